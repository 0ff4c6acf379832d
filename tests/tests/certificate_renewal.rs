//! User story: certificates renew themselves. A fleet made with `fleetctl init
//! --certificate-ttl 1m` runs for about three minutes: both hosts renew their certificates over
//! their sessions (events name the old and new serials, `fleetctl hosts` shows when the
//! current one expires), their apps never restart, and a rollout at the end succeeds on every
//! host. The admin credential `init` wrote renews itself on the calls made after two thirds
//! of its lifetime (its files replaced in place, the key 0600), and so does a CI credential
//! made with `credentials create --ttl 2m`, which keeps its own lifetime. A copy of the admin
//! credential in a read-only directory warns on every call when it expires and how to replace
//! it, and its calls still work. A revoked credential and a removed host cannot renew.

use fleet_proto::pb;
use fleet_tests::fleet::Fleet;
use fleet_tests::{grpc, wait_until, web_manifest};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn now_unix() -> i64 {
    fleet_proto::now_unix_ms() / 1000
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The identity of the certificate at `path`, if it can be read.
fn identity_at(path: &Path) -> Option<fleet_pki::Identity> {
    fleet_pki::Identity::from_pem(&read(path)).ok()
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The serials a file's certificate had, in order, as seen by polling it, and when the
/// current one expires.
#[derive(Default)]
struct Serials(Vec<String>, Option<fleet_pki::Identity>);

impl Serials {
    /// Notes the certificate at `path` now; returns true when it changed. A change comes after
    /// two thirds of the previous certificate's lifetime and before its end.
    fn note(&mut self, path: &Path) -> bool {
        let Some(identity) = identity_at(path) else {
            return false;
        };
        if self.0.last() == Some(&identity.serial) {
            return false;
        }
        if let Some(previous) = self.1.take() {
            let renew_at = fleet_pki::lifetime::renew_at(
                previous.not_before_unix_ms / 1000,
                previous.not_after_unix_ms / 1000,
            )
            .unwrap();
            let now = now_unix();
            assert!(
                now >= renew_at && now < previous.not_after_unix_ms / 1000,
                "{} renewed at {now}: after two thirds ({renew_at}) and before its end ({})",
                path.display(),
                previous.not_after_unix_ms / 1000
            );
        }
        self.0.push(identity.serial.clone());
        self.1 = Some(identity);
        true
    }

    fn renewals(&self) -> usize {
        self.0.len().saturating_sub(1)
    }
}

fn host_entry<'a>(hosts: &'a Value, host: &str) -> &'a Value {
    hosts["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["name"] == host))
        .unwrap_or_else(|| panic!("no host {host} in {hosts:#}"))
}

#[test]
fn certificates_renew_themselves_while_the_fleet_runs() {
    let fleet = Fleet::start_with_init_args(2, &["--certificate-ttl", "1m"]);
    let config_dir = fleet.config_dir();
    let hosts = ["h1", "h2"];
    let agent_pem = |host: &str| fleet.agent(host).data_dir.join("tls/agent.pem");
    fleet
        .create_web_release("1.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(30));
    let pids: Vec<u32> = hosts.iter().map(|h| fleet.web_pid(h).unwrap()).collect();
    // `init --certificate-ttl 1m`: the admin credential and the hosts' certificates live a
    // minute, back-dated 5 minutes against clock skew.
    let admin = identity_at(&config_dir.join("client.pem")).unwrap();
    assert_eq!(admin.lifetime(), Duration::from_secs(60));
    let h1 = fleet_pki::identity::facts_of_pem(&read(&agent_pem("h1"))).unwrap();
    assert_eq!(
        h1.not_after_unix - h1.not_before_unix,
        60 + fleet_pki::lifetime::BACKDATE_SECS
    );

    // A CI credential of its own lifetime, in a directory it may write.
    let ci = fleet.dir().join("ci");
    let ci_arg = ci.display().to_string();
    fleet.ctl_ok(&[
        "credentials",
        "create",
        "ci",
        "--role",
        "deployer",
        "--ttl",
        "2m",
        "--out",
        &ci_arg,
    ]);
    assert_eq!(
        identity_at(&ci.join("client.pem")).unwrap().lifetime(),
        Duration::from_secs(120)
    );

    // A copy of the admin credential fresh from a renewal, in a directory nobody may write
    // (its mode, which fleetctl respects even for root).
    let renewed_now = Instant::now();
    let mut admin_serials = Serials::default();
    admin_serials.note(&config_dir.join("client.pem"));
    wait_until(
        Duration::from_secs(70),
        "a renewal of the admin credential",
        || {
            fleet.ctl_ok(&["hosts"]);
            admin_serials.note(&config_dir.join("client.pem")) && admin_serials.renewals() >= 1
        },
    );
    eprintln!("admin credential renewed after {:?}", renewed_now.elapsed());
    let read_only = fleet.dir().join("read-only");
    std::fs::create_dir_all(&read_only).unwrap();
    for file in [
        "client.pem",
        "client.key",
        "ca.pem",
        "client.toml",
        "controller.addr",
    ] {
        std::fs::copy(config_dir.join(file), read_only.join(file)).unwrap();
        set_mode(&read_only.join(file), 0o400);
    }
    set_mode(&read_only, 0o555);
    let read_only_identity = identity_at(&read_only.join("client.pem")).unwrap();
    let out = fleet.ctl_in(&read_only, &["hosts"]).expect_code(0);
    assert!(
        !out.stderr.contains("warning"),
        "not due yet: {}",
        out.stderr
    );

    // About two more minutes: every host renews four times, the admin and CI credentials
    // renew on the calls made after two thirds of their lifetime, the read-only copy warns
    // once it is due. Every call made meanwhile works, and the hosts stay connected.
    let started = Instant::now();
    let mut host_serials: BTreeMap<&str, Serials> = BTreeMap::new();
    let mut ci_serials = Serials::default();
    ci_serials.note(&ci.join("client.pem"));
    let mut read_only_warned: Option<String> = None;
    let mut longest_gap = Duration::ZERO;
    let mut gap_started: Option<Instant> = None;
    wait_until(
        Duration::from_secs(240),
        "four renewals of every host",
        || {
            for host in hosts {
                host_serials.entry(host).or_default().note(&agent_pem(host));
            }
            let listed = fleet.ctl(&["hosts"]).expect_code(0).json;
            admin_serials.note(&config_dir.join("client.pem"));
            let all_connected = hosts
                .iter()
                .all(|host| host_entry(&listed, host)["connected"] == true);
            match (all_connected, gap_started) {
                (false, None) => gap_started = Some(Instant::now()),
                (true, Some(since)) => {
                    longest_gap = longest_gap.max(since.elapsed());
                    gap_started = None;
                }
                _ => {}
            }
            fleet.ctl_in(&ci, &["releases", "web"]).expect_code(0);
            ci_serials.note(&ci.join("client.pem"));
            // The read-only copy, while it is due but not expired yet.
            let due = fleet_pki::lifetime::renew_due(
                read_only_identity.not_before_unix_ms / 1000,
                read_only_identity.not_after_unix_ms / 1000,
                now_unix(),
            );
            if read_only_warned.is_none()
                && due
                && now_unix() < read_only_identity.not_after_unix_ms / 1000 - 3
            {
                let out = fleet.ctl_in(&read_only, &["hosts"]).expect_code(0);
                assert_eq!(out.json["hosts"].as_array().map(Vec::len), Some(2));
                read_only_warned = Some(out.stderr);
            }
            host_serials.values().all(|s| s.renewals() >= 4)
                && admin_serials.renewals() >= 4
                && ci_serials.renewals() >= 1
                && read_only_warned.is_some()
        },
    );
    eprintln!(
        "renewals after {:?}: hosts {:?}, admin {}, ci {}; longest time a host was seen disconnected: {longest_gap:?}",
        started.elapsed(),
        host_serials.iter().map(|(h, s)| (*h, s.renewals())).collect::<Vec<_>>(),
        admin_serials.renewals(),
        ci_serials.renewals()
    );
    assert!(longest_gap < Duration::from_secs(5), "{longest_gap:?}");

    // The read-only copy warned when it expires and how to replace it; its files are as they
    // were.
    let warned = read_only_warned.unwrap();
    let replace = format!(
        "fleetctl credentials create admin --role admin --ttl 1m --out {}.new",
        read_only.display()
    );
    assert!(
        warned.contains("cannot renew itself") && warned.contains(&replace),
        "{warned}"
    );
    assert!(warned.contains("is read-only"), "{warned}");
    assert_eq!(
        identity_at(&read_only.join("client.pem")).unwrap().serial,
        read_only_identity.serial
    );

    // The admin credential was replaced in place: same name, role and lifetime, the key
    // private, nothing left beside it.
    let renewed_admin = identity_at(&config_dir.join("client.pem")).unwrap();
    assert_eq!(
        (
            renewed_admin.name.as_str(),
            renewed_admin.role,
            renewed_admin.lifetime()
        ),
        ("admin", fleet_pki::Role::Admin, Duration::from_secs(60))
    );
    let key_mode = std::fs::metadata(config_dir.join("client.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let leftovers: Vec<String> = std::fs::read_dir(&config_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".renewed") || name.ends_with(".writing"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The CI credential kept its own lifetime and role.
    let renewed_ci = identity_at(&ci.join("client.pem")).unwrap();
    assert_eq!(
        (
            renewed_ci.name.as_str(),
            renewed_ci.role,
            renewed_ci.lifetime()
        ),
        ("ci", fleet_pki::Role::Deployer, Duration::from_secs(120))
    );

    // Every renewal is an event naming the old and the new serial.
    let events = fleet
        .ctl(&["events", "--limit", "500"])
        .expect_code(0)
        .json_lines();
    let renewal_event = |kind: &str, old: &str, new: &str| {
        events.iter().any(|event| {
            event["kind"] == kind
                && event["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(old) && m.contains(new))
        })
    };
    for (host, serials) in &host_serials {
        for pair in serials.0.windows(2) {
            assert!(
                renewal_event("host.certificate_renewed", &pair[0], &pair[1]),
                "no event for {host}'s renewal {pair:?}"
            );
        }
    }
    for pair in admin_serials.0.windows(2).chain(ci_serials.0.windows(2)) {
        assert!(
            renewal_event("credential.renewed", &pair[0], &pair[1]),
            "no event for the renewal {pair:?}"
        );
    }

    // `hosts` shows when each host's current certificate expires; `credentials list` shows
    // the credentials' expiry and which certificates were renewed.
    wait_until(
        Duration::from_secs(20),
        "hosts show their current certificates",
        || {
            let listed = fleet.ctl_ok(&["hosts"]);
            hosts.iter().all(|host| {
                let current = fleet_pki::identity::facts_of_pem(&read(&agent_pem(host))).unwrap();
                host_entry(&listed, host)["certificate_not_after_unix_ms"].as_i64()
                    == Some(current.not_after_unix * 1000)
            })
        },
    );
    let credentials = fleet.ctl_ok(&["credentials", "list"]);
    let current_ci = credentials
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["serial"] == renewed_ci.serial.as_str())
        .unwrap_or_else(|| panic!("no current ci certificate in {credentials:#}"));
    assert_eq!(
        current_ci["not_after_unix_ms"].as_i64(),
        Some(renewed_ci.not_after_unix_ms)
    );
    let first_ci = credentials
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["serial"] == ci_serials.0[0].as_str())
        .unwrap();
    assert_eq!(first_ci["renewed_by"], ci_serials.0[1].as_str());

    // Apps untouched by all of it, and a rollout succeeds on every host.
    let pids_now: Vec<u32> = hosts.iter().map(|h| fleet.web_pid(h).unwrap()).collect();
    assert_eq!(pids_now, pids, "no app restarted");
    fleet
        .create_web_release("2.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "2.0.0"]).expect_code(0);
    fleet.wait_all_serve("2.0.0", Duration::from_secs(30));

    // A revoked credential cannot renew, nor can a removed host.
    let runtime = grpc::runtime();
    let ci_identity = (read(&ci.join("client.pem")), read(&ci.join("client.key")));
    fleet.ctl_ok(&["credentials", "revoke", "ci"]);
    let (csr_pem, _key) = fleet_pki::request::new_key_and_request("ci").unwrap();
    let refused = runtime.block_on(async {
        let channel = grpc::channel(&fleet, Some(ci_identity)).await;
        pb::fleet_service_client::FleetServiceClient::new(channel)
            .renew_credential(pb::RenewCredentialRequest { csr_pem })
            .await
    });
    let status = refused.expect_err("a revoked credential renewed");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let h2_identity = (
        read(&fleet.agent("h2").data_dir.join("tls/agent.pem")),
        read(&fleet.agent("h2").data_dir.join("tls/agent.key")),
    );
    fleet.ctl_ok(&["remove", "h2"]);
    let (csr_pem, _key) = fleet_pki::request::new_key_and_request("h2").unwrap();
    let refused = runtime.block_on(async {
        let channel = grpc::channel(&fleet, Some(h2_identity)).await;
        pb::agent_service_client::AgentServiceClient::new(channel)
            .renew(pb::RenewRequest { csr_pem })
            .await
    });
    let status = refused.expect_err("a removed host renewed");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    eprintln!("whole test: {:?}", renewed_now.elapsed());
}
