//! Reading a checkpoint's `.metadata` (or per-rank `__N.metadata` files) into one [`Checkpoint`].
//!
//! torch's own files take a fast path (`fast`: one pass over the opcodes straight into entries and
//! storage, giving up on anything it does not know); every other file, and every error and
//! finding, takes the general one: [`pickle`] turns bytes into a value graph without executing
//! anything and [`model`] reads torch's classes from that graph. This module merges the files into
//! one view, links every chunk to its stored copies (and every stored copy back to its chunk) and
//! reports globals outside the known set as security findings ([`UnsafeGlobal`]).

pub mod dims;
pub mod dtype;
mod fast;
pub mod model;

#[doc(hidden)]
pub use fast::check_against_general;
pub mod pickle;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::source::{Source, SourceError};
use model::{EntryMeta, ModelError, RankMetadata, StorageInfo, StorageMeta, TensorMeta};

pub use dims::Dims;
use pickle::{Limits, Pickle, PickleError};

/// The name torch gives the metadata file of a checkpoint saved with collectives.
pub const METADATA_FILE: &str = ".metadata";

/// A `torch.save` archive holds several zip records besides the tensor's data (`data.pkl`,
/// `byteorder`, `version`, the local headers, the central directory and its end records): it is
/// never fewer than this many bytes longer than the data. An item shorter than its chunk's raw data
/// plus this cannot be an archive ([`Checkpoint::is_raw_tensor`]).
pub const MIN_ARCHIVE_OVERHEAD: u64 = 512;

/// A metadata file of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataFile {
    /// Name relative to the checkpoint (`.metadata` or `__N.metadata`).
    pub name: String,
    pub size: u64,
    pub version: Option<String>,
    pub storage_meta: Option<StorageMeta>,
    /// The pickle protocol the file declares.
    pub protocol: u8,
    /// The file's bytes, kept to copy them byte for byte into a fetched folder (the buffer they
    /// were read into, never copied).
    pub bytes: bytes::Bytes,
}

/// A global named by a metadata file that is not one torch's loading resolves to build data:
/// Python's `pickle.load` would import and call it. Reported as a security finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeGlobal {
    pub file: String,
    pub offset: u64,
    pub module: String,
    pub name: String,
}

impl fmt::Display for UnsafeGlobal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} names the global {}.{} at byte {}, outside the known DCP/torch set: \
             Python's pickle.load would import and call it (dcpfetch did not)",
            self.file, self.module, self.name, self.offset
        )
    }
}

/// Where a chunk is: an index into [`Checkpoint::entries`] and one into that entry's
/// [`Entry::chunks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkIndex {
    pub entry: usize,
    pub chunk: usize,
}

/// One stored copy of a chunk (or of a bytes entry): `[offset, offset + length)` of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    /// Index into [`Checkpoint::metadata_files`] of the file that lists this copy.
    pub metadata_file: usize,
    /// The same allocation as its entry's [`Entry::fqn`].
    pub fqn: Arc<str>,
    /// The chunk offsets of the `MetadataIndex`; `None` for bytes entries.
    pub chunk_offsets: Option<Dims>,
    pub info: StorageInfo,
    /// The chunk this is a copy of: the back-link of [`Chunk::storage`], set in the same place.
    /// `None` only for a copy that no chunk refers to (its fqn or offsets match no chunk).
    pub chunk: Option<ChunkIndex>,
}

impl Storage {
    /// The byte range of the item in its file; `None` when `offset + length` overflows.
    pub fn range(&self) -> Option<std::ops::Range<u64>> {
        let end = self.info.offset.checked_add(self.info.length)?;
        Some(self.info.offset..end)
    }
}

/// A tensor chunk (or the single value of a bytes entry) with its stored copies.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// `None` for bytes entries.
    pub offsets: Option<Dims>,
    pub sizes: Option<Dims>,
    /// Indexes into [`Checkpoint::storage`]: one per rank that stored it (usually one).
    pub storage: Vec<usize>,
}

impl Chunk {
    /// Number of elements of a tensor chunk; `None` for bytes entries and when the product
    /// overflows a `u64`.
    pub fn numel(&self) -> Option<u64> {
        self.sizes
            .as_ref()?
            .iter()
            .try_fold(1u64, |n, &s| n.checked_mul(s))
    }
}

/// One fqn of the state dict.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub fqn: Arc<str>,
    /// `None` for bytes entries (opaque `torch.save` values such as `step`).
    pub tensor: Option<TensorMeta>,
    pub chunks: Vec<Chunk>,
}

impl Entry {
    /// An entry as one metadata file describes it: its chunks not yet linked to storage.
    pub(crate) fn new(fqn: Arc<str>, meta: EntryMeta) -> Entry {
        match meta {
            EntryMeta::Bytes => Entry {
                fqn,
                tensor: None,
                chunks: vec![Chunk {
                    offsets: None,
                    sizes: None,
                    storage: Vec::new(),
                }],
            },
            EntryMeta::Tensor(mut t) => {
                let chunks = std::mem::take(&mut t.chunks)
                    .into_iter()
                    .map(|c| Chunk {
                        offsets: Some(c.offsets),
                        sizes: Some(c.sizes),
                        storage: Vec::new(),
                    })
                    .collect();
                Entry {
                    fqn,
                    tensor: Some(t),
                    chunks,
                }
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        if self.tensor.is_some() {
            "tensor"
        } else {
            "bytes"
        }
    }
}

/// Everything the metadata files say about a checkpoint, merged and linked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    pub metadata_files: Vec<MetadataFile>,
    /// Entries in file order (first file first).
    pub entries: Vec<Entry>,
    pub storage: Vec<Storage>,
    /// `planner_data` of the first file that has it.
    pub planner_data: Option<Vec<(String, Vec<model::PathPart>)>>,
    /// Globals outside the known set: the security findings.
    pub unsafe_globals: Vec<UnsafeGlobal>,
    /// Inconsistencies that do not stop reading (a chunk without a stored copy, ...).
    pub warnings: Vec<String>,
}

/// Lookups while merging files: entries by fqn (made when a second file comes: one file's entries
/// are unique), and the chunks of entries that more than one file names, by offsets.
#[derive(Debug, Default)]
struct MergeIndex {
    by_fqn: Option<HashMap<Arc<str>, usize>>,
    chunks: HashMap<usize, HashMap<Option<Dims>, usize>>,
}

/// One metadata file read: the file, its model, its unsafe globals, and the entry of each storage
/// item when the fast path knows it (see `fast::Read::owners`).
type ParsedFile = (
    MetadataFile,
    RankMetadata,
    Vec<UnsafeGlobal>,
    Option<Vec<u32>>,
);

/// Why the metadata could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("no {METADATA_FILE} and no __N.metadata files in {location}{}", safetensors_text(.safetensors))]
    NoMetadata {
        location: String,
        /// The `*.safetensors` and `*.safetensors.index.json` files the listing saw: a folder
        /// written by torch's `HuggingFaceStorageWriter` (or any Hugging Face model folder).
        safetensors: Vec<String>,
    },
    #[error("{file} is {size} bytes, more than the {limit} bytes a metadata file may have")]
    TooLarge { file: String, size: u64, limit: u64 },
    #[error("{file}: {source}")]
    Pickle {
        file: String,
        #[source]
        source: PickleError,
    },
    #[error("{file}: not a DCP metadata file: {source}")]
    Model {
        file: String,
        #[source]
        source: ModelError,
    },
    #[error("{file}: {problem}")]
    Inconsistent { file: String, problem: String },
}

/// What the `NoMetadata` message says about safetensors files found instead.
fn safetensors_text(names: &[String]) -> String {
    const SHOWN: usize = 3;
    if names.is_empty() {
        return String::new();
    }
    let mut shown = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        shown.push_str(&format!(", and {} more", names.len() - SHOWN));
    }
    format!(
        ", which holds safetensors files ({shown}): a Hugging Face safetensors folder, not a DCP checkpoint"
    )
}

/// Whether a file name is part of a safetensors folder (`model-00001-of-00002.safetensors`,
/// `model.safetensors.index.json`).
fn is_safetensors_name(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
}

impl Checkpoint {
    /// Parses one metadata file's bytes.
    pub fn parse_file(name: &str, data: &[u8]) -> Result<ParsedFile, MetadataError> {
        Self::parse_shared(name, bytes::Bytes::copy_from_slice(data))
    }

    /// Parses one metadata file's bytes, kept in the [`MetadataFile`] without another copy.
    fn parse_shared(name: &str, bytes: bytes::Bytes) -> Result<ParsedFile, MetadataError> {
        // torch's own files take the fast path; anything else (and every error and finding) the
        // general unpickler.
        let (md, protocol, findings, owners) = match fast::read(&bytes, Limits::default()) {
            Some(fast) => (fast.md, fast.protocol, Vec::new(), fast.owners),
            None => {
                let (md, protocol, findings) = Self::parse_general(name, &bytes)?;
                (md, protocol, findings, None)
            }
        };
        let file = MetadataFile {
            name: name.to_owned(),
            size: bytes.len() as u64,
            version: md.version.clone(),
            storage_meta: md.storage_meta.clone(),
            protocol,
            bytes,
        };
        Ok((file, md, findings, owners))
    }

    /// The general unpickler and model: the file's model, its protocol and its unknown globals.
    fn parse_general(
        name: &str,
        data: &[u8],
    ) -> Result<(RankMetadata, u8, Vec<UnsafeGlobal>), MetadataError> {
        let p = Pickle::parse_with(data, Limits::default()).map_err(|source| {
            MetadataError::Pickle {
                file: name.to_owned(),
                source,
            }
        })?;
        let findings = p
            .globals
            .iter()
            .filter(|g| !model::is_known_global(&g.module, &g.name))
            .map(|g| UnsafeGlobal {
                file: name.to_owned(),
                offset: g.offset,
                module: g.module.clone(),
                name: g.name.clone(),
            })
            .collect();
        let md = model::read(&p).map_err(|source| MetadataError::Model {
            file: name.to_owned(),
            source,
        })?;
        Ok((md, p.protocol, findings))
    }

    /// Parses and merges metadata files (one `.metadata`, or every rank's `__N.metadata`).
    pub fn from_files(files: &[(String, Vec<u8>)]) -> Result<Checkpoint, MetadataError> {
        Self::merge(
            files
                .iter()
                .map(|(name, data)| Self::parse_file(name, data)),
        )
    }

    /// Merges metadata files, in order, into one linked view. Each file is parsed only once the
    /// ones before it are merged: the first error stops reading.
    fn merge(
        parsed: impl IntoIterator<Item = Result<ParsedFile, MetadataError>>,
    ) -> Result<Checkpoint, MetadataError> {
        let mut ck = Checkpoint::default();
        let mut index = MergeIndex::default();
        // The first file's owners: its entries and storage items keep their places.
        let mut owners = None;
        for (file_index, parsed) in parsed.into_iter().enumerate() {
            let (file, md, findings, file_owners) = parsed?;
            if file_index == 0 {
                owners = file_owners.filter(|o| o.len() == md.storage.len());
            }
            let name = file.name.clone();
            let name = name.as_str();
            ck.metadata_files.push(file);
            ck.unsafe_globals.extend(findings);
            if ck.planner_data.is_none() {
                ck.planner_data = md.planner_data;
            }
            for fqn in &md.duplicate_keys {
                ck.warnings.push(format!(
                    "{name}: state_dict_metadata sets {fqn:?} more than once; the last value is kept, as in Python"
                ));
            }
            if ck.entries.is_empty() {
                // Moved, not copied: the first file's entries are unique.
                ck.entries = md.entries;
            } else {
                for entry in md.entries {
                    ck.merge_entry(&mut index, name, entry)?;
                }
            }
            let mut storage = md.storage;
            for s in &mut storage {
                s.metadata_file = file_index;
            }
            // The first file's items are moved, not copied: a million of them are 140 MB.
            if ck.storage.is_empty() {
                ck.storage = storage;
            } else {
                ck.storage.extend(storage);
            }
        }
        ck.link(owners.as_deref().unwrap_or_default());
        Ok(ck)
    }

    fn merge_entry(
        &mut self,
        index: &mut MergeIndex,
        file: &str,
        entry: Entry,
    ) -> Result<(), MetadataError> {
        let Entry {
            fqn,
            tensor,
            chunks,
        } = entry;
        let entries = &self.entries;
        let by_fqn = index.by_fqn.get_or_insert_with(|| {
            entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.fqn.clone(), i))
                .collect()
        });
        let Some(&i) = by_fqn.get(&fqn) else {
            by_fqn.insert(fqn.clone(), self.entries.len());
            self.entries.push(Entry {
                fqn,
                tensor,
                chunks,
            });
            return Ok(());
        };
        // The same fqn in another rank's file: it must describe the same tensor.
        let existing = &mut self.entries[i];
        let same = match (&existing.tensor, &tensor) {
            (None, None) => true,
            (Some(a), Some(b)) => a.dtype == b.dtype && a.shape == b.shape,
            _ => false,
        };
        if !same {
            return Err(MetadataError::Inconsistent {
                file: file.to_owned(),
                problem: format!(
                    "entry {fqn:?} differs from the one in {}",
                    self.metadata_files[0].name
                ),
            });
        }
        // Ranks record the strides of their own shard: they may differ; the first file's stay.
        if let (Some(a), Some(b)) = (&existing.tensor, &tensor)
            && a.strides != b.strides
        {
            let text = |s: &Option<Vec<i64>>| {
                s.as_ref()
                    .map_or_else(|| "none".to_owned(), |v| format!("{v:?}"))
            };
            self.warnings.push(format!(
                "{file}: entry {fqn:?} records strides {}, another file {}; listing the first",
                text(&b.strides),
                text(&a.strides)
            ));
        }
        // The entry's chunks by offsets, first one first (made when a second file names it).
        let by_offsets = index.chunks.entry(i).or_insert_with(|| {
            let mut m = HashMap::with_capacity(existing.chunks.len());
            for (ci, c) in existing.chunks.iter().enumerate() {
                m.entry(c.offsets.clone()).or_insert(ci);
            }
            m
        });
        for c in chunks {
            match by_offsets.get(&c.offsets).map(|&ci| &existing.chunks[ci]) {
                Some(e) if e.sizes != c.sizes => {
                    return Err(MetadataError::Inconsistent {
                        file: file.to_owned(),
                        problem: format!(
                            "entry {fqn:?}: chunk at {:?} has sizes {:?} here and {:?} in another file",
                            c.offsets, c.sizes, e.sizes
                        ),
                    });
                }
                Some(_) => {}
                None => {
                    by_offsets.insert(c.offsets.clone(), existing.chunks.len());
                    existing.chunks.push(c);
                }
            }
        }
        Ok(())
    }

    /// Links every chunk to the storage entries with its `(fqn, offsets)` key, and each of those
    /// storage entries back to the chunk. `owners` gives the entry of the first storage items,
    /// where the reader knew it (`u32::MAX` where not): those are not looked up.
    fn link(&mut self, owners: &[u32]) {
        // Group the storage entries by their entry (a counting sort: no allocation per entry),
        // sort each group by chunk offsets, and merge it with the entry's chunks sorted the same
        // way: one hash of each fqn, and no hashing of (fqn, offsets) keys.
        let storage = &mut self.storage;
        let mut owner: Vec<usize> = vec![usize::MAX; storage.len()];
        let mut start = vec![0usize; self.entries.len() + 1];
        {
            // A file's reader interns its fqns, so an entry and its storage entries from the same
            // file share one string: found by address. Across files (or for a fqn no entry has),
            // by name, in a map made on the first miss.
            let entries = &self.entries;
            let mut by_address: Option<model::AddressMap<usize>> = None;
            let mut by_name: Option<hashbrown::HashMap<&str, usize>> = None;
            for (si, s) in storage.iter().enumerate() {
                if let Some(&ei) = owners.get(si)
                    && let Some(e) = entries.get(ei as usize)
                    && e.fqn == s.fqn
                {
                    owner[si] = ei as usize;
                    start[ei as usize + 1] += 1;
                    continue;
                }
                let by_address = by_address.get_or_insert_with(|| {
                    let mut m = model::AddressMap::default();
                    m.reserve(entries.len());
                    for (i, e) in entries.iter().enumerate() {
                        m.insert(model::interned_key(&e.fqn), i);
                    }
                    m
                });
                let found = match by_address.get(&model::interned_key(&s.fqn)) {
                    Some(&ei) => Some(ei),
                    None => by_name
                        .get_or_insert_with(|| {
                            entries
                                .iter()
                                .enumerate()
                                .map(|(i, e)| (&*e.fqn, i))
                                .collect()
                        })
                        .get(&*s.fqn)
                        .copied(),
                };
                if let Some(ei) = found {
                    owner[si] = ei;
                    start[ei + 1] += 1;
                }
            }
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut grouped = vec![0usize; start[self.entries.len()]];
        let mut next = start.clone();
        for (si, &ei) in owner.iter().enumerate() {
            if ei != usize::MAX {
                grouped[next[ei]] = si;
                next[ei] += 1;
            }
        }
        drop((owner, next));
        // Every back-link is written below, straight into its storage entry: all unset yet (the
        // readers make them `None`).
        debug_assert!(storage.iter().all(|s| s.chunk.is_none()));
        let mut dropped = vec![false; storage.len()];
        let mut stored: Vec<usize> = Vec::new();
        let mut order: Vec<usize> = Vec::new();
        for (ei, e) in self.entries.iter_mut().enumerate() {
            let group = &mut grouped[start[ei]..start[ei + 1]];
            // By key, then file, then position: a key that one file sets twice keeps its last
            // value, as a Python dict does (MetadataIndex compares fqn and offsets only).
            let key = |i: &usize| (&storage[*i].chunk_offsets, storage[*i].metadata_file, *i);
            // torch writes a tensor's items in the order of its chunks: usually sorted already.
            if !group.is_sorted_by_key(key) {
                group.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
            }
            stored.clear();
            for &si in group.iter() {
                if let Some(last) = stored.last_mut()
                    && storage[*last].chunk_offsets == storage[si].chunk_offsets
                    && storage[*last].metadata_file == storage[si].metadata_file
                {
                    dropped[*last] = true;
                    *last = si;
                } else {
                    stored.push(si);
                }
            }
            order.clear();
            order.extend(0..e.chunks.len());
            if !order.is_sorted_by_key(|c| &e.chunks[*c].offsets) {
                order.sort_by(|a, b| e.chunks[*a].offsets.cmp(&e.chunks[*b].offsets));
            }
            let mut j = 0;
            for &ci in &order {
                let c = &mut e.chunks[ci];
                while j < stored.len() && storage[stored[j]].chunk_offsets < c.offsets {
                    j += 1;
                }
                let first = j;
                while j < stored.len() && storage[stored[j]].chunk_offsets == c.offsets {
                    storage[stored[j]].chunk = Some(ChunkIndex {
                        entry: ei,
                        chunk: ci,
                    });
                    j += 1;
                }
                c.storage = stored[first..j].to_vec();
                if c.storage.is_empty() {
                    self.warnings.push(match &c.offsets {
                        Some(o) => {
                            format!("{}: chunk at offsets {o:?} has no storage entry", e.fqn)
                        }
                        None => format!("{}: bytes entry has no storage entry", e.fqn),
                    });
                }
            }
        }
        for (i, s) in storage.iter().enumerate() {
            if dropped[i] {
                self.warnings.push(format!(
                    "{}: storage_data sets the key of {:?} at offsets {:?} more than once; the last value is kept, as in Python",
                    self.metadata_files[s.metadata_file].name, s.fqn, s.chunk_offsets
                ));
            } else if s.chunk.is_none() {
                self.warnings.push(format!(
                    "storage entry for {:?} at offsets {:?} ({}) belongs to no entry",
                    s.fqn, s.chunk_offsets, s.info.relative_path
                ));
            }
        }
        if dropped.contains(&true) {
            // Remove the overridden entries (no chunk links to them) and renumber the links.
            let mut new_index = vec![usize::MAX; self.storage.len()];
            let mut next = 0;
            for (i, d) in dropped.iter().enumerate() {
                if !d {
                    new_index[i] = next;
                    next += 1;
                }
            }
            let mut i = 0;
            self.storage.retain(|_| {
                i += 1;
                !dropped[i - 1]
            });
            for e in &mut self.entries {
                for c in &mut e.chunks {
                    for s in &mut c.storage {
                        *s = new_index[*s];
                    }
                }
            }
        }
    }

    /// Reads the metadata of the checkpoint at `source`.
    pub async fn load(source: &Source) -> Result<Checkpoint, MetadataError> {
        // The `.metadata`, or every rank's `__N.metadata` (found by listing), one GET each.
        let limit = Limits::default().max_input as u64;
        let read = |name: String| async move {
            match source.read_object(&name, limit).await {
                Ok((_, data)) => Ok((name, data)),
                Err(SourceError::TooLarge { name, size, limit }) => Err(MetadataError::TooLarge {
                    file: name,
                    size,
                    limit,
                }),
                Err(e) => Err(MetadataError::Source(e)),
            }
        };
        let files = match read(METADATA_FILE.to_owned()).await {
            Ok(file) => vec![file],
            Err(MetadataError::Source(SourceError::NotFound { .. })) => {
                let listing = source.list().await?;
                let mut ranks: Vec<(u64, String)> = listing
                    .iter()
                    .filter_map(|(n, _)| rank_metadata(n).map(|r| (r, n.clone())))
                    .collect();
                if ranks.is_empty() {
                    let mut safetensors: Vec<String> = listing
                        .into_iter()
                        .map(|(n, _)| n)
                        .filter(|n| is_safetensors_name(n))
                        .collect();
                    safetensors.sort();
                    return Err(MetadataError::NoMetadata {
                        location: source.describe(),
                        safetensors,
                    });
                }
                ranks.sort();
                let mut files = Vec::with_capacity(ranks.len());
                for (_, name) in ranks {
                    files.push(read(name).await?);
                }
                files
            }
            Err(e) => return Err(e),
        };
        // Each file's buffer becomes the `Bytes` that keeps it: its bytes are never copied.
        tokio::task::spawn_blocking(move || {
            Checkpoint::merge(
                files
                    .into_iter()
                    .map(|(name, data)| Self::parse_shared(&name, bytes::Bytes::from(data))),
            )
        })
        .await
        .expect("metadata parsing does not panic")
    }

    /// The entry whose chunk a stored copy holds (through its back-link, O(1)); `None` for a copy
    /// no chunk refers to, or an index out of range.
    pub fn entry_of(&self, storage: usize) -> Option<&Entry> {
        let at = self.storage.get(storage)?.chunk?;
        self.entries.get(at.entry)
    }

    /// The chunk a stored copy holds (through its back-link, O(1)); `None` for a copy no chunk
    /// refers to, or an index out of range.
    pub fn chunk_of(&self, storage: usize) -> Option<&Chunk> {
        let at = self.storage.get(storage)?.chunk?;
        self.entries.get(at.entry)?.chunks.get(at.chunk)
    }

    /// Bytes of the raw tensor data of the chunk a stored copy holds: its elements times the
    /// element size. `None` for bytes entries, unknown dtypes, copies no chunk refers to and
    /// products that overflow a `u64`.
    pub fn raw_tensor_len(&self, storage: usize) -> Option<u64> {
        let e = self.entry_of(storage)?;
        let size = e.tensor.as_ref()?.element_size()?;
        self.chunk_of(storage)?.numel()?.checked_mul(size)
    }

    /// Whether a stored copy holds only its chunk's raw data, not a `torch.save` archive: its
    /// length is more than 0 and less than [`Checkpoint::raw_tensor_len`] plus
    /// [`MIN_ARCHIVE_OVERHEAD`], and it has no transform descriptors. torch writes such items when
    /// it saves with `serialization_format=SAFETENSORS`.
    pub fn is_raw_tensor(&self, storage: usize) -> bool {
        let Some(s) = self.storage.get(storage) else {
            return false;
        };
        if !s.info.transform_descriptors.is_empty() || s.info.length == 0 {
            return false;
        }
        self.raw_tensor_len(storage)
            .is_some_and(|raw| s.info.length < raw.saturating_add(MIN_ARCHIVE_OVERHEAD))
    }

    /// Every shard file the metadata names, in first-seen order.
    pub fn files(&self) -> Vec<&str> {
        // By address first: the items of one file share its name's allocation, so the names are
        // hashed once per file, not once per item.
        let mut addresses = model::AddressMap::default();
        let mut seen = std::collections::HashSet::new();
        self.storage
            .iter()
            .map(|s| &s.info.relative_path)
            .filter(|p| {
                addresses
                    .insert(Arc::as_ptr(p) as *const u8 as usize, ())
                    .is_none()
            })
            .map(|p| &**p)
            .filter(|p| seen.insert(*p))
            .collect()
    }
}

/// The rank of a per-rank metadata file name (`__3.metadata` -> 3).
pub fn rank_metadata(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("__")?.strip_suffix(METADATA_FILE)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::ChunkMeta;

    fn tensor(dtype: &str, chunks: &[(&[u64], &[u64])]) -> EntryMeta {
        EntryMeta::Tensor(TensorMeta {
            dtype: dtype.into(),
            layout: "strided".into(),
            requires_grad: false,
            memory_format: "contiguous_format".into(),
            pin_memory: false,
            strides: None,
            shape: [4, 4].into(),
            chunks: chunks
                .iter()
                .map(|(offsets, sizes)| ChunkMeta {
                    offsets: (*offsets).into(),
                    sizes: (*sizes).into(),
                })
                .collect(),
        })
    }

    fn w(chunks: &[&[u64]]) -> (Arc<str>, EntryMeta) {
        let chunks: Vec<(&[u64], &[u64])> = chunks.iter().map(|o| (*o, &[2u64, 4][..])).collect();
        ("w".into(), tensor("float32", &chunks))
    }

    fn bytes(fqn: &str) -> (Arc<str>, EntryMeta) {
        (fqn.into(), EntryMeta::Bytes)
    }

    fn stored(fqn: &str, offsets: Option<&[u64]>, at: u64) -> Storage {
        stored_as(fqn, offsets, at, 1000, &[])
    }

    fn stored_as(
        fqn: &str,
        offsets: Option<&[u64]>,
        at: u64,
        length: u64,
        transforms: &[&str],
    ) -> Storage {
        Storage {
            metadata_file: 0,
            fqn: fqn.into(),
            chunk_offsets: offsets.map(Into::into),
            info: StorageInfo {
                relative_path: "__0_0.distcp".into(),
                offset: at,
                length,
                transform_descriptors: transforms.iter().map(|t| (*t).to_owned()).collect(),
            },
            chunk: None,
        }
    }

    fn rank(entries: Vec<(Arc<str>, EntryMeta)>, storage: Vec<Storage>) -> RankMetadata {
        RankMetadata {
            entries: entries
                .into_iter()
                .map(|(fqn, meta)| Entry::new(fqn, meta))
                .collect(),
            storage,
            ..RankMetadata::default()
        }
    }

    /// Metadata files as `Checkpoint::merge` takes them: `.metadata` alone, or `__N.metadata`.
    fn parsed(files: Vec<RankMetadata>) -> Vec<Result<ParsedFile, MetadataError>> {
        let n = files.len();
        files
            .into_iter()
            .enumerate()
            .map(|(i, md)| {
                let name = if n == 1 {
                    METADATA_FILE.to_owned()
                } else {
                    format!("__{i}{METADATA_FILE}")
                };
                let file = MetadataFile {
                    name,
                    size: 0,
                    version: None,
                    storage_meta: None,
                    protocol: 2,
                    bytes: bytes::Bytes::new(),
                };
                Ok((file, md, Vec::new(), None))
            })
            .collect()
    }

    fn merged(files: Vec<RankMetadata>) -> Checkpoint {
        Checkpoint::merge(parsed(files)).unwrap()
    }

    /// Links go both ways and agree with the linear scan callers used to do: the first entry with
    /// the copy's fqn, and its first chunk with the copy's offsets.
    fn assert_links(ck: &Checkpoint) {
        for (ei, e) in ck.entries.iter().enumerate() {
            for (ci, c) in e.chunks.iter().enumerate() {
                for &si in &c.storage {
                    let at = ChunkIndex {
                        entry: ei,
                        chunk: ci,
                    };
                    assert_eq!(ck.storage[si].chunk, Some(at), "storage {si}");
                }
            }
        }
        for (si, s) in ck.storage.iter().enumerate() {
            let mut scan = None;
            for (ei, e) in ck.entries.iter().enumerate() {
                if e.fqn == s.fqn {
                    scan = e
                        .chunks
                        .iter()
                        .enumerate()
                        .find(|(_, c)| c.offsets == s.chunk_offsets)
                        .map(|(ci, _)| ChunkIndex {
                            entry: ei,
                            chunk: ci,
                        });
                    break;
                }
            }
            assert_eq!(s.chunk, scan, "storage {si} ({:?})", s.fqn);
            match s.chunk {
                Some(at) => {
                    assert!(ck.entries[at.entry].chunks[at.chunk].storage.contains(&si));
                    assert_eq!(ck.entry_of(si).map(|e| &e.fqn), Some(&s.fqn));
                    assert_eq!(ck.chunk_of(si).map(|c| &c.offsets), Some(&s.chunk_offsets));
                }
                None => {
                    assert!(ck.entry_of(si).is_none() && ck.chunk_of(si).is_none());
                    assert!(
                        ck.entries
                            .iter()
                            .flat_map(|e| &e.chunks)
                            .all(|c| !c.storage.contains(&si))
                    );
                }
            }
        }
    }

    #[test]
    fn stored_copies_link_back_to_their_chunk() {
        type Case = (
            &'static str,
            Vec<RankMetadata>,
            Vec<(Option<(usize, usize)>, u64)>,
        );
        let cases: Vec<Case> = vec![
            (
                "one file, copies listed in another order than the chunks",
                vec![rank(
                    vec![w(&[&[0, 0], &[2, 0]]), bytes("step")],
                    vec![
                        stored("w", Some(&[2, 0]), 0),
                        stored("w", Some(&[0, 0]), 1000),
                        stored("step", None, 2000),
                    ],
                )],
                vec![
                    (Some((0, 1)), 0),
                    (Some((0, 0)), 1000),
                    (Some((1, 0)), 2000),
                ],
            ),
            (
                "per rank: each file stores its own chunk of one tensor",
                vec![
                    rank(vec![w(&[&[0, 0]])], vec![stored("w", Some(&[0, 0]), 0)]),
                    rank(
                        vec![w(&[&[2, 0]]), bytes("step")],
                        vec![stored("step", None, 0), stored("w", Some(&[2, 0]), 1000)],
                    ),
                ],
                vec![(Some((0, 0)), 0), (Some((1, 0)), 0), (Some((0, 1)), 1000)],
            ),
            (
                "per rank: a replicated chunk stored by both ranks",
                vec![
                    rank(vec![w(&[&[0, 0]])], vec![stored("w", Some(&[0, 0]), 0)]),
                    rank(vec![w(&[&[0, 0]])], vec![stored("w", Some(&[0, 0]), 500)]),
                ],
                vec![(Some((0, 0)), 0), (Some((0, 0)), 500)],
            ),
            (
                "per rank: files that share some chunks and add others",
                vec![
                    rank(
                        vec![w(&[&[0, 0], &[2, 0]])],
                        vec![
                            stored("w", Some(&[0, 0]), 0),
                            stored("w", Some(&[2, 0]), 1000),
                        ],
                    ),
                    rank(
                        vec![w(&[&[2, 0], &[4, 0]])],
                        vec![
                            stored("w", Some(&[4, 0]), 0),
                            stored("w", Some(&[2, 0]), 1000),
                        ],
                    ),
                ],
                vec![
                    (Some((0, 0)), 0),
                    (Some((0, 1)), 1000),
                    (Some((0, 2)), 0),
                    (Some((0, 1)), 1000),
                ],
            ),
            (
                "per rank: a copy listed in the file before the one with its entry",
                vec![
                    rank(
                        vec![bytes("step")],
                        vec![stored("w", Some(&[0, 0]), 0), stored("step", None, 1000)],
                    ),
                    rank(vec![w(&[&[0, 0]])], vec![]),
                ],
                vec![(Some((1, 0)), 0), (Some((0, 0)), 1000)],
            ),
            (
                "copies no chunk refers to",
                vec![rank(
                    vec![w(&[&[0, 0]])],
                    vec![
                        stored("w", Some(&[0, 0]), 0),
                        stored("w", Some(&[4, 0]), 1000),
                        stored("ghost", None, 2000),
                        stored("w", None, 3000),
                    ],
                )],
                vec![(Some((0, 0)), 0), (None, 1000), (None, 2000), (None, 3000)],
            ),
            (
                "a key one file sets twice keeps its last value, and the links are renumbered",
                vec![rank(
                    vec![w(&[&[0, 0], &[2, 0]])],
                    vec![
                        stored("w", Some(&[0, 0]), 0),
                        stored("w", Some(&[2, 0]), 1000),
                        stored("w", Some(&[0, 0]), 2000),
                    ],
                )],
                vec![(Some((0, 1)), 1000), (Some((0, 0)), 2000)],
            ),
        ];
        for (name, files, want) in cases {
            let ck = merged(files);
            assert_links(&ck);
            let got: Vec<_> = ck
                .storage
                .iter()
                .map(|s| (s.chunk.map(|c| (c.entry, c.chunk)), s.info.offset))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn files_that_disagree_on_a_chunk_are_refused() {
        let files = vec![
            rank(vec![w(&[&[0, 0], &[2, 0]])], vec![]),
            rank(
                vec![("w".into(), tensor("float32", &[(&[2, 0], &[2, 2])]))],
                vec![],
            ),
        ];
        let e = Checkpoint::merge(parsed(files)).unwrap_err().to_string();
        assert!(
            e.contains("__1.metadata") && e.contains("[2, 0]") && e.contains("in another file"),
            "{e}"
        );
    }

    #[test]
    fn fixtures_link_every_stored_copy() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let mut checked = 0;
        for dir in std::fs::read_dir(&root).unwrap() {
            let dir = dir.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|f| f.unwrap().file_name().into_string().unwrap())
                .filter(|n| n == METADATA_FILE || rank_metadata(n).is_some())
                .map(|n| {
                    let data = std::fs::read(dir.join(&n)).unwrap();
                    (n, data)
                })
                .collect();
            if files.is_empty() {
                continue;
            }
            files.sort_by_key(|(n, _)| rank_metadata(n));
            let ck = Checkpoint::from_files(&files).unwrap();
            assert_links(&ck);
            // The fast path's owners only spare the lookups: without them, the same links.
            let looked_up = Checkpoint::merge(files.iter().map(|(name, data)| {
                Checkpoint::parse_file(name, data).map(|(f, md, g, _)| (f, md, g, None))
            }))
            .unwrap();
            assert_eq!(ck, looked_up, "{}", dir.display());
            assert!(
                ck.storage.iter().all(|s| s.chunk.is_some()),
                "{}",
                dir.display()
            );
            checked += 1;
        }
        assert!(checked >= 12, "{checked}");
    }

    /// `fixtures/per_rank`: two ranks, each with its own `__N.metadata`, merged into one view.
    #[test]
    fn per_rank_fixture_links_across_files() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/per_rank");
        let files: Vec<(String, Vec<u8>)> = ["__0.metadata", "__1.metadata"]
            .into_iter()
            .map(|n| (n.to_owned(), std::fs::read(dir.join(n)).unwrap()))
            .collect();
        let ck = Checkpoint::from_files(&files).unwrap();
        assert_links(&ck);
        // Copies from both files, each linked to the chunk of its own key.
        let from: Vec<usize> = ck.storage.iter().map(|s| s.metadata_file).collect();
        assert!(from.contains(&0) && from.contains(&1), "{from:?}");
        for (si, s) in ck.storage.iter().enumerate() {
            let e = ck.entry_of(si).expect("every copy is linked");
            assert_eq!(e.fqn, s.fqn);
            assert_eq!(ck.chunk_of(si).unwrap().offsets, s.chunk_offsets);
            // A tensor item of a torch.save archive is never raw data.
            assert!(!ck.is_raw_tensor(si), "{}", s.fqn);
        }
    }

    #[test]
    fn raw_tensor_rule() {
        let f32_2x3 = || tensor("float32", &[(&[0, 0], &[2, 3])]);
        type Case = (
            &'static str,
            EntryMeta,
            u64,
            &'static [&'static str],
            Option<u64>,
            bool,
        );
        let cases: Vec<Case> = vec![
            ("exactly the raw data", f32_2x3(), 24, &[], Some(24), true),
            (
                "raw data plus 511 bytes",
                f32_2x3(),
                24 + 511,
                &[],
                Some(24),
                true,
            ),
            (
                "raw data plus 512 bytes: an archive",
                f32_2x3(),
                24 + 512,
                &[],
                Some(24),
                false,
            ),
            ("an empty item", f32_2x3(), 0, &[], Some(24), false),
            (
                "a transformed item",
                f32_2x3(),
                24,
                &["stream.zstd/1"],
                Some(24),
                false,
            ),
            (
                "bfloat16",
                tensor("bfloat16", &[(&[0], &[4])]),
                8,
                &[],
                Some(8),
                true,
            ),
            (
                "an unknown dtype",
                tensor("not_a_dtype", &[(&[0, 0], &[2, 3])]),
                24,
                &[],
                None,
                false,
            ),
            (
                "elements times size overflows",
                tensor("float32", &[(&[0, 0], &[u64::MAX / 2, 1])]),
                24,
                &[],
                None,
                false,
            ),
            (
                "the element count overflows",
                tensor("int8", &[(&[0, 0], &[u64::MAX, 2])]),
                24,
                &[],
                None,
                false,
            ),
        ];
        for (name, meta, length, transforms, raw, is_raw) in cases {
            let offsets: Option<&[u64]> = match &meta {
                EntryMeta::Tensor(t) => Some(&t.chunks[0].offsets),
                EntryMeta::Bytes => None,
            };
            let storage = vec![stored_as("t", offsets, 0, length, transforms)];
            let ck = merged(vec![rank(vec![("t".into(), meta.clone())], storage)]);
            assert_eq!(ck.raw_tensor_len(0), raw, "{name}");
            assert_eq!(ck.is_raw_tensor(0), is_raw, "{name}");
        }
        // A bytes entry, a copy no chunk refers to, an index out of range.
        let ck = merged(vec![rank(
            vec![bytes("step"), ("t".into(), f32_2x3())],
            vec![
                stored_as("step", None, 0, 24, &[]),
                stored_as("t", Some(&[9, 9]), 24, 24, &[]),
            ],
        )]);
        for si in [0, 1, 2] {
            assert_eq!(ck.raw_tensor_len(si), None, "storage {si}");
            assert!(!ck.is_raw_tensor(si), "storage {si}");
        }
    }

    #[test]
    fn no_metadata_names_a_safetensors_folder() {
        let plain = MetadataError::NoMetadata {
            location: "ckpt".into(),
            safetensors: vec![],
        };
        assert_eq!(
            plain.to_string(),
            "no .metadata and no __N.metadata files in ckpt"
        );
        let names: Vec<String> = [
            "model-00001-of-00005.safetensors",
            "model-00002-of-00005.safetensors",
            "model-00003-of-00005.safetensors",
            "model-00004-of-00005.safetensors",
            "model.safetensors.index.json",
        ]
        .map(String::from)
        .to_vec();
        assert!(names.iter().all(|n| is_safetensors_name(n)));
        assert!(!is_safetensors_name("__0_0.distcp") && !is_safetensors_name("config.json"));
        let hf = MetadataError::NoMetadata {
            location: "ckpt".into(),
            safetensors: names,
        };
        let text = hf.to_string();
        assert!(
            text.contains("(model-00001-of-00005.safetensors, model-00002-of-00005.safetensors, model-00003-of-00005.safetensors, and 2 more)")
                && text.contains("not a DCP checkpoint"),
            "{text}"
        );
    }

    #[test]
    fn per_rank_metadata_names() {
        assert_eq!(rank_metadata("__0.metadata"), Some(0));
        assert_eq!(rank_metadata("__12.metadata"), Some(12));
        for bad in [
            ".metadata",
            "__.metadata",
            "__x.metadata",
            "_0.metadata",
            "__0.metadata.tmp",
            "__0_0.distcp",
        ] {
            assert_eq!(rank_metadata(bad), None, "{bad}");
        }
    }
}
