//! User story: an operator rotates the fleet CA in two commands while the fleet runs: every
//! host moves to a certificate of the new CA by itself, apps untouched, and once the old CA is
//! retired a certificate of it is refused. (Renewals before certificates run out are
//! `certificate_renewal.rs`'s.)

use fleet_tests::fleet::Fleet;
use fleet_tests::{wait_for, wait_until, web_manifest};
use std::path::Path;
use std::time::{Duration, Instant};

fn agent_cert(fleet: &Fleet, host: &str) -> String {
    std::fs::read_to_string(fleet.agent(host).data_dir.join("tls/agent.pem")).unwrap_or_default()
}

fn issuer_of(cert_pem: &str) -> String {
    fleet_pki::identity::facts_of_pem(cert_pem)
        .map(|facts| facts.issuer)
        .unwrap_or_default()
}

/// The subject of the first CA of a bundle: the one that signs.
fn signing_ca_subject(bundle_path: &Path) -> String {
    let bundle = std::fs::read_to_string(bundle_path).unwrap();
    let first = fleet_pki::identity::split_pem_bundle(&bundle)
        .into_iter()
        .next()
        .unwrap();
    fleet_pki::identity::facts_of_pem(&first).unwrap().subject
}

#[test]
fn the_ca_is_rotated_while_the_fleet_runs() {
    let fleet = Fleet::start(2);
    fleet
        .create_web_release("1.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));
    let pids = [fleet.web_pid("h1").unwrap(), fleet.web_pid("h2").unwrap()];
    let config_dir = fleet.config_dir();
    let old_ca = signing_ca_subject(&config_dir.join("ca.pem"));

    // An operator's credential of the old CA, kept aside.
    let old_admin = fleet.dir().join("old-admin");
    std::fs::create_dir_all(&old_admin).unwrap();
    for file in ["client.pem", "client.key", "client.toml"] {
        std::fs::copy(config_dir.join(file), old_admin.join(file)).unwrap();
    }

    // h2 is frozen: its session stays open on its old certificate, so finishing is refused.
    fleet.pause_agent("h2", true);
    let started = Instant::now();
    fleet.ctl(&["ca", "rotate"]).expect_code(0);
    let new_ca = signing_ca_subject(&config_dir.join("ca.pem"));
    assert_ne!(new_ca, old_ca);
    let refused = fleet.ctl(&["ca", "rotate", "--finish"]);
    assert_ne!(refused.code, 0, "finish with h2 on the old CA: {refused:?}");
    assert!(
        refused.stderr.contains("h2") && refused.stderr.contains("old CA"),
        "{}",
        refused.stderr
    );
    fleet.pause_agent("h2", false);

    // Both hosts move to the new CA over their sessions.
    wait_until(
        Duration::from_secs(30),
        "both hosts on new-CA certificates",
        || {
            ["h1", "h2"]
                .iter()
                .all(|host| issuer_of(&agent_cert(&fleet, host)) == new_ca)
        },
    );
    let moved_after = started.elapsed();
    // Finishing succeeds once their sessions run on the new certificates.
    let finished = wait_for(Duration::from_secs(30), "ca rotate --finish", || {
        let out = fleet.ctl(&["ca", "rotate", "--finish"]);
        (out.code == 0).then_some(out)
    });
    eprintln!(
        "hosts moved in {moved_after:?}; finished after {:?}",
        started.elapsed()
    );
    assert_eq!(finished.json["finished"], true);
    let controller_pem = std::fs::read_to_string(config_dir.join("controller.pem")).unwrap();
    assert_eq!(issuer_of(&controller_pem), new_ca);

    // Agents drop the old CA from what they trust; apps never restarted; releases kept.
    wait_until(
        Duration::from_secs(30),
        "agents trust only the new CA",
        || {
            ["h1", "h2"].iter().all(|host| {
                let bundle = std::fs::read_to_string(fleet.agent(host).data_dir.join("tls/ca.pem"))
                    .unwrap_or_default();
                fleet_pki::identity::split_pem_bundle(&bundle).len() == 1
                    && issuer_of(&agent_cert(&fleet, host)) == new_ca
            })
        },
    );
    fleet.wait_hosts_ready(2);
    assert_eq!(
        [fleet.web_pid("h1").unwrap(), fleet.web_pid("h2").unwrap()],
        pids,
        "no app restarted"
    );
    fleet
        .create_web_release("2.0.0", &web_manifest("10s"), &[])
        .expect_code(0);
    fleet.ctl(&["rollout", "web", "2.0.0"]).expect_code(0);
    fleet.wait_all_serve("2.0.0", Duration::from_secs(30));

    // The old CA is retired: its credential is refused, although it trusts the new CA.
    std::fs::copy(config_dir.join("ca.pem"), old_admin.join("ca.pem")).unwrap();
    let out = fleet.ctl_in(&old_admin, &["hosts"]);
    assert_ne!(
        out.code, 0,
        "an old-CA credential after the rotation: {out:?}"
    );
    // The rotated admin credential in the config dir works.
    fleet.ctl_ok(&["hosts"]);
}
