//! A CPU-limited cgroup of the test's own (root only), for a load generator that must not
//! simply take the machine's cores from what it measures: `fleet-faults-<pid>-<name>`, made
//! under the cgroup v2 hierarchy when its `cpu` controller is there (`cpu.max = "QUOTA PERIOD"`),
//! else under the v1 `cpu` hierarchy (`cpu.cfs_quota_us`, `cpu.cfs_period_us`: the same
//! limit). Processes are put in with [`CpuLimit::add`]; dropping the guard moves whatever is
//! left back to the root and removes the cgroup.

use std::path::{Path, PathBuf};

/// A cgroup with a CPU limit; see the module doc.
#[derive(Debug)]
pub struct CpuLimit {
    dir: PathBuf,
    root: PathBuf,
    /// How the limit was set, for reports (`cgroup v2 cpu.max = "50000 100000"`).
    pub described: String,
}

/// Mount points of `fs_type` in /proc/mounts with their options.
fn mounts(fs_type: &str) -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 4 && fields[2] == fs_type)
                .then(|| (PathBuf::from(fields[1]), fields[3].to_string()))
        })
        .collect()
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {text:?} to {}: {e}", path.display()))
}

impl CpuLimit {
    /// Makes cgroup `fleet-faults-<pid>-<name>` limited to `quota_us` of CPU time every
    /// `period_us`; why not, when no writable cgroup hierarchy with a `cpu` controller exists.
    pub fn create(name: &str, quota_us: u64, period_us: u64) -> Result<CpuLimit, String> {
        let leaf = format!("fleet-faults-{}-{name}", std::process::id());
        let mut tried = Vec::new();
        for (root, _) in mounts("cgroup2") {
            let controllers =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if !controllers.split_whitespace().any(|c| c == "cpu") {
                tried.push(format!("{}: no cpu controller", root.display()));
                continue;
            }
            // The children of the root get the cpu controller only when it is enabled there.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
            let dir = root.join(&leaf);
            if let Err(e) = std::fs::create_dir(&dir) {
                tried.push(format!("{}: {e}", dir.display()));
                continue;
            }
            let limit = CpuLimit {
                dir: dir.clone(),
                root: root.clone(),
                described: format!("cgroup v2 cpu.max = \"{quota_us} {period_us}\""),
            };
            match write(&dir.join("cpu.max"), &format!("{quota_us} {period_us}")) {
                Ok(()) => return Ok(limit),
                Err(e) => tried.push(e),
            }
        }
        for (root, options) in mounts("cgroup") {
            if !options.split(',').any(|o| o == "cpu") {
                continue;
            }
            let dir = root.join(&leaf);
            if let Err(e) = std::fs::create_dir(&dir) {
                tried.push(format!("{}: {e}", dir.display()));
                continue;
            }
            let limit = CpuLimit {
                dir: dir.clone(),
                root: root.clone(),
                described: format!(
                    "cgroup v1 cpu.cfs_quota_us = {quota_us}, cpu.cfs_period_us = {period_us}"
                ),
            };
            let set = write(&dir.join("cpu.cfs_period_us"), &period_us.to_string())
                .and_then(|()| write(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string()));
            match set {
                Ok(()) => return Ok(limit),
                Err(e) => tried.push(e),
            }
        }
        Err(if tried.is_empty() {
            "no cgroup hierarchy with a cpu controller is mounted".to_string()
        } else {
            format!(
                "no writable cgroup with a cpu controller: {}",
                tried.join("; ")
            )
        })
    }

    /// Puts process `pid` (and the threads and children it makes afterwards) in the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // A cgroup with processes in it cannot be removed: move any left to the root first.
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
