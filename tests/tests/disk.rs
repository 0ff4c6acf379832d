//! User story: disks fill. A decompression bomb (a small artifact that unpacks to far more) is
//! refused at `release create`, before any host sees it, as is a release over the unpacked
//! size the controller allows. A host whose data directory (a 48 MiB tmpfs here) cannot hold a
//! release fails at once, saying which host, how much it needs and how much is free; it writes
//! nothing and keeps serving the release it ran.

use fleet_tests::fleet::Fleet;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[test]
fn a_decompression_bomb_and_an_oversized_release_are_refused_at_upload() {
    let fleet =
        Fleet::start_with_controller_config(0, "max_compression_ratio = 50\nmax_unpacked_mb = 8\n");
    let manifest = fleet_tests::web_manifest("10s");
    // 6 MiB of zeros gzip to a few KiB: far over 50:1.
    let zeros = vec![0u8; 6 << 20];
    let bomb = fleet.write_artifact(&[
        ("fleet.toml", manifest.as_bytes(), 0o644),
        ("data/zeros", &zeros, 0o644),
    ]);
    let refused = fleet.create_release("web", "1.0.0", &bomb, &[]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("max_compression_ratio"),
        "{}",
        refused.stderr
    );
    // 20 MiB that does not compress: within the ratio, over the limit unpacked.
    let noise = fleet_tests::incompressible_bytes(20 << 20);
    let big = fleet.web_artifact(&manifest, &[("data/noise", &noise)]);
    let refused = fleet.create_release("web", "1.0.0", &big, &[]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("max_unpacked_mb"),
        "{}",
        refused.stderr
    );
    // What fits is taken, and its unpacked size is on record.
    fleet.create_web_releases(&["1.0.0"]);
}

/// A tmpfs mounted at `dir` for the length of a test.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir_all(dir).unwrap();
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={mib}m,mode=0700").as_str()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot mount a tmpfs at {} ({e}): this test needs root, as CI has",
                dir.display()
            )
        });
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn a_host_whose_disk_cannot_hold_a_release_fails_at_once_and_writes_nothing() {
    if !nix::unistd::Uid::effective().is_root() {
        // Mounting a tmpfs needs root; CI and `scripts/test.sh` on the workplace run as root.
        eprintln!("SKIPPED: a tmpfs data directory needs root");
        return;
    }
    let mut fleet = Fleet::start(0);
    let data_dir = fleet.dir().join("hosts").join("h1");
    let tmpfs = Tmpfs::mount(&data_dir, 160);
    fleet.start_agent("h1");
    fleet.wait_hosts_ready(1);
    fleet.create_web_releases(&["1.0.0"]);
    fleet.ctl(&["rollout", "web", "1.0.0"]).expect_code(0);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));
    let before: Vec<PathBuf> = files_under(&data_dir.join("artifacts"));

    // 60 MiB that does not compress: artifact, unpacked tree, the instance's copy and the
    // margin need about 250 MiB; the 160 MiB disk has less.
    let noise = fleet_tests::incompressible_bytes(60 << 20);
    let artifact = fleet.web_artifact(&fleet_tests::web_manifest("10s"), &[("data/noise", &noise)]);
    fleet
        .create_release("web", "2.0.0", &artifact, &[])
        .expect_code(0);
    let out = fleet.ctl(&["rollout", "web", "2.0.0"]);
    assert_eq!(out.code, 1, "{out:?}");
    let message = out.json["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("host h1 needs"), "{message}");
    assert!(message.contains("MiB free in"), "{message}");
    assert!(message.contains("nothing was written"), "{message}");
    assert_eq!(files_under(&data_dir.join("artifacts")), before);
    fleet.wait_all_serve("1.0.0", Duration::from_secs(10));

    fleet.kill_agent("h1");
    drop(tmpfs);
}
