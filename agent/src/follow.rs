//! Reading a download while it runs: [`Following`] is a blocking `Read` of an artifact's
//! bytes in order, handed out as the download starts ([`crate::fetch::Fetcher::fetch_followed`]),
//! so the release can be unpacked while the rest still arrives instead of after it, from
//! memory rather than read back from the disk. It hands out only bytes the download checked
//! chunk by chunk against the controller's list (`Progress::by_chunks`); a download without
//! that list is checked whole at its end, so the reader gives up at once (an error of kind
//! `Unsupported`) and the release is unpacked from the verified file as before. Each byte
//! comes from the chunks the download keeps in memory ([`crate::peer::Recent`]) when it is
//! still there, otherwise from the file once it is written. A download that ends without its
//! artifact renamed into place, or brings nothing new for
//! [`STALL`], ends the read with an error: whatever was unpacked from it is then thrown away by
//! the unpack itself ([`crate::releases`]).

use crate::peer::{Progress, Recent};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The longest wait for the download's next verified bytes.
pub const STALL: Duration = Duration::from_secs(60);

/// The verified bytes of a download, in order, as they come (see the module's doc).
pub struct Following {
    digest: String,
    size: u64,
    progress: watch::Receiver<Progress>,
    recent: Arc<Recent>,
    /// The partial file; once the download completed, the artifact it was renamed to.
    partial: PathBuf,
    /// Where the download renames the verified artifact: there once it completed.
    done: PathBuf,
    /// The file read from: the partial file, the same inode once renamed into place.
    file: Option<std::fs::File>,
    /// Whether the download completed: the file is the whole verified artifact.
    complete: bool,
    position: u64,
    runtime: tokio::runtime::Handle,
}

impl Following {
    /// Follows the download of `digest` (`size` bytes) into `partial`, renamed to `done` when
    /// complete. Call it within the runtime: the reader waits on it.
    pub fn new(
        digest: &str,
        size: u64,
        progress: watch::Receiver<Progress>,
        recent: Arc<Recent>,
        partial: PathBuf,
        done: PathBuf,
    ) -> Following {
        Following {
            digest: digest.to_string(),
            size,
            progress,
            recent,
            partial,
            done,
            file: None,
            complete: false,
            position: 0,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Whether the download is checked chunk by chunk, known once it writes its first bytes
    /// (or ends). Without that, nothing is handed out: the caller unpacks the verified file.
    pub async fn by_chunks(&mut self) -> bool {
        loop {
            let progress = *self.progress.borrow_and_update();
            if progress.by_chunks || progress.on_disk > 0 {
                return progress.by_chunks;
            }
            if self.progress.changed().await.is_err() {
                return self.progress.borrow().by_chunks;
            }
        }
    }

    /// Reads from the file at the current position, at most `limit` bytes.
    fn read_file(&mut self, buf: &mut [u8], limit: u64) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if self.file.is_none() {
            self.file = Some(std::fs::File::open(&self.partial)?);
        }
        let file = self.file.as_ref().expect("opened above");
        let n = (buf.len() as u64).min(limit) as usize;
        let read = file.read_at(&mut buf[..n], self.position)?;
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the artifact file is shorter than its verified bytes",
            ));
        }
        Ok(read)
    }

    /// Waits for the download to move. `Ok(false)`: it ended.
    fn wait(&mut self) -> std::io::Result<bool> {
        let changed = self
            .runtime
            .block_on(tokio::time::timeout(STALL, self.progress.changed()));
        match changed {
            Ok(Ok(())) => Ok(true),
            Ok(Err(_)) => Ok(false),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the download brought nothing new for {STALL:?}"),
            )),
        }
    }
}

/// The error of a download checked only whole, at its end: its release is unpacked from the
/// verified file afterwards, as without a follower.
fn not_by_chunks() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "the download is not checked chunk by chunk: unpacked from the file once verified",
    )
}

impl Read for Following {
    /// Blocking: call it off the runtime thread.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.position >= self.size || buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.complete {
                let n = self.read_file(buf, self.size - self.position)?;
                self.position += n as u64;
                return Ok(n);
            }
            let Progress {
                on_disk,
                verified,
                by_chunks,
            } = *self.progress.borrow_and_update();
            if !by_chunks && on_disk > 0 {
                return Err(not_by_chunks());
            }
            let trusted = if by_chunks {
                verified.min(self.size)
            } else {
                0
            };
            if trusted > self.position {
                if let Some((at, chunk)) = self.recent.holding(self.position) {
                    let from = (self.position - at) as usize;
                    let until = (chunk.len() as u64).min(trusted - at) as usize;
                    let n = buf.len().min(until - from);
                    buf[..n].copy_from_slice(&chunk[from..from + n]);
                    self.position += n as u64;
                    return Ok(n);
                }
                let readable = trusted.min(on_disk);
                if readable > self.position {
                    let n = self.read_file(buf, readable - self.position)?;
                    self.position += n as u64;
                    return Ok(n);
                }
            }
            if !self.wait()? {
                // The download ended: complete (the same file, renamed into place) or not.
                if !self.done.is_file() {
                    return Err(std::io::Error::other(format!(
                        "the download of {} ended unfinished",
                        self.digest
                    )));
                }
                if !self.progress.borrow().by_chunks {
                    return Err(not_by_chunks());
                }
                // A file not opened yet is found where it was renamed to.
                self.partial = self.done.clone();
                self.complete = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    /// A download's partial file, `done` where it is renamed to, its progress and kept chunks,
    /// and a follower of it.
    struct Download {
        _dir: tempfile::TempDir,
        partial: PathBuf,
        done: PathBuf,
        progress: watch::Sender<Progress>,
        recent: Arc<Recent>,
    }

    fn download(size: u64) -> (Download, Following) {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("a.partial");
        let done = dir.path().join("a.tar.gz");
        std::fs::File::create(&partial).unwrap();
        let (progress, rx) = watch::channel(Progress::default());
        let recent = Arc::new(Recent::default());
        let following = Following::new(
            DIGEST,
            size,
            rx,
            recent.clone(),
            partial.clone(),
            done.clone(),
        );
        let download = Download {
            _dir: dir,
            partial,
            done,
            progress,
            recent,
        };
        (download, following)
    }

    fn write_at(path: &PathBuf, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(bytes, offset).unwrap();
    }

    fn progress(on_disk: u64, verified: u64, by_chunks: bool) -> Progress {
        Progress {
            on_disk,
            verified,
            by_chunks,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hands_out_only_what_was_checked_chunk_by_chunk_from_memory_or_disk() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let (d, mut following) = download(3000);
        // Written but not yet checked (and, here, wrong): not to be handed out.
        write_at(&d.partial, 0, &[0xee; 1000]);
        d.progress.send_replace(progress(1000, 0, true));
        let reader = tokio::task::spawn_blocking(move || {
            let mut first = vec![0u8; 2000];
            following
                .read_exact(&mut first)
                .map(|()| (first, following))
        });
        // The check found it bad; the right bytes are written again and checked.
        write_at(&d.partial, 0, &data[..1000]);
        d.progress.send_replace(progress(1000, 1000, true));
        // Checked and kept in memory, not yet written out: only memory has them (the file
        // holds other bytes there, beyond what is on disk).
        d.recent
            .keep(1000, bytes::Bytes::copy_from_slice(&data[1000..2000]));
        write_at(&d.partial, 1000, &[0u8; 1000]);
        d.progress.send_replace(progress(1000, 2000, true));
        let (first, mut following) = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the checked bytes are handed out")
            .unwrap()
            .expect("the first 2000 bytes");
        assert!(
            first == data[..2000],
            "the reader handed out other bytes than the checked ones"
        );

        // The rest written and checked; the download completes: renamed into place, and
        // read from there.
        write_at(&d.partial, 1000, &data[1000..]);
        d.progress.send_replace(progress(3000, 3000, true));
        std::fs::rename(&d.partial, &d.done).unwrap();
        drop(d.progress);
        let rest = tokio::task::spawn_blocking(move || {
            let mut rest = Vec::new();
            following.read_to_end(&mut rest).map(|_| rest)
        });
        let rest = tokio::time::timeout(Duration::from_secs(10), rest)
            .await
            .expect("the reader ends")
            .unwrap()
            .expect("the rest of the artifact");
        assert!(rest == data[2000..], "the rest differs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_chunk_list_gives_up_and_fails_with_the_download() {
        // Without a list, bytes on disk are not checked until the end: none is handed out.
        let (d, mut following) = download(500);
        write_at(&d.partial, 0, &[7u8; 500]);
        let reader = tokio::task::spawn_blocking(move || following.read(&mut [0u8; 100]));
        d.progress.send_replace(progress(500, 500, false));
        let err = reader
            .await
            .unwrap()
            .expect_err("unchecked bytes were handed out");
        assert_eq!(err.kind(), std::io::ErrorKind::Unsupported, "{err}");
        // Told as soon as the download writes: checked whole, or chunk by chunk.
        let (d, mut following) = download(500);
        d.progress.send_replace(progress(500, 500, false));
        assert!(!following.by_chunks().await);
        let (d2, mut following) = download(500);
        d2.progress.send_replace(progress(0, 0, true));
        assert!(following.by_chunks().await);
        drop(d);

        // A download that ends unfinished (nothing renamed into place) ends the read with an
        // error.
        let (d, mut following) = download(500);
        let reader = tokio::task::spawn_blocking(move || following.read(&mut [0u8; 10]));
        drop(d.progress);
        let err = reader.await.unwrap().expect_err("the download failed");
        assert!(err.to_string().contains("ended unfinished"), "{err}");
    }
}
