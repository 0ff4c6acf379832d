//! The fleet-agent `.deb` that `fleetctl bootstrap --agent-deb PATH` installs: read and checked
//! on the operator's side before any host is touched. A Debian package is an `ar` archive of
//! `debian-binary` ("2.0"), `control.tar[.gz|.xz|.zst]` and `data.tar[...]`; only the control
//! file is read here (with the `ar`, `tar`, `flate2`, `lzma-rs` and `ruzstd` crates, never
//! dpkg-deb), and it must say `Package: fleet-agent`. Whether its `Architecture` fits a host is
//! decided on the host (`dpkg --print-architecture`), by the install script.
//!
//! The package (built by `scripts/package.sh`) puts the agent in `/usr/bin/fleet-agent` and its
//! unit in `/lib/systemd/system/fleet-agent.service`, which reads
//! `/var/lib/fleet-agent/agent.toml`: that is the remote dir of a host installed from it.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use thiserror::Error;

/// The package `--agent-deb` must be.
pub const AGENT_PACKAGE: &str = "fleet-agent";
/// Where the package's unit reads agent.toml and keeps its data: the remote dir of a host
/// installed from the package.
pub const PACKAGE_REMOTE_DIR: &str = "/var/lib/fleet-agent";
/// Where the package installs the agent binary.
pub const PACKAGE_AGENT_PATH: &str = "/usr/bin/fleet-agent";
/// A control archive larger than this is not a fleet-agent package (it holds a few small files).
const MAX_CONTROL_BYTES: u64 = 1 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DebError {
    #[error(
        "not a Debian package ({0}): pass the fleet-agent .deb that `bash scripts/package.sh` \
         builds into target/debian/"
    )]
    NotADeb(String),
    #[error(
        "the package is {0}, not fleet-agent: pass the fleet-agent .deb \
         (target/debian/fleet-agent_*.deb from `bash scripts/package.sh`)"
    )]
    WrongPackage(String),
    #[error(
        "the package's control file has no {0} field: rebuild it with `bash scripts/package.sh`"
    )]
    MissingField(&'static str),
}

/// The fleet-agent package to install, with what its control file says.
#[derive(Debug)]
pub struct AgentDeb {
    pub bytes: Vec<u8>,
    /// Of the .deb file, reported so an audit can tell which build a host got.
    pub sha256: String,
    pub version: String,
    /// Debian's name (`amd64`, `arm64`, or `all`).
    pub architecture: String,
}

impl AgentDeb {
    /// Reads and checks a .deb: it must be a Debian package of fleet-agent.
    pub fn read(bytes: Vec<u8>) -> Result<AgentDeb, DebError> {
        let control = control_text(&bytes)?;
        let fields = parse_control(&control);
        let (version, architecture) = check_control(&fields)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Ok(AgentDeb {
            bytes,
            sha256,
            version,
            architecture,
        })
    }

    /// `fleet-agent 0.1.0 (amd64)`.
    pub fn describe(&self) -> String {
        format!("{AGENT_PACKAGE} {} ({})", self.version, self.architecture)
    }
}

/// The text of `./control` inside the package's control archive.
fn control_text(bytes: &[u8]) -> Result<String, DebError> {
    let not_a_deb = |why: &str| DebError::NotADeb(why.to_string());
    if !bytes.starts_with(b"!<arch>\n") {
        return Err(not_a_deb("it is not an ar archive"));
    }
    let mut archive = ar::Archive::new(bytes);
    let mut seen_debian_binary = false;
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(|e| DebError::NotADeb(format!("a bad ar archive: {e}")))?;
        let name = String::from_utf8_lossy(entry.header().identifier()).to_string();
        let name = name.trim_end_matches('/');
        if !seen_debian_binary {
            // dpkg requires debian-binary first, saying format 2.x.
            let mut text = String::new();
            let _ = (&mut entry).take(64).read_to_string(&mut text);
            if name != "debian-binary" || !text.starts_with("2.") {
                return Err(not_a_deb("no debian-binary 2.x member first"));
            }
            seen_debian_binary = true;
            continue;
        }
        let Some(compression) = name.strip_prefix("control.tar") else {
            continue;
        };
        let reader: Box<dyn Read + '_> = match compression {
            "" => Box::new(entry),
            ".gz" => Box::new(flate2::read::GzDecoder::new(entry)),
            ".xz" => {
                let mut packed = Vec::new();
                (&mut entry)
                    .take(MAX_CONTROL_BYTES)
                    .read_to_end(&mut packed)
                    .map_err(|e| DebError::NotADeb(format!("{name}: {e}")))?;
                let mut unpacked = Vec::new();
                lzma_rs::xz_decompress(&mut &packed[..], &mut unpacked)
                    .map_err(|e| DebError::NotADeb(format!("{name}: {e}")))?;
                Box::new(std::io::Cursor::new(unpacked))
            }
            ".zst" => Box::new(
                ruzstd::decoding::StreamingDecoder::new(entry)
                    .map_err(|e| DebError::NotADeb(format!("{name}: {e}")))?,
            ),
            other => {
                return Err(DebError::NotADeb(format!(
                    "control.tar{other} is a compression fleetctl does not read"
                )))
            }
        };
        return control_from_tar(reader.take(MAX_CONTROL_BYTES), name);
    }
    Err(not_a_deb(if seen_debian_binary {
        "no control.tar member"
    } else {
        "an empty ar archive"
    }))
}

fn control_from_tar(reader: impl Read, member: &str) -> Result<String, DebError> {
    let bad = |e: std::io::Error| DebError::NotADeb(format!("{member}: {e}"));
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.to_string_lossy().to_string();
        if path.trim_start_matches("./") == "control" {
            let mut text = String::new();
            (&mut entry)
                .take(MAX_CONTROL_BYTES)
                .read_to_string(&mut text)
                .map_err(bad)?;
            return Ok(text);
        }
    }
    Err(DebError::NotADeb(format!("{member} holds no control file")))
}

/// The fields of a control file (`Name: value`; continuation lines, which start with a space,
/// belong to the field before and are dropped here). Names are as written.
pub fn parse_control(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) || line.trim().is_empty() {
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            fields.insert(name.trim().to_string(), value.trim().to_string());
        }
    }
    fields
}

/// Whether the control fields are those of a fleet-agent package: its (version, architecture).
pub fn check_control(fields: &BTreeMap<String, String>) -> Result<(String, String), DebError> {
    let field = |name: &'static str| {
        fields
            .get(name)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or(DebError::MissingField(name))
    };
    let package = field("Package")?;
    if package != AGENT_PACKAGE {
        return Err(DebError::WrongPackage(package));
    }
    Ok((field("Version")?, field("Architecture")?))
}

/// Whether a package of `package_arch` installs on a host whose dpkg says `host_arch`; the
/// install script makes the same decision with `case`.
pub fn architecture_fits(package_arch: &str, host_arch: &str) -> bool {
    package_arch == "all" || package_arch == host_arch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> BTreeMap<String, String> {
        parse_control(text)
    }

    #[test]
    fn control_checks() {
        let ok =
            "Package: fleet-agent\nVersion: 0.1.0-1\nArchitecture: amd64\nDescription: x\n more\n";
        for (text, expect) in [
            (ok, Ok(("0.1.0-1".to_string(), "amd64".to_string()))),
            (
                "Package: fleetctl\nVersion: 1\nArchitecture: amd64\n",
                Err(DebError::WrongPackage("fleetctl".into())),
            ),
            (
                "Package: fleet-agent\nArchitecture: amd64\n",
                Err(DebError::MissingField("Version")),
            ),
            (
                "Package: fleet-agent\nVersion: 1\nArchitecture:\n",
                Err(DebError::MissingField("Architecture")),
            ),
            ("", Err(DebError::MissingField("Package"))),
        ] {
            assert_eq!(check_control(&fields(text)), expect, "{text:?}");
        }
    }

    #[test]
    fn architectures() {
        for (package, host, fits) in [
            ("amd64", "amd64", true),
            ("all", "arm64", true),
            ("arm64", "amd64", false),
            ("amd64", "i386", false),
        ] {
            assert_eq!(architecture_fits(package, host), fits, "{package} {host}");
        }
    }

    /// A .deb made with the same crates: debian-binary, control.tar.gz, data.tar.
    fn deb(package: &str, first: &str) -> Vec<u8> {
        let control = format!("Package: {package}\nVersion: 2.0.0\nArchitecture: amd64\n");
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(control.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "./control", control.as_bytes())
            .unwrap();
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let control_tar = gz.finish().unwrap();
        let mut ar = ar::Builder::new(Vec::new());
        for (name, bytes) in [
            (first, &b"2.0\n"[..]),
            ("control.tar.gz", &control_tar[..]),
            ("data.tar", &[0u8; 1024][..]),
        ] {
            let header = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
            ar.append(&header, bytes).unwrap();
        }
        ar.into_inner().unwrap()
    }

    #[test]
    fn reads_what_dpkg_deb_builds_in_each_compression() {
        for (name, bytes) in [
            (
                "xz",
                &include_bytes!("../../testdata/deb/fleet-agent-xz.deb")[..],
            ),
            (
                "zstd",
                &include_bytes!("../../testdata/deb/fleet-agent-zstd.deb")[..],
            ),
            (
                "gzip",
                &include_bytes!("../../testdata/deb/fleet-agent-gzip.deb")[..],
            ),
        ] {
            let deb = AgentDeb::read(bytes.to_vec()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(deb.version, "1.2.3-1", "{name}");
            assert_eq!(deb.architecture, "arm64", "{name}");
        }
    }

    #[test]
    fn reads_a_deb_and_refuses_others() {
        let agent = AgentDeb::read(deb("fleet-agent", "debian-binary")).unwrap();
        assert_eq!(agent.describe(), "fleet-agent 2.0.0 (amd64)");
        assert_eq!(agent.sha256.len(), 64);
        assert_eq!(
            AgentDeb::read(deb("fleetctl", "debian-binary")).unwrap_err(),
            DebError::WrongPackage("fleetctl".into())
        );
        assert!(matches!(
            AgentDeb::read(deb("fleet-agent", "README")),
            Err(DebError::NotADeb(_))
        ));
        assert!(matches!(
            AgentDeb::read(b"\x7fELF not a package".to_vec()),
            Err(DebError::NotADeb(_))
        ));
    }
}
