//! One printer decides, for every command, what goes where: reports on stdout (a table, CSV or
//! JSON), warnings and the progress bar on stderr, and what `--quiet` and `--json` silence
//! (uv's `Printer`).
//!
//! - Security findings of the metadata (globals outside the known set) are always printed.
//! - Other warnings are printed unless `--quiet`, or unless the JSON report carries them itself
//!   (`ls --json`, `plan --json`).
//! - The progress bar is drawn only on a terminal, and not with `--quiet`, `--no-progress` or a
//!   machine-readable report (`--json`, `--csv`).
//! - When stdout carries data (`fetch -o -`), the JSON summary goes to stderr instead.

use std::io::Write;

use serde::Serialize;

use crate::fetch::Progress;
use crate::metadata::Checkpoint;
use crate::report;

/// How a command's report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
}

impl ReportFormat {
    pub fn json_if(json: bool) -> ReportFormat {
        if json {
            ReportFormat::Json
        } else {
            ReportFormat::Table
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Printer {
    format: ReportFormat,
    quiet: bool,
    /// `--no-progress`: no bar, everything else as without it.
    no_progress: bool,
    /// stdout carries fetched bytes: reports go to stderr.
    data_on_stdout: bool,
    /// The JSON report lists the warnings itself.
    warnings_in_report: bool,
}

impl Printer {
    /// For commands whose output is the report (`ls`, `plan`): their JSON carries the warnings.
    pub fn report(format: ReportFormat) -> Printer {
        Printer {
            format,
            quiet: false,
            no_progress: false,
            data_on_stdout: false,
            warnings_in_report: format == ReportFormat::Json,
        }
    }

    /// For commands that run the engine (`fetch`, `verify`, `bench`).
    pub fn run(format: ReportFormat, quiet: bool, data_on_stdout: bool) -> Printer {
        Printer {
            format,
            quiet,
            no_progress: false,
            data_on_stdout,
            warnings_in_report: false,
        }
    }

    /// The same printer without a progress bar when `hide` (`--no-progress`).
    pub fn hide_progress(self, hide: bool) -> Printer {
        Printer {
            no_progress: self.no_progress || hide,
            ..self
        }
    }

    pub fn format(&self) -> ReportFormat {
        self.format
    }

    fn bar_hidden(&self) -> bool {
        self.quiet || self.no_progress || self.format != ReportFormat::Table
    }

    /// Whether a run's progress bar may be drawn (it still needs a terminal).
    pub fn shows_progress(&self) -> bool {
        !self.bar_hidden()
    }

    /// A bar over the bytes and items of a run.
    pub fn progress(&self, bytes: u64, items: u64) -> Progress {
        Progress::new(bytes, items, self.bar_hidden())
    }

    /// A bar over the runs of a sweep.
    pub fn sweep_progress(&self, runs: u64) -> Progress {
        Progress::runs(runs, self.bar_hidden())
    }

    /// The metadata's findings and warnings and the selection's warnings, on stderr.
    pub fn warnings(&self, ck: &Checkpoint, selection: &[String]) {
        for f in &ck.unsafe_globals {
            report::warn(&f.to_string());
        }
        if !self.quiet && !self.warnings_in_report {
            for w in ck.warnings.iter().chain(selection) {
                report::warn(w);
            }
        }
    }

    /// One warning on stderr, unless `--quiet`.
    pub fn warning(&self, message: &str) {
        if !self.quiet {
            report::warn(message);
        }
    }

    /// A note on stderr (what `--shard auto` found), unless `--quiet`.
    pub fn note(&self, message: &str) {
        if !self.quiet {
            eprintln!("note: {message}");
        }
    }

    /// The command's report: JSON, or what `human` writes (a table or CSV), on stdout.
    pub fn print(
        &self,
        report: &impl Serialize,
        human: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        let mut out: Box<dyn Write> = if self.data_on_stdout {
            Box::new(std::io::stderr().lock())
        } else {
            Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
        };
        if self.format == ReportFormat::Json {
            // Into an io::Error: serde_json's own error hides a closed stdout from
            // `report::fail`, which looks for the io::Error in the cause chain.
            serde_json::to_writer_pretty(&mut out, report).map_err(std::io::Error::from)?;
            writeln!(out)?;
        } else {
            human(&mut out)?;
        }
        out.flush()?;
        Ok(())
    }

    /// A run's summary: JSON (as [`Printer::print`]), or one line on stderr unless `--quiet` or
    /// stdout carries data.
    pub fn summary(
        &self,
        report: &impl Serialize,
        line: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.format == ReportFormat::Json {
            return self.print(report, |_| Ok(()));
        }
        if !self.quiet && !self.data_on_stdout {
            eprintln!("{}", line());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_progress_hides_only_the_bar() {
        let run = Printer::run(ReportFormat::Table, false, false);
        assert!(run.shows_progress());
        let no_bar = run.hide_progress(true);
        assert!(!no_bar.shows_progress());
        assert!(!no_bar.quiet, "warnings and the summary stay");
        assert_eq!(no_bar.hide_progress(false), no_bar);
        assert_eq!(run.hide_progress(false), run);
        assert!(!Printer::run(ReportFormat::Table, true, false).shows_progress());
        assert!(!Printer::run(ReportFormat::Json, false, false).shows_progress());
    }
}
