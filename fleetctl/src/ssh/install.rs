//! What `fleetctl bootstrap` puts on a host and runs there, over an [`SshSession`]:
//!
//! ```text
//! REMOTE_DIR/bin/fleet-agent        the agent binary (replaced atomically)
//! REMOTE_DIR/agent.toml             0600: controller (a URL, or an array of them), name, advertise, data_dir, labels, ca, join_token, peer_port
//! REMOTE_DIR/ca.pem                 the fleet CA the agent trusts (with mTLS)
//! REMOTE_DIR/                       0711: apps (users of their own) pass through to data/
//! REMOTE_DIR/data/                  the agent's data dir (credentials, releases, instances)
//! REMOTE_DIR/fleet-agent.pid|.log   when no systemd runs: the detached agent's pid and log
//! /etc/systemd/system/fleet-agent.service   where systemd runs (packaging/systemd)
//! ```
//!
//! Every file is written as `cat > .tmp && chmod && mv`, so a reader never sees half a file.
//! Bootstrapping a host again upgrades it in place: the old agent is stopped (systemctl
//! restart, or the pid from the pid file), the binary and config replaced, the data dir and the
//! agent's credentials kept.
//!
//! With `--agent-deb` ([`AgentSource::Package`]) the host's dpkg installs the fleet-agent
//! package instead (`dpkg -i`, as root or through `sudo -n`): the binary is
//! `/usr/bin/fleet-agent`, the unit the package's own, and the remote dir the one that unit
//! reads, `/var/lib/fleet-agent` (agent.toml, ca.pem, data/, and the pid file and log when no
//! systemd runs). Installing a newer package upgrades in place the same way.

use crate::ssh::connection::{SshError, SshSession};
use crate::ssh::deb::{AgentDeb, PACKAGE_AGENT_PATH, PACKAGE_REMOTE_DIR};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The unit file, with `@REMOTE_DIR@` where the remote dir goes.
pub const AGENT_UNIT_TEMPLATE: &str =
    include_str!("../../../packaging/systemd/fleet-agent.service");
/// Where the unit is installed on a host with systemd.
pub const AGENT_UNIT_PATH: &str = "/etc/systemd/system/fleet-agent.service";
/// The default `--remote-dir`.
pub const DEFAULT_REMOTE_DIR: &str = "/opt/fleet";
/// How long a stopping detached agent gets before SIGKILL, in tenths of a second.
const STOP_WAIT_TENTHS: u32 = 150;

#[derive(Debug, Error)]
pub enum InstallError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("the remote dir {0:?} must be an absolute path without '..' or quotes")]
    RemoteDir(PathBuf),
    #[error(
        "the agent binary is built for {binary} but the host is {host} (uname -m): build \
         fleet-agent for {host} and pass it with --agent-binary"
    )]
    Architecture { binary: String, host: String },
    #[error("the host answered something unexpected to {what}: {answer:?}")]
    Unexpected { what: String, answer: String },
    #[error("cannot write the agent config: {0}")]
    Config(String),
    #[error("no join token from the controller: {0}")]
    JoinToken(String),
    #[error("{host} has no dpkg; bootstrap without --agent-deb installs the binary")]
    NoDpkg { host: String },
    #[error(
        "the package is {package} but the host's dpkg is {host} (dpkg --print-architecture): \
         build the fleet-agent package for {host} and pass it with --agent-deb"
    )]
    PackageArchitecture { package: String, host: String },
    #[error(
        "dpkg -i of the agent package failed on the host; the end of its output:\n{tail}\n\
         fix what dpkg says (missing dependencies: `apt-get -f install` on the host) and run \
         bootstrap again; the agent that ran before (if any) still runs"
    )]
    Dpkg { tail: String },
    #[error(
        "the host runs no systemd and the login user is not root: the packaged agent lives in \
         /var/lib/fleet-agent and must be started as root; log in as root, or bootstrap \
         without --agent-deb"
    )]
    PackageNeedsRoot,
}

/// The agent's config file, as the agent reads it (`fleet-agent --config`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentConfigFile {
    pub controller: ControllerValue,
    pub name: String,
    pub advertise: String,
    pub data_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
    /// Where the agent serves artifact chunks to its peers (0: not at all); must come before
    /// `labels`, a table.
    pub peer_port: u16,
    pub labels: BTreeMap<String, String>,
}

/// agent.toml's `controller`: a string for one controller, an array for several.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum ControllerValue {
    One(String),
    Several(Vec<String>),
}

impl ControllerValue {
    pub fn of(urls: &[String]) -> ControllerValue {
        match urls {
            [one] => ControllerValue::One(one.clone()),
            several => ControllerValue::Several(several.to_vec()),
        }
    }
}

/// The port bootstrapped agents serve their peers on (the agent's own default).
pub const AGENT_PEER_PORT: u16 = 7702;

/// The agent binary to install, with its sha256 (reported, so an audit can tell which build a
/// host got) computed once for every host.
#[derive(Debug)]
pub struct AgentBinary {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl AgentBinary {
    pub fn new(bytes: Vec<u8>) -> AgentBinary {
        let sha256 = sha256_hex(&bytes);
        AgentBinary { bytes, sha256 }
    }
}

/// What is installed on each host: the agent binary (`--agent-binary`, or the one beside
/// fleetctl) or the fleet-agent package (`--agent-deb`).
#[derive(Debug)]
pub enum AgentSource {
    Binary(AgentBinary),
    Package(AgentDeb),
}

impl AgentSource {
    /// The sha256 of what is sent: the binary, or the .deb file.
    pub fn sha256(&self) -> &str {
        match self {
            AgentSource::Binary(binary) => &binary.sha256,
            AgentSource::Package(deb) => &deb.sha256,
        }
    }

    /// The first entry of the tar stream sent to every host, made once.
    pub fn tar_entry(&self) -> Vec<u8> {
        match self {
            AgentSource::Binary(binary) => binary_tar_entry(binary),
            AgentSource::Package(deb) => tar_entry(PACKAGE_FILE, &deb.bytes, 0o644),
        }
    }
}

/// The name the .deb has in the staging dir on the host.
const PACKAGE_FILE: &str = "fleet-agent.deb";

/// Everything one host gets.
pub struct InstallPlan<'a> {
    pub remote_dir: PathBuf,
    pub agent: &'a AgentSource,
    /// The controllers the agent dials, in turn.
    pub controller_urls: Vec<String>,
    pub host_name: String,
    pub advertise: String,
    pub labels: BTreeMap<String, String>,
    /// The CA certificate (PEM) the agent should trust; None without mTLS.
    pub ca_pem: Option<String>,
}

/// How the agent runs on the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceMode {
    /// Installed and enabled as fleet-agent.service.
    Systemd,
    /// Started detached (no systemd on the host), with this pid.
    Detached { pid: u32 },
}

/// What [`install`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstallOutcome {
    pub mode: ServiceMode,
    /// True when an agent ran there before and was replaced.
    pub upgraded: bool,
    /// False when the binary on the host was already the same bytes (it is sent anyway: one
    /// round trip beats asking first).
    pub binary_uploaded: bool,
    pub remote_dir: PathBuf,
    /// The sha256 of the agent binary now on the host (with `--agent-deb`: of the .deb).
    pub agent_sha256: String,
    /// The package installed with `--agent-deb`, e.g. `fleet-agent 0.1.0 (amd64)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
}

impl InstallPlan<'_> {
    /// The agent's config file text, with `join_token` (None when the controller has none to
    /// give: no mTLS).
    pub fn config_toml(&self, join_token: Option<&str>) -> Result<String, InstallError> {
        let dir = &self.remote_dir;
        let file = AgentConfigFile {
            controller: ControllerValue::of(&self.controller_urls),
            name: self.host_name.clone(),
            advertise: self.advertise.clone(),
            data_dir: dir.join("data"),
            ca: self.ca_pem.as_ref().map(|_| dir.join("ca.pem")),
            join_token: join_token.map(str::to_string),
            peer_port: AGENT_PEER_PORT,
            labels: self.labels.clone(),
        };
        let body = toml::to_string(&file).map_err(|e| InstallError::Config(e.to_string()))?;
        Ok(format!(
            "# Written by `fleetctl bootstrap`; bootstrapping this host again rewrites it.\n{body}"
        ))
    }

    /// The unit file for this remote dir.
    pub fn unit_file(&self) -> String {
        AGENT_UNIT_TEMPLATE.replace("@REMOTE_DIR@", &self.remote_dir.display().to_string())
    }
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A remote dir must be absolute, normal and free of characters that would need care in a
/// unit file.
pub fn check_remote_dir(dir: &Path) -> Result<(), InstallError> {
    let text = dir.to_string_lossy();
    let ok = dir.is_absolute()
        && dir != Path::new("/")
        && dir
            .components()
            .all(|c| !matches!(c, std::path::Component::ParentDir))
        && !text.contains(['\'', '"', '\\', '\n', ' ', '%', '$', '`', ';']);
    if ok {
        Ok(())
    } else {
        Err(InstallError::RemoteDir(dir.to_path_buf()))
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The `uname -m` names an ELF binary runs on, from its e_machine field; None when unknown.
fn elf_machines(binary: &[u8]) -> Option<(&'static str, &'static [&'static str])> {
    if binary.len() < 20 || &binary[..4] != b"\x7fELF" {
        return None;
    }
    // e_machine at offset 18, in the file's byte order (EI_DATA: 1 little, 2 big).
    let machine = if binary[5] == 2 {
        u16::from_be_bytes([binary[18], binary[19]])
    } else {
        u16::from_le_bytes([binary[18], binary[19]])
    };
    Some(match machine {
        0x3e => ("x86_64", &["x86_64", "amd64"]),
        0xb7 => ("aarch64", &["aarch64", "arm64"]),
        0x03 => ("i686", &["i386", "i486", "i586", "i686"]),
        0x28 => ("arm", &["armv6l", "armv7l", "armv8l", "arm"]),
        0xf3 => ("riscv64", &["riscv64"]),
        _ => return None,
    })
}

/// The exit status the install script uses when the host's architecture does not fit.
const EXIT_WRONG_ARCH: u32 = 42;
/// The package install script's exit status when the host has no dpkg.
const EXIT_NO_DPKG: u32 = 43;
/// The package install script's exit status when `dpkg -i` failed (its output's tail follows
/// a `dpkg=failed` line).
const EXIT_DPKG_FAILED: u32 = 44;
/// The package install script's exit status when it would have to start the agent detached as
/// a user other than root.
const EXIT_NEEDS_ROOT: u32 = 45;
/// How many lines of dpkg's output a failure shows.
const DPKG_TAIL_LINES: u32 = 15;

/// One file of the tar stream sent to the host: a ustar header, the bytes, padding to 512.
fn tar_entry(name: &str, bytes: &[u8], mode: u32) -> Vec<u8> {
    let mut header = tar::Header::new_ustar();
    // Names are short constants: set_path cannot fail on them.
    let _ = header.set_path(name);
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut entry = Vec::with_capacity(512 + bytes.len() + 512);
    entry.extend_from_slice(header.as_bytes());
    entry.extend_from_slice(bytes);
    entry.resize(entry.len().div_ceil(512) * 512, 0);
    entry
}

/// The agent binary as a tar entry, made once and sent to every host.
pub fn binary_tar_entry(agent_binary: &AgentBinary) -> Vec<u8> {
    tar_entry("fleet-agent", &agent_binary.bytes, 0o755)
}

/// Installs (or upgrades) the agent on the host and starts it, in ONE command: a shell script
/// that reads a tar stream (binary, config, CA, unit) from stdin (SSH's MACs guard the bytes,
/// tar notices a cut stream), moves everything into place, stops the old agent and starts the
/// new one. One round trip whatever the network, and the least work for the host's sshd.
pub async fn install(
    session: &SshSession,
    plan: &InstallPlan<'_>,
    binary_entry: &[u8],
    join_token: impl std::future::Future<Output = Result<Option<String>, String>>,
) -> Result<InstallOutcome, InstallError> {
    check_remote_dir(&plan.remote_dir)?;
    let dir_text = plan.remote_dir.display().to_string();
    let dir = shell_quote(&dir_text);

    // The small files follow the binary on the stream; the config needs the join token, which
    // the controller makes while the binary's bytes travel.
    let small_entries = async {
        let join_token = join_token.await.map_err(InstallError::JoinToken)?;
        let mut entries = tar_entry(
            "agent.toml",
            plan.config_toml(join_token.as_deref())?.as_bytes(),
            0o600,
        );
        if let Some(ca_pem) = &plan.ca_pem {
            entries.extend(tar_entry("ca.pem", ca_pem.as_bytes(), 0o644));
        }
        entries.extend(tar_entry(
            "fleet-agent.service",
            plan.unit_file().as_bytes(),
            0o644,
        ));
        entries.extend([0u8; 1024]);
        Ok::<_, InstallError>(entries)
    };

    let script = match plan.agent {
        AgentSource::Binary(binary) => {
            let arch_check = match elf_machines(&binary.bytes) {
        Some((_, accepted)) => format!(
            "case \"$(uname -m)\" in {}) ;; *) echo \"arch=$(uname -m)\"; exit {EXIT_WRONG_ARCH};; esac; ",
            accepted.join("|")
        ),
                None => String::new(),
            };
            install_script(&dir, &arch_check)
        }
        AgentSource::Package(deb) => {
            if plan.remote_dir != Path::new(PACKAGE_REMOTE_DIR) {
                return Err(InstallError::RemoteDir(plan.remote_dir.clone()));
            }
            package_install_script(&deb.architecture)
        }
    };
    let (output, tail_error) = session
        .exec_then(&script, binary_entry, small_entries)
        .await?;
    if let Some(error) = tail_error {
        return Err(error);
    }
    let answer = output.stdout_text();
    let host_arch = || {
        answer
            .lines()
            .find_map(|l| l.strip_prefix("arch="))
            .unwrap_or("unknown")
            .to_string()
    };
    match (output.exit_status, plan.agent) {
        (Some(EXIT_WRONG_ARCH), AgentSource::Binary(binary)) => {
            let binary = elf_machines(&binary.bytes)
                .map(|(arch, _)| arch.to_string())
                .unwrap_or_default();
            return Err(InstallError::Architecture {
                binary,
                host: host_arch(),
            });
        }
        (Some(EXIT_WRONG_ARCH), AgentSource::Package(deb)) => {
            return Err(InstallError::PackageArchitecture {
                package: deb.architecture.clone(),
                host: host_arch(),
            });
        }
        (Some(EXIT_NO_DPKG), AgentSource::Package(_)) => {
            return Err(InstallError::NoDpkg {
                host: plan.host_name.clone(),
            })
        }
        (Some(EXIT_DPKG_FAILED), AgentSource::Package(_)) => {
            return Err(InstallError::Dpkg {
                tail: dpkg_output_tail(&answer),
            });
        }
        (Some(EXIT_NEEDS_ROOT), AgentSource::Package(_)) => {
            return Err(InstallError::PackageNeedsRoot)
        }
        _ => {}
    }
    session.check_exit("install and start the agent", &output)?;

    let upgraded = answer.lines().any(|l| l == "upgraded=yes");
    let binary_uploaded = !answer.lines().any(|l| l == "binary=same");
    let mode = if answer.lines().any(|l| l == "mode=systemd") {
        ServiceMode::Systemd
    } else {
        let pid = answer
            .lines()
            .find_map(|l| l.strip_prefix("pid="))
            .and_then(|p| p.trim().parse::<u32>().ok())
            .ok_or_else(|| InstallError::Unexpected {
                what: "starting the agent".to_string(),
                answer: answer.clone(),
            })?;
        ServiceMode::Detached { pid }
    };
    Ok(InstallOutcome {
        mode,
        upgraded,
        binary_uploaded,
        remote_dir: plan.remote_dir.clone(),
        agent_sha256: plan.agent.sha256().to_string(),
        package: match plan.agent {
            AgentSource::Package(deb) => Some(deb.describe()),
            AgentSource::Binary(_) => None,
        },
    })
}

/// The install script; `dir` is shell-quoted already. It starts as few processes as it can
/// (each costs a host's sshd session real time): shell builtins wherever they do. Under
/// systemd the restart does not wait for the unit to be ready (Type=notify: ready once the
/// agent's session is up); bootstrap waits for the host to register instead.
/// The shell that replaces a detached agent (no systemd) in the current directory, its data
/// dir `dir`: stops the one `fleet-agent.pid` names (recognised by its command line, so a
/// recycled pid is left alone; SIGTERM, then SIGKILL after a while), runs `between`, then starts
/// `agent` detached and records its pid. Both install scripts end with it.
fn detached_restart(dir: &str, agent: &str, between: &str) -> String {
    format!(
        "alive() {{ [ -r /proc/$1/stat ] && read -r stat < /proc/$1/stat && \
           case \"${{stat##*) }}\" in Z*) false;; *) true;; esac; }}; \
         if [ -f fleet-agent.pid ]; then \
           read -r old < fleet-agent.pid || old=; \
           if [ -n \"$old\" ] && alive \"$old\" && tr '\\0' ' ' < /proc/$old/cmdline | grep -q fleet-agent; then \
             kill -TERM \"$old\" 2>/dev/null || true; i=0; \
             while alive \"$old\" && [ $i -lt {STOP_WAIT_TENTHS} ]; do sleep 0.1; i=$((i+1)); done; \
             if alive \"$old\"; then kill -KILL \"$old\" 2>/dev/null || true; fi; \
             echo upgraded=yes; \
           fi; \
         fi; \
         {between}\
         if command -v setsid >/dev/null 2>&1; then \
           setsid {agent} --config {dir}/agent.toml >> {dir}/fleet-agent.log 2>&1 < /dev/null & \
         else \
           nohup {agent} --config {dir}/agent.toml >> {dir}/fleet-agent.log 2>&1 < /dev/null & \
         fi; \
         pid=$!; echo $pid > fleet-agent.pid; \
         echo mode=detached; echo pid=$pid; "
    )
}

fn install_script(dir: &str, arch_check: &str) -> String {
    let unit = shell_quote(AGENT_UNIT_PATH);
    let detached = detached_restart(
        dir,
        &format!("{dir}/bin/fleet-agent"),
        "mv -f \"$staging/fleet-agent\" bin/fleet-agent; ",
    );
    format!(
        "set -e; umask 077; {arch_check}\
         staging={dir}/.incoming.$$; \
         mkdir -p {dir}/bin {dir}/data \"$staging\"; chmod 711 {dir}; cd {dir}; \
         trap 'rm -rf \"$staging\"' EXIT; \
         tar -xf - -C \"$staging\"; \
         if [ -f bin/fleet-agent ] && cmp -s bin/fleet-agent \"$staging/fleet-agent\" 2>/dev/null; then \
           echo binary=same; \
         fi; \
         if [ -f \"$staging/ca.pem\" ]; then mv -f \"$staging/agent.toml\" \"$staging/ca.pem\" .; \
         else mv -f \"$staging/agent.toml\" .; fi; \
         if [ -d /run/systemd/system ]; then \
           SUDO=; [ \"$(id -u)\" = 0 ] || SUDO='sudo -n'; \
           if $SUDO systemctl is-active --quiet fleet-agent.service; then echo upgraded=yes; fi; \
           $SUDO systemctl stop fleet-agent.service 2>/dev/null || true; \
           mv -f \"$staging/fleet-agent\" bin/fleet-agent; \
           $SUDO install -m 0644 \"$staging/fleet-agent.service\" {unit}; \
           $SUDO systemctl daemon-reload; \
           $SUDO systemctl enable fleet-agent.service >/dev/null 2>&1; \
           $SUDO systemctl restart --no-block fleet-agent.service; \
           echo mode=systemd; \
         else \
           {detached}\
         fi"
    )
}

/// The script that installs the fleet-agent package of `package_arch` (a Debian architecture
/// name, checked by [`check_control`](crate::ssh::deb::check_control)-read values only, but
/// quoted anyway). It checks dpkg and the architecture before reading the stream (a .deb, then
/// agent.toml and maybe ca.pem), runs `dpkg -i`, puts the config where the package's unit reads
/// it, then restarts the unit, or, without systemd, replaces the detached agent as
/// [`install_script`] does. Upgrades in place: dpkg replaces the binary under the running agent,
/// which is then restarted; the apps keep running and the new agent adopts them.
fn package_install_script(package_arch: &str) -> String {
    let arch = shell_quote(package_arch);
    let dir = shell_quote(PACKAGE_REMOTE_DIR);
    let agent = shell_quote(PACKAGE_AGENT_PATH);
    let unit = shell_quote(AGENT_UNIT_PATH);
    let detached = detached_restart(&dir, &agent, "");
    format!(
        "set -e; umask 077; \
         command -v dpkg >/dev/null 2>&1 || exit {EXIT_NO_DPKG}; \
         host_arch=$(dpkg --print-architecture); \
         case {arch} in all|\"$host_arch\") ;; *) echo \"arch=$host_arch\"; exit {EXIT_WRONG_ARCH};; esac; \
         SUDO=; [ \"$(id -u)\" = 0 ] || SUDO='sudo -n'; \
         if [ ! -d /run/systemd/system ] && [ -n \"$SUDO\" ]; then exit {EXIT_NEEDS_ROOT}; fi; \
         staging=$(mktemp -d); trap 'rm -rf \"$staging\"' EXIT; \
         tar -xf - -C \"$staging\"; \
         if ! $SUDO dpkg -i \"$staging/{PACKAGE_FILE}\" > \"$staging/dpkg.log\" 2>&1 < /dev/null; then \
           echo dpkg=failed; tail -n {DPKG_TAIL_LINES} \"$staging/dpkg.log\"; exit {EXIT_DPKG_FAILED}; \
         fi; \
         $SUDO mkdir -p {dir}/data; $SUDO chmod 711 {dir}; \
         $SUDO install -m 0600 \"$staging/agent.toml\" {dir}/agent.toml; \
         if [ -f \"$staging/ca.pem\" ]; then $SUDO install -m 0644 \"$staging/ca.pem\" {dir}/ca.pem; fi; \
         if [ -d /run/systemd/system ]; then \
           if $SUDO systemctl is-active --quiet fleet-agent.service; then echo upgraded=yes; fi; \
           if [ -f {unit} ] && grep -q 'fleetctl bootstrap' {unit}; then \
             $SUDO rm -f {unit}; echo bootstrap_unit=removed; \
           fi; \
           $SUDO systemctl daemon-reload; \
           $SUDO systemctl enable fleet-agent.service >/dev/null 2>&1; \
           $SUDO systemctl restart --no-block fleet-agent.service; \
           echo mode=systemd; \
         else \
           cd {dir}; \
           {detached}\
         fi"
    )
}

/// dpkg's own lines in the package install script's answer: those after `dpkg=failed`.
fn dpkg_output_tail(answer: &str) -> String {
    let tail: Vec<&str> = answer
        .lines()
        .skip_while(|l| *l != "dpkg=failed")
        .skip(1)
        .collect();
    if tail.is_empty() {
        "(dpkg printed nothing)".to_string()
    } else {
        tail.join("\n")
    }
}

/// Whether the agent still runs on the host, and if not, the tail of its log.
pub async fn agent_health(
    session: &SshSession,
    remote_dir: &Path,
    mode: &ServiceMode,
) -> Result<Result<(), String>, InstallError> {
    let dir = shell_quote(&remote_dir.display().to_string());
    let script = match mode {
        // The unit is Type=notify: `activating` until its agent's first session is up.
        ServiceMode::Systemd => "SUDO=; [ \"$(id -u)\" = 0 ] || SUDO='sudo -n'; \
             case \"$($SUDO systemctl is-active fleet-agent.service)\" in \
             active|activating|reloading) echo alive=yes;; \
             *) $SUDO journalctl -u fleet-agent.service -n 15 --no-pager 2>&1 | tail -n 15;; esac"
            .to_string(),
        ServiceMode::Detached { pid } => format!(
            "if [ -r /proc/{pid}/stat ] && read -r stat < /proc/{pid}/stat && \
               case \"${{stat##*) }}\" in Z*) false;; *) true;; esac; \
             then echo alive=yes; else tail -n 15 {dir}/fleet-agent.log 2>&1; fi"
        ),
    };
    let output = session.exec(&script, &[]).await?;
    let text = output.stdout_text();
    if text.lines().any(|l| l == "alive=yes") {
        Ok(Ok(()))
    } else {
        Ok(Err(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(binary: &AgentSource) -> InstallPlan<'_> {
        InstallPlan {
            remote_dir: PathBuf::from("/opt/fleet"),
            agent: binary,
            controller_urls: vec!["https://10.0.0.1:7700".into()],
            host_name: "web-1".into(),
            advertise: "10.0.0.5".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            ca_pem: Some("PEM".into()),
        }
    }

    #[test]
    fn the_config_is_toml_the_agent_reads() {
        let empty = AgentSource::Binary(AgentBinary::new(Vec::new()));
        let text = plan(&empty).config_toml(Some("tok\"en")).unwrap();
        let value: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(value["controller"].as_str(), Some("https://10.0.0.1:7700"));
        assert_eq!(value["data_dir"].as_str(), Some("/opt/fleet/data"));
        // Several controllers: an array, in order.
        let mut several = plan(&empty);
        several.controller_urls = vec![
            "https://10.0.0.1:7700".to_string(),
            "https://10.0.0.2:7700".to_string(),
        ];
        let text = several.config_toml(None).unwrap();
        let other: toml::Value = toml::from_str(&text).unwrap();
        let listed: Vec<&str> = other["controller"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(toml::Value::as_str)
            .collect();
        assert_eq!(listed, ["https://10.0.0.1:7700", "https://10.0.0.2:7700"]);
        assert_eq!(value["ca"].as_str(), Some("/opt/fleet/ca.pem"));
        assert_eq!(value["join_token"].as_str(), Some("tok\"en"));
        assert_eq!(value["labels"]["env"].as_str(), Some("prod"));

        let mut bare = plan(&empty);
        bare.ca_pem = None;
        let value: toml::Value = toml::from_str(&bare.config_toml(None).unwrap()).unwrap();
        assert!(value.get("ca").is_none() && value.get("join_token").is_none());
    }

    #[test]
    fn the_unit_names_the_remote_dir() {
        let empty = AgentSource::Binary(AgentBinary::new(Vec::new()));
        let unit = plan(&empty).unit_file();
        assert!(!unit.contains("@REMOTE_DIR@"));
        assert!(
            unit.contains("ExecStart=/opt/fleet/bin/fleet-agent --config /opt/fleet/agent.toml")
        );
        assert!(unit.contains("ReadWritePaths=/opt/fleet"));
    }

    #[test]
    fn remote_dirs_and_quoting() {
        for (dir, ok) in [
            ("/opt/fleet", true),
            ("/srv/fleet-2/x_y", true),
            ("opt/fleet", false),
            ("/", false),
            ("/opt/../etc", false),
            ("/opt/fle et", false),
            ("/opt/$(reboot)", false),
            ("/opt/it's", false),
        ] {
            assert_eq!(check_remote_dir(Path::new(dir)).is_ok(), ok, "{dir}");
        }
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn the_tar_stream_unpacks_with_names_modes_and_bytes() {
        let binary = AgentBinary::new(b"#!/bin/sh\nexit 0\n".to_vec());
        let mut stream = binary_tar_entry(&binary);
        stream.extend(tar_entry("agent.toml", b"name = \"x\"\n", 0o600));
        stream.extend([0u8; 1024]);
        let mut archive = tar::Archive::new(&stream[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            seen.push((
                entry.path().unwrap().display().to_string(),
                entry.header().mode().unwrap(),
                bytes,
            ));
        }
        assert_eq!(
            seen,
            vec![
                ("fleet-agent".to_string(), 0o755, binary.bytes.clone()),
                ("agent.toml".to_string(), 0o600, b"name = \"x\"\n".to_vec()),
            ]
        );
    }

    #[test]
    fn dpkg_failures_show_dpkg_lines_only() {
        for (answer, tail) in [
            (
                "dpkg=failed\ndpkg: error processing package fleet-agent (--install):\n dependency problems\n",
                "dpkg: error processing package fleet-agent (--install):\n dependency problems",
            ),
            ("upgraded=yes\ndpkg=failed\nE: x\n", "E: x"),
            ("dpkg=failed\n", "(dpkg printed nothing)"),
            ("", "(dpkg printed nothing)"),
        ] {
            assert_eq!(dpkg_output_tail(answer), tail, "{answer:?}");
        }
    }

    #[test]
    fn the_package_script_checks_dpkg_and_architecture_before_reading_the_stream() {
        let script = package_install_script("arm64");
        let at = |what: &str| script.find(what).unwrap_or_else(|| panic!("{what}"));
        assert!(at("command -v dpkg") < at("tar -xf -"));
        assert!(at("dpkg --print-architecture") < at("tar -xf -"));
        assert!(script.contains("case 'arm64' in all|"));
        assert!(at("dpkg -i") < at("/var/lib/fleet-agent'/agent.toml"));
        assert!(
            script.contains("'/usr/bin/fleet-agent' --config '/var/lib/fleet-agent'/agent.toml")
        );
    }

    /// Both install scripts are valid shell (`sh -n`: parsed, not run), with and without an
    /// architecture check.
    #[test]
    fn the_install_scripts_parse() {
        for script in [
            install_script("'/opt/fleet'", ""),
            install_script(
                "'/opt/fleet'",
                "case \"$(uname -m)\" in x86_64) ;; *) exit 3;; esac; ",
            ),
            package_install_script("amd64"),
        ] {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .expect("sh");
            assert!(
                out.status.success(),
                "{}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn elf_architectures() {
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[5] = 1;
        header[18] = 0x3e;
        assert_eq!(elf_machines(&header).unwrap().0, "x86_64");
        header[18] = 0xb7;
        assert!(elf_machines(&header).unwrap().1.contains(&"arm64"));
        assert!(elf_machines(b"#!/bin/sh\n").is_none());
    }
}
