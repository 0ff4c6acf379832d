//! A network namespace of the test's own with one veth link to this host (root only), for an
//! agent whose link to the controller the fault runner cuts in the kernel rather than at a
//! proxy. The namespace is `fleet-faults-<pid>-<idx>`, its link `fv<pid>x<idx>` (host end) and
//! `fv<pid>n<idx>` (namespace end), on a /29 of 10.0.0.0/8 of its own:
//!
//! - `.1` the host's end, where the runner reaches the namespace from (the health sampler,
//!   `GET /` on the app);
//! - `.2` the namespace's end: the agent's advertise address, where its app listens;
//! - `.3` a second address of the host's end, where a proxy to the controller listens.
//!
//! [`Netns::cut`] adds a blackhole route to `.3` inside the namespace (every packet to the
//! controller dropped, its TCP connections left hanging as on a dead link) while `.1` still
//! reaches the app, so the cut takes no app down; [`Netns::restore`] removes it. Dropping the
//! guard deletes the namespace, which deletes the veth pair with it; namespaces of this process
//! left over from a crash are removed by [`remove_leftovers`].
//!
//! Set up with `ip` (iproute2): this is the test harness, not the product.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

/// The prefix of every namespace the runner makes.
pub const PREFIX: &str = "fleet-faults-";
/// How long one `ip` call may take.
const IP_DEADLINE: Duration = Duration::from_secs(20);

/// One namespace and its link; see the module doc.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    base: u32,
    cut: bool,
}

/// Runs `ip ARGS`; what it said when it failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let mut command = Command::new("ip");
    command.args(args);
    let done = crate::process::run_with_deadline(command, IP_DEADLINE);
    if done.code == 0 {
        Ok(())
    } else {
        Err(format!(
            "ip {} exited {}: {}",
            args.join(" "),
            done.code,
            done.stderr.trim()
        ))
    }
}

/// Why namespaces cannot be made here, if they cannot: not root, or no `ip`.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root to create network namespaces".to_string());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("needs `ip` (iproute2) to create network namespaces".to_string()),
    }
}

/// The /29 of namespace `idx` of process `pid`: `10.X.Y.Z` with a base unique to the pair
/// (the pid's low 17 bits and the index's 4).
fn subnet_base(pid: u32, idx: u32) -> u32 {
    let unique = ((pid & 0x1_ffff) << 4) | (idx & 0xf);
    (10 << 24) | (unique << 3)
}

impl Netns {
    /// Creates namespace `idx` (0–15) of this process with its link up and addressed.
    pub fn create(idx: u32) -> Result<Netns, String> {
        assert!(idx < 16, "at most 16 namespaces per process");
        let pid = std::process::id();
        let netns = Netns {
            name: format!("{PREFIX}{pid}-{idx}"),
            host_if: format!("fv{pid}x{idx}"),
            ns_if: format!("fv{pid}n{idx}"),
            base: subnet_base(pid, idx),
            cut: false,
        };
        let ns_if = netns.ns_if.clone();
        // From here on the guard removes whatever was made, also when a step fails.
        ip(&["netns", "add", &netns.name])?;
        let cidr = |last: u32| format!("{}/29", Ipv4Addr::from(netns.base + last));
        ip(&[
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            &netns.name,
        ])?;
        ip(&["addr", "add", &cidr(1), "dev", &netns.host_if])?;
        ip(&["addr", "add", &cidr(3), "dev", &netns.host_if])?;
        ip(&["link", "set", &netns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", netns.name.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &cidr(2), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        Ok(netns)
    }

    /// The host's end, where the runner reaches the namespace from.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// The namespace's end: the agent's advertise address.
    pub fn inside_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 2)
    }

    /// Where a proxy to the controller listens, on the host's end.
    pub fn controller_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 3)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", self.name.as_str()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn blackhole(&self, add: bool) -> Result<(), String> {
        let to = format!("{}/32", self.controller_addr());
        ip(&[
            "-n",
            &self.name,
            "route",
            if add { "add" } else { "del" },
            "blackhole",
            &to,
        ])
    }

    /// Caps what leaves the namespace over its link at `megabytes_per_s` (a token bucket,
    /// `tc qdisc ... tbf`, on the namespace's end), as a real uplink would be.
    pub fn cap_egress(&self, megabytes_per_s: u32) -> Result<(), String> {
        let rate = format!("{}mbit", megabytes_per_s * 8);
        let mut command = Command::new("ip");
        command.args([
            "netns",
            "exec",
            &self.name,
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.ns_if,
        ]);
        // A burst of 4 MB keeps the bucket from starving a 1 GB/s-class sender between
        // refills; 200 ms of queue before drops.
        command.args([
            "root", "tbf", "rate", &rate, "burst", "4mb", "latency", "200ms",
        ]);
        let done = crate::process::run_with_deadline(command, IP_DEADLINE);
        if done.code == 0 {
            Ok(())
        } else {
            Err(format!(
                "tc qdisc add dev {} root tbf rate {rate} exited {}: {}",
                self.ns_if,
                done.code,
                done.stderr.trim()
            ))
        }
    }

    /// Cuts the link to the controller: every packet to it is dropped inside the namespace.
    pub fn cut(&mut self) -> Result<(), String> {
        if !self.cut {
            self.blackhole(true)?;
            self.cut = true;
        }
        Ok(())
    }

    /// Restores the link.
    pub fn restore(&mut self) -> Result<(), String> {
        if self.cut {
            self.blackhole(false)?;
            self.cut = false;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the host's end;
        // the host's end is deleted by name too in case the namespace never got its end.
        let _ = ip(&["netns", "delete", &self.name]);
        let _ = ip(&["link", "delete", &self.host_if]);
    }
}

/// Removes namespaces named for processes that no longer run (a runner killed before its
/// guards ran); the names of those removed.
pub fn remove_leftovers() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id()
            && !crate::process::pid_is_alive(pid)
            && ip(&["netns", "delete", &name]).is_ok()
        {
            removed.push(name);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_private_distinct_and_in_10_slash_8() {
        let mut seen = std::collections::BTreeSet::new();
        // Pids that differ in their low 17 bits never share a subnet.
        for pid in [1, 2, 4_000, 65_536, 131_071] {
            for idx in 0..16 {
                let base = subnet_base(pid, idx);
                assert_eq!(base >> 24, 10, "{pid} {idx}");
                assert_eq!(base & 7, 0);
                assert!(seen.insert(base), "{pid} {idx} collides");
            }
        }
    }
}
