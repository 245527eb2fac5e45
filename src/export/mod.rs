//! Exporting selected tensors whole, as safetensors (one file, or a Hugging Face folder) or npy.
//!
//! The layout of the output is known from the metadata alone, before any byte is fetched: every
//! exported tensor's name, dtype, shape, file and offset ([`Layout`]), and for every stored chunk
//! where its bytes go ([`geometry::Placement`]). [`item`] finds a chunk's values inside its stored
//! item; [`sink::ExportSink`] takes the fetch engine's pieces and writes each byte where it
//! belongs, and [`output`] creates the files and publishes them once complete.

pub mod format;
pub mod geometry;
pub mod item;
pub mod output;
pub mod sink;

use std::collections::HashMap;

use crate::metadata::{Checkpoint, dtype};
use crate::selection::{Region, Selected};
use crate::units::natural_cmp;
use geometry::{Extent, Placement};

/// The file format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// safetensors (Hugging Face): one file, or a folder with `--max-shard-size`.
    Safetensors,
    /// numpy's `.npy`: one tensor.
    Npy,
}

/// How names, dtypes and files are chosen.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: Format,
    /// Largest data of one file: a folder of several files in the Hugging Face layout.
    pub max_shard_size: Option<u64>,
    /// Removed from the start of every name that has it.
    pub strip_prefix: Option<String>,
    /// `(from, to)`: a name starting with `from` starts with `to` instead (the first rule that
    /// applies, after the prefix is stripped).
    pub rename: Vec<(String, String)>,
    /// Skip (and list) tensors of dtypes the format cannot hold, instead of failing.
    pub skip_unsupported: bool,
    /// Order tensors as they are read, not widest elements first (a stream, which cannot hold
    /// a whole group of narrower tensors until the wider ones are in).
    pub read_order: bool,
}

/// One exported tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Its name in the output.
    pub name: String,
    pub fqn: String,
    /// The torch dtype, and the format's name for it.
    pub dtype: String,
    pub code: &'static str,
    /// The box of the checkpoint's tensor exported (the whole tensor, or a region).
    pub extent: Extent,
    pub elem: u64,
    /// Bytes of data.
    pub len: u64,
    /// Index into [`Layout::files`], and offset in that file's data.
    pub file: usize,
    pub offset: u64,
}

/// One output file: its header, and the bytes of data after it.
#[derive(Debug, Clone)]
pub struct OutFile {
    /// Its name in a folder (`model-00001-of-00002.safetensors`); empty for a single file.
    pub name: String,
    pub header: Vec<u8>,
    pub data_len: u64,
}

/// Where a stored copy's bytes go: into tensor `tensor`, placed by `placement`.
#[derive(Debug, Clone)]
pub struct Feed {
    pub tensor: usize,
    pub placement: Placement,
}

/// A selected entry that is not exported, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub fqn: String,
    pub reason: String,
}

/// Everything an export writes, decided before the fetch.
#[derive(Debug, Clone)]
pub struct Layout {
    pub format: Format,
    pub tensors: Vec<Tensor>,
    pub files: Vec<OutFile>,
    /// Stored copies to read (indexes into [`Checkpoint::storage`]), each with where it goes.
    pub feeds: HashMap<usize, Vec<Feed>>,
    pub skipped: Vec<Skipped>,
}

/// Why an export cannot be laid out.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "{fqn} is {dtype}, which {format} cannot hold (pass --skip-unsupported to leave it out)"
    )]
    Unsupported {
        fqn: String,
        dtype: String,
        format: &'static str,
    },
    #[error("{fqn}: {detail}")]
    Incomplete { fqn: String, detail: String },
    #[error("{fqn} and {other} would both be named {name:?} in the export")]
    SameName {
        name: String,
        fqn: String,
        other: String,
    },
    #[error("--format npy writes one tensor; the selection has {0} (select one)")]
    NotOne(usize),
    #[error("nothing to export: every selected entry was skipped ({0})")]
    Nothing(String),
    #[error("{fqn}: its size in bytes overflows")]
    Overflow { fqn: String },
    #[error("{name}: an npy header for this shape would exceed 64 KiB")]
    NpyHeader { name: String },
}

impl ExportOptions {
    /// A tensor's name in the output.
    fn name(&self, fqn: &str) -> String {
        let name = match &self.strip_prefix {
            Some(p) => fqn.strip_prefix(p.as_str()).unwrap_or(fqn),
            None => fqn,
        };
        match self.rename.iter().find(|(from, _)| name.starts_with(from)) {
            Some((from, to)) => format!("{to}{}", &name[from.len()..]),
            None => name.to_owned(),
        }
    }

    fn code(&self, dtype: &str) -> Option<&'static str> {
        match self.format {
            Format::Safetensors => format::safetensors_dtype(dtype),
            Format::Npy => format::npy_descr(dtype),
        }
    }

    fn format_name(&self) -> &'static str {
        match self.format {
            Format::Safetensors => "safetensors",
            Format::Npy => "npy",
        }
    }
}

/// What is missing of an export box: along one dimension when the chunks split only that one,
/// otherwise a count.
fn missing(extent: &Extent, chunks: &[Extent], covered: u64, total: u64) -> String {
    let n = extent.sizes.len();
    for d in 0..n {
        let spans_rest = chunks.iter().all(|c| {
            (0..n).all(|j| {
                j == d
                    || (c.offsets[j] <= extent.offsets[j]
                        && c.offsets[j] + c.sizes[j] >= extent.offsets[j] + extent.sizes[j])
            })
        });
        if !spans_rest {
            continue;
        }
        let mut spans: Vec<(u64, u64)> = chunks
            .iter()
            .map(|c| (c.offsets[d], c.offsets[d] + c.sizes[d]))
            .collect();
        spans.sort_unstable();
        let (lo, hi) = (extent.offsets[d], extent.offsets[d] + extent.sizes[d]);
        let mut at = lo;
        let mut gaps = Vec::new();
        for (a, b) in spans {
            if a > at {
                gaps.push(format!("{at}..{}", a.min(hi)));
            }
            at = at.max(b);
        }
        if at < hi {
            gaps.push(format!("{at}..{hi}"));
        }
        if !gaps.is_empty() {
            return format!(
                "indices {} of dimension {d} are in no stored chunk",
                gaps.join(", ")
            );
        }
    }
    format!("the stored chunks hold {covered} of its {total} elements")
}

impl Layout {
    /// Lays out the export of `selected` (with the regions of entries selected only through
    /// regions exported as tensors of their own).
    pub fn build(
        ck: &Checkpoint,
        selected: &[Selected],
        regions: &[Region],
        opts: &ExportOptions,
    ) -> Result<Layout, LayoutError> {
        let mut tensors: Vec<Tensor> = Vec::new();
        let mut sources: Vec<Vec<(usize, Placement)>> = Vec::new();
        let mut skipped = Vec::new();
        for sel in selected {
            let e = &ck.entries[sel.entry];
            let Some(t) = &e.tensor else {
                skipped.push(Skipped {
                    fqn: e.fqn.to_string(),
                    reason: "a bytes entry, not a tensor".into(),
                });
                continue;
            };
            let (Some(code), Some(elem)) = (opts.code(&t.dtype), dtype::element_size(&t.dtype))
            else {
                if !opts.skip_unsupported {
                    return Err(LayoutError::Unsupported {
                        fqn: e.fqn.to_string(),
                        dtype: t.dtype.to_string(),
                        format: opts.format_name(),
                    });
                }
                skipped.push(Skipped {
                    fqn: e.fqn.to_string(),
                    reason: format!("{} cannot hold {}", opts.format_name(), t.dtype),
                });
                continue;
            };
            let extents: Vec<Extent> = if sel.whole {
                vec![Extent::whole(&t.shape)]
            } else {
                regions
                    .iter()
                    .filter(|r| *r.fqn == *e.fqn)
                    .map(|r| Extent {
                        offsets: r.offsets.clone(),
                        sizes: r.sizes.clone(),
                    })
                    .collect()
            };
            for extent in extents {
                let total = extent.numel().ok_or(LayoutError::Overflow {
                    fqn: e.fqn.to_string(),
                })?;
                let len = total.checked_mul(elem).ok_or(LayoutError::Overflow {
                    fqn: e.fqn.to_string(),
                })?;
                let mut feeds = Vec::new();
                let mut held = Vec::new();
                let mut covered = 0u64;
                for &c in &sel.chunks {
                    let chunk = &e.chunks[c];
                    let (Some(offsets), Some(sizes)) = (&chunk.offsets, &chunk.sizes) else {
                        continue;
                    };
                    let Some(&storage) = chunk.storage.first() else {
                        continue;
                    };
                    let box_ = Extent {
                        offsets: offsets.to_vec(),
                        sizes: sizes.to_vec(),
                    };
                    let Some(inter) = box_.intersect(&extent) else {
                        continue;
                    };
                    // A stored item holds at least its chunk's data (unless compressed): a
                    // chunk claimed larger is refused before any file is sized for it.
                    let info = &ck.storage[storage].info;
                    let raw = box_.numel().and_then(|n| n.checked_mul(elem));
                    if info.transform_descriptors.is_empty()
                        && raw.is_none_or(|raw| raw > info.length)
                    {
                        return Err(LayoutError::Incomplete {
                            fqn: e.fqn.to_string(),
                            detail: format!(
                                "the chunk at {offsets:?} of sizes {sizes:?} needs {} bytes, but its stored item ({} bytes {}..) holds {}",
                                raw.map_or_else(|| "more than 2^64".into(), |r| r.to_string()),
                                info.relative_path,
                                info.offset,
                                info.length
                            ),
                        });
                    }
                    let placement =
                        Placement::new(&box_, &extent, elem).ok_or(LayoutError::Overflow {
                            fqn: e.fqn.to_string(),
                        })?;
                    covered = covered.saturating_add(inter.numel().unwrap_or(u64::MAX));
                    held.push(inter);
                    feeds.push((storage, placement));
                }
                if covered < total {
                    return Err(LayoutError::Incomplete {
                        fqn: e.fqn.to_string(),
                        detail: missing(&extent, &held, covered, total),
                    });
                }
                tensors.push(Tensor {
                    name: opts.name(&e.fqn),
                    fqn: e.fqn.to_string(),
                    dtype: t.dtype.to_string(),
                    code,
                    extent,
                    elem,
                    len,
                    file: 0,
                    offset: 0,
                });
                // An empty tensor reads nothing.
                sources.push(if len == 0 { Vec::new() } else { feeds });
            }
        }
        if tensors.is_empty() {
            let why: Vec<String> = skipped
                .iter()
                .take(3)
                .map(|s| format!("{}: {}", s.fqn, s.reason))
                .collect();
            return Err(LayoutError::Nothing(why.join("; ")));
        }
        if opts.format == Format::Npy && tensors.len() != 1 {
            return Err(LayoutError::NotOne(tensors.len()));
        }
        let mut names: HashMap<&str, &str> = HashMap::new();
        for t in &tensors {
            if let Some(other) = names.insert(&t.name, &t.fqn) {
                return Err(LayoutError::SameName {
                    name: t.name.clone(),
                    fqn: other.to_owned(),
                    other: t.fqn.clone(),
                });
            }
        }

        // Order: wider elements first (so every tensor starts aligned to its element size, as
        // safetensors' own writer does), then where the tensor's bytes are in the checkpoint. A
        // stream takes the second order only: it writes in the order it reads.
        let first_read: Vec<Option<(&str, u64)>> = sources
            .iter()
            .map(|feeds| {
                feeds
                    .iter()
                    .map(|(s, _)| {
                        let info = &ck.storage[*s].info;
                        (&*info.relative_path, info.offset)
                    })
                    .min_by(|a, b| natural_cmp(a.0, b.0).then(a.1.cmp(&b.1)))
            })
            .collect();
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        let width = |i: usize| if opts.read_order { 0 } else { tensors[i].elem };
        order.sort_by(|&a, &b| {
            width(b)
                .cmp(&width(a))
                .then_with(|| match (first_read[a], first_read[b]) {
                    (Some(x), Some(y)) => natural_cmp(x.0, y.0).then(x.1.cmp(&y.1)),
                    (x, y) => x.is_some().cmp(&y.is_some()).reverse(),
                })
        });
        let tensors: Vec<Tensor> = order.iter().map(|&i| tensors[i].clone()).collect();
        let mut sources: Vec<Option<Vec<(usize, Placement)>>> =
            sources.into_iter().map(Some).collect();
        let sources: Vec<Vec<(usize, Placement)>> = order
            .iter()
            .map(|&i| sources[i].take().expect("each tensor once"))
            .collect();

        let mut layout = Layout {
            format: opts.format,
            tensors,
            files: Vec::new(),
            feeds: HashMap::new(),
            skipped,
        };
        layout.place_in_files(opts.max_shard_size)?;
        for (i, feeds) in sources.into_iter().enumerate() {
            for (storage, placement) in feeds {
                layout.feeds.entry(storage).or_default().push(Feed {
                    tensor: i,
                    placement,
                });
            }
        }
        Ok(layout)
    }

    /// Puts the tensors, in order, into files of at most `max` bytes of data (one file without a
    /// limit; a tensor larger than the limit gets a file of its own), and writes their headers.
    fn place_in_files(&mut self, max: Option<u64>) -> Result<(), LayoutError> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut size = 0u64;
        for (i, t) in self.tensors.iter().enumerate() {
            let start_new = match (groups.last(), max) {
                (None, _) => true,
                (Some(g), Some(max)) => !g.is_empty() && size.saturating_add(t.len) > max,
                (Some(_), None) => false,
            };
            if start_new {
                groups.push(Vec::new());
                size = 0;
            }
            groups.last_mut().expect("pushed").push(i);
            size = size
                .checked_add(t.len)
                .ok_or(LayoutError::Overflow { fqn: t.fqn.clone() })?;
        }
        let count = groups.len();
        for (f, group) in groups.into_iter().enumerate() {
            let mut at = 0u64;
            for &i in &group {
                let t = &mut self.tensors[i];
                t.file = f;
                t.offset = at;
                at += t.len;
            }
            let header = match self.format {
                Format::Safetensors => format::safetensors_header(
                    &group
                        .iter()
                        .map(|&i| {
                            let t = &self.tensors[i];
                            format::Entry {
                                name: &t.name,
                                dtype: t.code,
                                shape: &t.extent.sizes,
                                data: (t.offset, t.offset + t.len),
                            }
                        })
                        .collect::<Vec<_>>(),
                ),
                Format::Npy => {
                    let t = &self.tensors[group[0]];
                    format::npy_header(t.code, &t.extent.sizes).ok_or_else(|| {
                        LayoutError::NpyHeader {
                            name: t.name.clone(),
                        }
                    })?
                }
            };
            let name = if max.is_some() {
                format!("model-{:05}-of-{count:05}.safetensors", f + 1)
            } else {
                String::new()
            };
            self.files.push(OutFile {
                name,
                header,
                data_len: at,
            });
        }
        Ok(())
    }

    /// The stored copies to read.
    pub fn storage(&self) -> Vec<usize> {
        let mut s: Vec<usize> = self.feeds.keys().copied().collect();
        s.sort_unstable();
        s
    }

    /// Bytes of tensor data the export writes.
    pub fn data_len(&self) -> u64 {
        self.files.iter().map(|f| f.data_len).sum()
    }
}
