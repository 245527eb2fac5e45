//! `dcpfetch ls`: the entries of a checkpoint, as a table or one JSON document.
//!
//! Both are written straight from the checkpoint, entry by entry in natural fqn order: the report
//! holds the order and the totals, never a second copy of the entries, so a listing of millions
//! of entries takes little more memory than the metadata itself.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::io::Write;

use serde::Serialize;
use serde::ser::{SerializeSeq, SerializeStruct, Serializer};
use unicode_width::UnicodeWidthStr;

use crate::cli::settings::LsSettings;
use crate::metadata::{Checkpoint, Chunk, Entry, Storage};
use crate::pipeline::Opened;
use crate::report::Outcome;
use crate::selection::Selected;
use crate::units::{count, human, natural_cmp};

/// The `--json` document (docs/output.md), serialized from the checkpoint as it is written.
#[derive(Debug, Serialize)]
pub struct LsReport<'a> {
    pub checkpoint: String,
    pub version: Option<&'a str>,
    pub metadata_files: Vec<MetadataFileJson<'a>>,
    pub entries: Entries<'a>,
    pub totals: Totals,
    pub warnings: Vec<WarningJson<'a>>,
}

#[derive(Debug, Serialize)]
pub struct MetadataFileJson<'a> {
    pub name: &'a str,
    pub size: u64,
    pub version: Option<&'a str>,
    pub protocol: u8,
    pub checkpoint_id: Option<&'a str>,
    pub save_id: Option<&'a str>,
}

/// The selected entries in natural fqn order: each one is serialized from the checkpoint when
/// its turn comes.
#[derive(Debug)]
pub struct Entries<'a> {
    ck: &'a Checkpoint,
    order: Vec<&'a Selected>,
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
pub struct WarningJson<'a> {
    pub kind: &'static str,
    pub message: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global: Option<String>,
}

/// One selected entry: what the table and the JSON say about it.
struct EntryView<'a> {
    ck: &'a Checkpoint,
    entry: &'a Entry,
    chunks: &'a [usize],
}

impl<'a> EntryView<'a> {
    fn new(ck: &'a Checkpoint, sel: &'a Selected) -> Self {
        EntryView {
            ck,
            entry: &ck.entries[sel.entry],
            chunks: &sel.chunks,
        }
    }

    fn chunks(&self) -> impl Iterator<Item = &'a Chunk> + '_ {
        self.chunks.iter().map(|&ci| &self.entry.chunks[ci])
    }

    fn copies(&self) -> impl Iterator<Item = &'a Storage> + '_ {
        self.chunks()
            .flat_map(|c| c.storage.iter().map(|&si| &self.ck.storage[si]))
    }

    fn stored_bytes(&self) -> u64 {
        self.copies()
            .fold(0u64, |n, s| n.saturating_add(s.info.length))
    }

    /// The files holding the selected chunks, sorted.
    fn files(&self) -> BTreeSet<&'a str> {
        self.copies().map(|s| &*s.info.relative_path).collect()
    }

    /// Selected chunks with distinct offsets.
    fn distinct_chunks(&self) -> usize {
        self.chunks()
            .map(|c| &c.offsets)
            .collect::<BTreeSet<_>>()
            .len()
    }
}

impl Serialize for Entries<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.order.len()))?;
        for sel in &self.order {
            seq.serialize_element(&EntryView::new(self.ck, sel))?;
        }
        seq.end()
    }
}

impl Serialize for EntryView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.entry;
        let t = e.tensor.as_ref();
        let mut st = serializer.serialize_struct("Entry", 9)?;
        st.serialize_field("fqn", &*e.fqn)?;
        st.serialize_field("kind", e.kind())?;
        st.serialize_field("dtype", &t.map(|t| &*t.dtype))?;
        st.serialize_field("shape", &t.map(|t| &t.shape))?;
        st.serialize_field("strides", &t.and_then(|t| t.strides.as_ref()))?;
        st.serialize_field("requires_grad", &t.map(|t| t.requires_grad))?;
        st.serialize_field("stored_bytes", &self.stored_bytes())?;
        st.serialize_field("files", &self.files())?;
        st.serialize_field("chunks", &ChunksView(self))?;
        st.end()
    }
}

/// One element per stored copy of each selected chunk (a chunk stored by several ranks appears
/// once per copy; one without a copy once, with no file).
struct ChunksView<'v, 'a>(&'v EntryView<'a>);

impl Serialize for ChunksView<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let view = self.0;
        let mut seq = serializer.serialize_seq(None)?;
        for c in view.chunks() {
            if c.storage.is_empty() {
                seq.serialize_element(&ChunkJson {
                    chunk: c,
                    copy: None,
                })?;
            }
            for &si in &c.storage {
                let s = &view.ck.storage[si];
                let metadata_file = view.ck.metadata_files[s.metadata_file].name.as_str();
                seq.serialize_element(&ChunkJson {
                    chunk: c,
                    copy: Some((s, metadata_file)),
                })?;
            }
        }
        seq.end()
    }
}

struct ChunkJson<'a> {
    chunk: &'a Chunk,
    copy: Option<(&'a Storage, &'a str)>,
}

impl Serialize for ChunkJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let info = self.copy.map(|(s, _)| &s.info);
        let mut st = serializer.serialize_struct("Chunk", 7)?;
        st.serialize_field("offsets", &self.chunk.offsets)?;
        st.serialize_field("sizes", &self.chunk.sizes)?;
        st.serialize_field("file", &info.map(|i| &*i.relative_path))?;
        st.serialize_field("offset", &info.map(|i| i.offset))?;
        st.serialize_field("length", &info.map(|i| i.length))?;
        let none: &[String] = &[];
        st.serialize_field(
            "transform_descriptors",
            info.map_or(none, |i| &i.transform_descriptors),
        )?;
        st.serialize_field("metadata_file", &self.copy.map(|(_, m)| m))?;
        st.end()
    }
}

/// Builds the report of the selected entries, in natural fqn order: the order and the totals,
/// the entries themselves are read from `ck` as they are written.
pub fn report<'a>(
    location: &str,
    ck: &'a Checkpoint,
    selected: &'a [Selected],
    selection_warnings: &'a [String],
) -> LsReport<'a> {
    let mut totals = Totals::default();
    let mut all_files: HashSet<&str> = HashSet::new();
    for sel in selected {
        let view = EntryView::new(ck, sel);
        totals.entries += 1;
        match &view.entry.tensor {
            Some(_) => totals.tensors += 1,
            None => totals.bytes_entries += 1,
        }
        totals.chunks += sel.chunks.len();
        for s in view.copies() {
            totals.storage_entries += 1;
            totals.stored_bytes = totals.stored_bytes.saturating_add(s.info.length);
            all_files.insert(&s.info.relative_path);
        }
    }
    totals.files = all_files.len();
    let mut order: Vec<&Selected> = selected.iter().collect();
    order.sort_by(|a, b| natural_cmp(&ck.entries[a.entry].fqn, &ck.entries[b.entry].fqn));

    let mut warnings: Vec<WarningJson> = ck
        .unsafe_globals
        .iter()
        .map(|f| WarningJson {
            kind: "unknown_global",
            message: Cow::Owned(f.to_string()),
            file: Some(&f.file),
            offset: Some(f.offset),
            global: Some(format!("{}.{}", f.module, f.name)),
        })
        .collect();
    let plain = |kind: &'static str, w: &'a String| WarningJson {
        kind,
        message: Cow::Borrowed(w),
        file: None,
        offset: None,
        global: None,
    };
    warnings.extend(ck.warnings.iter().map(|w| plain("inconsistency", w)));
    warnings.extend(selection_warnings.iter().map(|w| plain("selection", w)));

    LsReport {
        checkpoint: location.to_owned(),
        version: ck.metadata_files.iter().find_map(|f| f.version.as_deref()),
        metadata_files: ck
            .metadata_files
            .iter()
            .map(|f| MetadataFileJson {
                name: &f.name,
                size: f.size,
                version: f.version.as_deref(),
                protocol: f.protocol,
                checkpoint_id: f
                    .storage_meta
                    .as_ref()
                    .and_then(|m| m.checkpoint_id.as_deref()),
                save_id: f.storage_meta.as_ref().and_then(|m| m.save_id.as_deref()),
            })
            .collect(),
        entries: Entries { ck, order },
        totals,
        warnings,
    }
}

/// An fqn for the table: control characters (a tab, a newline) written as escapes, so that one
/// odd key cannot break the layout.
fn printable(fqn: &str) -> Cow<'_, str> {
    if !fqn.chars().any(char::is_control) {
        return Cow::Borrowed(fqn);
    }
    Cow::Owned(
        fqn.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

fn shape_text(shape: Option<&[u64]>) -> String {
    match shape {
        None => "-".into(),
        Some(s) => format!(
            "[{}]",
            s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn files_text(files: &BTreeSet<&str>) -> String {
    let mut it = files.iter();
    match (files.len(), it.next(), it.next()) {
        (0, ..) => "-".into(),
        (1, Some(a), _) => (*a).to_owned(),
        (2, Some(a), Some(b)) => format!("{a},{b}"),
        (n, Some(a), Some(b)) => format!("{a},{b} +{} more", n - 2),
        _ => unreachable!("a set of n > 0 files has its first two"),
    }
}

const HEADER: [&str; 7] = ["FQN", "KIND", "DTYPE", "SHAPE", "CHUNKS", "STORED", "FILES"];

/// The cells of one entry's row.
fn row(view: &EntryView) -> [String; 7] {
    let t = view.entry.tensor.as_ref();
    [
        printable(&view.entry.fqn).into_owned(),
        view.entry.kind().to_owned(),
        t.map_or_else(|| "-".into(), |t| t.dtype.to_string()),
        shape_text(t.map(|t| &t.shape[..])),
        view.distinct_chunks().to_string(),
        human(view.stored_bytes()),
        files_text(&view.files()),
    ]
}

/// The table: one row per entry, then the totals. Rows are made twice, once to measure the
/// columns and once to write them, so that none is held.
pub fn write_table(out: &mut dyn Write, r: &LsReport) -> std::io::Result<()> {
    let ck = r.entries.ck;
    let mut widths = HEADER.map(str::len);
    for sel in &r.entries.order {
        for (w, cell) in widths.iter_mut().zip(row(&EntryView::new(ck, sel))) {
            *w = (*w).max(cell.width());
        }
    }
    let mut line = String::new();
    let mut write_line = |out: &mut dyn Write, cells: [&str; 7]| -> std::io::Result<()> {
        line.clear();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.width();
            let right = matches!(i, 4 | 5);
            if i > 0 {
                line.push_str("  ");
            }
            if right {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i < cells.len() - 1 {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        writeln!(out, "{}", line.trim_end())
    };
    write_line(out, HEADER)?;
    for sel in &r.entries.order {
        let row = row(&EntryView::new(ck, sel));
        write_line(
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
    use crate::metadata::model::TensorMeta;

    fn entry(fqn: &str) -> Entry {
        Entry {
            fqn: fqn.into(),
            tensor: Some(TensorMeta {
                dtype: "float32".into(),
                layout: "strided".into(),
                requires_grad: false,
                memory_format: "contiguous_format".into(),
                pin_memory: false,
                strides: None,
                shape: [2].into(),
                chunks: vec![],
            }),
            chunks: vec![],
        }
    }

    #[test]
    fn columns_align_by_display_width() {
        // CJK characters take two columns, a combining accent none.
        let ck = Checkpoint {
            entries: vec![entry("w"), entry("权重.层"), entry("cafe\u{301}")],
            ..Checkpoint::default()
        };
        let selected: Vec<Selected> = (0..3)
            .map(|entry| Selected {
                entry,
                chunks: vec![],
                whole: true,
            })
            .collect();
        let report = report("ck", &ck, &selected, &[]);
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
