//! `fleet-controller migrate --config controller.toml --to-etcd URL[,URL]`: copies a one-node
//! fleet's store (the redb file in its data directory) into an etcd prefix, through the
//! backend-neutral store dump (`Store::export`, `Store::import_into`), and says what to change
//! in controller.toml next. Refuses a prefix that holds data already: another fleet's, keys
//! without a fleet marker, or this fleet's ("already migrated"). The marker is written last,
//! so a copy that did not finish is never taken for a fleet's data.

use crate::config::{ControllerConfig, EtcdFile};
use crate::store::etcd::{ca_fingerprint, migrate_refusal, EtcdBackend, EtcdConfig};
use crate::store::{Store, StoreError};
use std::sync::Arc;

/// How many records one etcd transaction of the copy writes (below etcd's default
/// `--max-txn-ops` of 128).
const BATCH: usize = 100;

/// What `migrate` copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub records: u64,
}

/// Copies the redb store of `config` into etcd at `to`. The controller must be stopped (its
/// store file is locked while it runs).
pub fn migrate(config: &ControllerConfig, to: &EtcdConfig) -> Result<Migrated, String> {
    if config.etcd.is_some() {
        return Err(
            "controller.toml has an [etcd] table already: its store is in etcd, there is nothing to migrate"
                .into(),
        );
    }
    let store_file = config.data_dir.join(crate::store::STORE_FILE);
    if !store_file.exists() {
        return Err(format!(
            "there is no store at {}: is --config the controller.toml of the fleet to migrate?",
            store_file.display()
        ));
    }
    let store = Store::open(&config.data_dir).map_err(|e| match e {
        StoreError::Db(e) if matches!(*e, ::redb::Error::DatabaseAlreadyOpen) => format!(
            "{} is in use: stop the fleet-controller first (systemctl stop fleet-controller), then migrate",
            store_file.display()
        ),
        e => format!("cannot open the store {}: {e}", store_file.display()),
    })?;
    let ca = std::fs::read_to_string(&config.tls.ca)
        .map_err(|e| format!("cannot read the fleet CA {}: {e}", config.tls.ca.display()))?;
    let fingerprint = ca_fingerprint(&ca);
    let backend = EtcdBackend::connect(to).map_err(|e| e.to_string())?;
    let state = backend.prefix_state().map_err(|e| e.to_string())?;
    if let Some(why) = migrate_refusal(&state, &fingerprint) {
        return Err(format!("etcd at {} prefix {} {why}", to.url(), to.prefix));
    }
    let mut dump = Vec::new();
    store.export(&mut dump).map_err(|e| e.to_string())?;
    drop(store);
    let backend = Arc::new(backend);
    let records = Store::over(backend.clone())
        .import_into(dump.as_slice(), BATCH)
        .map_err(|e| e.to_string())?;
    backend.claim(&fingerprint).map_err(|e| e.to_string())?;
    Ok(Migrated { records })
}

/// The `[etcd]` table to add to controller.toml after a migrate to `to`. Pure.
pub fn etcd_table(to: &EtcdConfig) -> String {
    let file = EtcdFile {
        endpoints: to.endpoints.clone(),
        prefix: Some(to.prefix.clone()),
        ca: to.ca.as_ref().map(|p| p.display().to_string()),
        cert: to.cert.as_ref().map(|p| p.display().to_string()),
        key: to.key.as_ref().map(|p| p.display().to_string()),
    };
    #[derive(serde::Serialize)]
    struct Table {
        etcd: EtcdFile,
    }
    toml::to_string(&Table { etcd: file }).expect("an [etcd] table serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etcd_table_to_add_reads_back_as_the_same_config() {
        let to = EtcdConfig {
            endpoints: vec![
                "https://10.0.0.5:2379".into(),
                "https://10.0.0.6:2379".into(),
            ],
            prefix: "/fleet".into(),
            ca: Some("/etc/fleet/etcd-ca.pem".into()),
            cert: None,
            key: None,
        };
        let text = etcd_table(&to);
        assert!(text.starts_with("[etcd]\n"), "{text}");
        #[derive(serde::Deserialize)]
        struct Table {
            etcd: EtcdFile,
        }
        let back: Table = toml::from_str(&text).unwrap();
        assert_eq!(
            crate::config::check_etcd(&back.etcd, std::path::Path::new("/elsewhere")).unwrap(),
            to
        );
    }
}
