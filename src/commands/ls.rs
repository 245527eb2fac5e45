//! `dcpfetch ls`: the entries of a checkpoint, as a table or one JSON document.

use std::collections::BTreeSet;
use std::io::Write;

use serde::Serialize;
use unicode_width::UnicodeWidthStr;

use crate::cli::settings::LsSettings;
use crate::metadata::Checkpoint;
use crate::pipeline::Opened;
use crate::report::Outcome;
use crate::selection::Selected;
use crate::units::{count, human, natural_cmp};

/// The `--json` document (docs/output.md).
#[derive(Debug, Serialize)]
pub struct LsReport {
    pub checkpoint: String,
    pub version: Option<String>,
    pub metadata_files: Vec<MetadataFileJson>,
    pub entries: Vec<EntryJson>,
    pub totals: Totals,
    pub warnings: Vec<WarningJson>,
}

#[derive(Debug, Serialize)]
pub struct MetadataFileJson {
    pub name: String,
    pub size: u64,
    pub version: Option<String>,
    pub protocol: u8,
    pub checkpoint_id: Option<String>,
    pub save_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EntryJson {
    pub fqn: String,
    pub kind: &'static str,
    pub dtype: Option<String>,
    pub shape: Option<Vec<u64>>,
    pub strides: Option<Vec<i64>>,
    pub requires_grad: Option<bool>,
    pub stored_bytes: u64,
    pub files: Vec<String>,
    pub chunks: Vec<ChunkJson>,
}

/// One stored copy of a chunk (a chunk stored by several ranks appears once per copy).
#[derive(Debug, Serialize)]
pub struct ChunkJson {
    pub offsets: Option<Vec<u64>>,
    pub sizes: Option<Vec<u64>>,
    pub file: Option<String>,
    pub offset: Option<u64>,
    pub length: Option<u64>,
    pub transform_descriptors: Vec<String>,
    pub metadata_file: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub entries: usize,
    pub tensors: usize,
    pub bytes_entries: usize,
    pub chunks: usize,
    pub storage_entries: usize,
    pub stored_bytes: u64,
    pub files: usize,
}

/// A finding or warning: `kind` is `unknown_global`, `inconsistency` or `selection`.
#[derive(Debug, Serialize)]
pub struct WarningJson {
    pub kind: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<String>,
}

/// Builds the report of the selected entries, in natural fqn order.
pub fn report(
    location: &str,
    ck: &Checkpoint,
    selected: &[Selected],
    selection_warnings: &[String],
) -> LsReport {
    let mut entries = Vec::with_capacity(selected.len());
    let mut all_files = BTreeSet::new();
    let mut totals = Totals::default();
    for sel in selected {
        let e = &ck.entries[sel.entry];
        let mut chunks = Vec::new();
        let mut files = BTreeSet::new();
        let mut stored = 0u64;
        for &ci in &sel.chunks {
            let c = &e.chunks[ci];
            totals.chunks += 1;
            if c.storage.is_empty() {
                chunks.push(ChunkJson {
                    offsets: c.offsets.clone(),
                    sizes: c.sizes.clone(),
                    file: None,
                    offset: None,
                    length: None,
                    transform_descriptors: Vec::new(),
                    metadata_file: None,
                });
            }
            for &si in &c.storage {
                let s = &ck.storage[si];
                totals.storage_entries += 1;
                stored = stored.saturating_add(s.info.length);
                files.insert(s.info.relative_path.clone());
                chunks.push(ChunkJson {
                    offsets: c.offsets.clone(),
                    sizes: c.sizes.clone(),
                    file: Some(s.info.relative_path.clone()),
                    offset: Some(s.info.offset),
                    length: Some(s.info.length),
                    transform_descriptors: s.info.transform_descriptors.clone(),
                    metadata_file: Some(ck.metadata_files[s.metadata_file].name.clone()),
                });
            }
        }
        totals.entries += 1;
        match &e.tensor {
            Some(_) => totals.tensors += 1,
            None => totals.bytes_entries += 1,
        }
        totals.stored_bytes = totals.stored_bytes.saturating_add(stored);
        all_files.extend(files.iter().cloned());
        entries.push(EntryJson {
            fqn: e.fqn.clone(),
            kind: e.kind(),
            dtype: e.tensor.as_ref().map(|t| t.dtype.clone()),
            shape: e.tensor.as_ref().map(|t| t.shape.clone()),
            strides: e.tensor.as_ref().and_then(|t| t.strides.clone()),
            requires_grad: e.tensor.as_ref().map(|t| t.requires_grad),
            stored_bytes: stored,
            files: files.into_iter().collect(),
            chunks,
        });
    }
    entries.sort_by(|a, b| natural_cmp(&a.fqn, &b.fqn));
    totals.files = all_files.len();

    let mut warnings: Vec<WarningJson> = ck
        .unsafe_globals
        .iter()
        .map(|f| WarningJson {
            kind: "unknown_global",
            message: f.to_string(),
            file: Some(f.file.clone()),
            offset: Some(f.offset),
            global: Some(format!("{}.{}", f.module, f.name)),
        })
        .collect();
    warnings.extend(ck.warnings.iter().map(|w| WarningJson {
        kind: "inconsistency",
        message: w.clone(),
        file: None,
        offset: None,
        global: None,
    }));
    warnings.extend(selection_warnings.iter().map(|w| WarningJson {
        kind: "selection",
        message: w.clone(),
        file: None,
        offset: None,
        global: None,
    }));

    LsReport {
        checkpoint: location.to_owned(),
        version: ck.metadata_files.iter().find_map(|f| f.version.clone()),
        metadata_files: ck
            .metadata_files
            .iter()
            .map(|f| MetadataFileJson {
                name: f.name.clone(),
                size: f.size,
                version: f.version.clone(),
                protocol: f.protocol,
                checkpoint_id: f
                    .storage_meta
                    .as_ref()
                    .and_then(|m| m.checkpoint_id.clone()),
                save_id: f.storage_meta.as_ref().and_then(|m| m.save_id.clone()),
            })
            .collect(),
        entries,
        totals,
        warnings,
    }
}

/// An fqn for the table: control characters (a tab, a newline) written as escapes, so that one
/// odd key cannot break the layout.
fn printable(fqn: &str) -> String {
    if !fqn.chars().any(char::is_control) {
        return fqn.to_owned();
    }
    fqn.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn shape_text(shape: &Option<Vec<u64>>) -> String {
    match shape {
        None => "-".into(),
        Some(s) => format!(
            "[{}]",
            s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn files_text(files: &[String]) -> String {
    match files.len() {
        0 => "-".into(),
        1 | 2 => files.join(","),
        n => format!("{},{} +{} more", files[0], files[1], n - 2),
    }
}

/// The table: one row per entry, then the totals.
pub fn write_table(out: &mut dyn Write, r: &LsReport) -> std::io::Result<()> {
    let header = ["FQN", "KIND", "DTYPE", "SHAPE", "CHUNKS", "STORED", "FILES"];
    let rows: Vec<[String; 7]> = r
        .entries
        .iter()
        .map(|e| {
            let chunks: BTreeSet<_> = e.chunks.iter().map(|c| &c.offsets).collect();
            [
                printable(&e.fqn),
                e.kind.to_owned(),
                e.dtype.clone().unwrap_or_else(|| "-".into()),
                shape_text(&e.shape),
                chunks.len().to_string(),
                human(e.stored_bytes),
                files_text(&e.files),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.width());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; 7]| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.width();
            let right = matches!(i, 4 | 5);
            if i > 0 {
                s.push_str("  ");
            }
            if right {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            } else {
                s.push_str(cell);
                if i < cells.len() - 1 {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, header)?;
    for row in &rows {
        line(
            out,
            [
                &row[0], &row[1], &row[2], &row[3], &row[4], &row[5], &row[6],
            ],
        )?;
    }
    let t = &r.totals;
    writeln!(
        out,
        "{} ({}, {}), {}, {} stored in {}",
        count(t.entries as u64, "entry"),
        count(t.tensors as u64, "tensor"),
        count(t.bytes_entries as u64, "bytes entry"),
        count(t.chunks as u64, "chunk"),
        human(t.stored_bytes),
        count(t.files as u64, "file")
    )
}

pub async fn run(s: LsSettings) -> anyhow::Result<Outcome> {
    let opened = Opened::open(&s.target).await?;
    let selection = opened.select(&s.target.spec)?;
    let r = report(
        &opened.source.describe(),
        &opened.ck,
        &selection.selected,
        &selection.warnings,
    );
    s.printer.warnings(&opened.ck, &selection.warnings);
    s.printer.print(&r, |out| write_table(out, &r))?;
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fqn: &str) -> EntryJson {
        EntryJson {
            fqn: fqn.into(),
            kind: "tensor",
            dtype: Some("float32".into()),
            shape: Some(vec![2]),
            strides: None,
            requires_grad: None,
            stored_bytes: 8,
            files: vec!["__0_0.distcp".into()],
            chunks: vec![],
        }
    }

    #[test]
    fn columns_align_by_display_width() {
        // CJK characters take two columns, a combining accent none.
        let report = LsReport {
            checkpoint: "ck".into(),
            version: None,
            metadata_files: vec![],
            entries: vec![entry("w"), entry("权重.层"), entry("cafe\u{301}")],
            totals: Totals::default(),
            warnings: vec![],
        };
        let mut out = Vec::new();
        write_table(&mut out, &report).unwrap();
        let text = String::from_utf8(out).unwrap();
        let kind_columns: Vec<usize> = text
            .lines()
            .take(4)
            .map(|l| {
                let at = l.find("tensor").or_else(|| l.find("KIND")).unwrap();
                l[..at].width()
            })
            .collect();
        assert_eq!(kind_columns, vec![9, 9, 9, 9], "{text}");
    }
}
