//! Checkpoint integrity checks, all in one place: each check has a stable name ([`Check`]) and
//! reports its problems per item.
//!
//! [`run`] wires them: the checks over the metadata alone ([`metadata`]), over the shard files'
//! sizes, format and sha256 manifest ([`files`]), and over item bytes, which run through the fetch
//! engine into [`sink::VerifySink`] (with [`archive`], [`tensor`] and [`safetensors`]).

pub mod files;
pub mod metadata;
pub mod safetensors;
pub mod sink;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::fetch::{EngineOptions, FetchError};
use crate::metadata::Checkpoint;
use crate::pipeline::{Opened, Selection};
use crate::plan::{Cut, Plan, PlanError, PlanOptions, Share, Split, describe_storage};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Not run (`--quick`, no `--manifest`, or nothing to check).
    Skipped,
}

/// One problem a check found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
            file: Some(s.info.relative_path.to_string()),
            offset: Some(s.info.offset),
            length: Some(s.info.length),
            fqn: Some(describe_storage(ck, storage)),
            message: message.into(),
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub description: String,
    pub status: Status,
    /// How many things it looked at (files, items, entries).
    pub checked: u64,
    pub problems: Vec<Finding>,
    /// Observations that are not failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
            name: check.name().to_owned(),
            description: check.description().to_owned(),
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
    /// Check only the items of this share (`--shard I/N`; whole items, see [`Cut::Items`]).
    pub share: Share,
}

/// The report (`verify --json`, docs/output.md).
#[derive(Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    pub checkpoint: String,
    /// Every check passed or was skipped.
    pub ok: bool,
    pub checks: Vec<CheckResult>,
    pub elapsed_seconds: f64,
    /// With `--shard I/N`: the share whose items the byte checks read (the other checks are over
    /// everything selected, in every share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Share>,
    /// With `--shard`: what the reports of every share must agree on to be combined. Also in a
    /// combined report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

/// Why reports cannot be combined (`verify --combine`).
#[derive(Debug, thiserror::Error)]
pub enum CombineError {
    #[error("no report to combine")]
    Empty,
    #[error(
        "{0} is not the report of a share (`verify --shard I/N --json` writes those); it cannot be combined"
    )]
    NotAShare(String),
    #[error("{path} is not of the same verification as {first}: {why}")]
    Mismatch {
        path: String,
        first: String,
        why: String,
    },
    #[error("{first} and {path} are both the report of share {share}")]
    Twice {
        first: String,
        path: String,
        share: Share,
    },
    #[error("the reports of {} of {count} are missing: {}", if .missing.len() == 1 { "share" } else { "shares" }, .missing.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))]
    Missing { missing: Vec<u32>, count: u32 },
}

/// Combines the reports of every share of a verification (`(path, report)`, one per share) into
/// one verdict. The byte checks (`items.*`) of shares read disjoint items, so their counts add
/// up; the other checks each share ran over everything selected, so they are counted once. A
/// check fails if it failed in any share (its problems are merged), passes if it passed in any,
/// and is skipped otherwise.
pub fn combine(reports: Vec<(String, VerifyReport)>) -> Result<VerifyReport, CombineError> {
    let Some((first_path, first)) = reports.first() else {
        return Err(CombineError::Empty);
    };
    let Some(share0) = first.shard else {
        return Err(CombineError::NotAShare(first_path.clone()));
    };
    // No split: --quick, which reads no items.
    let split = first.split.clone();
    let mut seen: Vec<Option<&str>> = vec![None; share0.count as usize];
    for (path, r) in &reports {
        let Some(share) = r.shard else {
            return Err(CombineError::NotAShare(path.clone()));
        };
        let mismatch = |why: String| CombineError::Mismatch {
            path: path.clone(),
            first: first_path.clone(),
            why,
        };
        if r.checkpoint != first.checkpoint {
            return Err(mismatch(format!(
                "it verified {}, not {}",
                r.checkpoint, first.checkpoint
            )));
        }
        match (&r.split, &split) {
            (Some(theirs), Some(split)) => {
                if let Some(why) = theirs.difference(split) {
                    return Err(mismatch(why));
                }
            }
            (None, None) => {}
            _ => return Err(mismatch("one of them read no items (--quick)".to_owned())),
        }
        if share.count != share0.count {
            return Err(mismatch(format!(
                "it is share {share}, of {} shares, not {}",
                share.count, share0.count
            )));
        }
        match seen[share.index as usize] {
            Some(earlier) => {
                return Err(CombineError::Twice {
                    first: earlier.to_owned(),
                    path: path.clone(),
                    share,
                });
            }
            None => seen[share.index as usize] = Some(path),
        }
    }
    let missing: Vec<u32> = (0..share0.count)
        .filter(|&i| seen[i as usize].is_none())
        .collect();
    if !missing.is_empty() {
        return Err(CombineError::Missing {
            missing,
            count: share0.count,
        });
    }

    let mut checks: Vec<CheckResult> = Vec::new();
    for (_, r) in &reports {
        for c in &r.checks {
            let Some(into) = checks.iter_mut().find(|k| k.name == c.name) else {
                checks.push(c.clone());
                continue;
            };
            if c.name.starts_with("items.") {
                into.checked += c.checked;
            } else {
                into.checked = into.checked.max(c.checked);
            }
            into.problems.extend(c.problems.iter().cloned());
            for n in &c.notes {
                if !into.notes.contains(n) {
                    into.notes.push(n.clone());
                }
            }
            into.status = match (into.status, c.status) {
                (Status::Fail, _) | (_, Status::Fail) => Status::Fail,
                (Status::Pass, _) | (_, Status::Pass) => Status::Pass,
                _ => Status::Skipped,
            };
        }
    }
    for c in &mut checks {
        c.problems.sort();
        c.problems.dedup();
        if c.status == Status::Pass {
            c.notes.retain(|n| n != "nothing to check");
        }
    }
    Ok(VerifyReport {
        checkpoint: first.checkpoint.clone(),
        ok: checks.iter().all(|c| c.status != Status::Fail),
        checks,
        elapsed_seconds: reports
            .iter()
            .map(|(_, r)| r.elapsed_seconds)
            .fold(0.0, f64::max),
        shard: None,
        split,
    })
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
    let mut split = None;

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
    let objects = files::check_exist(
        source,
        &names,
        opts.engine.concurrency,
        &opened.ahead,
        &mut checks,
    )
    .await?;
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
        let mut deep: Vec<usize> = in_bounds
            .iter()
            .copied()
            .filter(|s| overlapping.binary_search(s).is_err())
            .filter(|&s| {
                !(raw_files.contains(&*ck.storage[s].info.relative_path) && ck.is_raw_tensor(s))
            })
            .collect();
        let whole_files = opts.manifest.is_some();
        // With --shard, the stored items of this share (kept whole: each is checked as a whole).
        if !opts.share.is_whole() {
            let plan = Plan::of_storage(ck, &deep, opts.plan, None).map_err(VerifyError::Plan)?;
            let mine = plan
                .share(opts.share, Cut::Items)
                .map_err(VerifyError::Plan)?;
            split = Some(Split::of(&plan, opts.share.count));
            deep = mine
                .files
                .iter()
                .flat_map(|f| f.items.iter().flat_map(|i| i.storage.iter().copied()))
                .collect();
            deep.sort_unstable();
        }
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
        shard: (!opts.share.is_whole()).then_some(opts.share),
        split,
    })
}
