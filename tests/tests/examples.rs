//! The examples of `ansible-free-examples/`, each run the fleet way with real processes, and
//! checked as their README says a user would check them (what the hosts serve):
//! canary with automatic rollback, a database migration run once by the release hook (a real
//! SQLite file, migrated by `python3`), a config-only release (the same artifact, a new
//! `--env`), build once and promote from `env=staging` to `env=prod`, and replacing a host.
//! The migration example's `fleet.toml` and `migrate.py` are the files of the example itself.

use fleet_tests::fleet::Fleet;
use fleet_tests::sshd::{RemoteAgents, SshClient, Sshd};
use fleet_tests::{http, wait_until, web_manifest};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long hosts may take to serve what a rollout gave them.
const SERVE_DEADLINE: Duration = Duration::from_secs(20);
/// How long `fleetctl replace` may take (it bootstraps a host over SSH).
const REPLACE_DEADLINE: Duration = Duration::from_secs(240);

const MIGRATION_MANIFEST: &str = include_str!("../../ansible-free-examples/migration/fleet.toml");
const MIGRATION_SCRIPT: &str = include_str!("../../ansible-free-examples/migration/migrate.py");

/// Waits until host `name` answers `expect` on `path`.
fn wait_answers(fleet: &Fleet, name: &str, path: &str, expect: &str) {
    let what = format!("{name} to answer {expect:?} on {path}");
    wait_until(SERVE_DEADLINE, &what, || {
        fleet.web_get(name, path).as_deref() == Some(expect)
    });
}

/// The release of `version` as `releases web` shows it.
fn release<'a>(releases: &'a Value, version: &str) -> &'a Value {
    releases["releases"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["version"] == version))
        .unwrap_or_else(|| panic!("no release {version}: {releases:#}"))
}

/// Runs `python3 -c SCRIPT DATABASE` (what an operator would type to look at the database);
/// its stdout.
fn python_sqlite(script: &str, database: &Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(database)
        .output()
        .expect("run python3 (on every machine of the project)");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Example `canary-rollback/`.
#[test]
fn canary_rollback_a_broken_release_halts_at_the_canary_which_goes_back() {
    let fleet = Fleet::start(3);
    let artifact = fleet.web_artifact(&web_manifest("10s"), &[]);
    fleet
        .create_release("web", "1.0.0", &artifact, &[])
        .expect_code(0);
    fleet
        .create_release("web", "1.1.0", &artifact, &["WEB_BROKEN=1"])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", SERVE_DEADLINE);
    let pids_before: BTreeMap<String, u32> = fleet
        .host_names()
        .into_iter()
        .map(|name| {
            let pid = fleet.web_pid(&name).expect("a pid");
            (name, pid)
        })
        .collect();

    let out = fleet
        .ctl(&[
            "rollout",
            "web",
            "1.1.0",
            "--canary",
            "1",
            "--batch",
            "50%",
            "--smoke-timeout",
            "3s",
        ])
        .expect_code(1);
    assert_eq!(out.json["state"], "rolled_back", "{:#}", out.json);
    assert_eq!(out.json["waves"][0]["state"], "failed", "{:#}", out.json);
    assert_eq!(out.json["waves"][1]["state"], "pending", "{:#}", out.json);
    let canary = out.json["waves"][0]["hosts"][0]["host"]
        .as_str()
        .expect("the canary host")
        .to_string();

    // What a user checks: every host serves 1.0.0 again, and only the canary was touched.
    fleet.wait_all_serve("1.0.0", SERVE_DEADLINE);
    for (name, before) in &pids_before {
        let now = fleet.web_pid(name).expect("a pid");
        if *name == canary {
            assert_ne!(now, *before, "the canary took 1.1.0 and came back");
        } else {
            assert_eq!(now, *before, "{name} must never have been touched");
        }
    }
}

/// Example `migration/`.
#[test]
fn migration_the_release_hook_migrates_a_real_sqlite_database_once() {
    let fleet = Fleet::start(3);
    // The application's database, as it stands before the release: `users` without `email`.
    // It sits where the apps (users of their own) may write.
    let database = fleet.outbox().join("app.db");
    python_sqlite(
        "import sqlite3, sys\n\
         con = sqlite3.connect(sys.argv[1])\n\
         con.execute('CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)')\n\
         con.execute(\"INSERT INTO users (name) VALUES ('ada')\")\n\
         con.commit()",
        &database,
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o666))
        .expect("chmod the database");

    let artifact = fleet.web_artifact(
        MIGRATION_MANIFEST,
        &[("migrate.py", MIGRATION_SCRIPT.as_bytes())],
    );
    let env = format!("DATABASE={}", database.display());
    fleet
        .create_release("web", "1.1.0", &artifact, &[&env])
        .expect_code(0);
    let out = fleet
        .ctl(&[
            "rollout", "web", "1.1.0", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    assert_eq!(out.json["state"], "succeeded", "{:#}", out.json);
    fleet.wait_all_serve("1.1.0", SERVE_DEADLINE);

    let columns = python_sqlite(
        "import sqlite3, sys\n\
         con = sqlite3.connect(sys.argv[1])\n\
         print(','.join(row[1] for row in con.execute('PRAGMA table_info(users)')))",
        &database,
    );
    assert_eq!(columns, "id,name,email", "the migration added users.email");
    let counts = python_sqlite(
        "import sqlite3, sys\n\
         con = sqlite3.connect(sys.argv[1])\n\
         runs = con.execute('SELECT count(*) FROM hook_runs').fetchone()[0]\n\
         applied = con.execute('SELECT count(*) FROM schema_migrations').fetchone()[0]\n\
         kept = con.execute('SELECT name FROM users').fetchone()[0]\n\
         print(runs, applied, kept)",
        &database,
    );
    assert_eq!(
        counts, "1 1 ada",
        "the hook ran once for 3 hosts, applied one migration, and kept the data"
    );
}

/// Example `config-release/`.
#[test]
fn config_release_the_same_artifact_with_a_new_env_reaches_every_host() {
    let fleet = Fleet::start(2);
    let artifact = fleet.web_artifact(&web_manifest("10s"), &[]);
    fleet
        .create_release("web", "1.0.0", &artifact, &["WEB_GREETING=hello"])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", SERVE_DEADLINE);
    for name in fleet.host_names() {
        wait_answers(&fleet, &name, "/greeting", "hello\n");
    }

    // Only the configuration changes: the same bytes, a new version with a new --env.
    fleet
        .create_release("web", "1.0.1", &artifact, &["WEB_GREETING=bonjour"])
        .expect_code(0);
    fleet
        .ctl(&[
            "rollout", "web", "1.0.1", "--canary", "1", "--batch", "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.0.1", SERVE_DEADLINE);
    for name in fleet.host_names() {
        wait_answers(&fleet, &name, "/greeting", "bonjour\n");
    }
    let releases = fleet.ctl_ok(&["releases", "web"]);
    assert_eq!(
        release(&releases, "1.0.0")["artifact_digest"],
        release(&releases, "1.0.1")["artifact_digest"],
        "both releases are the same artifact: {releases:#}"
    );
}

/// Example `promote/`.
#[test]
fn promote_one_release_goes_to_staging_then_to_prod() {
    let fleet = Fleet::start(3);
    fleet.ctl_ok(&["label", "h1", "env=staging"]);
    fleet.ctl_ok(&["label", "h2", "env=prod"]);
    fleet.ctl_ok(&["label", "h3", "env=prod"]);
    // Built and uploaded once.
    fleet.create_web_releases(&["1.0.0"]);

    fleet
        .ctl(&["rollout", "web", "1.0.0", "--selector", "env=staging"])
        .expect_code(0);
    wait_answers(&fleet, "h1", "/", "web 1.0.0 on h1\n");
    for name in ["h2", "h3"] {
        assert_eq!(fleet.web_get(name, "/"), None, "prod is not touched yet");
    }

    // Staging looks good: the very same release goes to prod.
    fleet
        .ctl(&[
            "rollout",
            "web",
            "1.0.0",
            "--selector",
            "env=prod",
            "--canary",
            "1",
            "--batch",
            "100%",
        ])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", SERVE_DEADLINE);
    let releases = fleet.ctl_ok(&["releases", "web"]);
    assert_eq!(
        releases["releases"].as_array().map(Vec::len),
        Some(1),
        "one release, one upload: {releases:#}"
    );
    let deployments = fleet.ctl_ok(&["deployments", "web"]);
    assert_eq!(
        deployments["deployments"].as_array().map(Vec::len),
        Some(2),
        "staging and prod, both on 1.0.0: {deployments:#}"
    );
}

/// Example `replace-host/`.
#[test]
fn replace_host_the_new_host_ends_on_the_release() {
    let fleet = Fleet::start(1);
    let client = SshClient::new(&fleet.dir().join("ssh-client"));
    let Some(sshd) = Sshd::start(&fleet.dir().join("sshd"), &client.public_line) else {
        return;
    };
    let remote = fleet_tests::fleet::remote_parent(fleet.dir()).join("n1");
    let _agents = RemoteAgents {
        remote_dirs: vec![remote.clone()],
    };
    std::fs::write(&client.known_hosts, sshd.known_hosts_line() + "\n").unwrap();
    fleet.ctl_ok(&["label", "h1", "env=prod"]);
    fleet
        .create_web_release("1.0.0", &web_manifest("20s"), &[])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--selector", "env=prod"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", SERVE_DEADLINE);

    let new_addr = fleet.range.host_addr(1);
    let identity = client.identity.display().to_string();
    let known_hosts = client.known_hosts.display().to_string();
    let remote_text = remote.display().to_string();
    let url = sshd.url();
    let out = fleet.ctl_with_deadline(
        &[
            "replace",
            "h1",
            "--with",
            &url,
            "--name",
            "n1",
            "--advertise",
            &new_addr,
            "--identity",
            &identity,
            "--known-hosts",
            &known_hosts,
            "--remote-dir",
            &remote_text,
        ],
        REPLACE_DEADLINE,
    );
    if out.code != 0 {
        eprintln!("sshd log:\n{}", sshd.log_tail());
    }
    out.expect_code(0);

    // What a user checks: the new host serves the release, and it is the only host left.
    wait_until(SERVE_DEADLINE, "n1 to serve web 1.0.0", || {
        http::get_ok(&new_addr, "/").as_deref() == Some("web 1.0.0 on n1\n")
    });
    let hosts = fleet.ctl_ok(&["hosts"]);
    let names: Vec<&str> = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, vec!["n1"], "{hosts:#}");
}
