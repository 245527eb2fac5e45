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
use tokio::task::JoinSet;

use crate::cli::{Cli, Command, PlanOpts, S3Args, SelectArgs};
use crate::metadata::Checkpoint;
use crate::plan::{Plan, PlanOptions, describe_storage};
use crate::report::{self, Outcome, Problem};
use crate::source::{Location, ObjectMeta, ObjectName, Source, SourceError, TransferStats};

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

/// Size and version of each named object, each with its own result. Up to 32 objects are asked
/// for concurrently (HEADs or stats). More than that are looked up in one listing of the
/// checkpoint (on S3 a request per 1,000 objects instead of one per object: checkpoints saved with
/// a file per item have thousands); what the listing lacks (a name in a sub-folder, a missing
/// object), or everything when listing is not allowed, is then asked for one by one.
pub(crate) async fn stat_each(
    source: &Source,
    names: &[ObjectName],
) -> Vec<(ObjectName, Result<ObjectMeta, SourceError>)> {
    const IN_FLIGHT: usize = 32;
    let mut out = Vec::with_capacity(names.len());
    let mut rest = names.to_vec();
    if names.len() > IN_FLIGHT
        && let Ok(listed) = source.list().await
    {
        let mut listed: HashMap<String, ObjectMeta> = listed.into_iter().collect();
        rest.retain(|name| match listed.remove(name.as_str()) {
            Some(meta) => {
                out.push((name.clone(), Ok(meta)));
                false
            }
            None => true,
        });
    }
    let mut tasks = JoinSet::new();
    let mut pending = rest.into_iter();
    loop {
        while tasks.len() < IN_FLIGHT {
            let Some(name) = pending.next() else { break };
            let source = source.clone();
            tasks.spawn(async move {
                let meta = source.stat(name.as_str()).await;
                (name, meta)
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        out.push(done.expect("stat tasks do not panic"));
    }
    out
}

/// Size and version of every named object; a missing one is a problem with the checkpoint.
pub(crate) async fn stat_all(
    source: &Source,
    names: &[ObjectName],
) -> anyhow::Result<HashMap<ObjectName, ObjectMeta>> {
    let mut out = HashMap::with_capacity(names.len());
    for (name, meta) in stat_each(source, names).await {
        let meta = meta.with_context(|| Problem(format!("cannot find the shard file {name}")))?;
        out.insert(name, meta);
    }
    Ok(out)
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
