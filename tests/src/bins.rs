//! Finds the binaries the harness starts: `fleet-controller`, `fleet-agent`, `fleetctl` and
//! `fleet-example-web`, in the target directory of the running test or benchmark.
//!
//! A test executable lives in `target/<profile>/deps/`, a binary of this crate (the benchmark)
//! in `target/<profile>/`; the binaries sit in `target/<profile>/`. `FLEET_BIN_DIR` overrides
//! the directory.

use std::path::{Path, PathBuf};

/// Paths of the binaries a fleet is made of.
#[derive(Debug, Clone)]
pub struct Bins {
    pub controller: PathBuf,
    pub agent: PathBuf,
    pub fleetctl: PathBuf,
    pub web: PathBuf,
}

impl Bins {
    /// Locates every binary or panics saying how to build them.
    pub fn locate() -> Bins {
        let dir = bin_dir();
        let find = |name: &str| -> PathBuf {
            let path = dir.join(name);
            if !path.is_file() {
                let release = if dir.file_name().is_some_and(|n| n == "release") {
                    " --release"
                } else {
                    ""
                };
                panic!(
                    "{name} is missing from {}: run `cargo build{release} --workspace --bins` first",
                    dir.display()
                );
            }
            path
        };
        Bins {
            controller: find("fleet-controller"),
            agent: find("fleet-agent"),
            fleetctl: find("fleetctl"),
            web: find("fleet-example-web"),
        }
    }
}

/// The directory holding the binaries: `FLEET_BIN_DIR`, else the running executable's profile
/// directory.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLEET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the path of the running test executable");
    profile_dir_of(&exe)
}

fn profile_dir_of(exe: &Path) -> PathBuf {
    let dir = exe
        .parent()
        .expect("the test executable has a parent directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_profile_dir_from_tests_and_binaries() {
        assert_eq!(
            profile_dir_of(Path::new("target/debug/deps/rolling_update-abc")),
            PathBuf::from("target/debug")
        );
        assert_eq!(
            profile_dir_of(Path::new("target/release/fleet-bench")),
            PathBuf::from("target/release")
        );
    }
}
