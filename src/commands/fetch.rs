//! `dcpfetch fetch`: the selected items into a sparse copy of the checkpoint, or onto stdout.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use crate::cli::{FetchArgs, StreamFormat as CliFormat};
use crate::fetch::{self, Cancel, EngineOptions, Progress, Sink};
use crate::plan::Plan;
use crate::report::{Outcome, Problem};
use crate::sink::{FolderOptions, FolderSink, StreamFormat, StreamSink};
use crate::units::count;

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
}

pub async fn run(args: FetchArgs) -> anyhow::Result<Outcome> {
    let to_stdout = args.output == Path::new("-");
    if !to_stdout && (args.manifest.is_some() || args.format != CliFormat::Raw) {
        anyhow::bail!("--manifest and --format go with -o - (stdout)");
    }
    if to_stdout && args.resume {
        anyhow::bail!("--resume goes with -o DIR, not with stdout");
    }
    let planned = super::plan(
        &args.checkpoint,
        &args.s3,
        &args.selection,
        args.plan.options(),
        !to_stdout,
    )
    .await?;
    super::warn_about(&planned.ck, &planned.selection_warnings, args.quiet);
    let location = planned.source.describe();

    let (plan, sink, already): (Plan, Box<dyn Sink>, usize) = if to_stdout {
        let format = match args.format {
            CliFormat::Raw => StreamFormat::Raw,
            CliFormat::Tar => StreamFormat::Tar,
        };
        // A duplicate of fd 1 as a plain file: no line buffering to scan or copy the bytes, and
        // writes of many pieces at once (it shares the offset and flags, so `>>` appends).
        let out = std::fs::File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("cannot write to stdout")?,
        );
        let sink = StreamSink::new(
            Box::new(out),
            format,
            planned.ck.clone(),
            args.manifest.clone(),
        );
        (planned.plan.clone(), Box::new(sink), 0)
    } else {
        let (sink, done) = FolderSink::prepare(
            &args.output,
            &location,
            &planned.ck,
            &planned.objects,
            FolderOptions {
                resume: args.resume,
                force: args.force,
            },
        )
        .with_context(|| format!("cannot fetch into {}", args.output.display()))?;
        let plan = planned
            .plan
            .without(
                &|name, item| done.contains(&(name.clone(), item.range.clone())),
                &planned.ck,
            )
            .context(Problem("cannot plan the fetch".into()))?;
        let already = planned.plan.items() - plan.items();
        (plan, Box::new(sink), already)
    };

    let progress = Progress::new(plan.fetched(), plan.items() as u64, args.quiet);
    let (_, requests_before, retries_before) = planned.source.stats().snapshot();
    let bytes_before = planned.source.stats().snapshot().0;
    let plan = Arc::new(plan);
    let engine = EngineOptions {
        concurrency: args.engine.concurrency as usize,
        max_memory: args.engine.max_memory.0,
    };
    let report = fetch::run(&planned.source, plan.clone(), &planned.objects, engine, sink, progress, Cancel::on_ctrl_c())
        .await
        .with_context(|| match to_stdout {
            true => "the fetch to stdout failed".to_owned(),
            false => format!(
                "the fetch into {} is incomplete (its metadata was not written; run again with --resume to continue)",
                args.output.display()
            ),
        })?;
    let (bytes, requests, retries) = planned.source.stats().snapshot();

    let secs = report.elapsed.as_secs_f64();
    let summary = FetchSummary {
        checkpoint: location,
        output: args.output.display().to_string(),
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
    };
    if args.json {
        // With -o -, stdout carries the items: the summary goes to stderr.
        let mut out: Box<dyn Write> = if to_stdout {
            Box::new(std::io::stderr().lock())
        } else {
            Box::new(std::io::stdout().lock())
        };
        serde_json::to_writer_pretty(&mut out, &summary)?;
        writeln!(out)?;
    } else if !args.quiet && !to_stdout {
        eprintln!(
            "fetched {} ({}) from {} in {:.2}s ({}/s), {}{}",
            count(summary.items, "item"),
            crate::units::human(summary.bytes_needed),
            count(summary.files as u64, "file"),
            secs,
            crate::units::human(summary.throughput_bytes_per_second as u64),
            count(summary.requests, "request"),
            if already > 0 {
                format!(", {} already present", count(already as u64, "item"))
            } else {
                String::new()
            }
        );
    }
    Ok(Outcome::Ok)
}
