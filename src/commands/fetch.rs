//! `dcpfetch fetch`: the selected items into a sparse copy of the checkpoint, or onto stdout.

use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use crate::cli::Output;
use crate::cli::printer::Printer;
use crate::cli::settings::{FetchSettings, Sharding};
use crate::fetch::{self, Cancel, Sink};
use crate::pipeline::{Files, PipelineError, Planned};
use crate::plan::{Cut, Plan, Split};
use crate::report::{Outcome, Problem};
use crate::sink::folder::{Completion, Sharded};
use crate::sink::{FolderOptions, FolderSink, StreamSink, local_root};
use crate::units::{count, human};

/// The `--json` summary (docs/output.md).
#[derive(Debug, Serialize)]
pub struct FetchSummary {
    pub checkpoint: String,
    pub output: String,
    pub items: u64,
    pub files: usize,
    /// Ranged reads sent for item data, retries included.
    pub requests: u64,
    pub retries: u64,
    pub bytes_needed: u64,
    /// Body bytes received (gaps inside requests and bytes of failed attempts included).
    pub bytes_transferred: u64,
    pub gap_bytes: u64,
    /// Items an earlier interrupted fetch had already written (`--resume`).
    pub items_already_present: usize,
    pub elapsed_seconds: f64,
    pub throughput_bytes_per_second: f64,
    /// With `--shard`: this worker's share, and whether the folder is complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardSummary>,
}

/// The share a worker fetched (`--shard`, docs/output.md).
#[derive(Debug, Serialize)]
pub struct ShardSummary {
    pub index: u32,
    pub count: u32,
    /// Where `--shard auto` found the share (`null` when given as I/N).
    pub from: Option<String>,
    /// With -o DIR: the shares not yet done when this one finished (empty: every share is in and
    /// the metadata is published). `null` with -o -.
    pub shares_missing: Option<Vec<u32>>,
}

/// Prints where `--shard auto` found the share.
pub fn note_shard(printer: &Printer, shard: &Sharding) {
    if let Some(from) = &shard.from {
        printer.note(&format!("share {} from {from}", shard.share));
    }
}

pub async fn run(s: FetchSettings) -> anyhow::Result<Outcome> {
    // A folder copy creates every shard file at its size; a stream needs only the planned ones.
    let files = match s.output {
        Output::Dir { .. } => Files::Every,
        Output::Stdout { .. } => Files::Planned,
    };
    note_shard(&s.printer, &s.shard);
    let planned = Planned::new(&s.target, s.plan, files, s.engine.concurrency).await?;
    let mut warnings = planned.selection.warnings.clone();
    warnings.extend(planned.empty_items_warning());
    s.printer.warnings(planned.ck(), &warnings);
    let source = planned.source();
    let location = source.describe();

    // With --shard, this worker's share: a stream's items whole (each a standalone archive), a
    // folder's clipped at part boundaries (it is written by byte range).
    let share = s.shard.share;
    let cut = match s.output {
        Output::Stdout { .. } => Cut::Items,
        Output::Dir { .. } => Cut::Parts,
    };
    let mine = planned
        .plan
        .share(share, cut)
        .map_err(PipelineError::Plan)?;
    let mut completion = None;
    let (plan, sink, already): (Plan, Box<dyn Sink>, usize) = match &s.output {
        Output::Stdout { format, manifest } => {
            let sink = StreamSink::stdout(*format, planned.ck(), &mine, manifest.as_deref())
                .context("cannot write to stdout")?;
            (mine, Box::new(sink), 0)
        }
        Output::Dir {
            path,
            resume,
            force,
        } => {
            let (sink, done) = FolderSink::prepare(
                path,
                &location,
                local_root(&s.target.location),
                planned.ck(),
                &planned.objects,
                FolderOptions {
                    resume: *resume,
                    force: *force,
                    shard: (!share.is_whole()).then(|| Sharded {
                        share,
                        split: Split::of(&planned.plan, share.count),
                    }),
                },
            )
            .with_context(|| format!("cannot fetch into {}", path.display()))?;
            completion = Some(sink.completion());
            for w in sink.warnings() {
                s.printer.warning(w);
            }
            let plan = mine
                .without(
                    &|name, item| done.contains(&(name.clone(), item.range.clone())),
                    planned.ck(),
                )
                .context(Problem("cannot plan the fetch".into()))?;
            let already = mine.items() - plan.items();
            (plan, Box::new(sink), already)
        }
    };

    let progress = s.printer.progress(plan.fetched(), plan.items() as u64);
    let (bytes_before, requests_before, retries_before) = source.stats().snapshot();
    let plan = Arc::new(plan);
    let report = fetch::run(
        source,
        plan.clone(),
        &planned.objects,
        s.engine,
        sink,
        progress,
        Cancel::on_ctrl_c(),
    )
    .await
    .with_context(|| match &s.output {
        Output::Stdout { .. } => "the fetch to stdout failed".to_owned(),
        Output::Dir { path, .. } => format!(
            "the fetch into {} is incomplete (its metadata was not written; run again with --resume to continue)",
            path.display()
        ),
    })?;
    let (bytes, requests, retries) = source.stats().snapshot();

    let secs = report.elapsed.as_secs_f64();
    let summary = FetchSummary {
        checkpoint: location,
        output: match &s.output {
            Output::Stdout { .. } => "-".to_owned(),
            Output::Dir { path, .. } => path.display().to_string(),
        },
        items: report.items,
        files: plan.files.len(),
        requests: requests - requests_before,
        retries: retries - retries_before,
        bytes_needed: plan.needed(),
        bytes_transferred: bytes - bytes_before,
        gap_bytes: report.part_bytes - report.item_bytes,
        items_already_present: already,
        elapsed_seconds: secs,
        throughput_bytes_per_second: if secs > 0.0 {
            report.part_bytes as f64 / secs
        } else {
            0.0
        },
        shard: (!share.is_whole()).then(|| ShardSummary {
            index: share.index,
            count: share.count,
            from: s.shard.from.clone(),
            shares_missing: completion.as_ref().and_then(Completion::missing),
        }),
    };
    s.printer.summary(&summary, || {
        format!(
            "fetched {} ({}) from {} in {:.2}s ({}/s), {}{}",
            count(summary.items, "item"),
            human(summary.bytes_needed),
            count(summary.files as u64, "file"),
            secs,
            human(summary.throughput_bytes_per_second as u64),
            count(summary.requests, "request"),
            if already > 0 {
                format!(", {} already present", count(already as u64, "item"))
            } else {
                String::new()
            }
        ) + &shard_line(&summary)
    })?;
    Ok(Outcome::Ok)
}

/// The end of the summary line of a worker: its share, and whether the folder is complete.
fn shard_line(summary: &FetchSummary) -> String {
    let Some(shard) = &summary.shard else {
        return String::new();
    };
    let share = format!("; share {}/{}", shard.index, shard.count);
    match &shard.shares_missing {
        None => share,
        Some(missing) if missing.is_empty() => {
            format!("{share}, the last one in: {} is complete", summary.output)
        }
        Some(missing) => {
            let list: Vec<String> = missing.iter().map(u32::to_string).collect();
            format!(
                "{share} is in; {} still to come ({}), then the metadata is published",
                count(missing.len() as u64, "share"),
                list.join(", ")
            )
        }
    }
}
