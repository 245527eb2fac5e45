//! `dcpfetch verify`: integrity checks for CI, each reported by name and, on failure, per item.
//! The checks live in [`crate::verify`]; this command opens, runs them and reports.

use std::io::Write;

use anyhow::Context;

use crate::cli::settings::{CombineSettings, VerifySettings};
use crate::pipeline::Opened;
use crate::report::Outcome;
use crate::units::count;
use crate::verify::{self, Status, VerifyOptions, VerifyReport};

pub async fn run(s: VerifySettings) -> anyhow::Result<Outcome> {
    super::fetch::note_shard(&s.printer, &s.shard);
    let opened = Opened::open_to_stat(&s.target).await?;
    let selection = opened.select(&s.target.spec)?;
    let opts = VerifyOptions {
        quick: s.quick,
        manifest: s.manifest,
        plan: s.plan,
        engine: s.engine,
        progress: s.printer.shows_progress(),
        share: s.shard.share,
    };
    let report = verify::run(&opened, &selection, &opts).await?;
    s.printer.print(&report, |out| write_report(out, &report))?;
    Ok(if report.ok {
        Outcome::Ok
    } else {
        Outcome::Problems
    })
}

/// `verify --combine`: the reports of every share, read back and combined into one verdict.
pub fn combine(s: CombineSettings) -> anyhow::Result<Outcome> {
    let mut reports = Vec::new();
    for path in &s.reports {
        let text =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let report: VerifyReport = serde_json::from_slice(&text).with_context(|| {
            format!(
                "{} is not a report of `dcpfetch verify --json`",
                path.display()
            )
        })?;
        reports.push((path.display().to_string(), report));
    }
    let report = verify::combine(reports).context("cannot combine the reports")?;
    s.printer.print(&report, |out| write_report(out, &report))?;
    Ok(if report.ok {
        Outcome::Ok
    } else {
        Outcome::Problems
    })
}

/// The human report.
fn write_report(out: &mut dyn Write, r: &VerifyReport) -> std::io::Result<()> {
    let failed = r.checks.iter().filter(|c| c.status == Status::Fail).count();
    let width = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    writeln!(
        out,
        "verify {}: {}",
        r.checkpoint,
        if failed == 0 {
            "all checks passed".to_owned()
        } else {
            format!("{failed} of {} checks failed", r.checks.len())
        }
    )?;
    for c in &r.checks {
        let status = match c.status {
            Status::Pass => "ok  ",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        };
        let detail = match c.status {
            Status::Fail => format!(
                "{} in {} checked",
                count(c.problems.len() as u64, "problem"),
                c.checked
            ),
            Status::Pass => format!("{} checked", c.checked),
            Status::Skipped => c.notes.first().cloned().unwrap_or_default(),
        };
        writeln!(out, "  {status}  {:width$}  {detail}", c.name)?;
        for p in c.problems.iter().take(20) {
            let mut place = Vec::new();
            if let Some(f) = &p.file {
                place.push(f.clone());
            }
            if let (Some(o), Some(l)) = (p.offset, p.length) {
                place.push(format!("bytes {o}..{}", o + l));
            }
            if let Some(fqn) = &p.fqn {
                place.push(format!("({fqn})"));
            }
            let place = if place.is_empty() {
                String::new()
            } else {
                format!("{}: ", place.join(" "))
            };
            writeln!(out, "          {place}{}", p.message)?;
        }
        if c.problems.len() > 20 {
            writeln!(
                out,
                "          ... and {} more (see --json)",
                c.problems.len() - 20
            )?;
        }
    }
    Ok(())
}
