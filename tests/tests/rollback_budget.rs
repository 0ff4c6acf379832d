//! User story: a rollback keeps to the budget. Three hosts run an app that takes two seconds to
//! start; a release that fails its check on the last host (`h3`) is rolled out with
//! `--max-unavailable 1`. The rollback puts the failed host back first (it is down already),
//! then one serving host at a time: a sampler of every host's `/healthz` never sees more than
//! one host down beyond the failed one, and every host ends on the old release, serving it.
//! A controller killed in the middle of such a rollback goes on from where it stood.

use fleet_tests::fleet::Fleet;
use fleet_tests::{http, web_manifest, WEB_PORT};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The example app, started two seconds late: long enough for a sampler to see every host
/// that is down at the same time.
fn slow_start_manifest() -> String {
    web_manifest("30s").replace(
        &format!("command = [\"bin/web\", \"--listen\", \"${{FLEET_ADDR}}:{WEB_PORT}\"]"),
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"sleep 2 && exec bin/web --listen ${{FLEET_ADDR}}:{WEB_PORT}\"]"
        ),
    )
}

/// Samples `/healthz` on every host until stopped: the most seen down at once.
struct Sampler {
    stop: Arc<AtomicBool>,
    worst: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(addrs: Vec<String>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let worst = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, worst, samples) = (stop.clone(), worst.clone(), samples.clone());
            std::thread::spawn(move || {
                // Bounded by the stop flag, which the test sets, and by a count.
                for _ in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let down = addrs
                        .iter()
                        .filter(|addr| http::get_ok(addr, "/healthz").is_none())
                        .count();
                    worst.fetch_max(down, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Sampler {
            stop,
            worst,
            samples,
            thread,
        }
    }

    /// Stops it; (the most hosts seen down at once, how many samples).
    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler");
        (
            self.worst.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

/// Three hosts on 1.0.0 (slow to start), and 1.1.0, which fails its check on h3 only.
fn fleet_with_a_release_failing_on_h3() -> Fleet {
    let fleet = Fleet::start(3);
    let manifest = slow_start_manifest();
    fleet
        .create_web_release("1.0.0", &manifest, &[])
        .expect_code(0);
    let fails_on_h3 = format!(
        "{manifest}\n[[smoke]]\nexec = [\"/bin/sh\", \"-c\", \"test \\\"$FLEET_HOST\\\" != h3\"]\ntimeout = \"2s\"\n"
    );
    fleet
        .create_web_release("1.1.0", &fails_on_h3, &[])
        .expect_code(0);
    fleet
        .ctl(&["rollout", "web", "1.0.0", "--batch", "100%"])
        .expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(30));
    fleet
}

fn sampler_of(fleet: &Fleet) -> Sampler {
    Sampler::start(
        fleet
            .host_names()
            .iter()
            .map(|h| fleet.agent(h).advertise.clone())
            .collect(),
    )
}

const ROLLOUT: [&str; 9] = [
    "rollout",
    "web",
    "1.1.0",
    "--canary",
    "1",
    "--batch",
    "1",
    "--max-unavailable",
    "1",
];

/// Every host serves 1.0.0 again, and `status` says it runs it.
fn assert_all_back_on_1_0_0(fleet: &Fleet) {
    fleet.wait_all_serve("1.0.0", Duration::from_secs(30));
    let status = fleet.status("web");
    for name in fleet.host_names() {
        let actual = Fleet::actual_of(&status, &name, "web").expect("an instance report");
        assert_eq!(actual["version"], "1.0.0", "{name}: {actual:#}");
        assert_eq!(actual["state"], "running", "{name}: {actual:#}");
    }
}

#[test]
fn a_rollback_takes_no_more_hosts_down_than_the_budget() {
    let fleet = fleet_with_a_release_failing_on_h3();
    let sampler = sampler_of(&fleet);
    // Generous: five starts of two seconds each, one after another, on a loaded machine.
    let out = fleet.ctl_with_deadline(&ROLLOUT, Duration::from_secs(180));
    let (worst, samples) = sampler.finish();
    let rollout = out.expect_code(1).json;
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    assert!(samples > 10, "the sampler must have run");
    assert!(
        worst <= 2,
        "with --max-unavailable 1, at most one host may be down beyond the failed one; {worst} were down at once: {rollout:#}"
    );
    // Each host the rollout changed is recorded as rolled back.
    let results: Vec<(String, String)> = rollout["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["hosts"].as_array().unwrap())
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (host, result) in &results {
        assert_eq!(result, "rolled_back", "{host}: {rollout:#}");
    }
    assert_all_back_on_1_0_0(&fleet);
}

#[test]
fn a_controller_killed_during_a_rollback_goes_on_from_where_it_was() {
    let mut fleet = fleet_with_a_release_failing_on_h3();
    let sampler = sampler_of(&fleet);
    let mut args = ROLLOUT.to_vec();
    args.push("--detach");
    let started = fleet.ctl(&args).expect_code(0).json;
    let id = started["id"].as_str().expect("a rollout id").to_string();
    // Kill it in the middle of the rollback: the failed host is back (recorded in the same
    // write that gives the next host its old release), the others not yet.
    fleet_tests::wait_for(
        Duration::from_secs(120),
        "the failed host to be rolled back first",
        || {
            let rollout = fleet.ctl_ok(&["rollout", "status", &id]);
            let back: Vec<&str> = rollout["waves"]
                .as_array()?
                .iter()
                .flat_map(|w| w["hosts"].as_array().into_iter().flatten())
                .filter(|h| h["result"] == "rolled_back")
                .filter_map(|h| h["host"].as_str())
                .collect();
            assert!(
                back.is_empty() || back[0] == "h3",
                "the failed host goes back first: {rollout:#}"
            );
            (back == ["h3"]).then_some(())
        },
    );
    fleet.kill_controller();
    fleet.restart_controller();
    let ended = fleet.wait_rollout_ends(&id, Duration::from_secs(120));
    let (worst, _) = sampler.finish();
    assert_eq!(ended["state"], "rolled_back", "{ended:#}");
    assert!(
        worst <= 2,
        "at most one host may be down beyond the failed one, across the restart; {worst} were: {ended:#}"
    );
    assert_all_back_on_1_0_0(&fleet);
}
