//! User story: a CI credential leaks. The admin lists the credentials (name, role, expiry,
//! last use), revokes the leaked one, and every call with it is refused at once, on a
//! connection opened before the revocation too. The last admin credential cannot be revoked;
//! when every admin credential is lost, `fleet-controller issue-admin` on the controller's host
//! makes a new one, and the controller records it.

use fleet_proto::pb;
use fleet_tests::fleet::Fleet;
use fleet_tests::{grpc, process};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// `fleetctl --config-dir DIR --controller URL --output json ARGS`: (exit code, json, stderr).
fn fleetctl_as(fleet: &Fleet, config_dir: &Path, args: &[&str]) -> (i32, Value, String) {
    let mut command = std::process::Command::new(&fleet.bins.fleetctl);
    command
        .arg("--config-dir")
        .arg(config_dir)
        .args(["--controller", &fleet.controller_url(), "--output", "json"])
        .args(args)
        .env_remove("FLEET_CONFIG_DIR")
        .env_remove("FLEET_CONTROLLER");
    let finished = process::run_with_deadline(command, Duration::from_secs(45));
    let json = serde_json::from_str(&finished.stdout).unwrap_or(Value::Null);
    (finished.code, json, finished.stderr)
}

fn credential<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no credential {name} in {list:#}"))
}

#[test]
fn a_revoked_credential_is_refused_at_once_even_on_an_open_connection() {
    let fleet = Fleet::start(1);
    let ci = fleet.dir().join("ci");
    fleet.ctl_ok(&[
        "credentials",
        "create",
        "ci",
        "--role",
        "deployer",
        "--out",
        &ci.display().to_string(),
    ]);
    let (code, _, stderr) = fleetctl_as(&fleet, &ci, &["hosts"]);
    assert_eq!(code, 0, "{stderr}");

    // Listed with its role, expiry and last use; init's admin is learned at its first use.
    let list = fleet.ctl_ok(&["credentials", "list"]);
    let listed = credential(&list, "ci");
    assert_eq!(listed["role"], "deployer");
    assert!(listed["not_after_unix_ms"].as_i64().unwrap() > fleet_proto::now_unix_ms());
    assert!(
        listed["last_used_unix_ms"].as_i64().unwrap() > 0,
        "ci was used: {list:#}"
    );
    assert_eq!(listed["revoked_unix_ms"], 0);
    assert_eq!(credential(&list, "admin")["role"], "admin");

    // A connection opened with ci's credential before the revocation.
    let ci_identity = (
        std::fs::read_to_string(ci.join("client.pem")).unwrap(),
        std::fs::read_to_string(ci.join("client.key")).unwrap(),
    );
    let runtime = grpc::runtime();
    let channel = runtime.block_on(grpc::channel(&fleet, Some(ci_identity)));
    let mut client = pb::fleet_service_client::FleetServiceClient::new(channel);
    runtime
        .block_on(client.list_hosts(pb::ListHostsRequest::default()))
        .expect("ci may list hosts before it is revoked");

    let revoked = fleet.ctl_ok(&["credentials", "revoke", "ci"]);
    assert_eq!(revoked["revoked"][0]["name"], "ci", "{revoked:#}");

    // The open connection's next call is refused, and so is a new one.
    let refused = runtime
        .block_on(client.list_hosts(pb::ListHostsRequest::default()))
        .expect_err("a revoked credential is refused on its open connection");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("was revoked"), "{refused:?}");
    let (code, _, stderr) = fleetctl_as(&fleet, &ci, &["hosts"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("`ci`") && stderr.contains("was revoked"),
        "{stderr}"
    );
    let list = fleet.ctl_ok(&["credentials", "list"]);
    assert!(credential(&list, "ci")["revoked_unix_ms"].as_i64().unwrap() > 0);
    let events = fleet.ctl(&["events"]).stdout;
    assert!(events.contains("credential.revoked"), "{events}");

    // Bad input: exit 2, saying why and what to do.
    for (args, says) in [
        (
            &["credentials", "revoke", "nobody"][..],
            "no credential `nobody`",
        ),
        (&["credentials", "revoke", "ci"], "revoked already"),
        (&["credentials", "revoke", "h1"], "is a host"),
        (
            &["credentials", "revoke", "admin"],
            "last live admin credential",
        ),
    ] {
        let out = fleet.ctl(args).expect_code(2);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    let out = fleet
        .ctl(&["credentials", "revoke", "admin"])
        .expect_code(2);
    assert!(
        out.stderr.contains("fleet-controller issue-admin"),
        "{}",
        out.stderr
    );
}

#[test]
fn issue_admin_makes_a_new_admin_on_the_controllers_host_and_it_is_recorded() {
    let fleet = Fleet::start(0);
    let out = fleet.dir().join("break-glass");
    let mut command = std::process::Command::new(&fleet.bins.controller);
    command
        .arg("issue-admin")
        .arg("--config")
        .arg(fleet.config_dir().join("controller.toml"))
        .arg("--out")
        .arg(&out);
    let finished = process::run_with_deadline(command, Duration::from_secs(30));
    assert_eq!(finished.code, 0, "{}", finished.stderr);
    assert!(
        finished.stdout.contains("break-glass"),
        "{}",
        finished.stdout
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("client.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // It works, and the running controller records it (with an event) at its first use.
    let (code, _, stderr) = fleetctl_as(&fleet, &out, &["hosts"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, list, stderr) = fleetctl_as(&fleet, &out, &["credentials", "list"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(credential(&list, "break-glass")["role"], "admin");
    let events = fleet.ctl(&["events"]).stdout;
    assert!(events.contains("credential.learned"), "{events}");

    // With a second admin, init's admin may be revoked (and is refused from then on).
    let (code, _, stderr) = fleetctl_as(&fleet, &out, &["credentials", "revoke", "admin"]);
    assert_eq!(code, 0, "{stderr}");
    let refused = fleet.ctl(&["hosts"]).expect_code(3);
    assert!(refused.stderr.contains("was revoked"), "{}", refused.stderr);

    // Never over an existing credential.
    let again = process::run_with_deadline(
        {
            let mut command = std::process::Command::new(&fleet.bins.controller);
            command
                .arg("issue-admin")
                .arg("--config")
                .arg(fleet.config_dir().join("controller.toml"))
                .arg("--out")
                .arg(&out);
            command
        },
        Duration::from_secs(30),
    );
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
}
