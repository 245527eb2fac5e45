//! `dcpfetch bench`: the fetch engine run for every combination of gap size, concurrency and part
//! size on the user's own checkpoint and link, to see how requests trade against wasted bytes.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use crate::cli::ReportFormat;
use crate::cli::settings::{BenchSettings, Trial};
use crate::fetch::{self, Cancel, FetchError, Progress, Sink};
use crate::pipeline::{Files, Planned, Target};
use crate::plan::Plan;
use crate::report::Outcome;
use crate::sink::{FolderOptions, FolderSink, NullSink, local_root};
use crate::units::{ByteSize, human};

use super::plot;

/// The `--json` document (docs/output.md).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub checkpoint: String,
    /// `null` (bytes dropped) or `folder`.
    pub sink: &'static str,
    pub items: usize,
    pub bytes_needed: u64,
    pub runs_per_setting: u32,
    /// Ctrl-C stopped the sweep: the results are those measured so far.
    pub interrupted: bool,
    pub results: Vec<Setting>,
}

/// One combination of settings and its runs.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    /// `null` for `inf`.
    pub max_gap_size: Option<u64>,
    pub concurrency: u32,
    pub part_size: u64,
    pub groups: usize,
    /// Ranged reads per run as planned; `requests_sent` adds retries (median over runs).
    pub requests: usize,
    pub requests_sent: u64,
    pub bytes_needed: u64,
    /// Body bytes received per run (median over runs).
    pub bytes_transferred: u64,
    /// Share of the transferred bytes that were not needed (gaps).
    pub wasted_share: f64,
    pub seconds: Seconds,
    /// Needed bytes over the median time.
    pub throughput_bytes_per_second: f64,
    /// The most bytes the engine held at once (largest over runs).
    pub peak_memory: u64,
    /// The process's peak resident memory during the runs (Linux; `null` elsewhere).
    pub peak_rss: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Seconds {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

/// Resets the process's peak RSS (Linux `clear_refs`), so the next reading covers one run.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak RSS since the last reset, from `/proc/self/status`.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn median_u64(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s[s.len() / 2]
}

/// A measured run.
struct Run {
    seconds: f64,
    requests: u64,
    bytes: u64,
    peak_memory: u64,
    peak_rss: Option<u64>,
}

fn setting(trial: Trial, plan: &Plan, runs: &[Run]) -> Setting {
    let opts = trial.plan;
    let secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
    let med = median(&secs);
    let transferred = median_u64(&runs.iter().map(|r| r.bytes).collect::<Vec<_>>());
    Setting {
        max_gap_size: (!ByteSize(opts.max_gap).is_inf()).then_some(opts.max_gap),
        concurrency: trial.engine.concurrency as u32,
        part_size: opts.part_size,
        groups: plan.groups(),
        requests: plan.requests(),
        requests_sent: median_u64(&runs.iter().map(|r| r.requests).collect::<Vec<_>>()),
        bytes_needed: plan.needed(),
        bytes_transferred: transferred,
        wasted_share: if transferred == 0 {
            0.0
        } else {
            transferred.saturating_sub(plan.needed()) as f64 / transferred as f64
        },
        seconds: Seconds {
            median: med,
            min: secs.iter().copied().fold(f64::INFINITY, f64::min),
            max: secs.iter().copied().fold(0.0, f64::max),
            runs: secs,
        },
        throughput_bytes_per_second: if med > 0.0 {
            plan.needed() as f64 / med
        } else {
            0.0
        },
        peak_memory: runs.iter().map(|r| r.peak_memory).max().unwrap_or(0),
        peak_rss: runs.iter().filter_map(|r| r.peak_rss).max(),
    }
}

pub async fn run(s: BenchSettings) -> anyhow::Result<Outcome> {
    let first = s.trials[0];
    // A folder copy creates every shard file; the null sink needs only the planned ones.
    let files = match &s.output {
        Some(_) => Files::Every,
        None => Files::Planned,
    };
    let planned = Planned::new(&s.target, first.plan, files, first.engine.concurrency).await?;
    let source = planned.source();

    let progress = s
        .printer
        .sweep_progress(s.trials.len() as u64 * s.repeat as u64);
    let cancel = Cancel::on_ctrl_c();
    let mut results = Vec::new();
    let mut interrupted = false;
    'sweep: for trial in &s.trials {
        let plan = Arc::new(planned.replan(trial.plan)?);
        let mut runs = Vec::new();
        for r in 0..s.repeat {
            progress.set_message(format!(
                "gap {}, concurrency {}, part {}, run {}",
                ByteSize(trial.plan.max_gap),
                trial.engine.concurrency,
                human(trial.plan.part_size),
                r + 1
            ));
            let sink: Box<dyn Sink> = match &s.output {
                Some(dir) => Box::new(prepare_folder(
                    dir,
                    &s.target,
                    &planned,
                    r > 0 || !results.is_empty(),
                )?),
                None => Box::new(NullSink::default()),
            };
            reset_peak_rss();
            let (bytes_before, requests_before, _) = source.stats().snapshot();
            match fetch::run(
                source,
                plan.clone(),
                &planned.objects,
                trial.engine,
                sink,
                Progress::hidden(),
                cancel.clone(),
            )
            .await
            {
                Ok(report) => {
                    let (bytes, requests, _) = source.stats().snapshot();
                    runs.push(Run {
                        seconds: report.elapsed.as_secs_f64(),
                        requests: requests - requests_before,
                        bytes: bytes - bytes_before,
                        peak_memory: report.peak_memory,
                        peak_rss: peak_rss(),
                    });
                }
                Err(FetchError::Interrupted) => {
                    interrupted = true;
                    if !runs.is_empty() {
                        results.push(setting(*trial, &plan, &runs));
                    }
                    break 'sweep;
                }
                Err(e) => return Err(e).context("a benchmark run failed"),
            }
            progress.step();
        }
        results.push(setting(*trial, &plan, &runs));
    }
    progress.finish();

    let report = BenchReport {
        checkpoint: source.describe(),
        sink: if s.output.is_some() { "folder" } else { "null" },
        items: planned.plan.items(),
        bytes_needed: planned.plan.needed(),
        runs_per_setting: s.repeat,
        interrupted,
        results,
    };
    if let Some(path) = &s.plot {
        std::fs::write(path, plot::svg(&report))
            .with_context(|| format!("cannot write the plot {}", path.display()))?;
    }
    s.printer.print(&report, |out| {
        if s.printer.format() == ReportFormat::Csv {
            write_csv(out, &report)
        } else {
            write_table(out, &report)
        }
    })?;
    if interrupted {
        return Err(FetchError::Interrupted)
            .context("the sweep was interrupted; the results above are those measured so far");
    }
    Ok(Outcome::Ok)
}

/// The output folder of one run. The first run refuses a folder that is not empty (like `fetch`
/// without `--force`); later runs overwrite what the earlier runs of this sweep wrote.
fn prepare_folder(
    dir: &Path,
    target: &Target,
    planned: &Planned,
    ours: bool,
) -> anyhow::Result<FolderSink> {
    let (sink, _) = FolderSink::prepare(
        dir,
        &planned.source().describe(),
        local_root(&target.location),
        planned.ck(),
        &planned.objects,
        FolderOptions {
            resume: false,
            force: ours,
            shard: None,
        },
    )
    .with_context(|| format!("cannot fetch into {}", dir.display()))?;
    Ok(sink)
}

fn gap_text(g: Option<u64>) -> String {
    g.map_or_else(|| "inf".to_owned(), human)
}

fn write_table(out: &mut dyn Write, r: &BenchReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} items, {} needed, {} sink, {} runs per setting{}",
        r.checkpoint,
        r.items,
        human(r.bytes_needed),
        r.sink,
        r.runs_per_setting,
        if r.interrupted {
            " (interrupted: partial results)"
        } else {
            ""
        }
    )?;
    let header = [
        "GAP",
        "CONC",
        "PART",
        "GROUPS",
        "REQUESTS",
        "TRANSFERRED",
        "WASTED",
        "MEDIAN",
        "SPREAD",
        "THROUGHPUT",
        "PEAK MEM",
    ];
    let rows: Vec<[String; 11]> = r
        .results
        .iter()
        .map(|s| {
            [
                gap_text(s.max_gap_size),
                s.concurrency.to_string(),
                human(s.part_size),
                s.groups.to_string(),
                s.requests_sent.to_string(),
                human(s.bytes_transferred),
                format!("{:.1}%", s.wasted_share * 100.0),
                format!("{:.3}s", s.seconds.median),
                format!("{:.3}-{:.3}s", s.seconds.min, s.seconds.max),
                format!("{}/s", human(s.throughput_bytes_per_second as u64)),
                human(s.peak_memory),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn write_csv(out: &mut dyn Write, r: &BenchReport) -> std::io::Result<()> {
    writeln!(
        out,
        "max_gap_size,concurrency,part_size,groups,requests,requests_sent,bytes_needed,bytes_transferred,wasted_share,\
         seconds_median,seconds_min,seconds_max,throughput_bytes_per_second,peak_memory,peak_rss"
    )?;
    for s in &r.results {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.0},{},{}",
            s.max_gap_size
                .map_or_else(|| "inf".to_owned(), |g| g.to_string()),
            s.concurrency,
            s.part_size,
            s.groups,
            s.requests,
            s.requests_sent,
            s.bytes_needed,
            s.bytes_transferred,
            s.wasted_share,
            s.seconds.median,
            s.seconds.min,
            s.seconds.max,
            s.throughput_bytes_per_second,
            s.peak_memory,
            s.peak_rss.map_or_else(String::new, |v| v.to_string()),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median_u64(&[5, 1, 3]), 3);
    }
}
