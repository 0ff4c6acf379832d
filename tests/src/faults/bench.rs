//! The fleet a fault is tried on: a controller, [`N_HOSTS`] agents (or as many as [`Setup`]
//! says) that each dial it through a [`Proxy`] of their own (so a link can be cut or
//! corrupted), the example web app rolled out, and what the runner was told so far (the
//! rollout ids acknowledged to it, the version every host serves, the processes' baseline of
//! open files and memory). As [`Setup`] asks, the controller's data directory or every host's
//! is a small tmpfs (a disk to fill), and every agent runs in a network namespace of its own
//! ([`crate::netns`]: its proxy listens on the host's end of the namespace's link).

use super::invariants::Baseline;
use crate::fleet::Fleet;
use crate::netns::Netns;
use crate::proxy::Proxy;
use crate::tmpfs::Tmpfs;
use crate::{incompressible_bytes, web_manifest};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// Hosts of the fleet: a canary and two later waves of one host each.
pub const N_HOSTS: usize = 3;
/// Heartbeats every 500 ms, a host lost after 6 s of silence: the lost-host grace the faults
/// are measured against. It must be longer than the agent's longest pause between reconnects
/// (`MAX_RECONNECT_BACKOFF`, 5 s): with a shorter grace a link cut a few times in a row makes
/// a host lost only because its agent is waiting to dial again.
pub const LOST_AFTER: Duration = Duration::from_millis(6_000);
const FAST_LOST: &str = "heartbeat_interval_ms = 500\nlost_after_ms = 6000";
/// The smoke checks' timeout in the releases the runner makes.
pub const SMOKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The canary pause of the rollouts that test the paused phase.
pub const CANARY_PAUSE: Duration = Duration::from_secs(3);
/// Rollouts done before the baseline of open files and memory is taken.
const WARM_UP_ROLLOUTS: usize = 3;
/// The host a "bad" release fails its smoke checks on, so that its rollout rolls back.
pub const FAILING_HOST: &str = "h3";

/// How the fleet of a fault is made.
#[derive(Debug, Clone)]
pub struct Setup {
    pub n_hosts: usize,
    /// The controller's data directory on a tmpfs of [`CONTROLLER_DISK_MIB`] (root only).
    pub controller_disk: bool,
    /// Every host's data directory on a tmpfs of [`HOST_DISK_MIB`] (root only).
    pub host_disks: bool,
    /// Every agent in a network namespace of its own (root only).
    pub netns: bool,
    /// Lines added to controller.toml.
    pub controller_extra: String,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            n_hosts: N_HOSTS,
            controller_disk: false,
            host_disks: false,
            netns: false,
            controller_extra: String::new(),
        }
    }
}

/// The size of each host's data directory when it is a tmpfs: room for two kept releases of
/// [`BIG_RELEASE_BYTES`] with their artifacts, and a third being deployed with the agent's
/// 64 MiB margin; little enough to fill in a moment.
pub const HOST_DISK_MIB: u64 = 256;
/// The padding of the releases whose unpack a full host disk interrupts: files of
/// [`BIG_RELEASE_FILE_BYTES`], enough that the unpack takes a moment.
pub const BIG_RELEASE_BYTES: usize = 24 << 20;
pub const BIG_RELEASE_FILE_BYTES: usize = 512 << 10;

/// A running fleet for the fault runner; see the module doc.
pub struct Bench {
    pub fleet: Fleet,
    /// `proxies[i]` carries host `h{i+1}`'s link to the controller.
    pub proxies: Vec<Proxy>,
    /// The version every host serves now.
    pub current_version: String,
    /// Rollout ids the controller acknowledged to the runner.
    pub acknowledged: Vec<String>,
    pub baseline: Baseline,
    releases_made: u32,
    /// The small filesystem the controller's data directory is on, when the fault fills it.
    pub controller_disk: Option<Tmpfs>,
    /// The small filesystem each host's data directory is on (`host_disks[i]`: `h{i+1}`),
    /// when the fault fills them.
    pub host_disks: Vec<Tmpfs>,
    /// The network namespace each agent runs in (`netns[i]`: `h{i+1}`), when it does.
    pub netns: Vec<Netns>,
    pub n_hosts: usize,
}

/// The size of the controller's data directory when it is a tmpfs: room for the releases of a
/// long run (about 3 MiB each), little enough to fill in a moment.
pub const CONTROLLER_DISK_MIB: u64 = 160;

impl Bench {
    /// Starts the fleet, rolls out [`WARM_UP_ROLLOUTS`] releases (so caches and pools are
    /// warm), then takes the baseline of open files and memory.
    pub fn start(seed: u64, setup: &Setup) -> Result<Bench> {
        if setup.netns {
            crate::netns::remove_leftovers();
        }
        let mut disk = None;
        let mut mount_error = None;
        let mut extra = format!("{FAST_LOST}\n{}", setup.controller_extra);
        if setup.controller_disk || setup.host_disks {
            // The upload check's free-space floor is for real disks; here the disk is small.
            extra.push_str("\nmin_free_disk_mb = 1");
        }
        let mut fleet = if setup.controller_disk {
            Fleet::start_with_controller_data(0, &extra, |dir| {
                match Tmpfs::mount(dir, CONTROLLER_DISK_MIB) {
                    Ok(tmpfs) => disk = Some(tmpfs),
                    Err(e) => mount_error = Some(e),
                }
            })
        } else {
            Fleet::start_with_controller_config(0, &extra)
        };
        if let Some(e) = mount_error {
            fleet.kill_controller();
            bail!("{e}");
        }
        let controller: SocketAddr = fleet
            .controller_url()
            .trim_start_matches("https://")
            .parse()
            .context("the controller's address")?;
        // Made before the fleet's agents and given to the bench at once, so that whatever
        // fails below, the bench's drop removes them.
        let mut bench = Bench {
            fleet,
            proxies: Vec::new(),
            current_version: String::new(),
            acknowledged: Vec::new(),
            baseline: Baseline::default(),
            releases_made: 0,
            controller_disk: disk,
            host_disks: Vec::new(),
            netns: Vec::new(),
            n_hosts: setup.n_hosts,
        };
        for idx in 0..setup.n_hosts {
            let name = format!("h{}", idx + 1);
            let host_seed = seed.wrapping_add(idx as u64);
            let (proxy, advertise, prefix) = if setup.netns {
                let netns = Netns::create(idx as u32).map_err(|e| anyhow!(e))?;
                let proxy = Proxy::start_on(netns.controller_addr().into(), controller, host_seed)
                    .context("start a fault proxy")?;
                let advertise = netns.inside_addr().to_string();
                let prefix = netns.exec_prefix();
                bench.netns.push(netns);
                (proxy, Some(advertise), prefix)
            } else {
                let proxy = Proxy::start(controller, host_seed).context("start a fault proxy")?;
                (proxy, None, Vec::new())
            };
            let mut mounted = Ok(None);
            bench.fleet.start_agent_custom(
                &name,
                &proxy.url(),
                advertise.as_deref(),
                &prefix,
                |dir| {
                    if setup.host_disks {
                        mounted = Tmpfs::mount_with_mode(dir, HOST_DISK_MIB, 0o711).map(Some);
                    }
                },
            );
            bench.proxies.push(proxy);
            match mounted {
                Ok(Some(tmpfs)) => bench.host_disks.push(tmpfs),
                Ok(None) => {}
                Err(e) => bail!("{e}"),
            }
        }
        bench.fleet.wait_hosts_ready(setup.n_hosts);
        // Warm-up rollouts as large as the tries' (their artifacts carry up to 1 MiB of padding).
        for _ in 0..WARM_UP_ROLLOUTS {
            let version = bench.create_release(false, 1024 * 1024)?;
            let id = bench.start_rollout(&version, false)?;
            let end = bench.wait_rollout_end(&id, bench.rollout_deadline())?;
            if end["state"] != "succeeded" {
                bail!("the warm-up rollout of {version} ended {end}");
            }
            bench
                .fleet
                .wait_all_serve(&version, Duration::from_secs(30));
            bench.current_version = version;
        }
        bench.baseline = Baseline::settle(&bench.fleet);
        Ok(bench)
    }

    pub fn host_names(&self) -> Vec<String> {
        self.fleet.host_names()
    }

    /// The proxy of host `name` (`hN`).
    pub fn proxy_of(&self, name: &str) -> &Proxy {
        let idx: usize = name
            .trim_start_matches('h')
            .parse()
            .expect("hosts are named hN");
        &self.proxies[idx - 1]
    }

    /// Creates release `1.N.0` of the web app, with an incompressible extra file of
    /// `extra_bytes` so its artifact is new bytes every time (every host fetches it). A `bad`
    /// release fails its smoke checks on [`FAILING_HOST`].
    pub fn create_release(&mut self, bad: bool, extra_bytes: usize) -> Result<String> {
        self.create_release_of(bad, extra_bytes, extra_bytes.max(1))
    }

    /// Like [`Bench::create_release`], the padding in files of `file_bytes` each (the last
    /// one smaller): a release of many files, whose unpack takes longer.
    pub fn create_release_of(
        &mut self,
        bad: bool,
        extra_bytes: usize,
        file_bytes: usize,
    ) -> Result<String> {
        self.releases_made += 1;
        let version = format!("1.{}.0", self.releases_made);
        let mut manifest = web_manifest(&format!("{}s", SMOKE_TIMEOUT.as_secs()));
        if bad {
            manifest.push_str(&format!(
                "\n[[smoke]]\nexec = [\"/bin/sh\", \"-c\", \"test \\\"$FLEET_HOST\\\" != {FAILING_HOST}\"]\ntimeout = \"2s\"\n"
            ));
        }
        let mut extra = incompressible_bytes(extra_bytes + 8);
        extra[..8].copy_from_slice(&u64::from(self.releases_made).to_le_bytes());
        let names: Vec<String> = (0..extra.len().div_ceil(file_bytes))
            .map(|idx| format!("padding-{idx}.bin"))
            .collect();
        let files: Vec<(&str, &[u8])> = names
            .iter()
            .map(String::as_str)
            .zip(extra.chunks(file_bytes))
            .collect();
        let artifact = self.fleet.web_artifact(&manifest, &files);
        let out = self.fleet.create_release("web", &version, &artifact, &[]);
        if out.code != 0 {
            bail!(
                "release create {version} exited {}: {}",
                out.code,
                out.stderr
            );
        }
        Ok(version)
    }

    /// `rollout web VERSION --canary 1 --batch 1 --max-unavailable 1 --detach`, with the
    /// canary pause when `pause`; the rollout id, recorded as acknowledged.
    pub fn start_rollout(&mut self, version: &str, pause: bool) -> Result<String> {
        let pause_arg = format!("{}s", CANARY_PAUSE.as_secs());
        let mut args = vec![
            "rollout",
            "web",
            version,
            "--canary",
            "1",
            "--batch",
            "1",
            "--max-unavailable",
            "1",
            "--min-healthy",
            "1s",
            "--detach",
        ];
        if pause {
            args.extend(["--pause-after-canary", pause_arg.as_str()]);
        }
        let out = self.fleet.ctl(&args);
        if out.code != 0 {
            bail!("rollout {version} exited {}: {}", out.code, out.stderr);
        }
        let id = out.json["id"]
            .as_str()
            .ok_or_else(|| anyhow!("rollout {version} printed no id: {}", out.stdout))?
            .to_string();
        self.acknowledged.push(id.clone());
        Ok(id)
    }

    /// `release create probe VERSION` of a tiny artifact (an app of its own, so `web` is not
    /// touched): what a call that must write to the controller's disk does.
    pub fn create_probe_release(&self, version: &str) -> crate::fleet::CtlOutput {
        let manifest = web_manifest("5s");
        let artifact = self.fleet.write_artifact(&[
            ("fleet.toml", manifest.as_bytes(), 0o644),
            ("bin/web", b"#!/bin/sh\nexit 0\n", 0o755),
        ]);
        self.fleet.create_release("probe", version, &artifact, &[])
    }

    /// `rollout status ID`, or `None` while the controller does not answer.
    pub fn rollout_status(&self, id: &str) -> Option<Value> {
        let out = self.fleet.ctl(&["rollout", "status", id]);
        (out.code == 0).then_some(out.json)
    }

    /// The deadline a rollout must end within: the smoke timeout times the waves, plus the
    /// lost-host grace, plus the canary pause, plus 30 s.
    pub fn rollout_deadline(&self) -> Duration {
        SMOKE_TIMEOUT * self.n_hosts as u32 + LOST_AFTER + CANARY_PAUSE + Duration::from_secs(30)
    }

    /// Waits for rollout `id` to end; its final record.
    pub fn wait_rollout_end(&self, id: &str, deadline: Duration) -> Result<Value> {
        let until = std::time::Instant::now() + deadline;
        let mut last = Value::Null;
        while std::time::Instant::now() < until {
            if let Some(status) = self.rollout_status(id) {
                if crate::fleet::is_end_state(status["state"].as_str().unwrap_or("")) {
                    return Ok(status);
                }
                last = status;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "rollout {id} did not end within {deadline:?}; last seen {} (wave {}): {}",
            last["state"],
            last["current_wave"],
            last["message"]
        )
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // The processes go before the filesystems under them and the namespaces they run in
        // (an unmounted data directory would hide its apps from the fleet's own cleanup).
        if self.controller_disk.is_some() || !self.host_disks.is_empty() || !self.netns.is_empty() {
            for name in self.fleet.host_names() {
                self.fleet.kill_agent(&name);
            }
            self.fleet.kill_controller();
            crate::process::kill_everything_inside(self.fleet.dir());
        }
        if let Some(disk) = self.controller_disk.take() {
            disk.free();
            drop(disk);
        }
        for disk in self.host_disks.drain(..) {
            disk.free();
            drop(disk);
        }
        self.proxies.clear();
        self.netns.clear();
    }
}
