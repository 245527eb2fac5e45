//! `dcpfetch plan`: what a fetch of a selection would read, per file and in total.
//!
//! The report holds a row per file; the range groups (`--groups`, one per group: as many as the
//! items at worst) are read from the plan as they are written, in the JSON and in the table.

use std::collections::HashMap;
use std::io::Write;

use serde::Serialize;
use serde::ser::{SerializeSeq, Serializer};

use crate::cli::settings::PlanSettings;
use crate::pipeline::PipelineError;
use crate::pipeline::{Files, Planned};
use crate::plan::{Cut, FilePlan, Plan, Share};
use crate::report::Outcome;
use crate::source::{ObjectMeta, ObjectName};
use crate::units::{ByteSize, count, human};

/// The `--json` document (docs/output.md).
#[derive(Debug, Serialize)]
pub struct PlanReport<'a> {
    pub checkpoint: String,
    /// `null` means no limit (`inf`).
    pub max_gap_size: Option<u64>,
    pub part_size: u64,
    pub files: Vec<FileReport<'a>>,
    pub totals: PlanTotals,
    pub warnings: Vec<String>,
    /// With `--shard I/N`: the share this report is of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<Share>,
    /// With `--shards N`: what each share fetches.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareReport>,
}

/// One share of `plan --shards N`.
#[derive(Debug, Serialize)]
pub struct ShareReport {
    pub index: u32,
    pub files: usize,
    pub items: usize,
    pub requests: usize,
    pub bytes_needed: u64,
    pub bytes_fetched: u64,
}

#[derive(Debug, Serialize)]
pub struct FileReport<'a> {
    pub file: String,
    pub size: u64,
    pub items: usize,
    pub groups: usize,
    pub requests: usize,
    pub bytes_needed: u64,
    pub gap_bytes: u64,
    pub bytes_fetched: u64,
    pub bytes_skipped: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range_groups: Option<Groups<'a>>,
}

/// The range groups of a file (`--groups`), serialized from its plan.
#[derive(Debug)]
pub struct Groups<'a>(&'a FilePlan);

impl<'a> Groups<'a> {
    /// Each group with its requests: parts are in group order, so one walk counts them.
    fn iter(&self) -> impl Iterator<Item = GroupReport> + 'a {
        let f = self.0;
        let mut parts = f.parts.iter().peekable();
        f.groups.iter().enumerate().map(move |(gi, g)| {
            let mut requests = 0;
            while parts.next_if(|p| p.group == gi).is_some() {
                requests += 1;
            }
            GroupReport {
                start: g.range.start,
                end: g.range.end,
                items: g.items.len(),
                requests,
            }
        })
    }
}

impl Serialize for Groups<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.groups.len()))?;
        for g in self.iter() {
            seq.serialize_element(&g)?;
        }
        seq.end()
    }
}

#[derive(Debug, Serialize)]
pub struct GroupReport {
    pub start: u64,
    pub end: u64,
    pub items: usize,
    pub requests: usize,
}

#[derive(Debug, Serialize)]
pub struct PlanTotals {
    pub files: usize,
    pub items: usize,
    pub groups: usize,
    pub requests: usize,
    pub bytes_needed: u64,
    pub gap_bytes: u64,
    pub bytes_fetched: u64,
    pub bytes_skipped: u64,
    /// Size of every shard file the metadata names.
    pub checkpoint_bytes: u64,
    /// `bytes_fetched / checkpoint_bytes`.
    pub fetched_share: f64,
}

/// Builds the report; `objects` must hold every shard file of the checkpoint.
pub fn report<'a>(
    location: &str,
    plan: &'a Plan,
    objects: &HashMap<ObjectName, ObjectMeta>,
    groups: bool,
    warnings: Vec<String>,
) -> PlanReport<'a> {
    let files: Vec<FileReport> = plan
        .files
        .iter()
        .map(|f| {
            let size = objects.get(&f.name).map_or(0, |m| m.size);
            let needed = f.needed();
            let fetched = f.fetched();
            FileReport {
                file: f.name.to_string(),
                size,
                items: f.items.len(),
                groups: f.groups.len(),
                requests: f.parts.len(),
                bytes_needed: needed,
                gap_bytes: fetched - needed,
                bytes_fetched: fetched,
                bytes_skipped: size.saturating_sub(fetched),
                range_groups: (groups && !f.groups.is_empty()).then_some(Groups(f)),
            }
        })
        .collect();
    let checkpoint_bytes: u64 = objects.values().map(|m| m.size).sum();
    let bytes_fetched = plan.fetched();
    PlanReport {
        checkpoint: location.to_owned(),
        max_gap_size: (!ByteSize(plan.options.max_gap).is_inf()).then_some(plan.options.max_gap),
        part_size: plan.options.part_size,
        totals: PlanTotals {
            files: files.len(),
            items: plan.items(),
            groups: plan.groups(),
            requests: plan.requests(),
            bytes_needed: plan.needed(),
            gap_bytes: bytes_fetched - plan.needed(),
            bytes_fetched,
            bytes_skipped: checkpoint_bytes.saturating_sub(bytes_fetched),
            checkpoint_bytes,
            fetched_share: if checkpoint_bytes == 0 {
                0.0
            } else {
                bytes_fetched as f64 / checkpoint_bytes as f64
            },
        },
        files,
        warnings,
        shard: None,
        shares: Vec::new(),
    }
}

/// What each of `count` shares of `plan` fetches.
fn share_reports(plan: &Plan, count: u32) -> Result<Vec<ShareReport>, PipelineError> {
    let shares = plan
        .shares(count, Cut::Parts)
        .map_err(PipelineError::Plan)?;
    Ok(shares
        .iter()
        .zip(0..)
        .map(|(s, index)| ShareReport {
            index,
            files: s.files.len(),
            items: s.items(),
            requests: s.requests(),
            bytes_needed: s.needed(),
            bytes_fetched: s.fetched(),
        })
        .collect())
}

/// The table of `--shards N`: a row per share, then how far the largest is from the mean.
fn write_shares(out: &mut dyn Write, r: &PlanReport) -> std::io::Result<()> {
    let header = ["SHARE", "FILES", "ITEMS", "REQUESTS", "NEEDED", "FETCHED"];
    let rows: Vec<[String; 6]> = r
        .shares
        .iter()
        .map(|s| {
            [
                format!("{}/{}", s.index, r.shares.len()),
                s.files.to_string(),
                s.items.to_string(),
                s.requests.to_string(),
                human(s.bytes_needed),
                human(s.bytes_fetched),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(header.map(str::to_owned)).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[0])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        writeln!(out, "{}", cells.join("  "))?;
    }
    let mean = r.totals.bytes_fetched as f64 / r.shares.len() as f64;
    let largest = r.shares.iter().map(|s| s.bytes_fetched).max().unwrap_or(0);
    writeln!(
        out,
        "{} fetched in {}: {} each on average, the largest {} ({:.2} part sizes above the mean)",
        human(r.totals.bytes_fetched),
        count(r.shares.len() as u64, "share"),
        human(mean as u64),
        human(largest),
        (largest as f64 - mean) / r.part_size as f64,
    )
}

/// The cells of the table's rows: a row per file, then one per group with `--groups`.
fn rows<'r>(r: &'r PlanReport) -> impl Iterator<Item = [String; 8]> + 'r {
    r.files.iter().flat_map(|f| {
        let file = [
            f.file.clone(),
            f.items.to_string(),
            f.groups.to_string(),
            f.requests.to_string(),
            human(f.bytes_needed),
            human(f.gap_bytes),
            human(f.bytes_fetched),
            human(f.bytes_skipped),
        ];
        let groups = f.range_groups.iter().flat_map(Groups::iter).map(|g| {
            [
                format!("  {}..{}", g.start, g.end),
                g.items.to_string(),
                String::new(),
                g.requests.to_string(),
                String::new(),
                String::new(),
                human(g.end - g.start),
                String::new(),
            ]
        });
        std::iter::once(file).chain(groups)
    })
}

/// The table: a row per file (and per group with `--groups`), then the totals. Rows are made
/// twice, once to measure the columns and once to write them, so that none is held.
pub fn write_table(out: &mut dyn Write, r: &PlanReport) -> std::io::Result<()> {
    let header = [
        "FILE", "ITEMS", "GROUPS", "REQUESTS", "NEEDED", "GAPS", "FETCHED", "SKIPPED",
    ];
    let mut widths = header.map(str::len);
    for row in rows(r) {
        for (w, cell) in widths.iter_mut().zip(&row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 0 {
                s.push_str(&format!("{cell:<w$}", w = widths[0]));
            } else {
                s.push_str(&format!("  {cell:>w$}", w = widths[i]));
            }
        }
        s.trim_end().to_owned()
    };
    writeln!(out, "{}", line(&header))?;
    for row in rows(r) {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&cells))?;
    }
    let t = &r.totals;
    let gap = match r.max_gap_size {
        Some(g) => human(g),
        None => "inf".into(),
    };
    writeln!(
        out,
        "{} in {}: {} (max gap {gap}), {} (parts of at most {}); \
         {} needed + {} of gaps = {} fetched, {:.1}% of the checkpoint's {}",
        count(t.items as u64, "item"),
        count(t.files as u64, "file"),
        count(t.groups as u64, "range group"),
        count(t.requests as u64, "request"),
        human(r.part_size),
        human(t.bytes_needed),
        human(t.gap_bytes),
        human(t.bytes_fetched),
        t.fetched_share * 100.0,
        human(t.checkpoint_bytes),
    )
}

pub async fn run(s: PlanSettings) -> anyhow::Result<Outcome> {
    super::fetch::note_shard(&s.printer, &s.shard);
    let planned = Planned::new(&s.target, s.plan, Files::Every, s.in_flight).await?;
    // `--shard I/N`: the share `fetch -o DIR --shard I/N` fetches.
    let share = s.shard.share;
    let plan = planned
        .plan
        .share(share, Cut::Parts)
        .map_err(PipelineError::Plan)?;
    let mut r = report(
        &planned.source().describe(),
        &plan,
        &planned.objects,
        s.groups,
        planned.selection.warnings.clone(),
    );
    r.shard = (!share.is_whole()).then_some(share);
    if let Some(n) = s.shares {
        r.shares = share_reports(&planned.plan, n)?;
    }
    s.printer
        .warnings(planned.ck(), &planned.selection.warnings);
    s.printer.print(&r, |out| {
        if s.shares.is_some() {
            write_shares(out, &r)
        } else {
            write_table(out, &r)
        }
    })?;
    Ok(Outcome::Ok)
}
