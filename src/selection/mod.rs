//! What a person asks for: globs over flattened fqns, exclusions, and regions of tensors.
//!
//! A selection is resolved against a [`Checkpoint`] into the chunks to fetch. It is a pure
//! function of the two; the command line (`--select`, `--exclude`) and a JSON spec file (`--spec`)
//! both build the same [`Spec`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod glob;

use crate::metadata::Checkpoint;
use glob::Glob;

/// A selection as written in a spec file: see docs/selection.md.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Globs over fqns; an entry matching any of them is selected whole.
    #[serde(default)]
    pub select: Vec<String>,
    /// Globs over fqns; an entry matching any of them is never selected.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Boxes of tensors: only the chunks that intersect a box are selected.
    #[serde(default)]
    pub regions: Vec<Region>,
}

/// A box of a tensor: `offsets[d] .. offsets[d] + sizes[d]` in every dimension `d`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub fqn: String,
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
}

/// One selected entry and the chunks of it that are needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// Index into [`Checkpoint::entries`].
    pub entry: usize,
    /// Indexes into that entry's chunks, ascending.
    pub chunks: Vec<usize>,
    /// Selected whole (by a glob, or by selecting everything), not only through regions.
    pub whole: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    #[error("invalid glob {pattern:?}: {detail}")]
    BadGlob { pattern: String, detail: String },
    #[error("cannot read the spec file {path}: {detail}")]
    SpecFile { path: String, detail: String },
    #[error("region for {fqn:?}: {detail}")]
    BadRegion { fqn: String, detail: String },
    #[error("the selection matches nothing in the checkpoint ({patterns}){}", suggestions_text(.suggestions))]
    NothingMatched {
        patterns: String,
        suggestions: Vec<String>,
    },
}

fn suggestions_text(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(
            "; did you mean {}?",
            s.iter()
                .map(|x| format!("{x:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

impl Spec {
    /// Reads a spec file (JSON).
    pub fn from_file(path: &Path) -> Result<Spec, SelectionError> {
        let text = std::fs::read_to_string(path).map_err(|e| SelectionError::SpecFile {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| SelectionError::SpecFile {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
    }

    /// Adds command-line globs to the spec.
    pub fn with_globs(mut self, select: &[String], exclude: &[String]) -> Spec {
        self.select.extend(select.iter().cloned());
        self.exclude.extend(exclude.iter().cloned());
        self
    }

    /// Whether the spec selects everything (no include globs and no regions).
    pub fn selects_all(&self) -> bool {
        self.select.is_empty() && self.regions.is_empty()
    }

    /// The entries and chunks the spec selects, in checkpoint order. Warnings (a glob that matched
    /// nothing while others did) are returned beside the result.
    pub fn resolve(&self, ck: &Checkpoint) -> Result<(Vec<Selected>, Vec<String>), SelectionError> {
        let include = build_set(&self.select)?;
        let exclude = build_set(&self.exclude)?;
        let mut hits = vec![0usize; self.select.len()];

        // Regions by fqn, checked against the entries they name.
        let mut regions: BTreeMap<&str, Vec<&Region>> = BTreeMap::new();
        for r in &self.regions {
            regions.entry(&*r.fqn).or_default().push(r);
        }
        let by_fqn: std::collections::HashMap<&str, &crate::metadata::Entry> = if regions.is_empty()
        {
            Default::default()
        } else {
            ck.entries.iter().map(|e| (&*e.fqn, e)).collect()
        };
        for (fqn, rs) in &regions {
            let Some(entry) = by_fqn.get(fqn) else {
                return Err(SelectionError::BadRegion {
                    fqn: fqn.to_string(),
                    detail: format!("no such entry{}", suggestions_text(&near_misses(fqn, ck))),
                });
            };
            let Some(t) = &entry.tensor else {
                return Err(SelectionError::BadRegion {
                    fqn: fqn.to_string(),
                    detail: "it is a bytes entry, which has no regions".into(),
                });
            };
            for r in rs {
                check_region(r, &t.shape)?;
            }
        }

        let mut out = Vec::new();
        for (i, e) in ck.entries.iter().enumerate() {
            if exclude.iter().any(|g| g.is_match(&e.fqn)) {
                continue;
            }
            let matched: Vec<usize> = (0..include.len())
                .filter(|&i| include[i].is_match(&e.fqn))
                .collect();
            for m in &matched {
                hits[*m] += 1;
            }
            let whole = !matched.is_empty() || self.selects_all();
            let chunks: Vec<usize> = if whole {
                (0..e.chunks.len()).collect()
            } else if let Some(rs) = regions.get(&*e.fqn) {
                e.chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| match (&c.offsets, &c.sizes) {
                        (Some(o), Some(s)) => {
                            rs.iter().any(|r| intersects(o, s, &r.offsets, &r.sizes))
                        }
                        _ => false,
                    })
                    .map(|(j, _)| j)
                    .collect()
            } else {
                continue;
            };
            out.push(Selected {
                entry: i,
                chunks,
                whole,
            });
        }

        if out.is_empty() {
            let mut words: Vec<String> = self
                .select
                .iter()
                .map(|p| format!("--select {p:?}"))
                .collect();
            words.extend(self.exclude.iter().map(|p| format!("--exclude {p:?}")));
            words.extend(
                self.regions
                    .iter()
                    .map(|r| format!("region of {:?}", r.fqn)),
            );
            let mut suggestions: Vec<String> = Vec::new();
            for p in &self.select {
                for s in near_misses(p, ck) {
                    if !suggestions.contains(&s) {
                        suggestions.push(s);
                    }
                }
            }
            suggestions.truncate(5);
            return Err(SelectionError::NothingMatched {
                patterns: match words.len() {
                    0 => "the checkpoint has no entries".into(),
                    n if n > 5 => format!("{} and {} more", words[..5].join(", "), n - 5),
                    _ => words.join(", "),
                },
                suggestions,
            });
        }
        let warnings = self
            .select
            .iter()
            .zip(&hits)
            .filter(|(_, n)| **n == 0)
            .map(|(p, _)| {
                format!(
                    "--select {p:?} matched nothing{}",
                    suggestions_text(&near_misses(p, ck))
                )
            })
            .collect();
        Ok((out, warnings))
    }
}

/// Compiles each pattern.
fn build_set(patterns: &[String]) -> Result<Vec<Glob>, SelectionError> {
    patterns
        .iter()
        .map(|p| {
            Glob::new(p).map_err(|e| SelectionError::BadGlob {
                pattern: p.clone(),
                detail: e.to_string(),
            })
        })
        .collect()
}

fn check_region(r: &Region, shape: &[u64]) -> Result<(), SelectionError> {
    let bad = |detail: String| {
        Err(SelectionError::BadRegion {
            fqn: r.fqn.clone(),
            detail,
        })
    };
    if r.offsets.len() != shape.len() || r.sizes.len() != shape.len() {
        return bad(format!(
            "the tensor has {} dimensions (shape {shape:?}) but the region gives offsets {:?} and sizes {:?}",
            shape.len(),
            r.offsets,
            r.sizes
        ));
    }
    for d in 0..shape.len() {
        let end = r.offsets[d].checked_add(r.sizes[d]);
        if end.is_none_or(|end| end > shape[d]) {
            return bad(format!(
                "dimension {d}: {}..{} is outside 0..{} (shape {shape:?})",
                r.offsets[d],
                r.offsets[d].saturating_add(r.sizes[d]),
                shape[d]
            ));
        }
    }
    Ok(())
}

/// Whether two boxes share at least one element (empty boxes share none).
fn intersects(ao: &[u64], asz: &[u64], bo: &[u64], bsz: &[u64]) -> bool {
    if ao.len() != bo.len() {
        return false;
    }
    (0..ao.len()).all(|d| {
        let (a0, a1) = (ao[d], ao[d].saturating_add(asz[d]));
        let (b0, b1) = (bo[d], bo[d].saturating_add(bsz[d]));
        a0.max(b0) < a1.min(b1)
    }) || (ao.is_empty() && bo.is_empty())
}

/// The stored copies (indexes into [`Checkpoint::storage`]) of the selected chunks, in selection
/// order; a copy that several selected chunks share comes once per chunk.
pub fn stored_copies<'a>(
    ck: &'a Checkpoint,
    selected: &'a [Selected],
) -> impl Iterator<Item = usize> + 'a {
    selected.iter().flat_map(move |sel| {
        sel.chunks
            .iter()
            .flat_map(move |&c| ck.entries[sel.entry].chunks[c].storage.iter().copied())
    })
}

/// Up to three fqns that look like what a pattern meant.
pub fn near_misses(pattern: &str, ck: &Checkpoint) -> Vec<String> {
    let literal: String = pattern.chars().filter(|c| !"*?[]{}".contains(*c)).collect();
    // A plain prefix of fqns is most likely meant as `prefix.*`.
    let prefix = format!("{pattern}.");
    if !pattern.contains(['*', '?', '[', '{'])
        && ck.entries.iter().any(|e| e.fqn.starts_with(&prefix))
    {
        return vec![format!("{pattern}.*")];
    }
    let mut scored: Vec<(f64, &str)> = ck
        .entries
        .iter()
        .map(|e| (strsim::jaro_winkler(&literal, &e.fqn), &*e.fqn))
        .filter(|(s, _)| *s > 0.75)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored
        .into_iter()
        .take(3)
        .map(|(_, f)| f.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::model::TensorMeta;
    use crate::metadata::{Chunk, Entry};

    fn tensor(fqn: &str, shape: &[u64], chunk_rows: u64) -> Entry {
        let mut chunks = Vec::new();
        let mut row = 0;
        while row < shape[0] {
            let rows = chunk_rows.min(shape[0] - row);
            let mut offsets = vec![0; shape.len()];
            offsets[0] = row;
            let mut sizes = shape.to_vec();
            sizes[0] = rows;
            chunks.push(Chunk {
                offsets: Some(offsets.into()),
                sizes: Some(sizes.into()),
                storage: vec![],
            });
            row += rows;
        }
        Entry {
            fqn: fqn.into(),
            tensor: Some(TensorMeta {
                dtype: "float32".into(),
                layout: "strided".into(),
                requires_grad: false,
                memory_format: "contiguous_format".into(),
                pin_memory: false,
                strides: None,
                shape: shape.into(),
                chunks: vec![],
            }),
            chunks,
        }
    }

    fn ck() -> Checkpoint {
        Checkpoint {
            entries: vec![
                tensor("model.layers.0.attn.wq", &[8, 4], 4),
                tensor("model.layers.0.mlp.w1", &[8, 4], 8),
                tensor("model.layers.10.attn.wq", &[8, 4], 4),
                tensor("optim.state.model.layers.0.attn.wq.exp_avg", &[8, 4], 8),
                Entry {
                    fqn: "step".into(),
                    tensor: None,
                    chunks: vec![Chunk {
                        offsets: None,
                        sizes: None,
                        storage: vec![],
                    }],
                },
            ],
            ..Checkpoint::default()
        }
    }

    fn fqns(ck: &Checkpoint, sel: &[Selected]) -> Vec<String> {
        sel.iter()
            .map(|s| ck.entries[s.entry].fqn.to_string())
            .collect()
    }

    fn spec(select: &[&str], exclude: &[&str]) -> Spec {
        Spec {
            select: select.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            regions: vec![],
        }
    }

    #[test]
    fn globs_select_and_exclude() {
        let ck = ck();
        let table: &[(&[&str], &[&str], &[&str])] = &[
            (
                &[],
                &[],
                &[
                    "model.layers.0.attn.wq",
                    "model.layers.0.mlp.w1",
                    "model.layers.10.attn.wq",
                    "optim.state.model.layers.0.attn.wq.exp_avg",
                    "step",
                ],
            ),
            (
                &["model.*"],
                &[],
                &[
                    "model.layers.0.attn.wq",
                    "model.layers.0.mlp.w1",
                    "model.layers.10.attn.wq",
                ],
            ),
            (
                &["model.layers.*.attn.*"],
                &[],
                &["model.layers.0.attn.wq", "model.layers.10.attn.wq"],
            ),
            (
                &["model.layers.0.*"],
                &[],
                &["model.layers.0.attn.wq", "model.layers.0.mlp.w1"],
            ),
            (
                &[],
                &["optim.*"],
                &[
                    "model.layers.0.attn.wq",
                    "model.layers.0.mlp.w1",
                    "model.layers.10.attn.wq",
                    "step",
                ],
            ),
            (
                &["*wq*"],
                &["optim.*", "*.10.*"],
                &["model.layers.0.attn.wq"],
            ),
            (
                &["step", "model.layers.{0,10}.attn.wq"],
                &[],
                &["model.layers.0.attn.wq", "model.layers.10.attn.wq", "step"],
            ),
        ];
        for (select, exclude, want) in table {
            let (sel, _) = spec(select, exclude).resolve(&ck).unwrap();
            assert_eq!(fqns(&ck, &sel), *want, "{select:?} {exclude:?}");
        }
    }

    #[test]
    fn nothing_matched_suggests_near_misses() {
        let ck = ck();
        let e = spec(&["model.layers.0.atn.wq"], &[])
            .resolve(&ck)
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("matches nothing"), "{msg}");
        assert!(msg.contains("model.layers.0.attn.wq"), "{msg}");
        let e = spec(&["model.layers.0"], &[]).resolve(&ck).unwrap_err();
        assert!(e.to_string().contains("model.layers.0.*"), "{e}");
    }

    #[test]
    fn unmatched_glob_beside_matching_ones_warns() {
        let ck = ck();
        let (sel, warnings) = spec(&["step", "nope"], &[]).resolve(&ck).unwrap();
        assert_eq!(fqns(&ck, &sel), vec!["step"]);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("nope"));
    }

    #[test]
    fn regions_select_intersecting_chunks() {
        let ck = ck();
        let region = |offsets: &[u64], sizes: &[u64]| Spec {
            regions: vec![Region {
                fqn: "model.layers.0.attn.wq".into(),
                offsets: offsets.to_vec(),
                sizes: sizes.to_vec(),
            }],
            ..Spec::default()
        };
        let table: &[(&[u64], &[u64], &[usize])] = &[
            (&[0, 0], &[1, 1], &[0]),
            (&[3, 0], &[2, 4], &[0, 1]),
            (&[4, 2], &[4, 2], &[1]),
            (&[0, 0], &[8, 4], &[0, 1]),
        ];
        for (o, s, want) in table {
            let (sel, _) = region(o, s).resolve(&ck).unwrap();
            assert_eq!(sel.len(), 1);
            assert_eq!(sel[0].chunks, *want, "{o:?} {s:?}");
        }
        for (o, s, needle) in [
            (&[0u64, 0][..], &[9u64, 1][..], "outside"),
            (&[0], &[1], "2 dimensions"),
            (&[u64::MAX, 0], &[2, 1], "outside"),
        ] {
            let e = region(o, s).resolve(&ck).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        let bad = Spec {
            regions: vec![Region {
                fqn: "step".into(),
                offsets: vec![],
                sizes: vec![],
            }],
            ..Spec::default()
        };
        assert!(
            bad.resolve(&ck)
                .unwrap_err()
                .to_string()
                .contains("bytes entry")
        );
    }

    #[test]
    fn bad_globs_and_spec_fields_are_errors() {
        let ck = ck();
        assert!(spec(&["model.[x"], &[]).resolve(&ck).is_err());
        let e = serde_json::from_str::<Spec>(r#"{"selct": ["x"]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"));
    }
}
