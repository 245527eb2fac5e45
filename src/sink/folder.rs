//! A sparse copy of the checkpoint: every shard file the metadata names, at its original size,
//! with the selected items' bytes at their original offsets and holes elsewhere, and the metadata
//! files copied byte for byte, last, so the folder never looks complete before it is.
//!
//! A journal (`.dcpfetch/journal.jsonl`) records the items whose bytes are on disk (after
//! `fdatasync`), so `--resume` fetches only what is missing, and refuses when the source changed.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::fetch::{Sink, SinkError};
use crate::metadata::Checkpoint;
use crate::plan::{FilePlan, PlanItem};
use crate::source::{ObjectMeta, ObjectName};
use crate::units::sha256_hex;

/// The folder dcpfetch keeps its own state in, inside the output folder.
pub const STATE_DIR: &str = ".dcpfetch";
const JOURNAL: &str = "journal.jsonl";

/// Flush to disk and record progress at least this often.
const SYNC_EVERY_BYTES: u64 = 256 << 20;
const SYNC_EVERY: Duration = Duration::from_secs(5);

/// Items already on disk, by file and byte range.
pub type Written = HashSet<(ObjectName, Range<u64>)>;

/// How to treat an output folder that already holds something.
#[derive(Debug, Clone, Copy, Default)]
pub struct FolderOptions {
    pub resume: bool,
    pub force: bool,
}

/// What makes two fetches "of the same checkpoint": the source, the metadata bytes and every
/// shard file's size and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    source: String,
    metadata: Vec<(String, String)>,
    files: Vec<(String, u64, Option<String>)>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum JournalLine {
    Header {
        dcpfetch_journal: u32,
        identity: Identity,
    },
    Item {
        file: String,
        start: u64,
        end: u64,
    },
}

/// Writes items into a sparse copy of the checkpoint.
#[derive(Debug)]
pub struct FolderSink {
    root: PathBuf,
    files: HashMap<ObjectName, File>,
    metadata: Vec<(String, Arc<[u8]>)>,
    journal: File,
    /// Items written since the last sync.
    pending: Vec<(ObjectName, Range<u64>)>,
    touched: HashSet<ObjectName>,
    unsynced_bytes: u64,
    last_sync: Instant,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SinkError {
    SinkError::io(what)
}

fn refuse<T>(msg: String) -> Result<T, SinkError> {
    Err(SinkError::Refused(msg))
}

/// Creates the folders of `name` below `root`, refusing to pass through a symbolic link.
fn safe_path(root: &Path, name: &ObjectName) -> Result<PathBuf, SinkError> {
    let mut path = root.to_path_buf();
    let components: Vec<&str> = name.components().collect();
    for (i, c) in components.iter().enumerate() {
        path.push(c);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return refuse(format!(
                    "{} is a symbolic link; dcpfetch does not write through links",
                    path.display()
                ));
            }
            Ok(m) if i + 1 < components.len() && !m.is_dir() => {
                return refuse(format!("{} is not a folder", path.display()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if i + 1 < components.len() {
                    std::fs::create_dir(&path)
                        .map_err(io(format!("creating {}", path.display())))?;
                }
            }
            Err(e) => return Err(io(format!("inspecting {}", path.display()))(e)),
        }
    }
    Ok(path)
}

impl FolderSink {
    /// Prepares `root` for a fetch of `ck` (whose shard files are `objects`), and returns the sink
    /// with the items an earlier interrupted fetch already wrote (with `resume`).
    pub fn prepare(
        root: &Path,
        source: &str,
        ck: &Checkpoint,
        objects: &HashMap<ObjectName, ObjectMeta>,
        opts: FolderOptions,
    ) -> Result<(FolderSink, Written), SinkError> {
        let identity = Identity {
            source: source.to_owned(),
            metadata: ck
                .metadata_files
                .iter()
                .map(|m| (m.name.clone(), sha256_hex(&m.bytes)))
                .collect(),
            files: {
                let mut f: Vec<_> = objects
                    .iter()
                    .map(|(n, m)| (n.to_string(), m.size, m.version.clone()))
                    .collect();
                f.sort();
                f
            },
        };
        let metadata_names: HashSet<&str> =
            ck.metadata_files.iter().map(|m| m.name.as_str()).collect();
        for name in objects.keys() {
            let first = name.components().next().unwrap_or_default();
            if metadata_names.contains(name.as_str()) || first == STATE_DIR {
                return refuse(format!(
                    "the metadata names a shard file {name:?}, which would overwrite dcpfetch's own files"
                ));
            }
        }

        match std::fs::symlink_metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return refuse(format!("{} exists and is not a folder", root.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(root)
                    .map_err(io(format!("creating {}", root.display())))?;
            }
            Err(e) => return Err(io(format!("inspecting {}", root.display()))(e)),
        }
        let state = root.join(STATE_DIR);
        let journal_path = state.join(JOURNAL);
        let earlier = read_journal(&journal_path)?;
        let mut done = HashSet::new();
        let fresh = match earlier {
            Some((old, items)) if opts.resume && old == identity => {
                done = items;
                false
            }
            Some((old, _)) if opts.resume && !opts.force => {
                let why = if old.source != identity.source {
                    format!("an earlier fetch from {}", old.source)
                } else {
                    "a fetch of another version of this checkpoint (its metadata or shard files changed)".to_owned()
                };
                return refuse(format!(
                    "{} holds {why}; pass --force to start over",
                    root.display()
                ));
            }
            Some(_) if !opts.force => {
                return refuse(format!(
                    "{} holds an earlier fetch; pass --resume to continue it (or add to it), or --force to start over",
                    root.display()
                ));
            }
            Some(_) => true,
            None => {
                let mut entries =
                    std::fs::read_dir(root).map_err(io(format!("reading {}", root.display())))?;
                if entries.next().is_some() && !opts.force {
                    return refuse(format!(
                        "{} is not empty and holds no dcpfetch fetch; choose an empty folder or pass --force",
                        root.display()
                    ));
                }
                true
            }
        };

        // The folder must not look complete until the end: the metadata goes first.
        for m in &ck.metadata_files {
            let name = ObjectName::new(&m.name).map_err(|e| SinkError::Refused(e.to_string()))?;
            let path = safe_path(root, &name)?;
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("removing {}", path.display()))(e)),
            }
        }
        std::fs::create_dir_all(&state).map_err(io(format!("creating {}", state.display())))?;
        let journal = if fresh {
            let mut j = File::create(&journal_path)
                .map_err(io(format!("creating {}", journal_path.display())))?;
            let header = JournalLine::Header {
                dcpfetch_journal: 1,
                identity: identity.clone(),
            };
            writeln!(j, "{}", serde_json::to_string(&header).expect("serializes"))
                .map_err(io("writing the journal"))?;
            j.sync_all().map_err(io("syncing the journal"))?;
            j
        } else {
            OpenOptions::new()
                .append(true)
                .open(&journal_path)
                .map_err(io(format!("opening {}", journal_path.display())))?
        };

        // Every shard file at its original size; new space is a hole.
        let mut files = HashMap::new();
        let mut names: Vec<&ObjectName> = objects.keys().collect();
        names.sort();
        for name in names {
            let size = objects[name].size;
            let path = safe_path(root, name)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(fresh)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io(format!("opening {}", path.display())))?;
            f.set_len(size)
                .map_err(io(format!("sizing {}", path.display())))?;
            files.insert(name.clone(), f);
        }
        let sink = FolderSink {
            root: root.to_path_buf(),
            files,
            metadata: ck
                .metadata_files
                .iter()
                .map(|m| (m.name.clone(), m.bytes.clone()))
                .collect(),
            journal,
            pending: Vec::new(),
            touched: HashSet::new(),
            unsynced_bytes: 0,
            last_sync: Instant::now(),
        };
        Ok((sink, done))
    }

    /// Makes written items durable, then records them in the journal.
    fn sync(&mut self) -> Result<(), SinkError> {
        for name in self.touched.drain() {
            self.files[&name]
                .sync_data()
                .map_err(io(format!("syncing {name}")))?;
        }
        let mut lines = String::new();
        for (file, r) in self.pending.drain(..) {
            let line = JournalLine::Item {
                file: file.to_string(),
                start: r.start,
                end: r.end,
            };
            lines.push_str(&serde_json::to_string(&line).expect("serializes"));
            lines.push('\n');
        }
        if !lines.is_empty() {
            self.journal
                .write_all(lines.as_bytes())
                .map_err(io("writing the journal"))?;
            self.journal
                .sync_data()
                .map_err(io("syncing the journal"))?;
        }
        self.unsynced_bytes = 0;
        self.last_sync = Instant::now();
        Ok(())
    }
}

/// The identity and finished items of an earlier fetch, if the folder has a journal. A torn last
/// line (a crash while appending) is ignored.
fn read_journal(path: &Path) -> Result<Option<(Identity, Written)>, SinkError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let mut identity = None;
    let mut items = HashSet::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io(format!("reading {}", path.display())))?;
        match serde_json::from_str::<JournalLine>(&line) {
            Ok(JournalLine::Header { identity: id, .. }) => identity = Some(id),
            Ok(JournalLine::Item { file, start, end }) => {
                if let Ok(name) = ObjectName::new(&file) {
                    items.insert((name, start..end));
                }
            }
            Err(_) => break,
        }
    }
    Ok(identity.map(|id| (id, items)))
}

impl Sink for FolderSink {
    fn write(
        &mut self,
        file: &FilePlan,
        item: &PlanItem,
        at: u64,
        data: Bytes,
    ) -> Result<(), SinkError> {
        let f = &self.files[&file.name];
        f.write_all_at(&data, item.range.start + at)
            .map_err(io(format!(
                "writing {}",
                self.root.join(file.name.as_str()).display()
            )))?;
        self.unsynced_bytes += data.len() as u64;
        if !self.touched.contains(&file.name) {
            self.touched.insert(file.name.clone());
        }
        Ok(())
    }

    fn item_done(&mut self, file: &FilePlan, item: &PlanItem) -> Result<(), SinkError> {
        self.pending.push((file.name.clone(), item.range.clone()));
        if self.unsynced_bytes >= SYNC_EVERY_BYTES || self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    fn interrupted(&mut self) -> Result<(), SinkError> {
        self.sync()
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.sync()?;
        // Now the metadata, each file written aside and renamed into place.
        for (name, bytes) in &self.metadata {
            let name = ObjectName::new(name).map_err(|e| SinkError::Refused(e.to_string()))?;
            let path = safe_path(&self.root, &name)?;
            let tmp = self
                .root
                .join(STATE_DIR)
                .join(format!("{}.tmp", name.as_str().replace('/', "%2F")));
            let mut f = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
            f.write_all(bytes)
                .map_err(io(format!("writing {}", tmp.display())))?;
            f.sync_all()
                .map_err(io(format!("syncing {}", tmp.display())))?;
            std::fs::rename(&tmp, &path)
                .map_err(io(format!("renaming {} into place", path.display())))?;
        }
        File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing {}", self.root.display())))?;
        Ok(())
    }
}
