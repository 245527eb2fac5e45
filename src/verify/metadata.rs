//! The checks over the metadata alone: pure functions of the checkpoint and the selection.

use std::collections::HashMap;

use super::{Check, Checks, Finding};
use crate::metadata::Checkpoint;
use crate::plan::describe_storage;
use crate::selection::Selected;
use crate::source::ObjectName;

/// `metadata.globals`: globals outside the known set are a failed check.
pub fn check_globals(ck: &Checkpoint, checks: &mut Checks) {
    let problems = ck
        .unsafe_globals
        .iter()
        .map(|f| Finding {
            file: Some(f.file.clone()),
            offset: Some(f.offset),
            length: None,
            fqn: None,
            message: f.to_string(),
        })
        .collect();
    checks.record(
        Check::MetadataGlobals,
        ck.metadata_files.len() as u64,
        problems,
    );
}

/// The storage entries of the selected chunks (and, with everything selected, the storage
/// entries that belong to no chunk).
pub fn selected_storage(ck: &Checkpoint, selected: &[Selected], everything: bool) -> Vec<usize> {
    let mut out: Vec<usize> = selected
        .iter()
        .flat_map(|s| {
            s.chunks
                .iter()
                .flat_map(move |&c| ck.entries[s.entry].chunks[c].storage.iter().copied())
        })
        .collect();
    if everything {
        let mut linked = vec![false; ck.storage.len()];
        for &i in &out {
            linked[i] = true;
        }
        out.extend((0..ck.storage.len()).filter(|i| !linked[*i]));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `storage.paths`: returns the storage entries whose names are safe.
pub fn check_paths(ck: &Checkpoint, storage: &[usize], checks: &mut Checks) -> Vec<usize> {
    let mut ok = Vec::new();
    let mut problems = Vec::new();
    for &s in storage {
        match ObjectName::new(&ck.storage[s].info.relative_path) {
            Ok(_) => ok.push(s),
            Err(e) => problems.push(Finding::item(ck, s, e.to_string())),
        }
    }
    checks.record(Check::StoragePaths, storage.len() as u64, problems);
    ok
}

/// `storage.linked` and `chunks.tile` over the selected entries.
pub fn check_chunks(ck: &Checkpoint, selected: &[Selected], everything: bool, checks: &mut Checks) {
    let mut linked = Vec::new();
    let mut tile = Vec::new();
    let mut entries = 0u64;
    for sel in selected {
        let e = &ck.entries[sel.entry];
        entries += 1;
        for &ci in &sel.chunks {
            let c = &e.chunks[ci];
            if c.storage.is_empty() {
                let what = match &c.offsets {
                    Some(o) => format!("chunk at offsets {o:?} has no storage entry"),
                    None => "the bytes entry has no storage entry".into(),
                };
                linked.push(Finding {
                    fqn: Some(e.fqn.clone()),
                    ..Finding::new(what)
                });
            }
        }
        if let Some(t) = &e.tensor
            && let Some(problem) = tiling_problem(
                &t.shape,
                e.chunks
                    .iter()
                    .filter_map(|c| Some((c.offsets.as_deref()?, c.sizes.as_deref()?))),
            )
        {
            tile.push(Finding {
                fqn: Some(e.fqn.clone()),
                ..Finding::new(problem)
            });
        }
    }
    if everything {
        let mut used = vec![false; ck.storage.len()];
        for e in &ck.entries {
            for c in &e.chunks {
                for &s in &c.storage {
                    used[s] = true;
                }
            }
        }
        for (i, u) in used.iter().enumerate() {
            if !u {
                linked.push(Finding::item(
                    ck,
                    i,
                    "this storage entry belongs to no entry or chunk of the metadata",
                ));
            }
        }
    }
    checks.record(Check::StorageLinked, entries, linked);
    checks.record(Check::ChunksTile, entries, tile);
}

/// Why chunks do not tile a shape exactly, if they do not: each inside the bounds, pairwise
/// disjoint, and together as many elements as the shape (which with disjointness means full
/// coverage).
pub fn tiling_problem<'a>(
    shape: &[u64],
    chunks: impl Iterator<Item = (&'a [u64], &'a [u64])>,
) -> Option<String> {
    let chunks: Vec<(&[u64], &[u64])> = chunks.collect();
    let total: u128 = shape.iter().map(|&d| d as u128).product();
    let mut sum: u128 = 0;
    for (o, s) in &chunks {
        if o.len() != shape.len() || s.len() != shape.len() {
            return Some(format!(
                "a chunk at {o:?} of size {s:?} does not have the tensor's {} dimensions",
                shape.len()
            ));
        }
        for d in 0..shape.len() {
            if o[d].checked_add(s[d]).is_none_or(|end| end > shape[d]) {
                return Some(format!(
                    "the chunk at {o:?} of size {s:?} reaches past the shape {shape:?}"
                ));
            }
        }
        sum += s.iter().map(|&d| d as u128).product::<u128>();
    }
    // Pairwise overlap of non-empty boxes. Sorting by the first dimension lets most pairs be
    // skipped; the worst case stays quadratic in the number of chunks of one tensor.
    let mut boxes: Vec<&(&[u64], &[u64])> = chunks
        .iter()
        .filter(|(_, s)| s.iter().all(|&d| d > 0))
        .collect();
    boxes.sort_by_key(|(o, _)| o.first().copied().unwrap_or(0));
    for i in 0..boxes.len() {
        for j in i + 1..boxes.len() {
            let (ao, asz) = boxes[i];
            let (bo, bsz) = boxes[j];
            if !ao.is_empty() && bo[0] >= ao[0] + asz[0] {
                break;
            }
            if (0..ao.len()).all(|d| ao[d].max(bo[d]) < (ao[d] + asz[d]).min(bo[d] + bsz[d])) {
                return Some(format!(
                    "the chunks at {ao:?} (size {asz:?}) and {bo:?} (size {bsz:?}) overlap"
                ));
            }
        }
    }
    if shape.is_empty() && chunks.is_empty() {
        return Some("a 0-dim tensor without a chunk".into());
    }
    if sum != total {
        return Some(format!(
            "the chunks hold {sum} elements but the shape {shape:?} has {total}: part of the tensor is not stored"
        ));
    }
    None
}

/// `storage.no_overlap`: distinct items of one file overlap. Returns the storage entries
/// involved, which the byte checks then skip.
pub fn check_overlaps(ck: &Checkpoint, storage: &[usize], checks: &mut Checks) -> Vec<usize> {
    let mut by_file: HashMap<&str, Vec<usize>> = HashMap::new();
    for &s in storage {
        by_file
            .entry(&ck.storage[s].info.relative_path)
            .or_default()
            .push(s);
    }
    let mut problems = Vec::new();
    let mut bad = Vec::new();
    let mut files: Vec<_> = by_file.into_iter().collect();
    files.sort();
    for (_, mut items) in files {
        items.sort_by_key(|&s| (ck.storage[s].info.offset, ck.storage[s].info.length));
        let mut reach: Option<(u64, usize)> = None;
        for &s in &items {
            let info = &ck.storage[s].info;
            let Some(end) = info.offset.checked_add(info.length) else {
                continue;
            };
            if let Some((prev_end, prev)) = reach {
                let p = &ck.storage[prev].info;
                let identical = p.offset == info.offset && p.length == info.length;
                if info.offset < prev_end && !identical && info.length > 0 {
                    problems.push(Finding::item(
                        ck,
                        s,
                        format!(
                            "bytes {}..{} overlap bytes {}..{} of {}",
                            info.offset,
                            end,
                            p.offset,
                            p.offset + p.length,
                            describe_storage(ck, prev)
                        ),
                    ));
                    bad.push(s);
                    bad.push(prev);
                }
            }
            if reach.is_none_or(|(e, _)| end > e) {
                reach = Some((end, s));
            }
        }
    }
    checks.record(Check::StorageNoOverlap, storage.len() as u64, problems);
    bad.sort_unstable();
    bad.dedup();
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    type Boxes<'a> = &'a [(&'a [u64], &'a [u64])];

    #[test]
    fn tiling_cases() {
        let ok: &[(&[u64], Boxes)] = &[
            (&[5, 6], &[(&[0, 0], &[3, 6]), (&[3, 0], &[2, 6])]),
            (&[4, 7], &[(&[0, 0], &[4, 4]), (&[0, 4], &[4, 3])]),
            (&[], &[(&[], &[])]),
            (&[0, 3], &[(&[0, 0], &[0, 3])]),
            (&[1, 4], &[(&[0, 0], &[1, 4]), (&[1, 0], &[0, 4])]),
        ];
        for (shape, chunks) in ok {
            assert_eq!(
                tiling_problem(shape, chunks.iter().copied()),
                None,
                "{shape:?}"
            );
        }
        let bad: &[(&[u64], Boxes, &str)] = &[
            (&[5, 6], &[(&[0, 0], &[3, 6])], "not stored"),
            (
                &[5, 6],
                &[(&[0, 0], &[3, 6]), (&[2, 0], &[3, 6])],
                "overlap",
            ),
            (&[5, 6], &[(&[0, 0], &[6, 6])], "past the shape"),
            (&[5, 6], &[(&[0], &[5])], "dimensions"),
            (&[], &[], "without a chunk"),
        ];
        for (shape, chunks, needle) in bad {
            let p = tiling_problem(shape, chunks.iter().copied()).unwrap();
            assert!(p.contains(needle), "{p}");
        }
    }
}
