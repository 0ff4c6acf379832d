//! The default backend: every table in one redb file in the data directory. Every write is a
//! transaction that is fsynced before it returns, so a controller killed at any moment
//! restarts with every record it acknowledged. After an I/O error (a full disk) the file is
//! opened again on the next use, so the store works again once the cause is gone.
//!
//! The file's layout predates the backend interface and is kept: `events` has `u64` keys,
//! `counters` `u64` values and `credential_uses` `i64` values; every other table maps text
//! to JSON bytes. The conversions to the interface's text keys and values live here.

use super::backend::{Backend, Body, Range, Table, Txn};
use super::StoreError;
use redb::{Database, ReadableTable, TableDefinition};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The file name of the store inside the data directory.
pub const STORE_FILE: &str = "fleet.redb";

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const CREDENTIAL_USES: TableDefinition<&str, i64> = TableDefinition::new("credential_uses");

fn text(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

pub(super) fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

/// One redb file.
pub struct RedbBackend {
    /// The open database; `None` while it is being reopened after an I/O error.
    db: Mutex<Option<Arc<Database>>>,
    /// The database file, to reopen it.
    path: PathBuf,
}

impl RedbBackend {
    /// Opens (or creates) the file `STORE_FILE` in `data_dir`, with every table.
    pub fn open(data_dir: &Path) -> Result<RedbBackend, StoreError> {
        let path = data_dir.join(STORE_FILE);
        let db = Database::create(&path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        for table in Table::ALL {
            match table {
                Table::Events => drop(txn.open_table(EVENTS).map_err(db_err)?),
                Table::Counters => drop(txn.open_table(COUNTERS).map_err(db_err)?),
                Table::CredentialUses => drop(txn.open_table(CREDENTIAL_USES).map_err(db_err)?),
                _ => drop(txn.open_table(text(table)).map_err(db_err)?),
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(RedbBackend {
            db: Mutex::new(Some(Arc::new(db))),
            path,
        })
    }

    /// The names of the tables the file holds (to check that a dump leaves none out).
    pub fn table_names(&self) -> Result<Vec<String>, StoreError> {
        use redb::TableHandle;
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let names = txn
            .list_tables()
            .map_err(db_err)?
            .map(|t| t.name().to_string())
            .collect();
        Ok(names)
    }

    /// The open database, reopened first if an I/O error closed it.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let mut slot = self.db.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        // redb refuses every transaction after an I/O error until the database is opened
        // again; opening it checks (and if need be repairs) the file. It fails while a
        // transaction of the old handle is still alive, or while the disk is still full: then
        // this call fails and the next one tries again.
        let db = Database::create(&self.path).map_err(|e| {
            StoreError::Db(Box::new(redb::Error::Io(std::io::Error::other(format!(
                "the store is being reopened after an I/O error, and reopening failed: {}",
                redb::Error::from(e)
            )))))
        })?;
        tracing::info!("store reopened after an I/O error");
        let db = Arc::new(db);
        *slot = Some(db.clone());
        Ok(db)
    }

    /// After an I/O error (a full disk, say) redb answers every later transaction with
    /// "Previous I/O error occurred": the handle is dropped here so that the next call opens
    /// the database again, and the store works once the cause is gone, without a restart.
    fn reopen_after_io_error(&self, result: &Result<(), StoreError>) {
        let failed_io = matches!(
            result,
            Err(StoreError::Db(e)) if matches!(**e, redb::Error::Io(_) | redb::Error::PreviousIo)
        );
        if failed_io {
            let mut slot = self.db.lock().unwrap_or_else(|e| e.into_inner());
            if slot.take().is_some() {
                tracing::warn!("the store had an I/O error; it is opened again on its next use");
            }
        }
    }
}

impl Backend for RedbBackend {
    fn read(&self, body: Body<'_>) -> Result<(), StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        body(&mut ReadTxn(&txn))
    }

    fn write(&self, body: Body<'_>) -> Result<(), StoreError> {
        let db = self.db()?;
        let result = (|| {
            let txn = db.begin_write().map_err(db_err)?;
            body(&mut WriteTxn(&txn))?;
            txn.commit().map_err(db_err)
        })();
        drop(db);
        self.reopen_after_io_error(&result);
        result
    }

    fn describe(&self) -> String {
        format!("the redb file {}", self.path.display())
    }
}

struct ReadTxn<'a>(&'a redb::ReadTransaction);
struct WriteTxn<'a>(&'a redb::WriteTransaction);

fn bounds(range: &Range) -> (Bound<&str>, Bound<&str>) {
    (
        range
            .from
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Included),
        range
            .below
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Excluded),
    )
}

fn seq(key: &str) -> Result<u64, StoreError> {
    key.parse()
        .map_err(|_| StoreError::Dump(format!("event key {key:?} is not a number")))
}

fn seq_bounds(range: &Range) -> Result<(Bound<u64>, Bound<u64>), StoreError> {
    Ok((
        match range.from.as_deref() {
            Some(from) => Bound::Included(seq(from)?),
            None => Bound::Unbounded,
        },
        match range.below.as_deref() {
            Some(below) => Bound::Excluded(seq(below)?),
            None => Bound::Unbounded,
        },
    ))
}

/// Takes `range.limit` items (all when 0) from the front, or from the back when reversed.
fn take<I>(items: I, range: &Range) -> Result<Vec<(String, Vec<u8>)>, StoreError>
where
    I: DoubleEndedIterator<Item = Result<(String, Vec<u8>), redb::StorageError>>,
{
    let limit = if range.limit == 0 {
        usize::MAX
    } else {
        range.limit
    };
    let items: Box<dyn Iterator<Item = _>> = if range.reverse {
        Box::new(items.rev())
    } else {
        Box::new(items)
    };
    items.take(limit).map(|item| item.map_err(db_err)).collect()
}

/// The reads, for a read-only and a writable table alike.
macro_rules! reads {
    () => {
        fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let txn = self.0;
            Ok(match table {
                Table::Events => txn
                    .open_table(EVENTS)
                    .map_err(db_err)?
                    .get(seq(key)?)
                    .map_err(db_err)?
                    .map(|v| v.value().to_vec()),
                Table::Counters => txn
                    .open_table(COUNTERS)
                    .map_err(db_err)?
                    .get(key)
                    .map_err(db_err)?
                    .map(|v| v.value().to_string().into_bytes()),
                Table::CredentialUses => txn
                    .open_table(CREDENTIAL_USES)
                    .map_err(db_err)?
                    .get(key)
                    .map_err(db_err)?
                    .map(|v| v.value().to_string().into_bytes()),
                _ => txn
                    .open_table(text(table))
                    .map_err(db_err)?
                    .get(key)
                    .map_err(db_err)?
                    .map(|v| v.value().to_vec()),
            })
        }

        fn range(
            &mut self,
            table: Table,
            range: &Range,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            let txn = self.0;
            match table {
                Table::Events => {
                    let t = txn.open_table(EVENTS).map_err(db_err)?;
                    let items = t.range(seq_bounds(range)?).map_err(db_err)?;
                    take(
                        items.map(|i| {
                            i.map(|(k, v)| {
                                (super::backend::event_key(k.value()), v.value().to_vec())
                            })
                        }),
                        range,
                    )
                }
                Table::Counters => {
                    let t = txn.open_table(COUNTERS).map_err(db_err)?;
                    let items = t.range::<&str>(bounds(range)).map_err(db_err)?;
                    take(
                        items.map(|i| {
                            i.map(|(k, v)| {
                                (k.value().to_string(), v.value().to_string().into_bytes())
                            })
                        }),
                        range,
                    )
                }
                Table::CredentialUses => {
                    let t = txn.open_table(CREDENTIAL_USES).map_err(db_err)?;
                    let items = t.range::<&str>(bounds(range)).map_err(db_err)?;
                    take(
                        items.map(|i| {
                            i.map(|(k, v)| {
                                (k.value().to_string(), v.value().to_string().into_bytes())
                            })
                        }),
                        range,
                    )
                }
                _ => {
                    let t = txn.open_table(text(table)).map_err(db_err)?;
                    let items = t.range::<&str>(bounds(range)).map_err(db_err)?;
                    take(
                        items.map(|i| i.map(|(k, v)| (k.value().to_string(), v.value().to_vec()))),
                        range,
                    )
                }
            }
        }
    };
}

fn read_only() -> StoreError {
    StoreError::Interrupted("a write in a read-only transaction (a bug)".into())
}

impl Txn for ReadTxn<'_> {
    reads!();

    fn put(&mut self, _: Table, _: &str, _: &[u8]) -> Result<(), StoreError> {
        Err(read_only())
    }
    fn delete(&mut self, _: Table, _: &str) -> Result<(), StoreError> {
        Err(read_only())
    }
    fn delete_below(&mut self, _: Table, _: &str) -> Result<(), StoreError> {
        Err(read_only())
    }
}

fn number<T: std::str::FromStr>(table: Table, key: &str, value: &[u8]) -> Result<T, StoreError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            StoreError::Dump(format!(
                "the value of {key} in {} is not a number",
                table.name()
            ))
        })
}

impl Txn for WriteTxn<'_> {
    reads!();

    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.0;
        match table {
            Table::Events => {
                txn.open_table(EVENTS)?.insert(seq(key)?, value)?;
            }
            Table::Counters => {
                let value: u64 = number(table, key, value)?;
                txn.open_table(COUNTERS)?.insert(key, value)?;
            }
            Table::CredentialUses => {
                let value: i64 = number(table, key, value)?;
                txn.open_table(CREDENTIAL_USES)?.insert(key, value)?;
            }
            _ => {
                txn.open_table(text(table))?.insert(key, value)?;
            }
        }
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &str) -> Result<(), StoreError> {
        let txn = self.0;
        match table {
            Table::Events => {
                txn.open_table(EVENTS)?.remove(seq(key)?)?;
            }
            Table::Counters => {
                txn.open_table(COUNTERS)?.remove(key)?;
            }
            Table::CredentialUses => {
                txn.open_table(CREDENTIAL_USES)?.remove(key)?;
            }
            _ => {
                txn.open_table(text(table))?.remove(key)?;
            }
        }
        Ok(())
    }

    fn delete_below(&mut self, table: Table, below: &str) -> Result<(), StoreError> {
        let txn = self.0;
        match table {
            Table::Events => {
                txn.open_table(EVENTS)?
                    .retain_in(..seq(below)?, |_, _| false)?;
            }
            Table::Counters => {
                txn.open_table(COUNTERS)?
                    .retain_in::<&str, _>(..below, |_, _| false)?;
            }
            Table::CredentialUses => {
                txn.open_table(CREDENTIAL_USES)?
                    .retain_in::<&str, _>(..below, |_, _| false)?;
            }
            _ => {
                txn.open_table(text(table))?
                    .retain_in::<&str, _>(..below, |_, _| false)?;
            }
        }
        Ok(())
    }
}
