//! User story: a release carries secrets (`--secret`, `--secret-file`). The instances of the
//! hosts it is rolled out to see them in their environment; nothing an operator or CI reads
//! back (`releases`, `history`, `status`, `events`, JSON or text) shows a value; a host the
//! release is not assigned to never receives them; on a host they sit only in the agent's
//! private state file, never in a directory an instance is given; and the same version with
//! other secrets is refused like other config.

use fleet_tests::fleet::Fleet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SECRET: &str = "hunter2-very-secret";
const FILE_SECRET: &str = "-----BEGIN KEY----- tls-key-material";

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path).is_ok_and(|bytes| {
            bytes
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())
        }) {
            found.push(path);
        }
    }
    found
}

#[test]
fn secrets_reach_only_the_instances_of_their_hosts_and_are_never_shown() {
    let fleet = Fleet::start(2);
    let secret_file = fleet.dir().join("tls.key");
    std::fs::write(&secret_file, FILE_SECRET).unwrap();
    let artifact = fleet.web_artifact(&fleet_tests::web_manifest("10s"), &[]);
    let artifact_text = artifact.display().to_string();
    let api_key = format!("API_KEY={SECRET}");
    let tls_key = format!("TLS_KEY={}", secret_file.display());
    let create = |version: &str, api_key: &str| {
        fleet.ctl(&[
            "release",
            "create",
            "web",
            version,
            &artifact_text,
            "--env",
            "GREETING=hi",
            "--secret",
            api_key,
            "--secret-file",
            &tls_key,
        ])
    };
    let created = create("1.0.0", &api_key).expect_code(0);
    assert_eq!(
        created.json["release"]["secrets"],
        serde_json::json!({"API_KEY": "***", "TLS_KEY": "***"})
    );
    // The same release again is a no-op; other secrets for the same version are refused.
    create("1.0.0", &api_key).expect_code(0);
    let other = create("1.0.0", "API_KEY=another");
    assert_eq!(other.code, 2, "{other:?}");
    assert!(other.stderr.contains("already exists"), "{}", other.stderr);

    // Only h1 is selected.
    fleet.ctl_ok(&["label", "h1", "vault=yes"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--selector", "vault=yes"])
        .expect_code(0);
    fleet_tests::wait_until(Duration::from_secs(10), "h1 to serve 1.0.0", || {
        fleet.web_get("h1", "/").as_deref() == Some("web 1.0.0 on h1\n")
    });
    let pid = fleet.web_pid("h1").expect("h1's instance");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert!(environ.contains(&api_key), "{environ:?}");
    assert!(environ.contains(&format!("TLS_KEY={FILE_SECRET}")));
    assert!(environ.contains(&"GREETING=hi".to_string()));

    // Nothing an operator reads shows a value, in text or JSON.
    for args in [
        &["releases", "web"][..],
        &["history", "web"],
        &["status"],
        &["hosts"],
        &["events"],
    ] {
        for json in [false, true] {
            let mut full: Vec<&str> = args.to_vec();
            if !json {
                full.extend(["--output", "text"]);
            }
            let out = fleet.ctl(&full).expect_code(0);
            for value in [SECRET, "tls-key-material"] {
                assert!(
                    !out.stdout.contains(value) && !out.stderr.contains(value),
                    "{full:?} shows a secret: {}",
                    out.stdout
                );
            }
        }
    }
    let releases = fleet.ctl(&["releases", "web", "--output", "text"]);
    assert!(
        releases.stdout.contains("API_KEY=***"),
        "{}",
        releases.stdout
    );

    // On the hosts: h2 never received it; on h1 only the agent's private state file holds it.
    let h2 = files_containing(&fleet.agent("h2").data_dir, SECRET);
    assert!(h2.is_empty(), "h2 holds the secret in {h2:?}");
    let h1_dir = fleet.agent("h1").data_dir.clone();
    let h1 = files_containing(&h1_dir, SECRET);
    assert_eq!(h1, [h1_dir.join("state.json")], "{h1:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&h1[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "state.json is {mode:o}");
    }
    let logs = files_containing(&fleet.dir().join("logs"), SECRET);
    assert!(logs.is_empty(), "a log shows the secret: {logs:?}");
}
