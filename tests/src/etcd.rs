//! Real etcd servers for the end-to-end tests: the harness the store's tests use too
//! (`fleet-etcd-harness`: one member or a cluster on loopback, killed by pid; skipped with a
//! line when `etcd` is missing, unless `FLEET_REQUIRE_ETCD=1`).

pub use fleet_etcd_harness::{binary, required, Etcd};
