//! The command layer: each subcommand wires the pipeline stages together and reports.

mod bench;
mod fetch;
mod ls;
mod plan;
mod plot;
mod verify;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, Command, PlanOpts, S3Args, SelectArgs};
use crate::metadata::Checkpoint;
use crate::plan::{Plan, PlanOptions, describe_storage};
use crate::report::{self, Outcome, Problem};
use crate::source::{self, Location, ObjectMeta, ObjectName, Source, TransferStats};

pub async fn dispatch(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Ls(args) => ls::run(args).await,
        Command::Plan(args) => plan::run(args).await,
        Command::Fetch(args) => fetch::run(args).await,
        Command::Verify(args) => verify::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "dcpfetch",
                &mut std::io::stdout(),
            );
            Ok(Outcome::Ok)
        }
    }
}

/// Opens a checkpoint location and reads its metadata.
pub(crate) async fn open(location: &Location, s3: &S3Args) -> anyhow::Result<(Source, Checkpoint)> {
    let stats = Arc::new(TransferStats::default());
    let source = Source::open(location, &s3.options(), stats)
        .await
        .with_context(|| format!("cannot open {location}"))?;
    let ck = Checkpoint::load(&source)
        .await
        .with_context(|| format!("cannot read the metadata of {location}"))?;
    Ok((source, ck))
}

/// Prints warnings on stderr: the metadata's security findings always (even when stdout carries
/// JSON, and with `--quiet`), its other warnings and the selection's unless `quiet`.
pub(crate) fn warn_about(ck: &Checkpoint, selection_warnings: &[String], quiet: bool) {
    for f in &ck.findings {
        report::warn(&f.to_string());
    }
    if !quiet {
        for w in ck.warnings.iter().chain(selection_warnings) {
            report::warn(w);
        }
    }
}

/// Stats (HEADs) in flight at once when looking up shard files.
pub(crate) const STATS_IN_FLIGHT: usize = 32;

/// Size and version of every named object; a missing one is a problem with the checkpoint.
pub(crate) async fn stat_all(
    source: &Source,
    names: &[ObjectName],
) -> anyhow::Result<HashMap<ObjectName, ObjectMeta>> {
    source::stat_all(source, names, STATS_IN_FLIGHT)
        .await
        .map_err(|e| {
            // "cannot find the shard file NAME", then the source's error as its cause.
            let message = e.to_string();
            anyhow::Error::new(e.source).context(Problem(message))
        })
}

/// Prints a report on stdout: one JSON document, or what `human` writes.
pub(crate) fn print(
    json: bool,
    report: &impl serde::Serialize,
    human: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        serde_json::to_writer_pretty(&mut out, report)?;
        writeln!(out)?;
    } else {
        human(&mut out)?;
    }
    out.flush()?;
    Ok(())
}

/// A checkpoint opened, a selection resolved and planned, and the planned files' sizes checked.
pub(crate) struct Planned {
    pub source: Source,
    pub ck: Arc<Checkpoint>,
    pub selection_warnings: Vec<String>,
    pub plan: Plan,
    /// Size and version of the files `stat_all_files` asked for (every shard file) or of the
    /// planned files.
    pub objects: HashMap<ObjectName, ObjectMeta>,
}

impl PlanOpts {
    pub fn options(&self) -> PlanOptions {
        PlanOptions {
            max_gap: self.max_gap_size.0,
            part_size: self.part_size.0,
        }
    }
}

/// Opens, selects and plans; with `every_file`, asks for the size of every shard file the
/// metadata names, not only the planned ones.
pub(crate) async fn plan(
    location: &Location,
    s3: &S3Args,
    selection: &SelectArgs,
    opts: PlanOptions,
    every_file: bool,
) -> anyhow::Result<Planned> {
    let spec = selection.spec()?;
    let (source, ck) = open(location, s3).await?;
    let (selected, selection_warnings) = spec.resolve(&ck)?;
    let plan =
        Plan::build(&ck, &selected, opts).context(Problem("cannot plan the fetch".into()))?;
    let names: Vec<ObjectName> = if every_file {
        ck.files()
            .into_iter()
            .map(ObjectName::new)
            .collect::<Result<_, _>>()
            .context(Problem("cannot plan the fetch".into()))?
    } else {
        plan.files.iter().map(|f| f.name.clone()).collect()
    };
    let objects = stat_all(&source, &names).await?;
    for f in &plan.files {
        f.check_size(objects[&f.name].size, &|s| describe_storage(&ck, s))
            .context(Problem(
                "the checkpoint is inconsistent with its metadata".into(),
            ))?;
    }
    Ok(Planned {
        source,
        ck: Arc::new(ck),
        selection_warnings,
        plan,
        objects,
    })
}
