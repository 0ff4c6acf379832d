//! User story: three controllers share one fleet in etcd, and a release outlives any one of
//! them (issue 14, point 4). With only the first controller up, `release create` is refused
//! with a message that says why and what to do, and nothing of the artifact is kept. Once a
//! second controller is up the release is acknowledged, and by then the second one's data
//! directory holds the artifact. The second is SIGKILLed, a third started (it never saw the
//! release), the first (the one that took the release) SIGKILLed, and the second started again
//! on its data directory; the third leads (it campaigned first). An agent of the third
//! controller, the only one it knows, is rolled out to the release, so the third fetches the artifact from the second, checks it, keeps it
//! and serves it; the host serves the release.

use fleet_tests::etcd::Etcd;
use fleet_tests::fleet::{CtlOutput, Fleet};
use fleet_tests::process::ChildGuard;
use fleet_tests::wait_until;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long a controller may take to start, or a registry to see a change.
const DEADLINE: Duration = Duration::from_secs(30);

/// A loopback `IP:PORT` nothing listens on (bound, then freed).
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").to_string()
}

/// One more controller of the fleet: the fleet's config directory, a data directory and an
/// address of its own.
struct Controller {
    guard: ChildGuard,
    data_dir: PathBuf,
    url: String,
}

/// Starts `fleet-controller --config CONFIG --listen ADDR --data-dir DIR` as `name` and waits
/// for it to write its address.
fn start_controller(fleet: &Fleet, name: &str, addr: &str) -> Controller {
    let data_dir = fleet.dir().join(format!("{name}-data"));
    let _ = std::fs::remove_file(data_dir.join("controller.addr"));
    let mut command = Command::new(&fleet.bins.controller);
    command
        .arg("--config")
        .arg(fleet.config_dir().join("controller.toml"))
        .args(["--listen", addr, "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data_dir)
        .current_dir(fleet.dir());
    let log = fleet.dir().join(format!("logs/{name}.log"));
    let mut guard = ChildGuard::spawn(name, command, &log);
    wait_until(DEADLINE, &format!("{name} to write its address"), || {
        assert!(
            !guard.has_exited(),
            "{name} exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::fs::read_to_string(data_dir.join("controller.addr"))
            .is_ok_and(|text| text.trim() == addr)
    });
    Controller {
        guard,
        data_dir,
        url: format!("https://{addr}"),
    }
}

/// Waits until `fleetctl controllers`, asked through `via`, shows `leader` leading and lists
/// exactly `listed` (URLs, in any order).
fn wait_controllers(fleet: &Fleet, via: &str, leader: &str, listed: &[&str]) {
    let mut expected: Vec<&str> = listed.to_vec();
    expected.sort();
    wait_until(DEADLINE, &format!("{leader} to lead {listed:?}"), || {
        let out = fleet.ctl_via(via, &["controllers"]);
        let controllers = out.json["controllers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut urls: Vec<&str> = controllers
            .iter()
            .filter_map(|c| c["url"].as_str())
            .collect();
        urls.sort();
        out.code == 0
            && urls == expected
            && controllers
                .iter()
                .any(|c| c["url"] == leader && c["leader"] == true)
    });
}

/// Whether the data directory `data_dir` holds the artifact `digest`.
fn holds(data_dir: &Path, digest: &str) -> bool {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    data_dir.join("artifacts/sha256").join(hex).is_file()
}

/// The files in `dir`, none when it does not exist.
fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_release_is_kept_on_two_controllers_and_served_by_a_third_after_the_first_dies() {
    let Some(etcd) = Etcd::single() else {
        return;
    };
    let url = etcd.urls().join(",");
    let mut fleet = Fleet::start_with_init_args(0, &["--etcd", &url, "--etcd-prefix", "/replicas"]);
    let manifest = fleet_tests::web_manifest("10s");
    let artifact = fleet.web_artifact(&manifest, &[]);
    let create = |via: &str| -> CtlOutput {
        let artifact = artifact.display().to_string();
        fleet.ctl_via(via, &["release", "create", "web", "1.0.0", &artifact])
    };

    // One controller up: refused, saying why and what to do; nothing kept.
    let first_url = fleet.controller_url();
    wait_controllers(&fleet, &first_url, &first_url, &[&first_url]);
    let refused = create(&first_url).expect_code(2);
    assert!(
        refused.stderr.contains("only one controller is up")
            && refused
                .stderr
                .contains("a release must be stored on two before it is acknowledged")
            && refused.stderr.contains("start another controller"),
        "{}",
        refused.stderr
    );
    let first_data = fleet.controller_data_dir();
    assert_eq!(files_in(&first_data.join("artifacts/sha256")), 0);
    assert_eq!(files_in(&first_data.join("artifacts/tmp")), 0);
    assert!(
        fleet.ctl(&["releases", "web"]).expect_code(0).json["releases"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );

    // A second one up: acknowledged once the second holds it too.
    let second_addr = free_addr();
    let mut second = start_controller(&fleet, "second", &second_addr);
    wait_controllers(&fleet, &first_url, &first_url, &[&first_url, &second.url]);
    let created = create(&first_url).expect_code(0).json;
    let digest = created["release"]["artifact_digest"]
        .as_str()
        .expect("the release's digest")
        .to_string();
    assert!(holds(&first_data, &digest));
    assert!(
        holds(&second.data_dir, &digest),
        "acknowledged, so the second controller holds {digest} already"
    );
    // The same release again is a no-op that pushes again (the second answers at once).
    let again = create(&first_url).expect_code(0);
    assert_eq!(
        again.json["created"],
        Value::Bool(false),
        "{:#}",
        again.json
    );

    // The second goes down, a third that never saw the release comes up, the first (which
    // took the release) is SIGKILLed, and the second comes back on its data directory.
    second.guard.kill_now();
    let third = start_controller(&fleet, "third", &free_addr());
    assert!(!holds(&third.data_dir, &digest));
    fleet.kill_controller();
    let mut second = start_controller(&fleet, "second", &second_addr);
    // The third campaigned before the second came back: it leads.
    wait_controllers(&fleet, &third.url, &third.url, &[&third.url, &second.url]);

    // An agent that knows only the third: joined and rolled out through it.
    fleet.set_agent_controller_url(&third.url);
    let token = fleet
        .ctl_via(&third.url, &["join-token", "create"])
        .expect_code(0)
        .json["token"]
        .as_str()
        .expect("a join token")
        .to_string();
    fleet.start_agent_with_token("h1", &token);
    wait_until(DEADLINE, "h1 ready through the third controller", || {
        let out = fleet.ctl_via(&third.url, &["hosts"]);
        out.code == 0
            && out.json["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|h| h["name"] == "h1" && h["state"] == "ready")
    });
    let controllers = format!("{},{}", third.url, second.url);
    fleet
        .ctl_via(
            &controllers,
            &[
                "rollout", "web", "1.0.0", "--canary", "1", "--batch", "100%",
            ],
        )
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", DEADLINE);
    assert!(
        holds(&third.data_dir, &digest),
        "the third controller kept the artifact it fetched from the second"
    );
    let third_log = std::fs::read_to_string(fleet.dir().join("logs/third.log")).unwrap();
    assert!(
        third_log.contains("artifact fetched from another controller")
            && third_log.contains(&second.url),
        "{third_log}"
    );

    second.guard.kill_now();
    drop(third);
    drop(fleet);
    drop(etcd);
}
