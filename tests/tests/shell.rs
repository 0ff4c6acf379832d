//! What fleetctl gives the operator's shell, checked as a user would: the bash completion
//! script loads into a real bash and registers itself, every shell it names works and an
//! unknown one is told which do, `fleetctl man` names every verb and `--dir` gets a page per
//! verb; `rollout --dry-run` prints the plan and changes nothing; hosts are listed in natural
//! order (`h2` before `h10`) by hosts, status, history and a rollout's waves; a rollout's
//! progress is today's timestamped lines when stdout is not a terminal, and a bar on one.

use fleet_tests::bins::Bins;
use fleet_tests::fleet::Fleet;
use fleet_tests::process;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `program args...` with no fleet configuration from the environment.
fn run(program: &Path, args: &[&str]) -> process::Finished {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(program);
    command
        .args(args)
        .env("HOME", home.path())
        .env_remove("FLEET_CONFIG_DIR")
        .env_remove("FLEET_CONTROLLER");
    process::run_with_deadline(command, DEADLINE)
}

/// The verbs `fleetctl --help` lists (its "Commands:" section), but `help`.
fn verbs_in_help(fleetctl: &Path) -> Vec<String> {
    let help = run(fleetctl, &["--help"]);
    assert_eq!(help.code, 0, "{}", help.stderr);
    help.stdout
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|verb| *verb != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn completions_load_in_bash_and_the_manual_names_every_verb() {
    let bins = Bins::locate();
    let fleetctl = bins.fleetctl.display().to_string();

    // The bash script, sourced into a real bash, registers a completion for fleetctl.
    let mut bash = Command::new("bash");
    bash.arg("-c").arg(format!(
        "set -e; source <('{fleetctl}' completions bash); complete -p fleetctl"
    ));
    let loaded = process::run_with_deadline(bash, DEADLINE);
    assert!(
        loaded.code == 0 && loaded.stdout.contains("fleetctl"),
        "bash did not load the completion (exit {}):\nstdout: {}\nstderr: {}",
        loaded.code,
        loaded.stdout,
        loaded.stderr
    );

    // It completes the verbs: COMPREPLY after `fleetctl roll<TAB>`.
    let mut bash = Command::new("bash");
    bash.arg("-c").arg(format!(
        "source <('{fleetctl}' completions bash); \
         COMP_WORDS=(fleetctl roll); COMP_CWORD=1; COMP_LINE='fleetctl roll'; COMP_POINT=13; \
         func=$(complete -p fleetctl | sed -E 's/.*-F ([^ ]+).*/\\1/'); \
         \"$func\" fleetctl roll fleetctl; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    ));
    let completed = process::run_with_deadline(bash, DEADLINE);
    let words: Vec<&str> = completed.stdout.lines().collect();
    assert!(
        words.contains(&"rollout") && words.contains(&"rollback"),
        "`fleetctl roll<TAB>` offered {words:?}; stderr: {}",
        completed.stderr
    );

    for (shell, marker) in [
        ("zsh", "#compdef fleetctl"),
        ("fish", "complete -c fleetctl"),
    ] {
        let script = run(&bins.fleetctl, &["completions", shell]);
        assert_eq!(script.code, 0, "{shell}: {}", script.stderr);
        assert!(script.stdout.contains(marker), "{shell}: {}", script.stdout);
    }

    // An unknown shell: usage error (2), and the message lists the shells there are.
    let unknown = run(&bins.fleetctl, &["completions", "tcsh"]);
    assert_eq!(unknown.code, 2, "{}", unknown.stderr);
    for shell in ["bash", "zsh", "fish"] {
        assert!(unknown.stderr.contains(shell), "{}", unknown.stderr);
    }

    // The manual page on stdout names every verb `--help` lists.
    let verbs = verbs_in_help(&bins.fleetctl);
    assert!(verbs.len() > 20, "{verbs:?}");
    let man = run(&bins.fleetctl, &["man"]);
    assert_eq!(man.code, 0, "{}", man.stderr);
    assert!(man.stdout.contains(".TH fleetctl 1"), "{}", man.stdout);
    for verb in &verbs {
        assert!(
            man.stdout
                .contains(&format!("fleetctl\\-{}", verb.replace('-', "\\-"))),
            "the manual page does not name {verb}"
        );
    }

    // With --dir: one page per verb, each a roff page of its own.
    let dir = tempfile::tempdir().unwrap();
    let pages_dir = dir.path().join("man1");
    let written = run(
        &bins.fleetctl,
        &["man", "--dir", &pages_dir.display().to_string()],
    );
    assert_eq!(written.code, 0, "{}", written.stderr);
    for verb in verbs.iter().map(String::as_str).chain(["rollout-status"]) {
        let page = pages_dir.join(format!("fleetctl-{verb}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.contains(".TH fleetctl-"), "{}", page.display());
    }
    assert!(pages_dir.join("fleetctl.1").is_file());
}

/// Runs fleetctl against `fleet` with text output (the harness's `ctl` asks for JSON), with
/// stdin, stdout and stderr not a terminal.
fn ctl_text(fleet: &Fleet, args: &[&str]) -> process::Finished {
    let mut command = Command::new(&fleet.bins.fleetctl);
    command
        .arg("--config-dir")
        .arg(fleet.config_dir())
        .arg("--controller")
        .arg(fleet.controller_url())
        .args(args)
        .env("HOME", fleet.dir())
        .env_remove("FLEET_CONFIG_DIR")
        .env_remove("FLEET_CONTROLLER");
    process::run_with_deadline(command, DEADLINE)
}

fn wave_hosts(rollout: &Value) -> Vec<Vec<String>> {
    rollout["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|wave| {
            wave["hosts"]
                .as_array()
                .expect("wave hosts")
                .iter()
                .map(|h| h["host"].as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn a_dry_run_changes_nothing_and_hosts_sort_naturally() {
    // h1, h2 and h10: in plain order h10 would come second.
    let mut fleet = Fleet::start(2);
    fleet.start_agent("h10");
    fleet.wait_hosts_ready(3);
    fleet.create_web_releases(&["1.0.0", "1.1.0"]);

    // A first rollout, followed in text without a terminal: today's lines on stderr, no
    // escape codes, the result on stdout.
    let first = ctl_text(
        &fleet,
        &["rollout", "web", "1.0.0", "--canary", "1", "--batch", "1"],
    );
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    let progress: Vec<&str> = first.stderr.lines().collect();
    assert!(
        progress.len() >= 3
            && progress
                .iter()
                .all(|line| line.starts_with('[') && line.contains("s] ")),
        "progress lines: {progress:?}"
    );
    assert!(
        !first.stderr.contains('\x1b') && !first.stdout.contains('\x1b'),
        "escape codes without a terminal: {:?}",
        first.stderr
    );
    assert!(first.stdout.contains("succeeded"), "{}", first.stdout);
    // The waves went in natural order.
    let wave_lines: Vec<&str> = first
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("wave "))
        .collect();
    assert_eq!(wave_lines.len(), 3, "{}", first.stdout);
    for (line, host) in wave_lines.iter().zip(["h1", "h2", "h10"]) {
        assert!(line.contains(&format!(": {host} passed")), "{line}");
    }
    fleet.wait_all_serve("1.0.0", DEADLINE);

    let history_before = fleet.ctl_ok(&["history", "web"]);
    let rollout_events = || -> Vec<Value> {
        fleet
            .ctl(&["events", "--limit", "1000"])
            .json_lines()
            .into_iter()
            .filter(|e| {
                e["kind"].as_str().unwrap_or("").starts_with("rollout")
                    || e["message"].as_str().unwrap_or("").contains("1.1.0")
            })
            .collect()
    };
    let events_before = rollout_events();

    // The dry run: the plan of 1.1.0, in natural order, and the budget.
    let planned = fleet.ctl_ok(&[
        "rollout",
        "web",
        "1.1.0",
        "--canary",
        "1",
        "--batch",
        "1",
        "--max-unavailable",
        "1",
        "--dry-run",
    ]);
    assert_eq!(planned["state"], "planned", "{planned}");
    assert_eq!(
        wave_hosts(&planned),
        [vec!["h1"], vec!["h2"], vec!["h10"]],
        "{planned}"
    );
    assert_eq!(planned["max_unavailable"], 1, "{planned}");
    for wave in planned["waves"].as_array().unwrap() {
        for host in wave["hosts"].as_array().unwrap() {
            assert_eq!(host["previous_version"], "1.0.0", "{planned}");
        }
    }
    let text = ctl_text(
        &fleet,
        &["rollout", "web", "1.1.0", "--batch", "2", "--dry-run"],
    );
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout
            .starts_with("plan: web@1.1.0 to 3 host(s) in 2 wave(s)")
            && text.stdout.contains(
                "wave 1 (canary): h1 (from 1.0.0)\n  wave 2: h2 (from 1.0.0), h10 (from 1.0.0)\n"
            )
            && text.stdout.contains("budget: at most ")
            && text.stdout.contains("nothing was changed"),
        "{}",
        text.stdout
    );
    // A dry run is refused for what a start would be refused for.
    let missing = fleet.ctl(&["rollout", "web", "9.9.9", "--dry-run"]);
    assert_ne!(missing.code, 0);
    assert!(
        missing.stderr.contains("does not exist"),
        "{}",
        missing.stderr
    );

    // Nothing changed: no rollout in history, no event, every host still on 1.0.0.
    let history_after = fleet.ctl_ok(&["history", "web"]);
    assert_eq!(
        history_after["rollouts"].as_array().map(Vec::len),
        history_before["rollouts"].as_array().map(Vec::len),
        "{history_after}"
    );
    assert!(
        !history_after.to_string().contains("1.1.0"),
        "{history_after}"
    );
    assert_eq!(rollout_events(), events_before, "a dry run recorded events");
    let status = fleet.status("web");
    for host in ["h1", "h2", "h10"] {
        let actual = Fleet::actual_of(&status, host, "web").expect("an instance");
        assert_eq!(actual["version"], "1.0.0", "{host}: {status}");
    }
    for agent in ["h1", "h2", "h10"] {
        assert_eq!(
            fleet.web_get(agent, "/").as_deref(),
            Some(format!("web 1.0.0 on {agent}\n").as_str())
        );
    }
    // Nothing is under way either (a dry run reserves nothing).
    let status_text = ctl_text(&fleet, &["status", "web"]);
    assert!(status_text.stdout.contains("no rollout in progress"));

    // Natural order in hosts (JSON and text), status and history.
    let hosts = fleet.ctl_ok(&["hosts"]);
    let listed: Vec<String> = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ["h1", "h2", "h10"]);
    for verb in [&["hosts"][..], &["status"], &["status", "web"]] {
        let out = ctl_text(&fleet, verb);
        let order: Vec<&str> = out
            .stdout
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|first| first.starts_with('h') && first.len() <= 3)
            .collect();
        assert_eq!(order, ["h1", "h2", "h10"], "{verb:?}:\n{}", out.stdout);
    }
    let rollout = &history_after["rollouts"][0];
    assert_eq!(wave_hosts(rollout), [vec!["h1"], vec!["h2"], vec!["h10"]]);
}

#[test]
fn a_rollout_on_a_terminal_shows_a_bar() {
    let Some(script) = ["/usr/bin/script", "/bin/script"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "script(1) is missing under CI: it comes with util-linux"
        );
        eprintln!("skipping: script(1) is not installed, so no terminal can be given to fleetctl");
        return;
    };
    let fleet = Fleet::start(2);
    fleet.create_web_releases(&["1.0.0"]);
    // script(1) runs fleetctl on a pseudo-terminal and copies what it drew.
    let fleetctl = format!(
        "'{}' --config-dir '{}' --controller '{}' rollout web 1.0.0 --canary 1 --batch 1",
        fleet.bins.fleetctl.display(),
        fleet.config_dir().display(),
        fleet.controller_url()
    );
    let mut command = Command::new(script);
    command
        .args(["-q", "-e", "-c", &fleetctl, "/dev/null"])
        .env("HOME", fleet.dir())
        .env("TERM", "xterm")
        .env_remove("FLEET_CONFIG_DIR")
        .env_remove("FLEET_CONTROLLER");
    let drawn = process::run_with_deadline(command, DEADLINE);
    assert_eq!(drawn.code, 0, "{}\n{}", drawn.stdout, drawn.stderr);
    // The bar (hosts done of all) was drawn, and the progress lines were printed above it.
    assert!(
        drawn.stdout.contains("/2 hosts"),
        "no bar on a terminal:\n{:?}",
        drawn.stdout
    );
    assert!(drawn.stdout.contains("s] rollout r"), "{:?}", drawn.stdout);
    assert!(drawn.stdout.contains("succeeded"), "{:?}", drawn.stdout);
}
