//! The checks over the metadata alone: pure functions of the checkpoint and the selection.

use std::collections::HashMap;

use super::{Check, Checks, Finding};
use crate::metadata::Checkpoint;
use crate::plan::describe_storage;
use crate::selection::{Selected, stored_copies};
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
    let mut out: Vec<usize> = stored_copies(ck, selected).collect();
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
                    fqn: Some(e.fqn.to_string()),
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
                fqn: Some(e.fqn.to_string()),
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
/// coverage). Element counts are computed with checked arithmetic: a shape whose element count
/// does not fit in 128 bits is a problem in itself (torch counts elements in an `int64`).
///
/// Disjointness is decided exactly by a sweep ([`first_overlap`]): O(n log n) for chunks on a
/// grid, as torch's sharding writes them.
pub fn tiling_problem<'a>(
    shape: &[u64],
    chunks: impl Iterator<Item = (&'a [u64], &'a [u64])>,
) -> Option<String> {
    let chunks: Vec<(&[u64], &[u64])> = chunks.collect();
    let Some(total) = volume(shape) else {
        return Some(format!(
            "the shape {shape:?} has more elements than can be counted: no tensor has that many"
        ));
    };
    let mut sum: Option<u128> = Some(0);
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
        // Inside the bounds, a chunk holds at most `total` elements; the sum may still overflow.
        sum = sum.and_then(|n| n.checked_add(volume(s)?));
    }
    let boxes: Vec<(&[u64], &[u64])> = chunks
        .iter()
        .copied()
        .filter(|(_, s)| s.iter().all(|&d| d > 0))
        .collect();
    if let Some((a, b)) = first_overlap(&boxes) {
        let ((ao, asz), (bo, bsz)) = (boxes[a], boxes[b]);
        return Some(format!(
            "the chunks at {ao:?} (size {asz:?}) and {bo:?} (size {bsz:?}) overlap"
        ));
    }
    if shape.is_empty() && chunks.is_empty() {
        return Some("a 0-dim tensor without a chunk".into());
    }
    match sum {
        Some(sum) if sum == total => None,
        Some(sum) => Some(format!(
            "the chunks hold {sum} elements but the shape {shape:?} has {total}: part of the tensor is not stored"
        )),
        None => Some(format!(
            "the chunks hold more elements than the {total} of the shape {shape:?}"
        )),
    }
}

/// The number of elements of a box of these sizes; `None` when it does not fit in a `u128`.
fn volume(sizes: &[u64]) -> Option<u128> {
    sizes
        .iter()
        .try_fold(1u128, |n, &d| n.checked_mul(u128::from(d)))
}

/// Two non-empty boxes (half-open, all of the same rank, every size above 0) that overlap, as
/// indexes into `boxes`, if any do.
///
/// A sweep over the first dimension: at each coordinate where boxes start, the boxes that
/// contain that coordinate (the active ones) must be disjoint in the remaining dimensions, which
/// is the same question one dimension down. Where no box starts, the active boxes are a subset of
/// ones already found disjoint and nothing is checked. The last dimension sorts by start and
/// compares neighbours. Exact: two boxes overlap iff both are active where the later one starts
/// and they overlap in the other dimensions. Each box is re-checked once per start coordinate in
/// its span, so chunks on a grid cost O(n log n).
pub fn first_overlap(boxes: &[(&[u64], &[u64])]) -> Option<(usize, usize)> {
    let all: Vec<usize> = (0..boxes.len()).collect();
    overlap_in(boxes, &all, 0)
}

fn overlap_in(boxes: &[(&[u64], &[u64])], ids: &[usize], dim: usize) -> Option<(usize, usize)> {
    if ids.len() < 2 {
        return None;
    }
    let rank = boxes[ids[0]].0.len();
    if dim >= rank {
        // Every dimension overlaps (a 0-dim tensor has one element: two chunks share it).
        return Some((ids[0], ids[1]));
    }
    let start = |i: usize| boxes[i].0[dim];
    // In bounds, so `offset + size` does not overflow; saturate all the same.
    let end = |i: usize| boxes[i].0[dim].saturating_add(boxes[i].1[dim]);
    let mut sorted = ids.to_vec();
    sorted.sort_unstable_by_key(|&i| (start(i), i));
    if dim + 1 == rank {
        return sorted
            .windows(2)
            .find(|w| start(w[1]) < end(w[0]))
            .map(|w| (w[0].min(w[1]), w[0].max(w[1])));
    }
    let mut active: Vec<usize> = Vec::new();
    let mut k = 0;
    while k < sorted.len() {
        let at = start(sorted[k]);
        active.retain(|&i| end(i) > at);
        while k < sorted.len() && start(sorted[k]) == at {
            active.push(sorted[k]);
            k += 1;
        }
        if let Some(pair) = overlap_in(boxes, &active, dim + 1) {
            return Some(pair);
        }
    }
    None
}

/// `items.archive`, from the metadata alone: an item of 0 bytes cannot be a `torch.save`
/// archive (which is never empty), unless it is the raw data of a chunk without elements (a
/// `serialization_format=SAFETENSORS` save of an empty tensor). A tensor chunk with elements, or
/// a bytes entry, stored in 0 bytes is a problem; the byte checks never see such an item.
pub fn check_empty_items(ck: &Checkpoint, storage: &[usize], checks: &mut Checks) {
    let problems: Vec<Finding> = storage
        .iter()
        .copied()
        .filter(|&s| ck.storage[s].info.length == 0)
        .filter_map(|s| {
            let what = match (ck.entry_of(s), ck.chunk_of(s)) {
                (Some(e), Some(c)) if e.tensor.is_some() => match c.numel() {
                    Some(0) => return None,
                    Some(n) => format!("a chunk of {n} elements"),
                    None => "a chunk of more elements than can be counted".to_owned(),
                },
                (Some(_), Some(_)) => "a bytes entry".to_owned(),
                // A copy no chunk refers to is reported by storage.linked.
                _ => return None,
            };
            Some(Finding::item(
                ck,
                s,
                format!("{what} is stored in 0 bytes: no torch.save archive is that short"),
            ))
        })
        .collect();
    if !problems.is_empty() {
        checks.record(Check::ItemsArchive, problems.len() as u64, problems);
    }
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
            (&[], &[(&[], &[]), (&[], &[])], "overlap"),
            // 2^62 * 2^62 * 256 wraps to 0 in 128 bits: an empty chunk must not pass.
            (
                &[1 << 62, 1 << 62, 256],
                &[(&[0, 0, 0], &[0, 0, 0])],
                "more elements than can be counted",
            ),
            (
                &[1 << 62, 1 << 62, 256],
                &[],
                "more elements than can be counted",
            ),
            // A chunk inside three others' span, touching none of their starts.
            (
                &[4, 4, 4],
                &[
                    (&[0, 0, 0], &[4, 4, 2]),
                    (&[0, 0, 2], &[4, 4, 2]),
                    (&[1, 1, 1], &[1, 1, 1]),
                ],
                "overlap",
            ),
        ];
        for (shape, chunks, needle) in bad {
            let p = tiling_problem(shape, chunks.iter().copied()).unwrap();
            assert!(p.contains(needle), "{p}");
        }
    }

    /// The method the sweep replaced: every pair of non-empty boxes.
    fn pairwise_overlap(boxes: &[(&[u64], &[u64])]) -> bool {
        (0..boxes.len()).any(|i| {
            (i + 1..boxes.len()).any(|j| {
                let ((ao, asz), (bo, bsz)) = (boxes[i], boxes[j]);
                (0..ao.len()).all(|d| ao[d].max(bo[d]) < (ao[d] + asz[d]).min(bo[d] + bsz[d]))
            })
        })
    }

    #[test]
    fn a_hundred_thousand_chunks_tile_in_linearithmic_time() {
        // shape [100, 1000] as 100,000 chunks of [1, 1], listed in a scrambled order.
        let coords: Vec<[u64; 2]> = (0..100_000u64)
            .map(|i| (i * 7919) % 100_000)
            .map(|i| [i / 1000, i % 1000])
            .collect();
        let ones = [1u64, 1];
        let started = std::time::Instant::now();
        let problem = tiling_problem(&[100, 1000], coords.iter().map(|o| (&o[..], &ones[..])));
        let took = started.elapsed();
        assert_eq!(problem, None);
        assert!(took.as_secs_f64() < 1.0, "{took:?}");
        // One row of 100,000 chunks: the pairwise test made 5 * 10^9 comparisons here.
        let row: Vec<[u64; 2]> = (0..100_000u64).rev().map(|i| [0, i]).collect();
        let started = std::time::Instant::now();
        let problem = tiling_problem(&[1, 100_000], row.iter().map(|o| (&o[..], &ones[..])));
        assert_eq!(problem, None);
        assert!(
            started.elapsed().as_secs_f64() < 1.0,
            "{:?}",
            started.elapsed()
        );
        // One chunk moved onto another's place: found, and still fast.
        let mut bad = coords.clone();
        bad[50_000] = bad[70_000];
        let started = std::time::Instant::now();
        let problem = tiling_problem(&[100, 1000], bad.iter().map(|o| (&o[..], &ones[..])));
        assert!(problem.unwrap().contains("overlap"));
        assert!(started.elapsed().as_secs_f64() < 1.0);
    }

    /// Small random boxes in up to 3 dimensions.
    /// A rank and boxes of that rank: (offsets, sizes) each.
    type RankedBoxes = (usize, Vec<(Vec<u64>, Vec<u64>)>);

    fn boxes_strategy() -> impl Strategy<Value = RankedBoxes> {
        (1usize..=3).prop_flat_map(|rank| {
            let one = (
                proptest::collection::vec(0u64..5, rank),
                proptest::collection::vec(1u64..4, rank),
            );
            (Just(rank), proptest::collection::vec(one, 0..12))
        })
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn sweep_agrees_with_pairwise((_rank, boxes) in boxes_strategy()) {
            let refs: Vec<(&[u64], &[u64])> =
                boxes.iter().map(|(o, s)| (&o[..], &s[..])).collect();
            let found = first_overlap(&refs);
            prop_assert_eq!(found.is_some(), pairwise_overlap(&refs));
            if let Some((a, b)) = found {
                prop_assert!(a != b);
                prop_assert!(pairwise_overlap(&[refs[a], refs[b]]));
            }
        }

        #[test]
        fn tiling_agrees_with_pairwise(
            (rank, boxes) in boxes_strategy(),
        ) {
            // Chunks clipped to a shape of 6 per dimension, as tiling_problem sees them.
            let shape = vec![6u64; rank];
            let refs: Vec<(&[u64], &[u64])> =
                boxes.iter().map(|(o, s)| (&o[..], &s[..])).collect();
            let got = tiling_problem(&shape, refs.iter().copied());
            let in_bounds = refs.iter().all(|(o, s)| (0..rank).all(|d| o[d] + s[d] <= 6));
            let sum: u128 = refs.iter().map(|(_, s)| s.iter().map(|&d| d as u128).product::<u128>()).sum();
            let expect_ok = in_bounds && !pairwise_overlap(&refs) && sum == 6u128.pow(rank as u32);
            prop_assert_eq!(got.is_none(), expect_ok, "{:?}", got);
        }
    }
}
