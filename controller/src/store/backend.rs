//! The backend interface the record-level [`super::Store`] is written over: a transaction that
//! gets, ranges over, puts and deletes raw records of the store's tables, and commits as one.
//! `redb.rs` implements it over one file (the default), `etcd.rs` over an etcd cluster.
//!
//! Keys are text. The `events` table's keys are the event number zero-padded to 20 digits
//! ([`event_key`]), so that text order is number order in every backend. Values are bytes:
//! records as JSON, and the numbers of `counters` and `credential_uses` in decimal text.

use super::StoreError;

/// The tables of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Hosts,
    Releases,
    Rollouts,
    Events,
    Counters,
    /// Join tokens by the sha256 of the token (the token itself is never stored).
    JoinTokens,
    /// Every certificate the controller signed, by serial (hex): who it names and its role.
    Certificates,
    /// Revoked certificates by serial (hex); auth refuses them on every call.
    Revoked,
    /// When each operator or CI credential was last used, by serial (unix ms): written in
    /// batches by `FleetState::flush_credential_uses`, never once per call.
    CredentialUses,
    /// Standing deployments by `app/selector` (see `DeploymentRecord::key`).
    Deployments,
    /// Hosts moved between rollouts (by the converger or `replace`), by `converge<seq>/app`.
    Convergences,
}

impl Table {
    /// Every table, in the order a store dump lists them.
    pub const ALL: [Table; 11] = [
        Table::Hosts,
        Table::Releases,
        Table::Rollouts,
        Table::JoinTokens,
        Table::Certificates,
        Table::Revoked,
        Table::Deployments,
        Table::Convergences,
        Table::Events,
        Table::Counters,
        Table::CredentialUses,
    ];

    /// The table's name (in a store dump, a redb file and an etcd key).
    pub fn name(self) -> &'static str {
        match self {
            Table::Hosts => "hosts",
            Table::Releases => "releases",
            Table::Rollouts => "rollouts",
            Table::Events => "events",
            Table::Counters => "counters",
            Table::JoinTokens => "join_tokens",
            Table::Certificates => "certificates",
            Table::Revoked => "revoked",
            Table::CredentialUses => "credential_uses",
            Table::Deployments => "deployments",
            Table::Convergences => "convergences",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The key of event number `seq`: zero-padded so that keys sort as numbers.
pub fn event_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// Which records of a table a [`Txn::range`] returns: keys in `[from, below)` (either bound
/// may be open), at most `limit` of them (0: all), from the highest key down when `reverse`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    pub from: Option<String>,
    pub below: Option<String>,
    pub limit: usize,
    pub reverse: bool,
}

impl Range {
    /// The whole table.
    pub fn all() -> Range {
        Range::default()
    }

    /// The highest key only.
    pub fn last() -> Range {
        Range {
            limit: 1,
            reverse: true,
            ..Range::default()
        }
    }

    /// The lowest key only.
    pub fn first() -> Range {
        Range {
            limit: 1,
            ..Range::default()
        }
    }

    /// Whether `key` lies within the bounds (the limit aside).
    pub fn contains(&self, key: &str) -> bool {
        self.from.as_deref().is_none_or(|from| key >= from)
            && self.below.as_deref().is_none_or(|below| key < below)
    }
}

/// One transaction: reads see one consistent state (and, in a write, this transaction's own
/// writes); writes are applied together when the backend commits, or not at all.
pub trait Txn {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The records of `range`, in key order (highest first when reversed).
    fn range(&mut self, table: Table, range: &Range) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Refused in a read transaction.
    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Refused in a read transaction.
    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError>;
    /// Deletes every key of `table` below `below`, in one operation. Refused in a read
    /// transaction.
    fn delete_below(&mut self, table: Table, below: &str) -> Result<(), StoreError>;
}

/// The body of a transaction. A backend may run it more than once (an optimistic backend
/// runs it again after a conflict), so it must not keep results of an earlier run.
pub type Body<'a> = &'a mut dyn FnMut(&mut dyn Txn) -> Result<(), StoreError>;

/// A store backend: runs transactions.
pub trait Backend: Send + Sync {
    /// Runs `body` in a read-only transaction.
    fn read(&self, body: Body<'_>) -> Result<(), StoreError>;
    /// Runs `body` in a write transaction and commits it (durably) when it returns `Ok`.
    fn write(&self, body: Body<'_>) -> Result<(), StoreError>;
    /// What the store is, for messages: "the redb file PATH", "etcd at URL prefix P".
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_keys_sort_as_numbers() {
        let keys: Vec<String> = [1u64, 9, 10, 100, u64::MAX]
            .into_iter()
            .map(event_key)
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(event_key(42).parse::<u64>().unwrap(), 42);
    }

    #[test]
    fn ranges_hold_keys_within_their_bounds() {
        let range = Range {
            from: Some("b".into()),
            below: Some("d".into()),
            ..Range::default()
        };
        for (key, inside) in [("a", false), ("b", true), ("c9", true), ("d", false)] {
            assert_eq!(range.contains(key), inside, "{key}");
        }
        assert!(Range::all().contains(""));
    }

    #[test]
    fn every_table_has_a_name_that_names_it_back() {
        for table in Table::ALL {
            assert_eq!(Table::from_name(table.name()), Some(table));
        }
        assert_eq!(Table::from_name("nope"), None);
    }
}
