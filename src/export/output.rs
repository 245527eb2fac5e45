//! The files an export writes, and their publication.
//!
//! A file is written under a temporary name next to its final one (`.NAME.dcpfetch-partial`),
//! created anew (a stale temporary or a planted link at that name is removed, never followed),
//! its bytes placed at their offsets, then synced and renamed: the output never exists under its
//! final name until it is complete. A folder's files are renamed once all are complete, and its
//! `model.safetensors.index.json` comes last; with `--force`, an earlier export's index goes
//! first and its other files once the new ones are in place, so a failed export leaves it whole. Without `--force` an existing output is refused, by
//! the rename itself (`RENAME_NOREPLACE`) and, for a clear message, before the fetch.
//!
//! On stdout the bytes must go in order: a piece that arrives before its turn waits in a scratch
//! file (unnamed, in the temporary folder, gone when the process ends) at its offset, and goes out
//! when the stream reaches it. Memory holds only where those pieces are.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rustix::fs::{AtFlags, RenameFlags};

use super::Layout;
use crate::fetch::SinkError;
use crate::sink::dir::Dir;

/// Where an export goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One file (`-o model.safetensors`).
    File(PathBuf),
    /// A Hugging Face folder (`-o DIR --max-shard-size SIZE`).
    Folder(PathBuf),
    /// stdout (`-o -`).
    Stdout,
}

/// The name of a folder's index.
pub const INDEX: &str = "model.safetensors.index.json";

fn temporary(name: &str) -> String {
    format!(".{name}.dcpfetch-partial")
}

/// A shard file name of a Hugging Face folder, as an earlier export may have left.
fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() == 14 && &rest[5..9] == "-of-" && b[..5].iter().chain(&b[9..]).all(u8::is_ascii_digit)
}

fn exists(dir: &Dir, leaf: &str) -> bool {
    rustix::fs::statat(dir, leaf, AtFlags::SYMLINK_NOFOLLOW).is_ok()
}

fn refuse<T>(msg: String) -> Result<T, SinkError> {
    Err(SinkError::Refused(msg))
}

struct Written {
    file: File,
    temporary: String,
    name: String,
    data_start: u64,
}

enum Writer {
    Files {
        dir: Dir,
        files: Vec<Written>,
        /// The folder's index, written last.
        index: Option<Vec<u8>>,
        force: bool,
        /// An earlier export's files in the folder (`--force`), kept until this one is complete.
        earlier: Vec<String>,
    },
    Stream {
        out: Box<dyn Write + Send>,
        /// Data bytes written so far.
        cursor: u64,
        /// Where pieces that arrived before their turn wait, once one has.
        ahead: Option<File>,
        /// The ranges `start -> end` of data waiting in `ahead`.
        waiting: BTreeMap<u64, u64>,
        total: u64,
    },
}

/// The export's files being written.
pub struct Output {
    writer: Writer,
    /// Where the output is, for messages and the summary.
    pub shown: String,
    /// The files written, relative to the output (a folder's), for the summary.
    pub names: Vec<String>,
    /// Published: the temporaries are the output now.
    published: bool,
}

/// An output dropped before it was published (any error, before or during the fetch) takes its
/// temporaries with it.
impl Drop for Output {
    fn drop(&mut self) {
        if !self.published {
            self.abandon();
        }
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("shown", &self.shown)
            .finish()
    }
}

impl Output {
    /// Creates the output of `layout` at `target`: temporary files of their final size, headers
    /// written.
    pub fn create(target: &Target, layout: &Layout, force: bool) -> Result<Output, SinkError> {
        match target {
            Target::Stdout => {
                use std::io::IsTerminal;
                if std::io::stdout().is_terminal() {
                    return refuse(
                        "stdout is a terminal; redirect it to a file or a pipe (or give -o FILE)"
                            .into(),
                    );
                }
                Output::stream(Box::new(crate::sink::stream::stdout_file()?), layout)
            }
            Target::File(path) => {
                let (parent, leaf) = split(path)?;
                let dir = Dir::open_root(&parent)?;
                match rustix::fs::statat(&dir, leaf.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() => {
                        return refuse(format!(
                            "{} is a folder (give a file name, or --max-shard-size to write a folder)",
                            path.display()
                        ));
                    }
                    Ok(_) if !force => {
                        return refuse(format!(
                            "{} exists (pass --force to replace it)",
                            path.display()
                        ));
                    }
                    _ => {}
                }
                let files = vec![Self::temporary_file(&dir, &leaf, layout, 0)?];
                Ok(Output {
                    writer: Writer::Files {
                        dir,
                        files,
                        index: None,
                        force,
                        earlier: Vec::new(),
                    },
                    shown: path.display().to_string(),
                    names: vec![leaf],
                    published: false,
                })
            }
            Target::Folder(path) => {
                let dir = Dir::open_root(path)?;
                let earlier: Vec<String> = dir
                    .names()?
                    .into_iter()
                    .filter(|n| n == INDEX || is_shard_name(n))
                    .collect();
                if !earlier.is_empty() && !force {
                    return refuse(format!(
                        "{} already holds an export ({}; pass --force to replace it)",
                        path.display(),
                        earlier.join(", ")
                    ));
                }
                let mut files = Vec::new();
                for (i, f) in layout.files.iter().enumerate() {
                    files.push(Self::temporary_file(&dir, &f.name, layout, i)?);
                }
                let mut weight_map = BTreeMap::new();
                for t in &layout.tensors {
                    weight_map.insert(t.name.as_str(), layout.files[t.file].name.as_str());
                }
                let index = super::format::index(layout.data_len(), &weight_map);
                let mut names: Vec<String> = layout.files.iter().map(|f| f.name.clone()).collect();
                names.push(INDEX.into());
                Ok(Output {
                    writer: Writer::Files {
                        dir,
                        files,
                        index: Some(index),
                        force: true,
                        earlier,
                    },
                    shown: path.display().to_string(),
                    names,
                    published: false,
                })
            }
        }
    }

    /// An output into any writer, in order (stdout, or a pipe in tests).
    pub fn stream(mut out: Box<dyn Write + Send>, layout: &Layout) -> Result<Output, SinkError> {
        let file = &layout.files[0];
        out.write_all(&file.header)
            .map_err(SinkError::io("writing to stdout"))?;
        Ok(Output {
            writer: Writer::Stream {
                out,
                cursor: 0,
                ahead: None,
                waiting: BTreeMap::new(),
                total: file.data_len,
            },
            shown: "-".into(),
            names: Vec::new(),
            published: false,
        })
    }

    fn temporary_file(
        dir: &Dir,
        name: &str,
        layout: &Layout,
        index: usize,
    ) -> Result<Written, SinkError> {
        let tmp = temporary(name);
        let file = dir.create_new(&tmp)?;
        let f = &layout.files[index];
        let shown = dir.shown(&tmp);
        file.write_all_at(&f.header, 0)
            .map_err(SinkError::io(format!("writing {}", shown.display())))?;
        let size = (f.header.len() as u64)
            .checked_add(f.data_len)
            .ok_or_else(|| SinkError::Refused(format!("{name}: its size overflows")))?;
        file.set_len(size)
            .map_err(SinkError::io(format!("sizing {}", shown.display())))?;
        Ok(Written {
            file,
            temporary: tmp,
            name: name.to_owned(),
            data_start: f.header.len() as u64,
        })
    }

    /// Bytes at `at` of file `file`'s data.
    pub fn write(&mut self, file: usize, at: u64, data: Bytes) -> Result<(), SinkError> {
        match &mut self.writer {
            Writer::Files { dir, files, .. } => {
                let w = &files[file];
                w.file
                    .write_all_at(&data, w.data_start + at)
                    .map_err(SinkError::io(format!(
                        "writing {}",
                        dir.shown(&w.temporary).display()
                    )))
            }
            Writer::Stream {
                out,
                cursor,
                ahead,
                waiting,
                ..
            } => {
                let end = at + data.len() as u64;
                if at > *cursor {
                    let file = match ahead {
                        Some(f) => f,
                        None => ahead.insert(scratch()?),
                    };
                    file.write_all_at(&data, at)
                        .map_err(SinkError::io("writing the stream's scratch file"))?;
                    waiting.insert(at, end);
                    return Ok(());
                }
                if end > *cursor {
                    out.write_all(&data[(*cursor - at) as usize..])
                        .map_err(SinkError::io("writing to stdout"))?;
                    *cursor = end;
                }
                // What waited for this.
                while let Some((&start, &stop)) = waiting.first_key_value() {
                    if start > *cursor {
                        break;
                    }
                    waiting.remove(&start);
                    let file = ahead.as_ref().expect("waiting data is in the scratch file");
                    let mut buf = vec![0u8; COPY.min(stop.saturating_sub(*cursor)) as usize];
                    while *cursor < stop {
                        let n = COPY.min(stop - *cursor) as usize;
                        file.read_exact_at(&mut buf[..n], *cursor)
                            .map_err(SinkError::io("reading the stream's scratch file"))?;
                        out.write_all(&buf[..n])
                            .map_err(SinkError::io("writing to stdout"))?;
                        *cursor += n as u64;
                    }
                }
                Ok(())
            }
        }
    }

    /// Makes the output complete and durable, under its final names.
    pub fn publish(&mut self) -> Result<(), SinkError> {
        self.put_in_place()?;
        self.published = true;
        Ok(())
    }

    fn put_in_place(&mut self) -> Result<(), SinkError> {
        match &mut self.writer {
            Writer::Stream {
                out, cursor, total, ..
            } => {
                if cursor != total {
                    return refuse(format!(
                        "the stream stopped at byte {cursor} of {total} of tensor data"
                    ));
                }
                out.flush().map_err(SinkError::io("writing to stdout"))
            }
            Writer::Files {
                dir,
                files,
                index,
                force,
                earlier,
            } => {
                for w in files.iter() {
                    w.file.sync_all().map_err(SinkError::io(format!(
                        "syncing {}",
                        dir.shown(&w.temporary).display()
                    )))?;
                }
                // An earlier export's index goes first, so that no reader follows it to files
                // that are replaced or gone; its other files go once this one's are in place.
                if index.is_some() {
                    dir.remove(INDEX)?;
                    dir.sync()?;
                }
                for w in files.iter() {
                    rename(dir, &w.temporary, &w.name, *force)?;
                }
                for n in earlier.iter() {
                    if n != INDEX && !files.iter().any(|w| &w.name == n) {
                        dir.remove(n)?;
                    }
                }
                if let Some(index) = index {
                    let tmp = temporary(INDEX);
                    let mut f = dir.create_new(&tmp)?;
                    f.write_all(index)
                        .and_then(|()| f.sync_all())
                        .map_err(SinkError::io(format!(
                            "writing {}",
                            dir.shown(INDEX).display()
                        )))?;
                    rename(dir, &tmp, INDEX, true)?;
                }
                dir.sync()
            }
        }
    }

    /// Removes what an unfinished export wrote (its temporaries).
    fn abandon(&mut self) {
        if let Writer::Files { dir, files, .. } = &self.writer {
            for w in files {
                let _ = dir.remove(&w.temporary);
            }
        }
    }
}

/// Bytes copied at a time from the scratch file to the stream.
const COPY: u64 = 1 << 20;

/// An unnamed file in the temporary folder (`TMPDIR`), gone when closed.
fn scratch() -> Result<File, SinkError> {
    use rustix::fs::{Mode, OFlags};
    let dir = std::env::temp_dir();
    let mode = Mode::from_bits_truncate(0o600);
    let fd = match rustix::fs::open(&dir, OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC, mode) {
        // A file system without unnamed files: a new name, removed at once.
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL) => {
            let name = dir.join(format!(
                ".dcpfetch-stream-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
            rustix::fs::open(&name, flags | OFlags::CLOEXEC, mode).and_then(|fd| {
                rustix::fs::unlink(&name)?;
                Ok(fd)
            })
        }
        other => other,
    }
    .map_err(|e| SinkError::Io {
        what: format!(
            "creating a scratch file in {} for the stream's reordering",
            dir.display()
        ),
        source: e.into(),
    })?;
    Ok(File::from(fd))
}

/// Renames `from` to `to` in `dir`, replacing `to` only when `replace`.
fn rename(dir: &Dir, from: &str, to: &str, replace: bool) -> Result<(), SinkError> {
    let flags = if replace {
        RenameFlags::empty()
    } else {
        RenameFlags::NOREPLACE
    };
    match rustix::fs::renameat_with(dir, from, dir, to, flags) {
        Ok(()) => Ok(()),
        // A file system without RENAME_NOREPLACE: look, then rename.
        Err(rustix::io::Errno::INVAL) if !replace && !exists(dir, to) => {
            rename(dir, from, to, true)
        }
        Err(rustix::io::Errno::EXIST) => refuse(format!(
            "{} appeared during the export (pass --force to replace it)",
            dir.shown(to).display()
        )),
        Err(e) => Err(SinkError::Io {
            what: format!(
                "renaming {} to {}",
                dir.shown(from).display(),
                dir.shown(to).display()
            ),
            source: e.into(),
        }),
    }
}

/// The folder of a file path and its name.
fn split(path: &Path) -> Result<(PathBuf, String), SinkError> {
    let leaf = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|_| !path.as_os_str().to_string_lossy().ends_with('/'))
        .ok_or_else(|| {
            SinkError::Refused(format!(
                "{} names no file (give a file name, or --max-shard-size for a folder)",
                path.display()
            ))
        })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, leaf.to_owned()))
}
