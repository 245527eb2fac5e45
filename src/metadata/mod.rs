//! Reading a checkpoint's `.metadata` (or per-rank `__N.metadata` files) into one [`Checkpoint`].
//!
//! [`pickle`] turns bytes into a value graph without executing anything, [`model`] reads torch's
//! classes from that graph, and this module merges the files into one view, links every chunk to
//! its stored copies and reports globals outside the known set as security findings
//! ([`UnsafeGlobal`]).

pub mod dtype;
pub mod model;
pub mod pickle;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::source::{Source, SourceError};
use model::{EntryMeta, ModelError, RankMetadata, StorageInfo, StorageMeta, TensorMeta};
use pickle::{Limits, Pickle, PickleError};

/// The name torch gives the metadata file of a checkpoint saved with collectives.
pub const METADATA_FILE: &str = ".metadata";

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
    /// The file's bytes, kept to copy them byte for byte into a fetched folder.
    pub bytes: Arc<[u8]>,
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

/// One stored copy of a chunk (or of a bytes entry): `[offset, offset + length)` of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    /// Index into [`Checkpoint::metadata_files`] of the file that lists this copy.
    pub metadata_file: usize,
    pub fqn: String,
    /// The chunk offsets of the `MetadataIndex`; `None` for bytes entries.
    pub chunk_offsets: Option<Vec<u64>>,
    pub info: StorageInfo,
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
    pub offsets: Option<Vec<u64>>,
    pub sizes: Option<Vec<u64>>,
    /// Indexes into [`Checkpoint::storage`]: one per rank that stored it (usually one).
    pub storage: Vec<usize>,
}

impl Chunk {
    /// Number of elements of a tensor chunk.
    pub fn numel(&self) -> Option<u64> {
        self.sizes.as_ref().map(|s| s.iter().product())
    }
}

/// One fqn of the state dict.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub fqn: String,
    /// `None` for bytes entries (opaque `torch.save` values such as `step`).
    pub tensor: Option<TensorMeta>,
    pub chunks: Vec<Chunk>,
}

impl Entry {
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
    pub findings: Vec<UnsafeGlobal>,
    /// Inconsistencies that do not stop reading (a chunk without a stored copy, ...).
    pub warnings: Vec<String>,
}

/// Why the metadata could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("no {METADATA_FILE} and no __N.metadata files in {location}")]
    NoMetadata { location: String },
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

impl Checkpoint {
    /// Parses one metadata file's bytes.
    pub fn parse_file(
        name: &str,
        data: &[u8],
    ) -> Result<(MetadataFile, RankMetadata, Vec<UnsafeGlobal>), MetadataError> {
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
        let file = MetadataFile {
            name: name.to_owned(),
            size: data.len() as u64,
            version: md.version.clone(),
            storage_meta: md.storage_meta.clone(),
            protocol: p.protocol,
            bytes: Arc::from(data),
        };
        Ok((file, md, findings))
    }

    /// Parses and merges metadata files (one `.metadata`, or every rank's `__N.metadata`).
    pub fn from_files(files: &[(String, Vec<u8>)]) -> Result<Checkpoint, MetadataError> {
        let mut ck = Checkpoint::default();
        let mut by_fqn: HashMap<String, usize> = HashMap::new();
        for (file_index, (name, data)) in files.iter().enumerate() {
            let (file, md, findings) = Self::parse_file(name, data)?;
            ck.metadata_files.push(file);
            ck.findings.extend(findings);
            if ck.planner_data.is_none() {
                ck.planner_data = md.planner_data;
            }
            for fqn in &md.duplicate_keys {
                ck.warnings.push(format!(
                    "{name}: state_dict_metadata sets {fqn:?} more than once; the last value is kept, as in Python"
                ));
            }
            for (fqn, meta) in md.entries {
                ck.merge_entry(&mut by_fqn, name, fqn, meta)?;
            }
            ck.storage
                .extend(md.storage.into_iter().map(|(index, info)| Storage {
                    metadata_file: file_index,
                    fqn: index.fqn,
                    chunk_offsets: index.offset,
                    info,
                }));
        }
        ck.link();
        Ok(ck)
    }

    fn merge_entry(
        &mut self,
        by_fqn: &mut HashMap<String, usize>,
        file: &str,
        fqn: String,
        meta: EntryMeta,
    ) -> Result<(), MetadataError> {
        let (tensor, chunks) = match meta {
            EntryMeta::Bytes => (
                None,
                vec![Chunk {
                    offsets: None,
                    sizes: None,
                    storage: Vec::new(),
                }],
            ),
            EntryMeta::Tensor(mut t) => {
                let chunks = std::mem::take(&mut t.chunks)
                    .into_iter()
                    .map(|c| Chunk {
                        offsets: Some(c.offsets),
                        sizes: Some(c.sizes),
                        storage: Vec::new(),
                    })
                    .collect();
                (Some(t), chunks)
            }
        };
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
        for c in chunks {
            match existing.chunks.iter().find(|e| e.offsets == c.offsets) {
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
                None => existing.chunks.push(c),
            }
        }
        Ok(())
    }

    /// Links every chunk to the storage entries with its `(fqn, offsets)` key.
    fn link(&mut self) {
        // Group the storage entries by fqn, sort each group by chunk offsets, and merge it with
        // the entry's chunks sorted the same way: no per-entry hashing of strings.
        let mut by_fqn: HashMap<&str, Vec<usize>> = HashMap::with_capacity(self.entries.len());
        for (i, s) in self.storage.iter().enumerate() {
            by_fqn.entry(&s.fqn).or_default().push(i);
        }
        let storage = &self.storage;
        let mut linked = vec![false; storage.len()];
        let mut dropped = vec![false; storage.len()];
        for e in &mut self.entries {
            let mut stored = by_fqn.remove(e.fqn.as_str()).unwrap_or_default();
            // By key, then file, then position: a key that one file sets twice keeps its last
            // value, as a Python dict does (MetadataIndex compares fqn and offsets only).
            stored.sort_by(|a, b| {
                (&storage[*a].chunk_offsets, storage[*a].metadata_file, *a).cmp(&(
                    &storage[*b].chunk_offsets,
                    storage[*b].metadata_file,
                    *b,
                ))
            });
            stored.dedup_by(|later, earlier| {
                let same = storage[*later].chunk_offsets == storage[*earlier].chunk_offsets
                    && storage[*later].metadata_file == storage[*earlier].metadata_file;
                if same {
                    // `dedup_by` keeps the earlier element: move the later one into its place.
                    dropped[*earlier] = true;
                    std::mem::swap(later, earlier);
                }
                same
            });
            let mut order: Vec<usize> = (0..e.chunks.len()).collect();
            order.sort_by(|a, b| e.chunks[*a].offsets.cmp(&e.chunks[*b].offsets));
            let mut j = 0;
            for ci in order {
                let c = &mut e.chunks[ci];
                while j < stored.len() && storage[stored[j]].chunk_offsets < c.offsets {
                    j += 1;
                }
                let first = j;
                while j < stored.len() && storage[stored[j]].chunk_offsets == c.offsets {
                    linked[stored[j]] = true;
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
            } else if !linked[i] {
                self.warnings.push(format!(
                    "storage entry for {:?} at offsets {:?} ({}) belongs to no entry",
                    s.fqn, s.chunk_offsets, s.info.relative_path
                ));
            }
        }
        if dropped.contains(&true) {
            // Remove the overridden entries and renumber the links.
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
                let mut ranks: Vec<(u64, String)> = source
                    .list()
                    .await?
                    .into_iter()
                    .filter_map(|(n, _)| rank_metadata(&n).map(|r| (r, n)))
                    .collect();
                if ranks.is_empty() {
                    return Err(MetadataError::NoMetadata {
                        location: source.describe(),
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
        tokio::task::spawn_blocking(move || Checkpoint::from_files(&files))
            .await
            .expect("metadata parsing does not panic")
    }

    /// Every shard file the metadata names, in first-seen order.
    pub fn files(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.storage
            .iter()
            .map(|s| s.info.relative_path.as_str())
            .filter(|p| seen.insert(*p))
            .collect()
    }
}

/// The rank of a per-rank metadata file name (`__3.metadata` -> 3).
fn rank_metadata(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("__")?.strip_suffix(METADATA_FILE)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
