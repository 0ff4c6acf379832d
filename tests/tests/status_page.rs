//! User story: during an incident an operator opens the controller's status page in a browser
//! (a real headless Chromium, as Debian ships it) and sees what runs where, hosts by name with
//! their releases, and a paused rollout; once it is resumed, the page (which the test loads
//! again and again, as a person would glance at it) shows the rollout moving from wave to
//! wave, and its script keeps redrawing from `/api/status` without a reload. Skips when no
//! `chromium` is installed (scripts/test.sh installs it).

use fleet_tests::fleet::Fleet;
use fleet_tests::{process, wait_for, wait_until};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Debian's `chromium` (or Ubuntu's `chromium-browser`) on the PATH.
fn chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    let dirs: Vec<std::path::PathBuf> = std::env::split_paths(&path).collect();
    ["chromium", "chromium-browser"]
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|p| p.exists())
}

/// The page's DOM after its script ran for a couple of (virtual) seconds.
fn dump_dom(chromium: &Path, profile: &Path, url: &str) -> String {
    let mut command = Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            // Nothing but the page: no updates, no sync, no metrics, no name lookups.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--no-first-run",
            "--no-default-browser-check",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=2500",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .env("HOME", profile);
    let out = process::run_with_deadline(command, Duration::from_secs(60));
    assert_eq!(out.code, 0, "chromium failed: {}", out.stderr);
    out.stdout
}

/// The label of the wave the page marks current, if a rollout is shown.
fn current_wave(dom: &str) -> Option<String> {
    let at = dom.find("current\" data-wave-state=")?;
    let rest = &dom[at..];
    let label = rest.split("<b>").nth(1)?.split("</b>").next()?;
    let state = rest.split("data-wave-state=\"").nth(1)?.split('"').next()?;
    Some(format!("{label} {state}"))
}

fn refreshes(dom: &str) -> u32 {
    dom.split("id=\"refreshes\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_status_page_shows_hosts_releases_and_a_rollout_moving_from_wave_to_wave() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: no chromium (apt-get install chromium)");
        return;
    };
    let fleet = Fleet::start(3);
    let url = format!("http://{}/", fleet.http_addr());
    let profile = fleet.dir().join("chromium-profile");
    std::fs::create_dir_all(&profile).unwrap();

    fleet.create_web_releases(&["1.0.0", "2.0.0"]);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "3"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(20));

    let dom = dump_dom(&chromium, &profile, &url);
    for host in ["h1", "h2", "h3"] {
        assert!(
            dom.contains(&format!("data-host=\"{host}\"")),
            "{host}:\n{dom}"
        );
    }
    assert!(dom.matches("web@1.0.0 running").count() >= 3, "{dom}");
    assert!(dom.contains("(every host)"), "the deployment:\n{dom}");
    assert!(
        refreshes(&dom) >= 1,
        "the script never redrew the page:\n{dom}"
    );

    // A rollout paused after its canary: the page shows where it stands.
    let started = fleet
        .ctl(&[
            "rollout",
            "web",
            "2.0.0",
            "--canary",
            "1",
            "--batch",
            "1",
            "--min-healthy",
            "3s",
            "--detach",
        ])
        .expect_code(0)
        .json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    fleet.ctl(&["rollout", "pause", &id]).expect_code(0);
    wait_until(Duration::from_secs(30), "the rollout to be paused", || {
        fleet.ctl_ok(&["rollout", "status", &id])["state"] == "paused"
    });
    let dom = dump_dom(&chromium, &profile, &url);
    assert!(dom.contains(&format!("data-rollout=\"{id}\"")), "{dom}");
    assert!(dom.contains("class=\"state paused\">paused"), "{dom}");
    let paused_at = current_wave(&dom).expect("a current wave");
    assert!(dom.contains("web@2.0.0"), "the canary's release:\n{dom}");
    assert!(dom.contains("web@1.0.0"), "the others' release:\n{dom}");

    // Resumed, it widens wave by wave (each host stays up 3 s before it passes); the page,
    // looked at again and again, shows other waves running.
    fleet.ctl(&["rollout", "resume", &id]).expect_code(0);
    let mut seen = vec![paused_at.clone()];
    let last = wait_for(
        Duration::from_secs(90),
        "the rollout to end on the page",
        || {
            let dom = dump_dom(&chromium, &profile, &url);
            if let Some(wave) = current_wave(&dom) {
                if !seen.contains(&wave) {
                    seen.push(wave);
                }
            }
            (dom.contains("<p class=\"none\">none</p>")
                && dom.matches("web@2.0.0 running").count() >= 3)
                .then_some(dom)
        },
    );
    eprintln!("waves the page showed as current: {seen:?}");
    let running: Vec<&String> = seen.iter().filter(|w| w.ends_with(" running")).collect();
    assert!(
        !running.is_empty(),
        "the page never showed a wave running after {paused_at}: saw {seen:?}"
    );
    assert!(last.contains("rollout.succeeded"), "the event:\n{last}");
}
