//! A sparse copy of the checkpoint: every shard file the metadata names, at its original size,
//! with the selected items' bytes at their original offsets and holes elsewhere, and the metadata
//! files copied byte for byte, last, so the folder never looks complete before it is.
//!
//! Nothing already in the output folder is trusted. The folder is held by a handle ([`Dir`]) and
//! locked for the whole fetch; every file in it is reached relative to that handle, never through
//! a symbolic link, and written only if it is a regular file with one name. A journal
//! (`.dcpfetch/journal.jsonl`, see [`super::journal`]) records the items whose bytes are
//! on disk (after `fdatasync`) with their CRC32, so `--resume` fetches only what is missing and
//! still intact, and refuses when the source changed, naming the file. The checkpoint being
//! fetched is never the output folder, inside it, or around it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::dir::{Dir, FileId, check_regular, id_of};
use super::journal::{self, Earlier, Finished, Identity, Limits};
use super::runs::CrcRuns;
use crate::fetch::{Sink, SinkError};
use crate::metadata::{Checkpoint, rank_metadata};
use crate::plan::{FilePlan, PlanItem, Share, Split};
use crate::source::{Location, ObjectMeta, ObjectName};
use crate::units::{count, sha256_hex};

/// The folder dcpfetch keeps its own state in, inside the output folder.
pub use crate::source::STATE_DIR;
const JOURNAL: &str = "journal.jsonl";
/// Holds the pid of the dcpfetch that has the folder locked.
const LOCK: &str = "lock";
const METADATA: &str = ".metadata";
/// What stands at `.metadata` while per-rank metadata files are put in place or taken away: not
/// a pickle, so neither torch nor dcpfetch reads the folder as a checkpoint.
const BLOCKER: &[u8] = b"dcpfetch is writing this folder: it is not a complete checkpoint yet\n";
const BLOCKER_TMP: &str = "blocker.tmp";

/// What the temporary files of a worker end with: nothing for a whole fetch, `.I-of-N` for a
/// share, so that workers that publish at once never write into each other's temporaries.
fn tag(share: Option<Share>) -> String {
    share.map_or(String::new(), |s| format!(".{}-of-{}", s.index, s.count))
}

/// Flush to disk and record progress at least this often.
const SYNC_EVERY_BYTES: u64 = 256 << 20;
const SYNC_EVERY: Duration = Duration::from_secs(5);

/// Items already on disk, by file and byte range.
pub type Written = HashSet<(ObjectName, Range<u64>)>;

/// How to treat an output folder that already holds something, and whether this fetch is one
/// share of a split one.
#[derive(Debug, Clone, Default)]
pub struct FolderOptions {
    pub resume: bool,
    pub force: bool,
    pub shard: Option<Sharded>,
}

/// One worker of a fetch split among several (`--shard I/N`), all writing into one folder.
///
/// Each worker holds the folder with a shared lock (a whole fetch's exclusive lock excludes
/// them), its share with the lock of `.dcpfetch/lock.I-of-N`, and records its items in
/// `.dcpfetch/journal.I-of-N.jsonl`, whose header carries the checkpoint and the [`Split`]: a
/// worker whose header would differ from the other shares' (another selection, number of
/// shares, part size, or a checkpoint changed since) is refused, naming what differs. Setting up
/// (reading the journals, removing the metadata, creating and sizing the shard files) and
/// publishing happen one worker at a time, under the lock of `.dcpfetch/` itself; only the first
/// worker of a fetch empties the shard files, the others never do. A share that finished ends its
/// journal with a `done` line, and the worker that then finds every share done publishes the
/// metadata: the folder reads as a checkpoint only once every share is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharded {
    pub share: Share,
    pub split: Split,
}

/// Whether the folder was complete when the sink finished: `None` before it finished, then the
/// shares still missing (none: the metadata is published).
#[derive(Debug, Clone, Default)]
pub struct Completion(Arc<Mutex<Option<Vec<u32>>>>);

impl Completion {
    fn set(&self, missing: Vec<u32>) {
        *self.0.lock().expect("not poisoned") = Some(missing);
    }

    pub fn missing(&self) -> Option<Vec<u32>> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// A shard file held open, and what it must still be at the end.
#[derive(Debug)]
struct Shard {
    file: File,
    size: u64,
    id: FileId,
}

/// Writes items into a sparse copy of the checkpoint.
#[derive(Debug)]
pub struct FolderSink {
    /// The output folder, locked for as long as the sink lives.
    root: Dir,
    state: Dir,
    files: HashMap<ObjectName, Shard>,
    metadata: Vec<(ObjectName, bytes::Bytes)>,
    journal: File,
    /// Items written since the last sync.
    pending: Vec<Finished>,
    touched: HashSet<ObjectName>,
    /// The CRC32s of the items being written, by file and item offset: one per run of bytes
    /// written in order (pieces arrive in order within a part, parts in any order).
    crcs: HashMap<ObjectName, HashMap<u64, CrcRuns>>,
    unsynced_bytes: u64,
    last_sync: Instant,
    /// A split fetch: this share, the header every share's journal has, and the journals' limits.
    split: Option<(Share, Identity, Limits)>,
    /// This share's lock (a split fetch), held as long as the sink lives.
    _share_lock: Option<File>,
    completion: Completion,
    /// What prepare found that the user should know.
    warnings: Vec<String>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SinkError {
    SinkError::io(what)
}

fn refuse<T>(msg: String) -> Result<T, SinkError> {
    Err(SinkError::Refused(msg))
}

/// The checkpoint's folder, when it is local (the output folder must stay out of it).
pub fn local_root(location: &Location) -> Option<&Path> {
    match location {
        Location::Local(path) => Some(path),
        Location::S3 { .. } | Location::Http { .. } => None,
    }
}

/// The name of the temporary file a metadata file is written to, in the state folder.
fn temporary(name: &ObjectName, tag: &str) -> String {
    format!("{}.tmp{tag}", name.as_str().replace('/', "%2F"))
}

impl FolderSink {
    /// Prepares `root` for a fetch of `ck` (whose shard files are `objects`) from `source`, and
    /// returns the sink with the items an earlier interrupted fetch already wrote (with `resume`)
    /// and that are still intact. `local_source` is the checkpoint's folder when it is local: the
    /// output folder may not be it, be inside it or contain it.
    ///
    /// With [`FolderOptions::shard`], this worker writes one share of a split fetch next to the
    /// other workers (see [`Sharded`]).
    pub fn prepare(
        root: &Path,
        source: &str,
        local_source: Option<&Path>,
        ck: &Checkpoint,
        objects: &HashMap<ObjectName, ObjectMeta>,
        opts: FolderOptions,
    ) -> Result<(FolderSink, Written), SinkError> {
        let share = opts.shard.as_ref().map(|s| s.share);
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
            split: opts.shard.as_ref().map(|s| s.split.clone()),
        };
        let metadata_names: HashSet<&str> =
            ck.metadata_files.iter().map(|m| m.name.as_str()).collect();
        for name in objects.keys() {
            let first = name.components().next().unwrap_or_default();
            if metadata_names.contains(name.as_str()) || first == STATE_DIR || first == METADATA {
                return refuse(format!(
                    "the metadata names a shard file {name:?}, which would overwrite dcpfetch's own files"
                ));
            }
        }
        let metadata = ck
            .metadata_files
            .iter()
            .map(|m| {
                let name =
                    ObjectName::new(&m.name).map_err(|e| SinkError::Refused(e.to_string()))?;
                Ok((name, m.bytes.clone()))
            })
            .collect::<Result<Vec<_>, SinkError>>()?;

        // The checkpoint's own folder is checked before anything is created.
        if let Some(src) = local_source {
            refuse_source_by_path(root, src)?;
        }
        let dir = Dir::open_root(root)?;
        if let Some(src) = local_source {
            refuse_source_by_id(&dir, src)?;
        }
        // A whole fetch holds the folder alone; the workers of a split fetch hold it together.
        let locked = match share {
            None => dir.try_lock()?,
            Some(_) => dir.try_lock_shared()?,
        };
        if !locked {
            let pid = dir
                .sub(STATE_DIR, false)
                .ok()
                .flatten()
                .and_then(|s| read_pid(&s, LOCK));
            return refuse(match (pid, share) {
                (Some(pid), _) => format!(
                    "{} is in use by another dcpfetch (pid {pid})",
                    root.display()
                ),
                (None, None) => format!(
                    "{} is in use by another dcpfetch (the workers of a fetch split with --shard)",
                    root.display()
                ),
                (None, Some(_)) => format!("{} is in use by another dcpfetch", root.display()),
            });
        }

        // The workers of a split fetch set up (and publish) one at a time, under the state
        // folder's lock; a whole fetch has the folder to itself, and creates its state folder
        // only once it is sure to write.
        let (state, setup) = match share {
            Some(_) => {
                let state = dir.sub(STATE_DIR, true)?.expect("created when missing");
                let setup = state.lock()?;
                (Some(state), Some(setup))
            }
            None => (dir.sub(STATE_DIR, false)?, None),
        };
        // One worker per share: its lock file is held for the whole fetch (taken below, once this
        // worker is sure to write; under the setup lock, so no twin can slip in between).
        if let (Some(share), Some(state)) = (share, &state)
            && let Some(pid) = running(state, Some(share))?
        {
            return refuse(format!(
                "share {share} of {} is being fetched by another dcpfetch (pid {pid})",
                root.display()
            ));
        }

        let longest = objects.keys().map(|n| n.as_str().len()).max().unwrap_or(0);
        let limits = Limits::for_fetch(&identity, ck.storage.len(), longest);
        let journals = match &state {
            Some(state) => read_journals(state, limits)?,
            None => Vec::new(),
        };
        // This share's journal; the other shares' of the same split fetch (peers); and those of
        // any other fetch.
        let mut mine = None;
        let mut peers = Vec::new();
        let mut others = Vec::new();
        for (of, earlier) in journals {
            let same_fetch =
                matches!(&earlier, Earlier::Found { identity: old, .. } if *old == identity);
            if of == share {
                mine = Some(earlier);
            } else if share.is_some() && of.is_some() && same_fetch {
                peers.push(of);
            } else {
                others.push((of, earlier));
            }
        }
        // Another fetch's state is replaced only with --force, and never while it runs.
        if let Some(state) = &state {
            for (of, _) in &others {
                if let Some(pid) = running(state, *of)? {
                    return refuse(format!(
                        "{} is being written by another fetch ({}, pid {pid})",
                        root.display(),
                        match of {
                            Some(s) => format!("share {s}"),
                            None => "not split".to_owned(),
                        }
                    ));
                }
            }
        }
        if let Some((_, earlier)) = others.first()
            && !opts.force
        {
            let what = match earlier {
                Earlier::Found { identity: old, .. } => describe_earlier(&identity, old),
                Earlier::Damaged(_) => "another fetch, whose journal is damaged".to_owned(),
            };
            return refuse(format!(
                "{} holds {what}; pass --force to start over",
                root.display()
            ));
        }
        let of_share = match share {
            Some(s) => format!(" of share {s}"),
            None => String::new(),
        };
        let mut warnings = Vec::new();
        let (fresh, claimed) = match mine {
            Some(Earlier::Found {
                identity: old,
                items,
                distrusted,
                ..
            }) if opts.resume && old == identity => {
                if distrusted > 0 {
                    warnings.push(format!(
                        "{} of the earlier fetch's journal could not be read (cut or damaged): the items they recorded are fetched again",
                        count(distrusted as u64, "line")
                    ));
                }
                (false, items)
            }
            Some(Earlier::Found { identity: old, .. }) if opts.resume && !opts.force => {
                return refuse(format!(
                    "{} holds {}; pass --force to start over",
                    root.display(),
                    describe_earlier(&identity, &old)
                ));
            }
            // A damaged journal vouches for nothing: everything is fetched again.
            Some(Earlier::Damaged(why)) if opts.resume => {
                warnings.push(format!(
                    "the earlier fetch's journal is damaged ({why}): every item is fetched again"
                ));
                (true, Vec::new())
            }
            Some(_) if !opts.force => {
                return refuse(format!(
                    "{} holds an earlier fetch{of_share}; pass --resume to continue it (or add to it), or --force to start over",
                    root.display()
                ));
            }
            Some(_) => (true, Vec::new()),
            None => {
                if !opts.force
                    && others.is_empty()
                    && peers.is_empty()
                    && !dir.is_empty_but(&[STATE_DIR])?
                {
                    return refuse(format!(
                        "{} is not empty and holds no dcpfetch fetch; choose an empty folder or pass --force",
                        root.display()
                    ));
                }
                (true, Vec::new())
            }
        };

        let state = match state {
            Some(state) => state,
            None => dir.sub(STATE_DIR, true)?.expect("created when missing"),
        };
        let share_lock = match share {
            Some(share) => {
                let name = lock_name(Some(share));
                let (file, _) = state.open_file(&name, true)?.expect("created when missing");
                if !try_lock_file(&file, &state.shown(&name))? {
                    return refuse(format!(
                        "share {share} of {} is being fetched by another dcpfetch",
                        root.display()
                    ));
                }
                write_pid_to(&file, &state.shown(&name))?;
                Some(file)
            }
            None => {
                write_pid(&state)?;
                None
            }
        };
        for (of, _) in &others {
            state.remove(&journal_name(*of))?;
            state.remove(&lock_name(*of))?;
        }
        // This share is not done until it finishes again: its `done` line goes first, so that a
        // worker publishing now (where the locks do not reach) sees it missing. Then the folder
        // must not look complete until the end: the metadata goes.
        let mut journal = write_journal(&state, share, &identity, &claimed)?;
        unpublish(&dir, &state, &metadata, &tag(share))?;

        // Every shard file at its original size; new space is a hole. A file whose size is not
        // the expected one vouches for none of its items.
        let mut files = HashMap::new();
        let mut intact = HashSet::new();
        let mut names: Vec<&ObjectName> = objects.keys().collect();
        names.sort();
        for name in names {
            let size = objects[name].size;
            let (parent, leaf) = dir.parent_of(name, true)?.expect("created when missing");
            let shown = parent.shown(leaf);
            let (file, st) = parent.open_file(leaf, true)?.expect("created when missing");
            let right_size = st.st_size as u64 == size;
            if right_size && !fresh {
                intact.insert(name.clone());
            }
            if share.is_some() {
                // The workers of a split fetch never empty a shard file: another worker (maybe
                // on another machine, which this one's locks may not reach) may be writing into
                // it already. They only give it its size; a file whose size changed under them
                // is refused.
                if !right_size && !peers.is_empty() && st.st_size != 0 {
                    return refuse(format!(
                        "{} is {} bytes, not {size}: it was changed while other workers wrote into \
                         it; run every share again with --force",
                        shown.display(),
                        st.st_size
                    ));
                }
            } else if !right_size || fresh {
                file.set_len(0)
                    .map_err(io(format!("truncating {}", shown.display())))?;
            }
            file.set_len(size)
                .map_err(io(format!("sizing {}", shown.display())))?;
            files.insert(
                name.clone(),
                Shard {
                    file,
                    size,
                    id: id_of(&st),
                },
            );
        }
        drop(setup);

        // What the journal claims, checked against the bytes on disk.
        let kept = check_claims(&dir, &files, &intact, claimed.clone())?;
        if kept.len() < claimed.len() {
            warnings.push(format!(
                "{} recorded in the journal changed on disk since (their CRC32 differs): fetched again",
                count((claimed.len() - kept.len()) as u64, "item")
            ));
        }
        if kept != claimed {
            journal = write_journal(&state, share, &identity, &kept)?;
        }
        let done = kept.into_iter().map(|f| (f.file, f.range)).collect();
        let sink = FolderSink {
            root: dir,
            state,
            files,
            metadata,
            journal,
            pending: Vec::new(),
            touched: HashSet::new(),
            crcs: HashMap::new(),
            unsynced_bytes: 0,
            last_sync: Instant::now(),
            split: opts.shard.map(|s| (s.share, identity, limits)),
            _share_lock: share_lock,
            completion: Completion::default(),
            warnings,
        };
        Ok((sink, done))
    }

    /// What the command learns once the sink has finished.
    /// What the user should know about the earlier fetch being resumed (a damaged journal,
    /// items whose bytes changed on disk).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn completion(&self) -> Completion {
        self.completion.clone()
    }

    /// The last step of a fetch: publish the metadata. A worker of a split fetch first records
    /// that its share is done; then, under the state folder's lock, the worker that finds every
    /// share done publishes (unless an earlier one did): two that finish together take the lock
    /// in turn, and the second finds the folder published.
    fn publish_when_complete(&mut self) -> Result<(), SinkError> {
        let Some((share, identity, limits)) = &self.split else {
            publish(&self.root, &self.state, &self.metadata, "")?;
            self.completion.set(Vec::new());
            return Ok(());
        };
        self.journal
            .write_all(journal::done(*share).as_bytes())
            .and_then(|()| self.journal.sync_data())
            .map_err(io("writing the journal"))?;
        let _setup = self.state.lock()?;
        let mut missing = Vec::new();
        for index in (0..share.count).filter(|&i| i != share.index) {
            let other = Share::new(index, share.count).expect("index < count");
            let done = match read_journal(&self.state, &journal_name(Some(other)), *limits)? {
                Some(Earlier::Found {
                    identity: theirs,
                    done,
                    ..
                }) => theirs == *identity && done == Some(other),
                _ => false,
            };
            if !done {
                missing.push(index);
            }
        }
        if missing.is_empty() && !published(&self.root, &self.metadata)? {
            publish(&self.root, &self.state, &self.metadata, &tag(Some(*share)))?;
        }
        self.completion.set(missing);
        Ok(())
    }

    /// Makes written items durable, then records them in the journal.
    fn sync(&mut self) -> Result<(), SinkError> {
        for name in self.touched.drain() {
            self.files[&name].file.sync_data().map_err(io(format!(
                "syncing {}",
                self.root.shown(name.as_str()).display()
            )))?;
        }
        let lines: String = self.pending.drain(..).map(|f| journal::item(&f)).collect();
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

    /// Refuses to finish when the folder or a shard file was changed under the fetch: the folder
    /// must still be at its path, and every shard file still at its name, with one link and its
    /// size.
    fn check_unchanged(&self) -> Result<(), SinkError> {
        if !self.root.still_at_path()? {
            return refuse(format!(
                "{} was moved or replaced while dcpfetch wrote into it",
                self.root.path().display()
            ));
        }
        let mut names: Vec<&ObjectName> = self.files.keys().collect();
        names.sort();
        for name in names {
            let shard = &self.files[name];
            let shown = self.root.shown(name.as_str());
            let here = self
                .root
                .parent_of(name, false)?
                .and_then(|(parent, leaf)| parent.entry_id(leaf));
            if here != Some(shard.id) {
                return refuse(format!(
                    "{} was moved or replaced while dcpfetch wrote it",
                    shown.display()
                ));
            }
            let st = check_regular(&shard.file, &shown)?;
            if st.st_size as u64 != shard.size {
                return refuse(format!(
                    "{} changed size while dcpfetch wrote it ({} bytes, expected {})",
                    shown.display(),
                    st.st_size,
                    shard.size
                ));
            }
        }
        Ok(())
    }
}

/// Makes an absolute path of `p` (relative to the current folder) without touching the disk.
fn absolute(p: &Path) -> Result<PathBuf, SinkError> {
    std::path::absolute(p).map_err(io(format!("resolving {}", p.display())))
}

fn canonical(p: &Path) -> Result<PathBuf, SinkError> {
    std::fs::canonicalize(p).map_err(io(format!("resolving {}", p.display())))
}

fn overlap(out: &Path, what: &str, src: &Path) -> SinkError {
    SinkError::Refused(format!(
        "{} {what} the checkpoint being fetched ({}); dcpfetch never writes into its source, even with --force",
        out.display(),
        src.display()
    ))
}

/// Refuses an output folder that is, is inside, or contains the local checkpoint, by canonical
/// paths; a folder that does not exist yet is judged by the nearest folder above it that does.
fn refuse_source_by_path(out: &Path, src: &Path) -> Result<(), SinkError> {
    let src_real = canonical(src)?;
    let mut probe = absolute(out)?;
    let exists = loop {
        match std::fs::canonicalize(&probe) {
            Ok(real) => break Some(real),
            Err(_) => match probe.parent() {
                Some(p) => probe = p.to_path_buf(),
                None => break None,
            },
        }
    };
    let Some(real) = exists else { return Ok(()) };
    if real == src_real {
        let what = if probe == absolute(out)? {
            "is the folder of"
        } else {
            "would be inside"
        };
        return Err(overlap(out, what, src));
    }
    if real.starts_with(&src_real) {
        return Err(overlap(out, "is inside the folder of", src));
    }
    if probe == absolute(out)? && src_real.starts_with(&real) {
        return Err(overlap(out, "contains", src));
    }
    Ok(())
}

/// The device and inode of `p` and of every folder above it.
fn ids_up_from(p: &Path) -> Result<Vec<FileId>, SinkError> {
    canonical(p)?
        .ancestors()
        .map(|a| {
            std::fs::metadata(a)
                .map(|m| (m.dev(), m.ino()))
                .map_err(io(format!("inspecting {}", a.display())))
        })
        .collect()
}

/// The same check by device and inode, on the folder actually opened (bind mounts and renames
/// between the path check and the open included).
fn refuse_source_by_id(out: &Dir, src: &Path) -> Result<(), SinkError> {
    let out_id = out.id()?;
    let src_up = ids_up_from(src)?;
    if src_up[0] == out_id {
        return Err(overlap(out.path(), "is the folder of", src));
    }
    if src_up.contains(&out_id) {
        return Err(overlap(out.path(), "contains", src));
    }
    if ids_up_from(out.path())?.contains(&src_up[0]) {
        return Err(overlap(out.path(), "is inside the folder of", src));
    }
    Ok(())
}

/// The journal of a share (`journal.I-of-N.jsonl`), or of a whole fetch (`journal.jsonl`).
fn journal_name(share: Option<Share>) -> String {
    match share {
        Some(s) => format!("journal.{}-of-{}.jsonl", s.index, s.count),
        None => JOURNAL.to_owned(),
    }
}

/// The lock file of a share (`lock.I-of-N`), or of a whole fetch (`lock`); it holds the pid.
fn lock_name(share: Option<Share>) -> String {
    match share {
        Some(s) => format!("{LOCK}.{}-of-{}", s.index, s.count),
        None => LOCK.to_owned(),
    }
}

/// Which fetch a file name of the state folder is the journal of: `Some(None)` for a whole
/// fetch's, `Some(Some(share))` for a share's, `None` if it is no journal.
fn journal_of(name: &str) -> Option<Option<Share>> {
    if name == JOURNAL {
        return Some(None);
    }
    let (index, count) = name
        .strip_prefix("journal.")?
        .strip_suffix(".jsonl")?
        .split_once("-of-")?;
    Share::new(index.parse().ok()?, count.parse().ok()?).map(Some)
}

/// Takes the lock of an open file without waiting; `false` when another process holds it.
fn try_lock_file(file: &File, shown: &Path) -> Result<bool, SinkError> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(SinkError::Io {
            what: format!("locking {}", shown.display()),
            source: e.into(),
        }),
    }
}

/// The pid of the dcpfetch running the fetch whose lock file is `of`'s, if one runs.
fn running(state: &Dir, of: Option<Share>) -> Result<Option<String>, SinkError> {
    let name = lock_name(of);
    let Some((file, _)) = state.open_file(&name, false)? else {
        return Ok(None);
    };
    if try_lock_file(&file, &state.shown(&name))? {
        return Ok(None);
    }
    Ok(Some(
        read_pid(state, &name).map_or("unknown".to_owned(), |p| p.to_string()),
    ))
}

/// An earlier fetch, in words, as it differs from this one.
fn describe_earlier(identity: &Identity, old: &Identity) -> String {
    if old.source != identity.source {
        format!("an earlier fetch from {}", old.source)
    } else if !identity.same_checkpoint(old) {
        format!(
            "a fetch of another version of this checkpoint ({})",
            identity.difference(old)
        )
    } else {
        format!(
            "another fetch of this checkpoint ({})",
            identity.difference(old)
        )
    }
}

/// The pid recorded in the lock file `name`, if it can be read.
fn read_pid(state: &Dir, name: &str) -> Option<u32> {
    let (file, _) = state.open_read(name).ok()??;
    let mut text = String::new();
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn write_pid(state: &Dir) -> Result<(), SinkError> {
    let (file, _) = state.open_file(LOCK, true)?.expect("created when missing");
    write_pid_to(&file, &state.shown(LOCK))
}

fn write_pid_to(file: &File, shown: &Path) -> Result<(), SinkError> {
    file.set_len(0)
        .and_then(|()| file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0))
        .map_err(io(format!("writing {}", shown.display())))
}

/// Every journal in the state folder, with the fetch (or share) it belongs to.
fn read_journals(state: &Dir, limits: Limits) -> Result<Vec<(Option<Share>, Earlier)>, SinkError> {
    let mut names: Vec<(String, Option<Share>)> = state
        .names()?
        .into_iter()
        .filter_map(|n| journal_of(&n).map(|of| (n, of)))
        .collect();
    names.sort();
    let mut journals = Vec::new();
    for (name, of) in names {
        if let Some(earlier) = read_journal(state, &name, limits)? {
            journals.push((of, earlier));
        }
    }
    Ok(journals)
}

/// The journal `name`, if there is one; it must be a regular file of one name.
fn read_journal(state: &Dir, name: &str, limits: Limits) -> Result<Option<Earlier>, SinkError> {
    let Some((file, st)) = state.open_read(name)? else {
        return Ok(None);
    };
    journal::read(file, st.st_size as u64, limits)
        .map(Some)
        .map_err(io(format!("reading {}", state.shown(name).display())))
}

/// Writes the journal of `share` with `items` aside and renames it into place; returns it open
/// for appending.
fn write_journal(
    state: &Dir,
    share: Option<Share>,
    identity: &Identity,
    items: &[Finished],
) -> Result<File, SinkError> {
    let name = journal_name(share);
    let tmp = format!("{name}.tmp");
    let shown = state.shown(&tmp);
    let mut f = state.create_new(&tmp)?;
    let mut text = journal::header(identity);
    for item in items {
        text.push_str(&journal::item(item));
    }
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", shown.display())))?;
    state.rename(&tmp, state, &name)?;
    state.sync()?;
    Ok(f)
}

/// Whether the metadata files are in place with their bytes (and, for per-rank files, no
/// blocker): an earlier worker of a split fetch published them.
fn published(root: &Dir, metadata: &[(ObjectName, bytes::Bytes)]) -> Result<bool, SinkError> {
    if per_rank(metadata) && root.entry_id(METADATA).is_some() {
        return Ok(false);
    }
    for (name, bytes) in metadata {
        let Ok(Some((parent, leaf))) = root.parent_of(name, false) else {
            return Ok(false);
        };
        let Ok(Some((file, st))) = parent.open_read(leaf) else {
            return Ok(false);
        };
        if st.st_size as u64 != bytes.len() as u64 {
            return Ok(false);
        }
        let mut held = Vec::with_capacity(bytes.len());
        file.take(bytes.len() as u64)
            .read_to_end(&mut held)
            .map_err(io(format!("reading {}", parent.shown(leaf).display())))?;
        if held[..] != bytes[..] {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The claimed items whose file kept its size and whose bytes on disk still have the recorded
/// CRC32; the others are fetched again.
fn check_claims(
    root: &Dir,
    files: &HashMap<ObjectName, Shard>,
    intact: &HashSet<ObjectName>,
    claimed: Vec<Finished>,
) -> Result<Vec<Finished>, SinkError> {
    let mut kept = Vec::new();
    let mut seen = HashSet::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in claimed {
        let Some(shard) = files.get(&f.file) else {
            continue;
        };
        if !intact.contains(&f.file)
            || f.range.end > shard.size
            || !seen.insert((f.file.clone(), f.range.clone()))
        {
            continue;
        }
        let mut crc = crc32fast::Hasher::new();
        let mut at = f.range.start;
        while at < f.range.end {
            let n = buf.len().min((f.range.end - at) as usize);
            shard
                .file
                .read_exact_at(&mut buf[..n], at)
                .map_err(io(format!(
                    "reading {}",
                    root.shown(f.file.as_str()).display()
                )))?;
            crc.update(&buf[..n]);
            at += n as u64;
        }
        if crc.finalize() == f.crc32 {
            kept.push(f);
        }
    }
    Ok(kept)
}

/// Whether the metadata files are torch's per-rank ones (`__N.metadata`) rather than one
/// `.metadata`.
fn per_rank(metadata: &[(ObjectName, bytes::Bytes)]) -> bool {
    !(metadata.len() == 1 && metadata[0].0.as_str() == METADATA)
}

// Why the metadata files are published (and taken away) in this order.
//
// A folder reads as a checkpoint when torch (or dcpfetch) finds its metadata: `.metadata` if it
// exists, otherwise every `__N.metadata` found, merged. So:
//
// - `.metadata` layout: there is one file; writing it aside and renaming it into place is atomic.
//   Removing it (at the start of a fetch) is one unlink. Either way the folder reads as complete
//   exactly from the rename on, and never before.
// - Per-rank layout: renaming `__0.metadata`, then `__1.metadata`, ... would leave, if the process
//   were killed between two renames, a folder that reads as a smaller complete checkpoint (rank
//   0's entries only); removing them one by one would do the same. So first a blocker, a file
//   that is not a pickle, is renamed to `.metadata`: torch reads it, fails, and does not merge the
//   rank files (dcpfetch likewise reads `.metadata` first and fails). Then the rank files are
//   renamed into place (or removed), and only the last step, removing the blocker, makes the
//   folder read as complete (or as holding no metadata at all). A kill at any point before it
//   leaves the blocker: the folder does not read as a checkpoint, and `--resume` takes it away.
//
// The folder is synced after the blocker is placed and before it is taken away, so the order
// also holds after a power loss.

/// Places the blocker at `.metadata`.
fn place_blocker(root: &Dir, state: &Dir, tag: &str) -> Result<(), SinkError> {
    let tmp = format!("{BLOCKER_TMP}{tag}");
    let mut f = state.create_new(&tmp)?;
    f.write_all(BLOCKER)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", state.shown(&tmp).display())))?;
    state.rename(&tmp, root, METADATA)?;
    root.sync()
}

/// Removes the metadata files, so that the folder does not read as complete while it is written.
fn unpublish(
    root: &Dir,
    state: &Dir,
    metadata: &[(ObjectName, bytes::Bytes)],
    tag: &str,
) -> Result<(), SinkError> {
    let blocked = per_rank(metadata);
    if blocked {
        place_blocker(root, state, tag)?;
    }
    for (name, _) in metadata {
        if let Some((parent, leaf)) = root.parent_of(name, false)? {
            parent.remove(leaf)?;
        }
    }
    // Per-rank metadata files this checkpoint does not have (an earlier fetch of another one
    // into this folder, with --force): a reader would merge them with this checkpoint's.
    for leaf in root.names()? {
        if rank_metadata(&leaf).is_some() && !metadata.iter().any(|(n, _)| n.as_str() == leaf) {
            root.remove(&leaf)?;
        }
    }
    if blocked {
        root.sync()?;
        root.remove(METADATA)?;
    }
    root.sync()
}

/// Writes the metadata files aside, then puts them in place in the order explained above.
fn publish(
    root: &Dir,
    state: &Dir,
    metadata: &[(ObjectName, bytes::Bytes)],
    tag: &str,
) -> Result<(), SinkError> {
    for (name, bytes) in metadata {
        let tmp = temporary(name, tag);
        let mut f = state.create_new(&tmp)?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(io(format!("writing {}", state.shown(&tmp).display())))?;
    }
    let blocked = per_rank(metadata);
    if blocked {
        place_blocker(root, state, tag)?;
    }
    for (name, _) in metadata {
        if name.as_str() != METADATA {
            let (parent, leaf) = root.parent_of(name, true)?.expect("created when missing");
            state.rename(&temporary(name, tag), &parent, leaf)?;
        }
    }
    root.sync()?;
    match metadata.iter().find(|(n, _)| n.as_str() == METADATA) {
        Some((name, _)) => state.rename(&temporary(name, tag), root, METADATA)?,
        None if blocked => {
            root.remove(METADATA)?;
        }
        None => {}
    }
    root.sync()
}

impl Sink for FolderSink {
    /// Pieces are placed at their offset as they arrive.
    fn ordered(&self) -> bool {
        false
    }

    fn write(
        &mut self,
        file: &FilePlan,
        item: &PlanItem,
        at: u64,
        data: Bytes,
    ) -> Result<(), SinkError> {
        let shard = &self.files[&file.name];
        shard
            .file
            .write_all_at(&data, item.range.start + at)
            .map_err(io(format!(
                "writing {}",
                self.root.shown(file.name.as_str()).display()
            )))?;
        if !self.crcs.contains_key(&file.name) {
            self.crcs.insert(file.name.clone(), HashMap::new());
        }
        self.crcs
            .get_mut(&file.name)
            .expect("inserted above")
            .entry(item.range.start)
            .or_default()
            .add(at, &data);
        self.unsynced_bytes += data.len() as u64;
        if !self.touched.contains(&file.name) {
            self.touched.insert(file.name.clone());
        }
        Ok(())
    }

    fn item_done(&mut self, file: &FilePlan, item: &PlanItem) -> Result<(), SinkError> {
        let runs = self
            .crcs
            .get_mut(&file.name)
            .and_then(|items| items.remove(&item.range.start))
            .unwrap_or_default();
        let Some(crc32) = runs.finish(item.len()) else {
            return refuse(format!(
                "{} bytes {}..{} were not all written",
                file.name, item.range.start, item.range.end
            ));
        };
        self.pending.push(Finished {
            file: file.name.clone(),
            range: item.range.clone(),
            crc32,
        });
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
        self.check_unchanged()?;
        self.publish_when_complete()
    }
}
