//! Artifact files written and read around the page cache (`O_DIRECT`).
//!
//! An artifact is written once as it arrives and read once to unpack it. Through the page cache
//! each of its bytes would be copied into freshly allocated cache pages twice over (and push the
//! running app's own pages out); with `O_DIRECT` the disk reads and writes our buffer itself,
//! for a fraction of the CPU (measured in README "Speed"). Writes are staged in one aligned
//! buffer and go out in aligned blocks; the unaligned tail of a download goes through a plain
//! file handle, so the file never holds a byte that was not sent.
//!
//! A file system that refuses `O_DIRECT`, at open (tmpfs, some overlays) or at the first read
//! or write (a device whose blocks are larger than 4 KiB, some network file systems), gets
//! plain buffered I/O through the same types, so callers never care which one they got.

use nix::fcntl::OFlag;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Alignment of buffers, offsets and lengths: 4 KiB suits every logical block size in use.
const ALIGN: usize = 4096;
/// The write staging buffer and the read block, at most (a small artifact gets small ones: an
/// idle agent keeps its memory small). 4 MiB rather than 1: a disk that ten agents write to at
/// once does more with fewer, larger requests (fleet-bench artifact: fetch phase median
/// 6.97 s -> 6.67 s over 8 interleaved runs each, on 2026-11-30).
const BLOCK: usize = 4 << 20;

/// The buffer size for `len` bytes of file: whole alignment units, at most [`BLOCK`].
fn buffer_size(len: u64) -> usize {
    (len.min(BLOCK as u64) as usize)
        .next_multiple_of(ALIGN)
        .max(ALIGN)
}

/// A heap buffer of `len` bytes whose start is `ALIGN`-aligned (safe code: an oversized `Vec`
/// and the aligned window inside it).
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn open_direct(options: &mut OpenOptions, path: &Path) -> io::Result<Option<File>> {
    match options.custom_flags(OFlag::O_DIRECT.bits()).open(path) {
        Ok(file) => Ok(Some(file)),
        // The file system does not do O_DIRECT: the caller falls back to buffered I/O.
        Err(e) if refused_direct(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether an error says the file system will not do this direct I/O (so buffered will).
fn refused_direct(error: &io::Error) -> bool {
    error.raw_os_error() == Some(nix::libc::EINVAL)
}

/// Appends to a file from `offset` (its current length) on; [`ArtifactWriter::finish`] writes
/// what is still staged. Bytes are on disk only after `finish` and the caller's `sync_all`.
pub struct ArtifactWriter {
    path: PathBuf,
    file: File,
    direct: bool,
    staged: AlignedBuf,
    /// Bytes in `staged`.
    filled: usize,
    /// Where `staged[0]` goes in the file (aligned when direct).
    file_offset: u64,
}

impl ArtifactWriter {
    /// Opens (or creates) `path` to append from `offset`, which must be its current length;
    /// `expected` is how many bytes will follow (0: unknown).
    pub fn open(path: &Path, offset: u64, expected: u64) -> io::Result<ArtifactWriter> {
        ArtifactWriter::open_with(path, offset, expected, true)
    }

    fn open_with(
        path: &Path,
        offset: u64,
        expected: u64,
        try_direct: bool,
    ) -> io::Result<ArtifactWriter> {
        let staged = match expected {
            0 => BLOCK,
            // Room for the head of the first block too.
            n => buffer_size(n + ALIGN as u64),
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true);
        let direct_file = match try_direct {
            true => open_direct(&mut options.clone(), path)?,
            false => None,
        };
        let (file, direct) = match direct_file {
            Some(file) => (file, true),
            None => (options.open(path)?, false),
        };
        let mut writer = ArtifactWriter {
            path: path.to_path_buf(),
            file,
            direct,
            staged: AlignedBuf::new(staged),
            filled: 0,
            file_offset: offset,
        };
        let head = (offset % ALIGN as u64) as usize;
        if direct && head > 0 {
            // Start at the aligned block that holds `offset`, with its bytes already staged.
            let start = offset - head as u64;
            let mut block = AlignedBuf::new(ALIGN);
            match read_full_at(&writer.file, block.as_mut_slice(), start) {
                Ok(n) if n < head => {
                    return Err(io::Error::other("the partial file shrank while resuming"))
                }
                Ok(_) => {
                    writer.staged.as_mut_slice()[..head].copy_from_slice(&block.as_slice()[..head]);
                    writer.filled = head;
                    writer.file_offset = start;
                }
                Err(e) if refused_direct(&e) => writer.fall_back_to_buffered()?,
                Err(e) => return Err(e),
            }
        }
        Ok(writer)
    }

    /// From now on through a plain file handle.
    fn fall_back_to_buffered(&mut self) -> io::Result<()> {
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.direct = false;
        Ok(())
    }

    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(self.staged.len - self.filled);
            self.staged.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == self.staged.len {
                self.flush_staged()?;
            }
        }
        Ok(())
    }

    /// Bytes of the file already written out (what a reader of the file sees); staged bytes
    /// are not counted.
    pub fn on_disk(&self) -> u64 {
        self.file_offset
    }

    /// Writes the staged bytes. Returns the file for the caller to `sync_all` (which covers
    /// every handle's writes: it syncs the file, not the handle).
    pub fn finish(mut self) -> io::Result<File> {
        if self.filled > 0 {
            self.flush_staged()?;
        }
        Ok(self.file)
    }

    fn flush_staged(&mut self) -> io::Result<()> {
        let staged = &self.staged.as_slice()[..self.filled];
        // Direct I/O takes whole blocks; only the last flush of a download has a tail.
        let aligned = if self.direct {
            self.filled / ALIGN * ALIGN
        } else {
            0
        };
        if aligned > 0 {
            match self.file.write_all_at(&staged[..aligned], self.file_offset) {
                Ok(()) => {}
                Err(e) if refused_direct(&e) => {
                    self.fall_back_to_buffered()?;
                    return self.flush_staged();
                }
                Err(e) => return Err(e),
            }
        }
        if aligned < self.filled {
            let offset = self.file_offset + aligned as u64;
            if self.direct {
                OpenOptions::new()
                    .write(true)
                    .open(&self.path)?
                    .write_all_at(&staged[aligned..], offset)?;
            } else {
                self.file.write_all_at(&staged[aligned..], offset)?;
            }
        }
        self.file_offset += self.filled as u64;
        self.filled = 0;
        Ok(())
    }
}

/// Reads a whole file front to back in large aligned blocks.
pub struct ArtifactReader {
    path: PathBuf,
    file: File,
    direct: bool,
    len: u64,
    block: AlignedBuf,
    /// The file offset of the next block to read.
    next: u64,
    pos: usize,
    filled: usize,
}

impl ArtifactReader {
    pub fn open(path: &Path) -> io::Result<ArtifactReader> {
        let mut options = OpenOptions::new();
        options.read(true);
        let (file, direct) = match open_direct(&mut options.clone(), path)? {
            Some(file) => (file, true),
            None => (options.open(path)?, false),
        };
        let len = file.metadata()?.len();
        Ok(ArtifactReader {
            path: path.to_path_buf(),
            file,
            direct,
            len,
            block: AlignedBuf::new(buffer_size(len)),
            next: 0,
            pos: 0,
            filled: 0,
        })
    }
}

impl Read for ArtifactReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.filled {
            if self.next >= self.len {
                return Ok(0);
            }
            // Direct reads must be whole blocks; the last one comes back short.
            let n = match read_full_at(&self.file, self.block.as_mut_slice(), self.next) {
                Err(e) if self.direct && refused_direct(&e) => {
                    self.file = File::open(&self.path)?;
                    self.direct = false;
                    read_full_at(&self.file, self.block.as_mut_slice(), self.next)?
                }
                other => other?,
            };
            if n == 0 {
                return Ok(0);
            }
            self.next += n as u64;
            self.pos = 0;
            self.filled = n;
        }
        let n = out.len().min(self.filled - self.pos);
        out[..n].copy_from_slice(&self.block.as_slice()[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads into `buf` at `offset` until it is full or the file ends; the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    /// Writes `data` from `offset` in `chunk`-sized pieces, direct when `try_direct` (and the
    /// file system allows it), with a size hint that is right, unknown or too small.
    fn write_in_chunks(path: &Path, offset: u64, data: &[u8], chunk: usize, try_direct: bool) {
        let expected = [data.len() as u64, 0, 1][(offset as usize + chunk) % 3];
        let mut writer = ArtifactWriter::open_with(path, offset, expected, try_direct).unwrap();
        // Where the file system takes O_DIRECT, a direct writer stays direct, even when it
        // resumes from an unaligned length (its first block is read back directly).
        let probe = path.with_extension("probe");
        let supported = open_direct(OpenOptions::new().write(true).create(true), &probe)
            .unwrap()
            .is_some();
        assert_eq!(writer.direct, try_direct && supported, "at offset {offset}");
        for piece in data.chunks(chunk) {
            writer.write(piece).unwrap();
        }
        writer.finish().unwrap().sync_all().unwrap();
    }

    fn read_all(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        ArtifactReader::open(path)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn a_file_written_in_odd_chunks_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.partial");
        // Larger than a block, not a multiple of the alignment.
        let data = bytes(BLOCK + 3 * ALIGN + 123, 7);
        for try_direct in [true, false] {
            let _ = std::fs::remove_file(&path);
            write_in_chunks(&path, 0, &data, 100_003, try_direct);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), data.len() as u64);
            assert_eq!(read_all(&path), data);
        }
    }

    #[test]
    fn resuming_from_an_unaligned_length_keeps_the_bytes_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.partial");
        let data = bytes(2 * ALIGN + 5000, 3);
        // Every cut, with each of the two attempts direct or buffered.
        for cut in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 77,
            2 * ALIGN + 4999,
            data.len(),
        ] {
            for (first, second) in [(true, true), (true, false), (false, true), (false, false)] {
                let _ = std::fs::remove_file(&path);
                write_in_chunks(&path, 0, &data[..cut], 999, first);
                assert_eq!(std::fs::metadata(&path).unwrap().len(), cut as u64);
                write_in_chunks(&path, cut as u64, &data[cut..], 4096, second);
                assert_eq!(read_all(&path), data, "cut at {cut}, {first} then {second}");
            }
        }
    }

    #[test]
    fn an_empty_file_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        write_in_chunks(&path, 0, &[], 1, true);
        assert!(read_all(&path).is_empty());
    }
}
