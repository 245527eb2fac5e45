//! Checkpoint integrity checks, all in one place: each check has a stable name ([`Check`]) and
//! reports its problems per item.
//!
//! [`run`] wires them: the checks over the metadata alone ([`metadata`]), over the shard files'
//! sizes, format and sha256 manifest ([`files`]), and over item bytes, which run through the fetch
//! engine into [`sink::VerifySink`] (with [`archive`], [`tensor`] and [`safetensors`]).

pub mod archive;
pub mod files;
pub mod metadata;
pub mod safetensors;
pub mod sink;
pub mod tensor;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::fetch::{EngineOptions, FetchError};
use crate::metadata::Checkpoint;
use crate::pipeline::{Opened, Selection};
use crate::plan::{PlanError, PlanOptions, describe_storage};
use crate::source::{ObjectName, SourceError};

/// The checks, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    MetadataGlobals,
    StoragePaths,
    StorageLinked,
    ChunksTile,
    StorageFilesExist,
    StorageInBounds,
    StorageNoOverlap,
    StorageFormat,
    ItemsArchive,
    ItemsTransform,
    ItemsTensor,
    Manifest,
}

impl Check {
    /// Every check, in report order.
    pub const ALL: [Check; 12] = [
        Check::MetadataGlobals,
        Check::StoragePaths,
        Check::StorageLinked,
        Check::ChunksTile,
        Check::StorageFilesExist,
        Check::StorageInBounds,
        Check::StorageNoOverlap,
        Check::StorageFormat,
        Check::ItemsArchive,
        Check::ItemsTransform,
        Check::ItemsTensor,
        Check::Manifest,
    ];

    /// The name in reports and `--json` (docs/output.md).
    pub fn name(self) -> &'static str {
        match self {
            Check::MetadataGlobals => "metadata.globals",
            Check::StoragePaths => "storage.paths",
            Check::StorageLinked => "storage.linked",
            Check::ChunksTile => "chunks.tile",
            Check::StorageFilesExist => "storage.files_exist",
            Check::StorageInBounds => "storage.in_bounds",
            Check::StorageNoOverlap => "storage.no_overlap",
            Check::StorageFormat => "storage.format",
            Check::ItemsArchive => "items.archive",
            Check::ItemsTransform => "items.transform",
            Check::ItemsTensor => "items.tensor",
            Check::Manifest => "manifest",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Check::MetadataGlobals => {
                "the metadata names no global outside the known DCP/torch set"
            }
            Check::StoragePaths => "every relative_path stays inside the checkpoint",
            Check::StorageLinked => {
                "every chunk has a storage entry and every storage entry belongs to a chunk"
            }
            Check::ChunksTile => {
                "every tensor's chunks tile its shape: in bounds, no gaps, no overlaps"
            }
            Check::StorageFilesExist => "every shard file the metadata names exists",
            Check::StorageInBounds => "every item lies inside its file",
            Check::StorageNoOverlap => "distinct items of a file do not overlap",
            Check::StorageFormat => {
                "shard files are in the torch.save format that .metadata offsets describe"
            }
            Check::ItemsArchive => {
                "every item is a well-formed torch.save archive whose records match their CRC32"
            }
            Check::ItemsTransform => "every ZStandard item decompresses",
            Check::ItemsTensor => {
                "every tensor item holds the dtype, shape and number of bytes the metadata says"
            }
            Check::Manifest => "every shard file matches the sha256 manifest",
        }
    }
}

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Not run (`--quick`, no `--manifest`, or nothing to check).
    Skipped,
}

/// One problem a check found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fqn: Option<String>,
    pub message: String,
}

impl Finding {
    pub fn new(message: impl Into<String>) -> Self {
        Finding {
            file: None,
            offset: None,
            length: None,
            fqn: None,
            message: message.into(),
        }
    }

    /// A problem with one stored item.
    pub fn item(ck: &Checkpoint, storage: usize, message: impl Into<String>) -> Self {
        let s = &ck.storage[storage];
        Finding {
            file: Some(s.info.relative_path.clone()),
            offset: Some(s.info.offset),
            length: Some(s.info.length),
            fqn: Some(describe_storage(ck, storage)),
            message: message.into(),
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub description: &'static str,
    pub status: Status,
    /// How many things it looked at (files, items, entries).
    pub checked: u64,
    pub problems: Vec<Finding>,
    /// Observations that are not failures.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// All checks, in report order.
#[derive(Debug, Clone)]
pub struct Checks([CheckResult; 12]);

impl Default for Checks {
    fn default() -> Self {
        Self::new()
    }
}

impl Checks {
    pub fn new() -> Self {
        Checks(Check::ALL.map(|check| CheckResult {
            name: check.name(),
            description: check.description(),
            status: Status::Skipped,
            checked: 0,
            problems: Vec::new(),
            notes: Vec::new(),
        }))
    }

    pub fn get(&mut self, check: Check) -> &mut CheckResult {
        &mut self.0[check as usize]
    }

    /// Records that a check ran over `checked` things and found `problems`.
    pub fn record(&mut self, check: Check, checked: u64, problems: Vec<Finding>) {
        let c = self.get(check);
        c.checked += checked;
        c.problems.extend(problems);
        c.status = if !c.problems.is_empty() {
            Status::Fail
        } else if c.checked == 0 {
            Status::Skipped
        } else {
            Status::Pass
        };
        if c.status == Status::Skipped && c.notes.is_empty() {
            c.notes.push("nothing to check".into());
        }
    }

    /// Notes that a check did not run, and why.
    pub fn not_run(&mut self, check: Check, why: &str) {
        self.get(check).notes.push(format!("not run: {why}"));
    }

    /// The results in report order, problems sorted.
    pub fn into_results(self) -> Vec<CheckResult> {
        self.0
            .into_iter()
            .map(|mut c| {
                c.problems.sort();
                c.problems.dedup();
                c
            })
            .collect()
    }
}

/// What `verify` is asked to do besides the checks over the metadata.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Metadata and sizes only: no item bytes are read.
    pub quick: bool,
    /// A sha256 manifest of every shard file: compared when it exists, written when not.
    pub manifest: Option<PathBuf>,
    pub plan: PlanOptions,
    pub engine: EngineOptions,
    /// Draw a progress bar for the byte checks (on a terminal).
    pub progress: bool,
}

/// The report (`verify --json`, docs/output.md).
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub checkpoint: String,
    /// Every check passed or was skipped.
    pub ok: bool,
    pub checks: Vec<CheckResult>,
    pub elapsed_seconds: f64,
}

/// Why verification could not run to the end (problems it finds are in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot inspect {name}")]
    Stat {
        name: ObjectName,
        #[source]
        source: SourceError,
    },
    #[error("cannot read the safetensors header of {name}")]
    Header {
        name: String,
        #[source]
        source: SourceError,
    },
    #[error("cannot plan the byte checks")]
    Plan(#[source] PlanError),
    #[error("cannot read the items to check them")]
    Fetch(#[source] FetchError),
    #[error("{path} is not a sha256 manifest")]
    ManifestFormat {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: algorithm {algorithm:?} is not supported (only sha256)")]
    ManifestAlgorithm { path: String, algorithm: String },
    #[error("cannot read the manifest {path}")]
    ManifestRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the manifest {path}")]
    ManifestWrite {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs every check over the selected part of an opened checkpoint.
pub async fn run(
    opened: &Opened,
    selection: &Selection,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let (source, ck) = (&opened.source, &opened.ck);
    let mut checks = Checks::new();

    metadata::check_globals(ck, &mut checks);
    let storage = metadata::selected_storage(ck, &selection.selected, selection.everything);
    let storage = metadata::check_paths(ck, &storage, &mut checks);
    metadata::check_chunks(ck, &selection.selected, selection.everything, &mut checks);

    // The files: the selected items' files, or (with a manifest) every shard file.
    let mut names: BTreeSet<ObjectName> = storage
        .iter()
        .filter_map(|&s| ObjectName::new(&ck.storage[s].info.relative_path).ok())
        .collect();
    if opts.manifest.is_some() {
        names.extend(
            ck.files()
                .into_iter()
                .filter_map(|n| ObjectName::new(n).ok()),
        );
    }
    let objects = files::check_exist(source, &names, opts.engine.concurrency, &mut checks).await?;
    let in_bounds = files::check_in_bounds(ck, &storage, &objects, &mut checks);
    let overlapping = metadata::check_overlaps(ck, &in_bounds, &mut checks);
    metadata::check_empty_items(ck, &in_bounds, &mut checks);
    let raw_files = files::check_format(source, ck, &objects, &mut checks).await?;

    if opts.quick {
        for check in [
            Check::ItemsArchive,
            Check::ItemsTransform,
            Check::ItemsTensor,
        ] {
            checks.not_run(check, "--quick");
        }
        if checks.get(Check::ItemsArchive).checked > 0 {
            checks
                .get(Check::ItemsArchive)
                .notes
                .push("items of 0 bytes were checked from the metadata".into());
        }
    } else {
        let deep: Vec<usize> = in_bounds
            .iter()
            .copied()
            .filter(|s| overlapping.binary_search(s).is_err())
            .filter(|&s| {
                !(raw_files.contains(ck.storage[s].info.relative_path.as_str())
                    && ck.is_raw_tensor(s))
            })
            .collect();
        let whole_files = opts.manifest.is_some();
        let results = sink::check_bytes(source, ck, &deep, &objects, whole_files, opts).await?;
        results.record(ck, &mut checks);
        if let Some(path) = &opts.manifest {
            files::check_manifest(path, &names, &objects, &results.file_sha256, &mut checks)?;
        }
    }
    if opts.manifest.is_none() {
        checks.not_run(Check::Manifest, "no --manifest");
    } else if opts.quick {
        checks.not_run(Check::Manifest, "--quick");
    }

    let results = checks.into_results();
    Ok(VerifyReport {
        checkpoint: source.describe(),
        ok: results.iter().all(|c| c.status != Status::Fail),
        checks: results,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
}
