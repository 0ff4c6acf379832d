//! The apps' logs on this host: `DATA/logs/<app>.log` (the instance's stdout and stderr, and a
//! line from the agent at every start) and `DATA/logs/<app>.log.1` (the one before), both 0600
//! and owned by the agent's user (root), in a directory only the agent can enter.
//!
//! Bounded by copy-truncate: the agent checks every [`ROTATE_EVERY`]; a log past
//! [`MAX_LOG_BYTES`] has its last [`MAX_LOG_BYTES`] copied to `.log.1` (replacing the older
//! one) and is truncated to nothing. So at most two files of 1 MiB per app (the current one
//! may grow past the bound for one check period).
//! Copy-truncate rather than reopening, because the instance holds its own descriptor of the
//! file: it is opened for the child directly (no pipe through the agent), so an instance adopted
//! after the agent's restart keeps logging without the agent, and a rename would leave it
//! writing into `.log.1`. Every writer opens the file with `O_APPEND`, so after the truncation
//! its writes land at the new end. The cost: what is written between the copy and the
//! truncation (a moment) is lost, and a log grows past the bound for at most one check period.
//!
//! Reading: [`tail`] (the last lines of both files) and [`Follower`] (what was appended since).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A log past this is rotated.
pub const MAX_LOG_BYTES: u64 = 1 << 20;
/// How often the logs are checked for rotation.
pub const ROTATE_EVERY: Duration = Duration::from_secs(1);
/// The most lines one request may ask for.
pub const MAX_LINES: u32 = 10_000;
/// A line longer than this is cut (a follow sends a partial line once it is this long).
pub const MAX_LINE_BYTES: usize = 16 << 10;
/// How many log lines a failed report carries.
pub const FAILED_REPORT_LINES: u32 = 10;

/// The rotated copy of `log`.
pub fn rotated(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Opens (creates) an app's log for appending, 0600 also when it existed with another mode.
pub fn open_append(log: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)?;
    if file.metadata()?.permissions().mode() & 0o777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Rotates `log` if it is past [`MAX_LOG_BYTES`]: copied to `.1`, then truncated. Blocking.
pub fn rotate_if_needed(log: &Path) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= MAX_LOG_BYTES {
        return Ok(false);
    }
    let old = rotated(log);
    let mut partial = old.as_os_str().to_owned();
    partial.push(".tmp");
    let partial = PathBuf::from(partial);
    {
        // Only the last MAX_LOG_BYTES: a burst between two checks does not make `.1` bigger.
        let mut from = std::fs::File::open(log)?;
        from.seek(SeekFrom::Start(len.saturating_sub(MAX_LOG_BYTES)))?;
        let mut from = from.take(MAX_LOG_BYTES);
        let mut to = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        std::io::copy(&mut from, &mut to)?;
    }
    std::fs::rename(&partial, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// Rotates every app's log in `logs_dir` that needs it. Blocking.
pub fn rotate_all(logs_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(logs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "log") {
            if let Err(e) = rotate_if_needed(&path) {
                tracing::warn!("cannot rotate the app log {}: {e}", path.display());
            }
        }
    }
}

/// Rotates the logs every [`ROTATE_EVERY`] until `stop` turns true.
pub async fn keep_rotated(logs_dir: PathBuf, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(ROTATE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let dir = logs_dir.clone();
        let _ = tokio::task::spawn_blocking(move || rotate_all(&dir)).await;
    }
}

fn read_from(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    // Bounded: a log is at most about two rotation bounds.
    file.take(4 * MAX_LOG_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn cut(line: &str) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line.to_string();
    }
    let mut end = MAX_LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// The last `n` lines (at most [`MAX_LINES`]) of `log` and its rotated copy, oldest first.
/// `None` when the app has no log here. Blocking.
pub fn tail(log: &Path, n: u32) -> std::io::Result<Option<Vec<String>>> {
    if !log.exists() && !rotated(log).exists() {
        return Ok(None);
    }
    let n = n.min(MAX_LINES) as usize;
    let mut bytes = read_from(&rotated(log), 0)?;
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        bytes.push(b'\n');
    }
    bytes.extend(read_from(log, 0)?);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    Ok(Some(lines[skip..].iter().map(|line| cut(line)).collect()))
}

/// Reads what is appended to a log after it was made, line by line, across rotations.
pub struct Follower {
    log: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Follows `log` from its current end. Blocking.
    pub fn from_end(log: &Path) -> Follower {
        let offset = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        Follower {
            log: log.to_path_buf(),
            offset,
            partial: Vec::new(),
        }
    }

    /// The complete lines appended since the last call. Blocking.
    pub fn poll(&mut self) -> std::io::Result<Vec<String>> {
        let len = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let mut bytes = Vec::new();
        if len < self.offset {
            // Rotated. A copy smaller than the bound is the whole file as it was: its rest is
            // what we had not read. A full copy is only the file's end, at an offset we cannot
            // know: what was written since the last poll (a burst, in a fraction of a
            // second) is then skipped.
            let copy = rotated(&self.log);
            if std::fs::metadata(&copy).is_ok_and(|m| m.len() < MAX_LOG_BYTES) {
                bytes.extend(read_from(&copy, self.offset)?);
            }
            self.offset = 0;
        }
        let fresh = read_from(&self.log, self.offset)?;
        self.offset += fresh.len() as u64;
        bytes.extend(fresh);
        self.partial.extend(bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            lines.push(cut(String::from_utf8_lossy(&line[..end]).as_ref()));
        }
        if self.partial.len() >= MAX_LINE_BYTES {
            let line = std::mem::take(&mut self.partial);
            lines.push(cut(String::from_utf8_lossy(&line).as_ref()));
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tails_follows_and_stays_bounded_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("web.log");
        assert_eq!(tail(&log, 5).unwrap(), None, "no log: none");
        let mut writer = open_append(&log).unwrap();
        for i in 0..10 {
            writeln!(writer, "line {i}").unwrap();
        }
        assert_eq!(
            std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            tail(&log, 3).unwrap().unwrap(),
            ["line 7", "line 8", "line 9"]
        );
        let mut follower = Follower::from_end(&log);
        assert!(follower.poll().unwrap().is_empty());
        write!(writer, "half").unwrap();
        assert!(follower.poll().unwrap().is_empty(), "no partial line yet");
        writeln!(writer, " and whole").unwrap();
        assert_eq!(follower.poll().unwrap(), ["half and whole"]);

        // Past the bound: rotated, and the writer's appends land in the truncated file.
        let big = "x".repeat(1000);
        for _ in 0..(MAX_LOG_BYTES / 1000 + 10) {
            writeln!(writer, "{big}").unwrap();
        }
        writeln!(writer, "before rotation").unwrap();
        assert!(rotate_if_needed(&log).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        writeln!(writer, "after rotation").unwrap();
        assert!(std::fs::metadata(&log).unwrap().len() < 100);
        assert_eq!(follower.poll().unwrap(), ["after rotation"]);
        assert_eq!(
            tail(&log, 2).unwrap().unwrap(),
            ["before rotation", "after rotation"]
        );
        let rotated_meta = std::fs::metadata(rotated(&log)).unwrap();
        assert_eq!(rotated_meta.permissions().mode() & 0o777, 0o600);
        assert!(!rotate_if_needed(&log).unwrap());
        assert!(tail(&log, 100_000).unwrap().unwrap().len() > 1000);
    }
}
