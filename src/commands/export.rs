//! `dcpfetch export`: the selected tensors whole, as safetensors or npy.

use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use crate::cli::settings::ExportSettings;
use crate::export::item::{ItemError, locate_all};
use crate::export::output::{Output, Target};
use crate::export::sink::ExportSink;
use crate::export::{Format, Layout, Skipped};
use crate::fetch::{self, Cancel};
use crate::pipeline::{Opened, PipelineError};
use crate::plan::{Plan, describe_storage, refuse_raw};
use crate::report::{Outcome, Problem};
use crate::units::{count, human};

/// Items of at most this many bytes are read whole before their values are placed, so the
/// largest that can wait whole at once is about `--concurrency` of them: a share of `--max-memory`,
/// between these bounds.
const WHOLE_BELOW: (u64, u64) = (256 << 10, 16 << 20);

/// The `--json` summary (docs/output.md).
#[derive(Debug, Serialize)]
pub struct ExportSummary {
    pub checkpoint: String,
    pub output: String,
    pub format: Format,
    /// The files written (a folder's, relative to it); empty for stdout.
    pub files: Vec<String>,
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Selected entries not exported, and why.
    pub skipped: Vec<Skipped>,
    /// Items read from the checkpoint, and ranged reads sent (probes and retries included).
    pub items: u64,
    /// Items whose values were located before the fetch and placed as they arrived (the others
    /// were read whole: small, compressed or stored with strides).
    pub items_located: usize,
    pub requests: u64,
    pub retries: u64,
    pub bytes_transferred: u64,
    pub elapsed_seconds: f64,
}

pub async fn run(s: ExportSettings) -> anyhow::Result<Outcome> {
    let started = std::time::Instant::now();
    let opened = Opened::open_to_stat(&s.target).await?;
    let selection = opened.select(&s.target.spec)?;
    let ck = opened.ck.clone();
    let mut warnings = selection.warnings.clone();
    let layout = Layout::build(&ck, &selection.selected, &s.target.spec.regions, &s.options)
        .map_err(|e| Problem(format!("cannot export: {e}")))?;
    if !layout.skipped.is_empty() {
        let names: Vec<String> = layout
            .skipped
            .iter()
            .take(10)
            .map(|k| format!("{} ({})", k.fqn, k.reason))
            .collect();
        let more = layout.skipped.len().saturating_sub(10);
        warnings.push(format!(
            "{} not exported: {}{}",
            count(layout.skipped.len() as u64, "selected entry"),
            names.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    s.printer.warnings(&ck, &warnings);

    let storage = layout.storage();
    for &si in &storage {
        refuse_raw(&ck, si).map_err(PipelineError::Plan)?;
    }
    let plan = Plan::of_storage(&ck, &storage, s.plan, None).map_err(PipelineError::Plan)?;
    let names: Vec<_> = plan.files.iter().map(|f| f.name.clone()).collect();
    let objects = opened.stat_all(&names, s.engine.concurrency).await?;
    for f in &plan.files {
        f.check_size(objects[&f.name].size, &|i| describe_storage(&ck, i))
            .map_err(PipelineError::Inconsistent)?;
    }
    let source = &opened.source;
    let (bytes_before, requests_before, retries_before) = source.stats().snapshot();
    let whole_below = (s.engine.max_memory / (2 * s.engine.concurrency as u64))
        .clamp(WHOLE_BELOW.0, WHOLE_BELOW.1);
    let located = locate_all(
        source,
        &ck,
        &plan,
        &objects,
        whole_below,
        s.engine.max_memory,
        s.engine.concurrency,
    )
    .await
    .map_err(|e| match e {
        // A failed read says what failed (a changed file is a problem, a lost link is not).
        ItemError::Read { .. } => anyhow::Error::new(e),
        ItemError::Bad { .. } => anyhow::Error::new(e).context(Problem("cannot export".into())),
    })?;

    let items_located = located.values().map(|m| m.len()).sum();
    let output = Output::create(&s.output, &layout, s.force)
        .with_context(|| format!("cannot export to {}", shown(&s.output)))?;
    let written = output.names.clone();
    let shown_output = output.shown.clone();
    let (tensors, bytes, skipped) = (
        layout.tensors.len(),
        layout.data_len(),
        layout.skipped.clone(),
    );
    let sink = ExportSink::new(
        ck.clone(),
        Arc::new(layout),
        located,
        output,
        s.output == Target::Stdout,
        s.engine.max_memory,
    );
    let progress = s.printer.progress(plan.fetched(), plan.items() as u64);
    let report = fetch::run(
        source,
        Arc::new(plan),
        &objects,
        s.engine,
        Box::new(sink),
        progress,
        Cancel::on_ctrl_c(),
    )
    .await
    .with_context(|| match &s.output {
        Target::Stdout => "the export to stdout failed".to_owned(),
        t => format!(
            "the export to {} failed; nothing was written under its name",
            shown(t)
        ),
    })?;
    let (bytes_after, requests_after, retries_after) = source.stats().snapshot();
    let secs = started.elapsed().as_secs_f64();
    let summary = ExportSummary {
        checkpoint: source.describe(),
        output: shown_output,
        format: s.options.format,
        files: written,
        tensors,
        bytes,
        skipped,
        items: report.items,
        items_located,
        requests: requests_after - requests_before,
        retries: retries_after - retries_before,
        bytes_transferred: bytes_after - bytes_before,
        elapsed_seconds: secs,
    };
    s.printer.summary(&summary, || {
        format!(
            "exported {} ({}) to {} in {:.2}s, from {} ({} read in {}){}",
            count(summary.tensors as u64, "tensor"),
            human(summary.bytes),
            summary.output,
            secs,
            count(summary.items, "item"),
            human(summary.bytes_transferred),
            count(summary.requests, "request"),
            if summary.skipped.is_empty() {
                String::new()
            } else {
                format!(", {} skipped", count(summary.skipped.len() as u64, "entry"))
            }
        )
    })?;
    Ok(Outcome::Ok)
}

fn shown(t: &Target) -> String {
    match t {
        Target::Stdout => "stdout".into(),
        Target::File(p) | Target::Folder(p) => p.display().to_string(),
    }
}
