//! Builds a fleet-agent `.deb` in a test, in seconds: the same files `scripts/package.sh` puts
//! in the package (the agent binary as `/usr/bin/fleet-agent`, the unit made from
//! `packaging/systemd/fleet-agent.service` with the same substitutions, the maintainer scripts
//! of `packaging/deb/fleet-agent`), assembled with the `ar`, `tar` and `flate2` crates instead
//! of cargo-deb. cargo-deb is not needed on the test machine then (installing it takes minutes),
//! and a test can make two versions of the package (an upgrade) from one debug binary.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The workspace root (tests/ is one of its members).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Debian's name of this machine's architecture, as `dpkg --print-architecture` says it.
pub fn debian_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "riscv64" => "riscv64",
        other => panic!("no Debian architecture known for {other}"),
    }
}

/// The agent's unit as the package holds it: scripts/package.sh's sed, in Rust.
pub fn packaged_unit() -> String {
    let template =
        std::fs::read_to_string(workspace().join("packaging/systemd/fleet-agent.service"))
            .expect("read packaging/systemd/fleet-agent.service");
    template
        .replace("@REMOTE_DIR@/bin/fleet-agent", "/usr/bin/fleet-agent")
        .replace("@REMOTE_DIR@", "/var/lib/fleet-agent")
}

/// One tar entry (a directory when `bytes` is None), owned by root.
fn append(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, bytes: Option<&[u8]>) {
    let mut header = tar::Header::new_gnu();
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    match bytes {
        Some(bytes) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(bytes.len() as u64);
            header.set_cksum();
            tar.append_data(&mut header, path, bytes)
                .expect("tar entry");
        }
        None => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            header.set_cksum();
            tar.append_data(&mut header, path, std::io::empty())
                .expect("tar directory entry");
        }
    }
}

/// Writes `DIR/PACKAGE_VERSION_ARCH.deb` holding `agent_binary` and returns its path. `package`
/// is `fleet-agent` but for a test that needs a package of another name.
pub fn build(dir: &Path, package: &str, version: &str, agent_binary: &[u8]) -> PathBuf {
    build_custom(
        dir,
        package,
        version,
        agent_binary,
        None,
        debian_architecture(),
    )
}

/// Like [`build`], with a `Depends:` field (a package dpkg refuses to configure) and the
/// `Architecture:` of the caller's choosing (a package for another machine).
pub fn build_custom(
    dir: &Path,
    package: &str,
    version: &str,
    agent_binary: &[u8],
    depends: Option<&str>,
    arch: &str,
) -> PathBuf {
    let depends = depends
        .map(|d| format!("Depends: {d}\n"))
        .unwrap_or_default();
    let control = format!(
        "Package: {package}\nVersion: {version}\nArchitecture: {arch}\n{depends}\
         Maintainer: fleet maintainers\nSection: admin\nPriority: optional\n\
         Description: fleet agent (built by the tests from the debug binary)\n"
    );
    let scripts = workspace().join("packaging/deb/fleet-agent");
    let mut control_tar = tar::Builder::new(Vec::new());
    append(&mut control_tar, "./", 0o755, None);
    append(
        &mut control_tar,
        "./control",
        0o644,
        Some(control.as_bytes()),
    );
    for script in ["postinst", "prerm"] {
        let text = std::fs::read(scripts.join(script)).expect("read a maintainer script");
        append(&mut control_tar, &format!("./{script}"), 0o755, Some(&text));
    }
    let control_tar = control_tar.into_inner().expect("control.tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&control_tar).expect("gzip control.tar");
    let control_tar_gz = gz.finish().expect("gzip control.tar");

    // data.tar uncompressed: the debug binary is large and dpkg reads it as it is.
    let mut data = tar::Builder::new(Vec::new());
    for dir in [
        "./",
        "./usr/",
        "./usr/bin/",
        "./lib/",
        "./lib/systemd/",
        "./lib/systemd/system/",
    ] {
        append(&mut data, dir, 0o755, None);
    }
    append(
        &mut data,
        "./usr/bin/fleet-agent",
        0o755,
        Some(agent_binary),
    );
    append(
        &mut data,
        "./lib/systemd/system/fleet-agent.service",
        0o644,
        Some(packaged_unit().as_bytes()),
    );
    let data_tar = data.into_inner().expect("data.tar");

    let mut ar = ar::Builder::new(Vec::new());
    for (name, bytes) in [
        ("debian-binary", &b"2.0\n"[..]),
        ("control.tar.gz", &control_tar_gz[..]),
        ("data.tar", &data_tar[..]),
    ] {
        let mut header = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
        header.set_mode(0o644);
        ar.append(&header, bytes).expect("ar member");
    }
    std::fs::create_dir_all(dir).expect("the .deb's dir");
    let path = dir.join(format!("{package}_{version}_{arch}.deb"));
    std::fs::write(&path, ar.into_inner().expect("the .deb")).expect("write the .deb");
    path
}
