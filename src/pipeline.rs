//! The stages every command shares, wired once: open a checkpoint (its source and metadata),
//! resolve a selection, stat the shard files and plan. Commands call these and hold no rules of
//! their own; `bench` re-plans each setting through [`Planned::replan`], and `verify` opens and
//! selects here before its own checks.

use std::collections::HashMap;
use std::sync::Arc;

use crate::metadata::{Checkpoint, MetadataError};
use crate::plan::{Plan, PlanError, PlanOptions, describe_storage};
use crate::selection::{Selected, SelectionError, Spec, stored_copies};
use crate::source::{
    Ahead, HttpOptions, Location, NameError, ObjectMeta, ObjectName, S3Options, STATE_DIR, Source,
    SourceError, StatError, TransferStats, is_dcpfetch_copy, stat_all,
};
use crate::units::count;

/// What a command reads: the checkpoint, how to reach it, and what to select.
#[derive(Debug, Clone)]
pub struct Target {
    pub location: Location,
    pub store: S3Options,
    /// Headers and CA bundle for `http(s)://` locations.
    pub http: HttpOptions,
    pub spec: Spec,
}

/// Why the shared stages stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot open {location}")]
    Open {
        location: String,
        #[source]
        source: SourceError,
    },
    #[error("cannot read the metadata of {location}")]
    Metadata {
        location: String,
        #[source]
        source: MetadataError,
    },
    #[error("{0}")]
    Selection(#[from] SelectionError),
    #[error("{0}")]
    MissingFile(#[source] StatError),
    #[error("cannot plan the fetch")]
    Plan(#[source] PlanError),
    #[error("cannot plan the fetch")]
    Name(#[source] NameError),
    #[error("the checkpoint is inconsistent with its metadata")]
    Inconsistent(#[source] PlanError),
}

impl PipelineError {
    /// Whether the checkpoint or the selection is at fault (exit 1), not the environment.
    pub fn is_problem(&self) -> bool {
        match self {
            PipelineError::Open { .. } | PipelineError::Metadata { .. } => false,
            PipelineError::Selection(e) => matches!(e, SelectionError::NothingMatched { .. }),
            PipelineError::MissingFile(_)
            | PipelineError::Plan(_)
            | PipelineError::Name(_)
            | PipelineError::Inconsistent(_) => true,
        }
    }
}

/// A checkpoint opened for reading: its source and its metadata.
#[derive(Debug, Clone)]
pub struct Opened {
    pub source: Source,
    pub ck: Arc<Checkpoint>,
    /// The listing started beside the metadata's read ([`Opened::open_to_stat`]), for the stats.
    pub ahead: Ahead,
}

/// A selection resolved against a checkpoint.
#[derive(Debug, Clone)]
pub struct Selection {
    pub selected: Vec<Selected>,
    pub warnings: Vec<String>,
    /// Everything was asked for (no globs, no exclusions, no regions).
    pub everything: bool,
}

/// Which files to stat when planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    /// The files the plan reads.
    Planned,
    /// Every shard file the metadata names (a folder copy creates them all; `plan` reports the
    /// checkpoint's size).
    Every,
}

/// Freeing a million entries and their storage takes about 0.1 s (millions of small
/// allocations): the last holder of a checkpoint that large frees it on a thread of its own, so
/// that a command ends when its work does (a process that exits meanwhile leaves the freeing to
/// the kernel).
impl Drop for Opened {
    fn drop(&mut self) {
        const LARGE: usize = 100_000;
        if Arc::strong_count(&self.ck) != 1 || self.ck.storage.len() + self.ck.entries.len() < LARGE
        {
            return;
        }
        let ck = std::mem::take(&mut self.ck);
        // Without a thread, the closure (and the checkpoint) is dropped here.
        let _ = std::thread::Builder::new()
            .name("free-metadata".into())
            .spawn(move || drop(ck));
    }
}

impl Opened {
    /// Opens the source and reads the metadata.
    pub async fn open(target: &Target) -> Result<Opened, PipelineError> {
        Self::open_with(target, false).await
    }

    /// Opens the source and reads the metadata, for a command that then stats the shard files:
    /// where a listing saves the stats their round trip (S3), its first page is asked for beside
    /// the metadata's GET.
    pub async fn open_to_stat(target: &Target) -> Result<Opened, PipelineError> {
        Self::open_with(target, true).await
    }

    async fn open_with(target: &Target, list_ahead: bool) -> Result<Opened, PipelineError> {
        let location = target.location.to_string();
        let stats = Arc::new(TransferStats::default());
        let source = Source::open(&target.location, &target.store, &target.http, stats)
            .await
            .map_err(|source| PipelineError::Open {
                location: location.clone(),
                source,
            })?;
        let ahead = if list_ahead {
            Ahead::start(&source)
        } else {
            Ahead::default()
        };
        let mut ck = Checkpoint::load(&source)
            .await
            .map_err(|source| PipelineError::Metadata {
                location: location.clone(),
                source,
            })?;
        if let Location::Local(root) = &target.location
            && is_dcpfetch_copy(root)
        {
            ck.warnings.push(format!(
                "{location} is a copy made by dcpfetch (it holds {STATE_DIR}/): only the items that \
                 were fetched into it are there, and every other item reads as zeros; read those \
                 from the original checkpoint"
            ));
        }
        Ok(Opened {
            source,
            ck: Arc::new(ck),
            ahead,
        })
    }

    /// Resolves a selection.
    pub fn select(&self, spec: &Spec) -> Result<Selection, PipelineError> {
        let (selected, warnings) = spec.resolve(&self.ck)?;
        Ok(Selection {
            selected,
            warnings,
            everything: spec.selects_all() && spec.exclude.is_empty(),
        })
    }

    /// Every shard file the metadata names.
    pub fn every_file(&self) -> Result<Vec<ObjectName>, PipelineError> {
        self.ck
            .files()
            .into_iter()
            .map(ObjectName::new)
            .collect::<Result<_, _>>()
            .map_err(PipelineError::Name)
    }

    /// Size and version of every named file; a missing one is a problem with the checkpoint.
    pub async fn stat_all(
        &self,
        names: &[ObjectName],
        in_flight: usize,
    ) -> Result<HashMap<ObjectName, ObjectMeta>, PipelineError> {
        stat_all(&self.source, names, in_flight, &self.ahead)
            .await
            .map_err(PipelineError::MissingFile)
    }

    /// The fetch plan of a selection.
    pub fn plan(&self, selection: &Selection, opts: PlanOptions) -> Result<Plan, PipelineError> {
        Plan::build(&self.ck, &selection.selected, opts).map_err(PipelineError::Plan)
    }
}

/// A checkpoint opened, a selection resolved and planned, and the files' sizes checked.
#[derive(Debug)]
pub struct Planned {
    pub opened: Opened,
    pub selection: Selection,
    pub plan: Plan,
    /// Size and version of the files asked for ([`Files`]).
    pub objects: HashMap<ObjectName, ObjectMeta>,
}

impl Planned {
    /// Opens, selects, plans with `opts`, stats `files` (`in_flight` at a time) and checks that
    /// every planned item lies inside its file.
    pub async fn new(
        target: &Target,
        opts: PlanOptions,
        files: Files,
        in_flight: usize,
    ) -> Result<Planned, PipelineError> {
        let opened = Opened::open_to_stat(target).await?;
        let selection = opened.select(&target.spec)?;
        let plan = opened.plan(&selection, opts)?;
        let names = match files {
            Files::Every => opened.every_file()?,
            Files::Planned => plan.files.iter().map(|f| f.name.clone()).collect(),
        };
        let objects = opened.stat_all(&names, in_flight).await?;
        for f in &plan.files {
            f.check_size(objects[&f.name].size, &|s| describe_storage(&opened.ck, s))
                .map_err(PipelineError::Inconsistent)?;
        }
        Ok(Planned {
            opened,
            selection,
            plan,
            objects,
        })
    }

    /// The same selection planned with other options (same items, so the sizes checked by
    /// [`Planned::new`] still hold).
    pub fn replan(&self, opts: PlanOptions) -> Result<Plan, PipelineError> {
        self.opened.plan(&self.selection, opts)
    }

    pub fn source(&self) -> &Source {
        &self.opened.source
    }

    /// A warning naming the selected items stored in 0 bytes (the plan drops them: a fetch
    /// writes nothing for them, and torch cannot load them), if there are any.
    pub fn empty_items_warning(&self) -> Option<String> {
        const SHOWN: usize = 10;
        let ck = &self.opened.ck;
        let empty: Vec<usize> = stored_copies(ck, &self.selection.selected)
            .filter(|&s| ck.storage[s].info.length == 0)
            .collect();
        if empty.is_empty() {
            return None;
        }
        let mut names: Vec<String> = empty
            .iter()
            .take(SHOWN)
            .map(|&s| describe_storage(ck, s))
            .collect();
        if empty.len() > SHOWN {
            names.push(format!("and {} more", empty.len() - SHOWN));
        }
        Some(format!(
            "{} of 0 bytes fetched as nothing: {}",
            count(empty.len() as u64, "item"),
            names.join(", ")
        ))
    }

    pub fn ck(&self) -> &Arc<Checkpoint> {
        &self.opened.ck
    }
}
