//! A checkpoint in a local folder: positional reads on a blocking thread.
//!
//! A file's version is its size, modification time and inode, seen at `stat`. Every read checks
//! the open file against that version before it reads and again (`fstat`) after, so a shard that
//! is rewritten in place, truncated or replaced while a read is in flight is reported as
//! [`SourceError::Changed`], never mixed into the output.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::{BoxFuture, ObjectMeta, ObjectName, ObjectStore, Receive, SourceError, TransferStats};

/// Bytes read at once: what a read holds in memory, twice.
const BLOCK: u64 = 256 << 10;

/// The least a read gives each of its threads: below this one thread reads it all. Above it, a
/// large read (a `.metadata` of hundreds of MB) is cut among the cores, because faulting in and
/// filling its buffer is the kernel's work on the reading thread.
const PIECE: usize = 16 << 20;

/// The folder a copy made by `dcpfetch fetch -o DIR` keeps its state in (journal, lock).
pub const STATE_DIR: &str = ".dcpfetch";

/// Whether the folder `root` is a copy made by dcpfetch (it holds [`STATE_DIR`], not followed if
/// it is a link): such a copy holds the items that were fetched, and every other item's bytes
/// read as zeros.
pub fn is_dcpfetch_copy(root: &std::path::Path) -> bool {
    std::fs::symlink_metadata(root.join(STATE_DIR)).is_ok()
}

/// A folder holding a checkpoint.
#[derive(Debug, Clone)]
pub struct LocalSource {
    root: PathBuf,
    stats: Arc<TransferStats>,
    /// Files kept open across reads.
    open: Arc<Mutex<HashMap<ObjectName, Arc<File>>>>,
}

impl LocalSource {
    pub fn new(root: PathBuf, stats: Arc<TransferStats>) -> Self {
        LocalSource {
            root,
            stats,
            open: Arc::default(),
        }
    }

    fn path(&self, name: &ObjectName) -> PathBuf {
        self.root.join(name.as_str())
    }

    fn io_error(&self, name: &ObjectName, e: std::io::Error) -> SourceError {
        if e.kind() == std::io::ErrorKind::NotFound {
            SourceError::NotFound {
                location: self.describe(),
                name: name.to_string(),
            }
        } else {
            SourceError::Io {
                path: self.path(name).display().to_string(),
                source: e,
            }
        }
    }

    fn meta_of(m: &std::fs::Metadata) -> ObjectMeta {
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        ObjectMeta {
            size: m.len(),
            version: Some(format!("size {} mtime {mtime} inode {}", m.len(), m.ino())),
        }
    }

    /// Fails with [`SourceError::Changed`] unless the open file is still the version `meta`
    /// describes.
    fn check_version(
        &self,
        name: &ObjectName,
        range: &Range<u64>,
        file: &File,
        meta: &ObjectMeta,
    ) -> Result<(), SourceError> {
        let now = Self::meta_of(&file.metadata().map_err(|e| self.io_error(name, e))?);
        if now.version != meta.version {
            return Err(SourceError::Changed {
                name: format!("{name} bytes {}..{}", range.start, range.end),
                expected: meta.version.clone().unwrap_or_default(),
                found: now.version.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// One positional read of `range`, between two checks of the file's version.
    fn read_pinned(
        &self,
        name: &ObjectName,
        range: &Range<u64>,
        meta: &ObjectMeta,
    ) -> Result<Bytes, SourceError> {
        let file = self.file(name)?;
        self.check_version(name, range, &file, meta)?;
        let mut buf = BytesMut::zeroed((range.end - range.start) as usize);
        let read = read_exact_at(&file, &mut buf, range.start);
        // Whatever the read gave, it counts only if the file is still the version pinned: a
        // rewrite or truncation during the read shows in its size, mtime or inode.
        self.check_version(name, range, &file, meta)?;
        read.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                SourceError::BadResponse {
                    name: name.to_string(),
                    start: range.start,
                    end: range.end,
                    detail: "the file ends before the range does".into(),
                }
            } else {
                self.io_error(name, e)
            }
        })?;
        self.stats.add_bytes(buf.len() as u64);
        Ok(buf.freeze())
    }

    /// A blocking read that did not finish: its panic goes on, else it was cancelled. The
    /// runtime is shutting down (a closed stdout ends the run early) before the read ran: nobody
    /// waits for it any more, and it must not print a panic on the way out.
    fn unjoined(&self, name: &ObjectName, e: tokio::task::JoinError) -> SourceError {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        SourceError::Io {
            path: self.path(name).display().to_string(),
            source: std::io::Error::other("the read was cancelled"),
        }
    }

    fn file(&self, name: &ObjectName) -> Result<Arc<File>, SourceError> {
        let mut open = self.open.lock().expect("no panics while holding the lock");
        if let Some(f) = open.get(name) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.path(name)).map_err(|e| self.io_error(name, e))?);
        open.insert(name.clone(), f.clone());
        Ok(f)
    }
}

/// Fills `buf` from `file` at `offset`, in pieces of at least [`PIECE`] read at once by up to one
/// thread per core.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    // Most reads (every block of a fetch) are far smaller: they do not ask for the cores, which
    // reads the process's cgroup files on Linux.
    if buf.len() < 2 * PIECE {
        return file.read_exact_at(buf, offset);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let pieces = (buf.len() / PIECE).clamp(1, threads);
    if pieces == 1 {
        return file.read_exact_at(buf, offset);
    }
    let size = buf.len().div_ceil(pieces);
    std::thread::scope(|s| {
        let mut pieces = buf.chunks_mut(size).enumerate();
        let first = pieces.next();
        let others: Vec<_> = pieces
            .map(|(i, piece)| {
                s.spawn(move || file.read_exact_at(piece, offset + (i * size) as u64))
            })
            .collect();
        let mut read = first.map_or(Ok(()), |(_, piece)| file.read_exact_at(piece, offset));
        for other in others {
            let other = other
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a reading thread panicked")));
            read = read.and(other);
        }
        read
    })
}

impl ObjectStore for LocalSource {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn stats(&self) -> &Arc<TransferStats> {
        &self.stats
    }

    fn stat<'a>(&'a self, name: &'a ObjectName) -> BoxFuture<'a, Result<ObjectMeta, SourceError>> {
        Box::pin(async move {
            let path = self.path(name);
            match tokio::fs::metadata(&path).await {
                Ok(m) if m.is_file() => Ok(Self::meta_of(&m)),
                Ok(_) => Err(SourceError::Io {
                    path: path.display().to_string(),
                    source: std::io::Error::other("not a regular file"),
                }),
                Err(e) => Err(self.io_error(name, e)),
            }
        })
    }

    /// The regular files directly in the folder (links followed, as `stat` does).
    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, ObjectMeta)>, SourceError>> {
        Box::pin(async move {
            let io = |e| SourceError::Io {
                path: self.describe(),
                source: e,
            };
            let mut dir = tokio::fs::read_dir(&self.root).await.map_err(io)?;
            let mut out = Vec::new();
            while let Some(e) = dir.next_entry().await.map_err(io)? {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if let Ok(m) = tokio::fs::metadata(e.path()).await
                    && m.is_file()
                {
                    out.push((name, Self::meta_of(&m)));
                }
            }
            Ok(out)
        })
    }

    /// The whole file in one read into one buffer (a `.metadata` of hundreds of MB is neither
    /// cut into blocks nor copied), between two checks of its version.
    fn read_object<'a>(
        &'a self,
        name: &'a ObjectName,
        limit: u64,
    ) -> BoxFuture<'a, Result<(ObjectMeta, Vec<Bytes>), SourceError>> {
        Box::pin(async move {
            let meta = self.stat(name).await?;
            super::fits(name, meta.size, limit)?;
            let (this, owned, whole) = (self.clone(), name.clone(), meta.clone());
            let read = tokio::task::spawn_blocking(move || {
                this.stats.add_request();
                let started = Instant::now();
                let read = this.read_pinned(&owned, &(0..whole.size), &whole);
                let status = if read.is_ok() { "local" } else { "local error" };
                super::resume::trace("read", owned.as_str(), None, status, started, 1);
                read
            })
            .await;
            let data = read.map_err(|e| self.unjoined(name, e))??;
            Ok((meta, vec![data]))
        })
    }

    /// Reads `BLOCK` bytes at a time on a blocking thread, two blocks ahead of the receiver at
    /// most, each between two checks of the file's version.
    fn read_range<'a>(
        &'a self,
        name: &'a ObjectName,
        range: Range<u64>,
        meta: &'a ObjectMeta,
        into: &'a mut dyn Receive,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, SourceError>>(1);
            let reader = {
                let this = self.clone();
                let name = name.clone();
                let meta = meta.clone();
                let range = range.clone();
                tokio::task::spawn_blocking(move || {
                    this.stats.add_request();
                    let started = Instant::now();
                    let mut status = "local";
                    let mut at = range.start;
                    while at < range.end {
                        let block = at..range.end.min(at + BLOCK);
                        at = block.end;
                        let read = this.read_pinned(&name, &block, &meta);
                        let failed = read.is_err();
                        if failed {
                            status = "local error";
                        }
                        // A closed channel: the receiver stopped or the run is over.
                        if tx.blocking_send(read).is_err() || failed {
                            break;
                        }
                    }
                    super::resume::trace("read", name.as_str(), Some(&range), status, started, 1);
                })
            };
            let mut result = Ok(());
            while let Some(block) = rx.recv().await {
                match block {
                    Ok(data) => {
                        if into.receive(data).await.is_err() {
                            result = Err(SourceError::Stopped {
                                name: name.to_string(),
                            });
                            break;
                        }
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            drop(rx);
            reader.await.map_err(|e| self.unjoined(name, e))?;
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large read is cut among threads: every piece lands in its place, at any offset, and a
    /// file shorter than the range fails as a short read does.
    #[test]
    fn a_read_in_pieces_is_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..3 * PIECE + 12345)
            .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        for (start, len) in [(0, data.len()), (7, data.len() - 7), (PIECE + 1, 2 * PIECE)] {
            let mut buf = vec![0u8; len];
            read_exact_at(&file, &mut buf, start as u64).unwrap();
            assert!(buf == data[start..start + len], "bytes {start}..+{len}");
        }
        let mut buf = vec![0u8; data.len() + 1];
        let e = read_exact_at(&file, &mut buf, 0).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
