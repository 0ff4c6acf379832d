//! Several controllers of one fleet on etcd, for the end-to-end tests and `fleet-bench
//! failover`: start another controller on the fleet's config with a data directory and an
//! address of its own, ask `fleetctl controllers` who leads, and see which app pid each host
//! serves a version with (to tell a host updated once from one updated twice).

use crate::fleet::Fleet;
use crate::process::ChildGuard;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// A loopback `IP:PORT` nothing listens on (bound, then freed).
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").to_string()
}

/// Starts another controller of the fleet with `config` (in the fleet's config directory) on
/// `listen`, with a data directory of its own (`NAME-data` in the fleet's directory, kept
/// across restarts); its log is `logs/NAME.log`.
pub fn start_controller(fleet: &Fleet, config: &Path, name: &str, listen: &str) -> ChildGuard {
    let data = fleet.dir().join(format!("{name}-data"));
    let mut command = Command::new(&fleet.bins.controller);
    command
        .arg("--config")
        .arg(config)
        .args(["--listen", listen])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "info")
        .current_dir(fleet.dir());
    let log = fleet.dir().join(format!("logs/{name}.log"));
    ChildGuard::spawn(name, command, &log)
}

/// `fleetctl controllers` through `via` (a URL or a list): the leader's URL if one leads, and
/// how many controllers are listed; `None` when no controller of `via` answered.
pub fn leader_via(fleet: &Fleet, via: &str) -> Option<(Option<String>, usize)> {
    let out = fleet.ctl_via(via, &["controllers"]);
    if out.code != 0 {
        return None;
    }
    let listed = out.json["controllers"].as_array()?.clone();
    let leader = listed
        .iter()
        .find(|c| c["leader"] == Value::Bool(true))
        .and_then(|c| c["url"].as_str())
        .map(str::to_string);
    Some((leader, listed.len()))
}

/// Each host's web pid while it serves `version` (hosts not serving it are left out).
pub fn pids_serving(fleet: &Fleet, version: &str) -> BTreeMap<String, u32> {
    let mut pids = BTreeMap::new();
    for name in fleet.host_names() {
        let serving = fleet.web_get(&name, "/").as_deref()
            == Some(format!("web {version} on {name}\n").as_str());
        if serving {
            if let Some(pid) = fleet.web_pid(&name) {
                pids.insert(name, pid);
            }
        }
    }
    pids
}

/// A web manifest whose instances must stay up `min_healthy` to pass: waves that take seconds.
pub fn slow_manifest(min_healthy: &str) -> String {
    crate::web_manifest("10s").replace(
        "stop_timeout = \"5s\"\n",
        &format!("stop_timeout = \"5s\"\nmin_healthy = \"{min_healthy}\"\n"),
    )
}
