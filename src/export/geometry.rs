//! Where the bytes of one stored chunk go in an exported tensor.
//!
//! A chunk is a box of the full tensor (its `offsets` and `sizes` in `.metadata`); an exported
//! tensor is a box too (the whole tensor, or a region). Both are row-major, so the part of the
//! chunk inside the export is a set of runs, each contiguous in the chunk's bytes and in the
//! export's: the dimensions after the last one where the two boxes differ travel whole, and every
//! index of the dimensions before it starts a run. Shard(0) of a tensor is one run; Shard(1) of a
//! matrix is one run per row.

use std::ops::Range;

/// A box of a tensor: `offsets[d] .. offsets[d] + sizes[d]` in every dimension `d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
}

impl Extent {
    /// The box of a whole tensor of `shape`.
    pub fn whole(shape: &[u64]) -> Extent {
        Extent {
            offsets: vec![0; shape.len()],
            sizes: shape.to_vec(),
        }
    }

    /// Elements in the box; `None` when the product overflows.
    pub fn numel(&self) -> Option<u64> {
        self.sizes.iter().try_fold(1u64, |n, &s| n.checked_mul(s))
    }

    /// The box both boxes hold; `None` when they do not meet (or differ in dimensions).
    pub fn intersect(&self, other: &Extent) -> Option<Extent> {
        if self.sizes.len() != other.sizes.len() || self.offsets.len() != self.sizes.len() {
            return None;
        }
        let mut out = Extent {
            offsets: Vec::with_capacity(self.sizes.len()),
            sizes: Vec::with_capacity(self.sizes.len()),
        };
        for d in 0..self.sizes.len() {
            let lo = self.offsets[d].max(other.offsets[d]);
            let hi = self.offsets[d]
                .saturating_add(self.sizes[d])
                .min(other.offsets[d].saturating_add(other.sizes[d]));
            if lo >= hi {
                return None;
            }
            out.offsets.push(lo);
            out.sizes.push(hi - lo);
        }
        Some(out)
    }
}

/// One dimension before the run: the chunk's size in it, the chunk indices inside the export, and
/// the bytes one step moves in the export.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outer {
    size: u64,
    inside: Range<u64>,
    /// Export index of chunk index 0 (may be negative: the chunk starts before the export).
    shift: i128,
    step: u64,
}

/// How the row-major bytes of one chunk map into the row-major bytes of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    outer: Vec<Outer>,
    /// Chunk bytes per row (one index of every outer dimension).
    row_bytes: u64,
    /// The bytes of a row inside the export.
    run: Range<u64>,
    /// Export byte of the run's start, before the outer dimensions' part.
    out_start: u64,
}

impl Placement {
    /// The placement of `chunk` into `export` (boxes of one tensor, elements of `elem` bytes);
    /// `None` when the chunk holds nothing of the export, the boxes differ in dimensions, or a
    /// size in bytes overflows.
    pub fn new(chunk: &Extent, export: &Extent, elem: u64) -> Option<Placement> {
        let n = chunk.sizes.len();
        let inter = chunk.intersect(export)?;
        if n == 0 {
            return Some(Placement {
                outer: Vec::new(),
                row_bytes: elem,
                run: 0..elem,
                out_start: 0,
            });
        }
        // Element steps of the export's dimensions.
        let mut steps = vec![0u64; n];
        let mut s = 1u64;
        for d in (0..n).rev() {
            steps[d] = s;
            s = s.checked_mul(export.sizes[d])?;
        }
        // The run's dimension: the last one where chunk and export differ.
        let k = (0..n)
            .rev()
            .find(|&d| chunk.offsets[d] != export.offsets[d] || chunk.sizes[d] != export.sizes[d])
            .unwrap_or(0);
        let inner: u64 = chunk.sizes[k + 1..]
            .iter()
            .try_fold(elem, |p, &x| p.checked_mul(x))?;
        let row_bytes = chunk.sizes[k].checked_mul(inner)?;
        let run = (inter.offsets[k] - chunk.offsets[k]).checked_mul(inner)?
            ..(inter.offsets[k] + inter.sizes[k] - chunk.offsets[k]).checked_mul(inner)?;
        let out_start = (inter.offsets[k] - export.offsets[k])
            .checked_mul(steps[k])?
            .checked_mul(elem)?;
        let outer = (0..k)
            .map(|d| {
                Some(Outer {
                    size: chunk.sizes[d],
                    inside: inter.offsets[d] - chunk.offsets[d]
                        ..inter.offsets[d] + inter.sizes[d] - chunk.offsets[d],
                    shift: i128::from(chunk.offsets[d]) - i128::from(export.offsets[d]),
                    step: steps[d].checked_mul(elem)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Placement {
            outer,
            row_bytes,
            run,
            out_start,
        })
    }

    /// Calls `f(chunk_byte, export_byte, len)` for every run of the chunk's bytes `[a, b)` that
    /// lies in the export, in chunk order.
    pub fn runs(&self, a: u64, b: u64, mut f: impl FnMut(u64, u64, u64)) {
        if a >= b || self.row_bytes == 0 {
            return;
        }
        let (first, last) = (a / self.row_bytes, (b - 1) / self.row_bytes);
        'rows: for row in first..=last {
            let mut rest = row;
            let mut out = i128::from(self.out_start);
            for o in self.outer.iter().rev() {
                let i = rest % o.size;
                rest /= o.size;
                if !o.inside.contains(&i) {
                    continue 'rows;
                }
                out += (i128::from(i) + o.shift) * i128::from(o.step);
            }
            let start = row * self.row_bytes;
            let lo = (start + self.run.start).max(a);
            let hi = (start + self.run.end).min(b);
            if lo < hi {
                let out = u64::try_from(out).expect("an index inside the export");
                f(lo, out + (lo - start - self.run.start), hi - lo);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(offsets: &[u64], sizes: &[u64]) -> Extent {
        Extent {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
        }
    }

    /// Every chunk byte's export byte, one element at a time.
    fn brute(chunk: &Extent, export: &Extent, elem: u64) -> Vec<Option<u64>> {
        let n = chunk.sizes.len();
        let numel = chunk.numel().unwrap();
        let mut out = Vec::new();
        for e in 0..numel {
            let mut rest = e;
            let mut idx = vec![0u64; n];
            for d in (0..n).rev() {
                idx[d] = rest % chunk.sizes[d];
                rest /= chunk.sizes[d];
            }
            let mut pos = Some(0u64);
            for (d, i) in idx.iter().enumerate() {
                let g = chunk.offsets[d] + i;
                let inside = g >= export.offsets[d] && g < export.offsets[d] + export.sizes[d];
                pos = pos
                    .filter(|_| inside)
                    .map(|p| p * export.sizes[d] + g - export.offsets[d]);
            }
            for b in 0..elem {
                out.push(pos.map(|p| p * elem + b));
            }
        }
        out
    }

    fn placed(chunk: &Extent, export: &Extent, elem: u64, a: u64, b: u64) -> Vec<Option<u64>> {
        let total = chunk.numel().unwrap() * elem;
        let mut out = vec![None; total as usize];
        if let Some(p) = Placement::new(chunk, export, elem) {
            p.runs(a, b, |c, o, len| {
                for i in 0..len {
                    assert!(out[(c + i) as usize].is_none(), "byte placed twice");
                    out[(c + i) as usize] = Some(o + i);
                }
            });
        }
        out
    }

    #[test]
    fn shard0_is_one_run_and_shard1_one_per_row() {
        let whole = Extent::whole(&[5, 6]);
        let rows = ext(&[3, 0], &[2, 6]);
        let mut calls = Vec::new();
        Placement::new(&rows, &whole, 4)
            .unwrap()
            .runs(0, 48, |c, o, n| calls.push((c, o, n)));
        assert_eq!(calls, vec![(0, 72, 48)]);

        let cols = ext(&[0, 4], &[4, 3]);
        let whole = Extent::whole(&[4, 7]);
        let mut calls = Vec::new();
        Placement::new(&cols, &whole, 4)
            .unwrap()
            .runs(0, 48, |c, o, n| calls.push((c, o, n)));
        assert_eq!(
            calls,
            vec![(0, 16, 12), (12, 44, 12), (24, 72, 12), (36, 100, 12)]
        );
    }

    #[test]
    fn a_scalar_is_one_element() {
        let p = Placement::new(&ext(&[], &[]), &ext(&[], &[]), 8).unwrap();
        let mut calls = Vec::new();
        p.runs(3, 8, |c, o, n| calls.push((c, o, n)));
        assert_eq!(calls, vec![(3, 3, 5)]);
    }

    #[test]
    fn chunks_outside_the_export_place_nothing() {
        assert!(Placement::new(&ext(&[0, 0], &[2, 2]), &ext(&[2, 0], &[2, 2]), 4).is_none());
        assert!(Placement::new(&ext(&[0], &[0]), &ext(&[0], &[4]), 4).is_none());
    }

    fn boxes() -> impl Strategy<Value = (Extent, Extent, u64, u64, u64)> {
        (1usize..4)
            .prop_flat_map(|n| {
                (
                    prop::collection::vec((0u64..4, 1u64..5, 0u64..4, 1u64..5), n),
                    prop::sample::select(vec![1u64, 2, 4]),
                )
            })
            .prop_flat_map(|(dims, elem)| {
                let chunk = ext(
                    &dims.iter().map(|d| d.0).collect::<Vec<_>>(),
                    &dims.iter().map(|d| d.1).collect::<Vec<_>>(),
                );
                let export = ext(
                    &dims.iter().map(|d| d.2).collect::<Vec<_>>(),
                    &dims.iter().map(|d| d.3).collect::<Vec<_>>(),
                );
                let total = chunk.numel().unwrap() * elem;
                (Just(chunk), Just(export), Just(elem), 0..=total, 0..=total)
            })
            .prop_map(|(c, e, elem, x, y)| (c, e, elem, x.min(y), x.max(y)))
    }

    proptest! {
        #[test]
        fn runs_place_every_byte_where_its_element_goes((chunk, export, elem, a, b) in boxes()) {
            let want = brute(&chunk, &export, elem);
            let got = placed(&chunk, &export, elem, a, b);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                let i = i as u64;
                if i >= a && i < b {
                    prop_assert_eq!(w, g, "byte {}", i);
                } else {
                    prop_assert_eq!(*g, None, "byte {} outside the range", i);
                }
            }
        }
    }
}
