//! Hostile artifacts: a corpus of tarballs built with the `tar` crate's low-level header API
//! (so they can say what no well-behaved tool writes: `..`, absolute paths, links out, devices,
//! lying sizes, metadata bombs), plus every file under `tests/hostile/`. Each one must be
//! refused
//! - by the agent's unpack path (`fleet_agent::releases::ensure_unpacked`), writing nothing
//!   outside the release directory, in fact nothing at all that survives the refusal;
//! - by `fleetctl release create` (exit 2, a message naming the problem);
//! - by the controller itself (the local check skipped), which keeps serving afterwards.

use fleet_tests::fleet::Fleet;
use std::io::Write;
use std::path::{Path, PathBuf};

const MANIFEST: &[u8] = b"[process]\ncommand = [\"bin/app\"]\n";

/// One entry of a hand-made tarball.
struct Raw {
    name: Vec<u8>,
    kind: tar::EntryType,
    data: Vec<u8>,
    /// The size the header claims (defaults to the data's length).
    claimed_size: Option<u64>,
    link: Option<Vec<u8>>,
}

fn raw(name: &str, kind: tar::EntryType, data: &[u8]) -> Raw {
    Raw {
        name: name.as_bytes().to_vec(),
        kind,
        data: data.to_vec(),
        claimed_size: None,
        link: None,
    }
}

fn file(name: &str, data: &[u8]) -> Raw {
    raw(name, tar::EntryType::Regular, data)
}

fn manifest() -> Raw {
    file("fleet.toml", MANIFEST)
}

fn link(name: &str, kind: tar::EntryType, target: &str) -> Raw {
    Raw {
        link: Some(target.as_bytes().to_vec()),
        ..raw(name, kind, b"")
    }
}

/// A tar stream of `entries`, names and link targets written into the header bytes directly
/// (the safe setters refuse `..` and absolute paths, which is the point here).
fn tar_bytes(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(entry.kind);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(entry.claimed_size.unwrap_or(entry.data.len() as u64));
        {
            let old = header.as_old_mut();
            old.name[..entry.name.len()].copy_from_slice(&entry.name);
            if let Some(target) = &entry.link {
                old.linkname[..target.len()].copy_from_slice(target);
            }
        }
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&entry.data);
        let pad = (512 - entry.data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn tgz(entries: &[Raw]) -> Vec<u8> {
    gzip(&tar_bytes(entries))
}

/// A GNU long-name header claiming `size` bytes of name, followed by those bytes (zeros, so
/// the whole thing compresses to almost nothing).
fn long_name_bomb(size: usize) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNULongName);
    header.set_size(size as u64);
    header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend(std::iter::repeat_n(b'a', size));
    out.extend(std::iter::repeat_n(0u8, (512 - size % 512) % 512));
    out.extend_from_slice(&tar_bytes(&[manifest()]));
    gzip(&out)
}

/// Every hostile artifact of the corpus: (name, bytes, what the refusal must mention).
fn corpus() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    use tar::EntryType::*;
    let good = tgz(&[manifest(), file("bin/app", b"#!/bin/sh\n")]);
    let plain_tar = tar_bytes(&[manifest()]);
    let mut trailing = tar_bytes(&[manifest()]);
    trailing.extend(std::iter::repeat_n(0u8, 8 << 20));
    vec![
        (
            "traversal",
            tgz(&[manifest(), file("../evil", b"x")]),
            "'..'",
        ),
        (
            "traversal-deep",
            tgz(&[manifest(), file("bin/../../evil", b"x")]),
            "'..'",
        ),
        (
            "absolute-path",
            tgz(&[manifest(), file("/tmp/fleet-evil", b"x")]),
            "absolute",
        ),
        (
            "symlink-outside",
            tgz(&[manifest(), link("l", Symlink, "../../etc")]),
            "symlinks must point inside",
        ),
        (
            "symlink-absolute",
            tgz(&[manifest(), link("l", Symlink, "/etc/passwd")]),
            "symlinks must point inside",
        ),
        (
            "symlink-chain-outside",
            tgz(&[
                manifest(),
                link("a/s", Symlink, ".."),
                link("t", Symlink, "a/s/.."),
            ]),
            "symlinks must point inside",
        ),
        (
            "symlink-chain-then-dir",
            tgz(&[
                manifest(),
                link("a/s", Symlink, ".."),
                link("t", Symlink, "a/s/.."),
                raw("t/evil", Directory, b""),
            ]),
            "through a symlink",
        ),
        (
            "write-through-symlink",
            tgz(&[manifest(), link("d", Symlink, "."), file("d/x", b"x")]),
            "through a symlink",
        ),
        (
            "symlink-loop",
            tgz(&[manifest(), link("a", Symlink, "b"), link("b", Symlink, "a")]),
            "loops",
        ),
        (
            "hardlink-outside",
            tgz(&[manifest(), link("h", Link, "/etc/passwd")]),
            "hard links",
        ),
        (
            "hardlink-inside",
            tgz(&[manifest(), link("h", Link, "fleet.toml")]),
            "hard links",
        ),
        (
            "char-device",
            tgz(&[manifest(), raw("dev", Char, b"")]),
            "device",
        ),
        (
            "block-device",
            tgz(&[manifest(), raw("dev", Block, b"")]),
            "device",
        ),
        ("fifo", tgz(&[manifest(), raw("pipe", Fifo, b"")]), "FIFO"),
        (
            "sparse",
            tgz(&[manifest(), raw("s", GNUSparse, b"")]),
            "artifact",
        ),
        (
            "entry-too-large",
            tgz(&[
                manifest(),
                Raw {
                    claimed_size: Some(3 << 30),
                    ..file("big", b"")
                },
            ]),
            "limit for one entry",
        ),
        (
            "long-name-bomb",
            long_name_bomb(8 << 20),
            "more bytes than its entries",
        ),
        (
            "trailing-bomb",
            gzip(&trailing),
            "more bytes than its entries",
        ),
        (
            "not-gzip",
            b"this is not an artifact\n".to_vec(),
            "not a gzip tarball",
        ),
        ("plain-tar", plain_tar, "not a gzip tarball"),
        ("gzip-of-garbage", gzip(&[0x42; 3000]), "not a gzip tarball"),
        ("empty-file", Vec::new(), "not a gzip tarball"),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        (
            "no-manifest",
            tgz(&[file("bin/app", b"x")]),
            "no fleet.toml",
        ),
        (
            "manifest-not-toml",
            tgz(&[file("fleet.toml", b"[process\ncommand = ")]),
            "fleet.toml is not valid",
        ),
        (
            "manifest-empty-command",
            tgz(&[file("fleet.toml", b"[process]\ncommand = []\n")]),
            "command is empty",
        ),
        (
            "manifest-blank-command",
            tgz(&[file("fleet.toml", b"[process]\ncommand = [\"  \"]\n")]),
            "command is empty",
        ),
        (
            "manifest-too-large",
            tgz(&[file("fleet.toml", &[b'#'; 70_000])]),
            "64 KiB",
        ),
        (
            "manifest-not-utf8",
            tgz(&[file("fleet.toml", &[0xff, 0xfe, 0x00])]),
            "UTF-8",
        ),
        (
            "manifest-is-a-symlink",
            tgz(&[
                file("real.toml", MANIFEST),
                link("fleet.toml", Symlink, "real.toml"),
            ]),
            "no fleet.toml",
        ),
        (
            "manifest-twice",
            tgz(&[
                manifest(),
                file("./fleet.toml", b"[process]\ncommand = [\"/bin/sh\"]\n"),
            ]),
            "twice",
        ),
        (
            "file-then-dir",
            tgz(&[manifest(), file("x", b"x"), raw("x", Directory, b"")]),
            "twice",
        ),
        ("name-too-long", long_component(), "at most 255"),
    ]
}

/// A path component over 255 bytes, written with a GNU long name (it cannot fit the 100-byte
/// header field).
fn long_component() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("fleet.toml".to_string(), MANIFEST),
        ("n".repeat(300), &b"x"[..]),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, data).unwrap();
    }
    gzip(&builder.into_inner().unwrap())
}

/// The files under `tests/hostile/`: hostile inputs kept as files (anyone may add one; each
/// must be refused).
fn corpus_files() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("hostile");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/hostile exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "gz") {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

/// What a fleetctl run said.
struct Refusal {
    code: i32,
    stderr: String,
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_agent_refuses_every_hostile_artifact_and_writes_nothing_outside() {
    let mut all: Vec<(String, Vec<u8>, &str)> = corpus()
        .into_iter()
        .map(|(name, bytes, why)| (name.to_string(), bytes, why))
        .collect();
    all.extend(
        corpus_files()
            .into_iter()
            .map(|(name, bytes)| (name, bytes, "")),
    );
    for (name, bytes, why) in all {
        let sandbox = tempfile::tempdir().unwrap();
        let data_dir = sandbox.path().join("host/data");
        let layout = fleet_agent::model::DataLayout::new(&data_dir);
        layout.create_all().unwrap();
        let artifact = sandbox.path().join("artifact.tar.gz");
        std::fs::write(&artifact, &bytes).unwrap();
        let digest = fleet_proto::artifact::digest_of(&bytes);
        let before = tree(sandbox.path());
        let result =
            fleet_agent::releases::ensure_unpacked(&layout, "web", "1.0", &digest, &artifact);
        let error = match result {
            Ok(release) => panic!("{name}: unpacked to {}", release.dir.display()),
            Err(error) => error.to_string(),
        };
        assert!(
            error.contains(why),
            "{name}: the refusal {error:?} does not mention {why:?}"
        );
        let after = tree(sandbox.path());
        let new: Vec<_> = after
            .iter()
            .filter(|p| !before.contains(p))
            .filter(|p| !p.starts_with("host/data/releases/web") || p.components().count() > 4)
            .collect();
        assert!(new.is_empty(), "{name}: the refused unpack left {new:?}");
        assert!(
            !Path::new("/tmp/fleet-evil").exists(),
            "{name}: wrote /tmp/fleet-evil"
        );
    }
}

#[test]
fn fleetctl_and_the_controller_refuse_every_hostile_artifact_and_keep_serving() {
    let fleet = Fleet::start(0);
    let mut all: Vec<(String, Vec<u8>, &str)> = corpus()
        .into_iter()
        .map(|(name, bytes, why)| (name.to_string(), bytes, why))
        .collect();
    all.extend(
        corpus_files()
            .into_iter()
            .map(|(name, bytes)| (name, bytes, "")),
    );
    for (idx, (name, bytes, why)) in all.iter().enumerate() {
        let path = fleet.write_raw_artifact(bytes);
        let version = format!("1.0.{idx}");
        let out = fleet.create_release("web", &version, &path, &[]);
        assert_eq!(
            out.code, 2,
            "{name}: fleetctl exited {}: {}",
            out.code, out.stderr
        );
        assert!(
            out.stderr.contains(why),
            "{name}: {:?} does not mention {why:?}",
            out.stderr
        );

        // The controller's own check, with fleetctl's local one skipped.
        let out = std::process::Command::new(&fleet.bins.fleetctl)
            .arg("--config-dir")
            .arg(fleet.config_dir())
            .args(["--controller", &fleet.controller_url()])
            .args(["release", "create", "web", &version])
            .arg(&path)
            .env("FLEET_SKIP_LOCAL_ARTIFACT_CHECK", "1")
            .output()
            .unwrap();
        let out = Refusal {
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        };
        assert_eq!(
            out.code, 2,
            "{name}: the controller took it: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(why),
            "{name}: {:?} does not mention {why:?}",
            out.stderr
        );
        fleet.ctl_ok(&["hosts"]);
    }
    assert!(fleet.ctl_ok(&["releases", "web"])["releases"]
        .as_array()
        .is_none_or(|r| r.is_empty()));
}

#[test]
fn hostile_names_are_refused_at_every_edge() {
    let fleet = Fleet::start(0);
    let good = fleet.write_artifact(&[("fleet.toml", MANIFEST, 0o644)]);
    let good = good.display().to_string();
    for (app, version) in [
        ("../web", "1.0"),
        ("web/..", "1.0"),
        ("Web", "1.0"),
        ("-web", "1.0"),
        ("", "1.0"),
        (&*"a".repeat(64), "1.0"),
        ("web", ".."),
        ("web", "."),
        ("web", "../1.0"),
        ("web", "1.0/.."),
        ("web", "1 0"),
        ("web", ""),
        ("web", &*"1".repeat(129)),
    ] {
        let out = fleet.ctl(&["release", "create", app, version, &good]);
        assert_eq!(out.code, 2, "{app:?} {version:?}: {}", out.stderr);
    }
    for args in [
        &["rollout", "../web", "1.0"][..],
        &["rollout", "web", "../1"],
        &["rollout", "web", "1.0", "--selector", "env=a b"],
        &["rollout", "web", "1.0", "--selector", "../x=y"],
        &["history", "../web"],
        &["status", "web/.."],
        &["drain", "../h1"],
        &[
            "credentials",
            "create",
            "../ci",
            "--role",
            "deployer",
            "--out",
            "x",
        ],
        &[
            "credentials",
            "create",
            "ci",
            "--role",
            "agent",
            "--out",
            "x",
        ],
    ] {
        let out = fleet.ctl(args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
    }
    // An agent with a hostile name or labels does not even start.
    let ca = fleet.config_dir().join("ca.pem");
    for (name, labels) in [
        ("../h1", "env=prod"),
        ("H1", "env=prod"),
        ("h1/x", "env=prod"),
        (&*"h".repeat(64), "env=prod"),
        ("h1", "env=pr od"),
        ("h1", "../k=v"),
        ("h1", &*format!("k={}", "v".repeat(64))),
    ] {
        let data_dir = fleet.dir().join("bad-agent");
        let out = std::process::Command::new(&fleet.bins.agent)
            .args(["--controller", &fleet.controller_url(), "--name", name])
            .args(["--advertise", "127.0.0.1", "--labels", labels, "--ca"])
            .arg(&ca)
            .args(["--join-token", &"0".repeat(64), "--data-dir"])
            .arg(&data_dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name:?} {labels:?}");
        assert!(!data_dir.join("tls").exists());
    }
}
