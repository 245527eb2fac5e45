//! From selected chunks to requests: per shard file, the items' byte ranges (deduplicated,
//! sorted, validated), coalesced into range groups, and split into parts (one request each).
//!
//! Coalescing keeps s3torchconnector's semantics: a range joins the current group when the gap
//! from the previous range's end is `<=` the limit. Unlike its reader, which streams each group
//! with one GET, a group here is split into parts of at most `part_size` that start and end on
//! needed bytes, and the parts are fetched concurrently. A gap is fetched only when it lies inside
//! a part; a gap larger than the part size never is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use crate::metadata::Checkpoint;
use crate::selection::{Selected, stored_copies};
use crate::source::{NameError, ObjectName};
use crate::units::natural_cmp;

/// Knobs of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Largest gap between two ranges of one group (`u64::MAX`: no limit).
    pub max_gap: u64,
    /// Largest request.
    pub part_size: u64,
}

/// One item to fetch: the bytes of one stored chunk (or bytes entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    pub range: Range<u64>,
    /// Storage entries ([`Checkpoint::storage`] indexes) stored at exactly this range; more than one
    /// when several selected chunks share one stored copy.
    pub storage: Vec<usize>,
}

impl PlanItem {
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// Nearby items fetched together (s3torchconnector's `RangeGroup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeGroup {
    pub range: Range<u64>,
    /// Indexes into [`FilePlan::items`].
    pub items: Range<usize>,
}

/// One request: a range inside one group that starts and ends on needed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub range: Range<u64>,
    pub group: usize,
}

/// What to read from one shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePlan {
    pub name: ObjectName,
    /// Sorted by offset, non-overlapping, non-empty.
    pub items: Vec<PlanItem>,
    pub groups: Vec<RangeGroup>,
    pub parts: Vec<Part>,
}

impl FilePlan {
    /// Bytes the items need.
    pub fn needed(&self) -> u64 {
        self.items.iter().map(PlanItem::len).sum()
    }

    /// Bytes the parts read (needed bytes plus gaps inside parts).
    pub fn fetched(&self) -> u64 {
        self.parts.iter().map(|p| p.range.end - p.range.start).sum()
    }

    /// The end of the last item: the file must be at least this long.
    pub fn end(&self) -> u64 {
        self.items.last().map_or(0, |i| i.range.end)
    }
}

/// The whole plan, files in natural name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub options: PlanOptions,
    pub files: Vec<FilePlan>,
}

impl Plan {
    pub fn items(&self) -> usize {
        self.files.iter().map(|f| f.items.len()).sum()
    }
    pub fn groups(&self) -> usize {
        self.files.iter().map(|f| f.groups.len()).sum()
    }
    pub fn requests(&self) -> usize {
        self.files.iter().map(|f| f.parts.len()).sum()
    }
    pub fn needed(&self) -> u64 {
        self.files.iter().map(FilePlan::needed).sum()
    }
    pub fn fetched(&self) -> u64 {
        self.files.iter().map(FilePlan::fetched).sum()
    }
}

/// Why a set of ranges cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{file}: the item of {fqn} at {offset} + {length} overflows a 64-bit offset")]
    Overflow {
        file: String,
        fqn: String,
        offset: u64,
        length: u64,
    },
    #[error(
        "{file}: bytes {a_start}..{a_end} ({a_fqn}) overlap bytes {b_start}..{b_end} ({b_fqn})"
    )]
    Overlap {
        file: String,
        a_fqn: String,
        a_start: u64,
        a_end: u64,
        b_fqn: String,
        b_start: u64,
        b_end: u64,
    },
    #[error("{file}: bytes {start}..{end} ({fqn}) are past the end of the file ({size} bytes)")]
    PastEnd {
        file: String,
        fqn: String,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("ranges are not sorted: {prev_start}..{prev_end} comes before {start}..{end}")]
    Unsorted {
        prev_start: u64,
        prev_end: u64,
        start: u64,
        end: u64,
    },
    #[error("ranges {a_start}..{a_end} and {b_start}..{b_end} overlap")]
    RangesOverlap {
        a_start: u64,
        a_end: u64,
        b_start: u64,
        b_end: u64,
    },
    #[error(
        "{file}: the item of {fqn} is {length} bytes, the size of its raw tensor data ({raw} bytes), not a \
         torch.save archive: the checkpoint was saved with serialization_format=SAFETENSORS, for which torch \
         writes .metadata offsets that do not locate the tensors (the real ones are in the file's safetensors \
         header, and torch cannot load such a checkpoint back either); dcpfetch does not fetch from it"
    )]
    Safetensors {
        file: String,
        fqn: String,
        length: u64,
        raw: u64,
    },
    #[error("the part size must be at least 1 byte")]
    ZeroPartSize,
}

/// Refuses a stored copy of raw tensor bytes (a checkpoint saved with
/// `serialization_format=SAFETENSORS`, whose `.metadata` offsets do not locate the tensors).
pub fn refuse_raw(ck: &Checkpoint, si: usize) -> Result<(), PlanError> {
    match ck.raw_tensor_len(si) {
        Some(raw) if ck.is_raw_tensor(si) => {
            let s = &ck.storage[si];
            Err(PlanError::Safetensors {
                file: s.info.relative_path.to_string(),
                fqn: describe_storage(ck, si),
                length: s.info.length,
                raw,
            })
        }
        _ => Ok(()),
    }
}

/// Coalesces sorted ranges into groups: a range joins the current group when its gap from the
/// previous range is `<= max_gap`. Zero-length ranges are skipped (they belong to no group).
/// Unsorted or overlapping ranges are errors naming both ranges.
pub fn coalesce(ranges: &[Range<u64>], max_gap: u64) -> Result<Vec<RangeGroup>, PlanError> {
    let mut groups: Vec<RangeGroup> = Vec::new();
    let mut prev: Option<&Range<u64>> = None;
    for (i, r) in ranges.iter().enumerate() {
        if r.is_empty() {
            continue;
        }
        if let Some(p) = prev {
            if r.start < p.start {
                return Err(PlanError::Unsorted {
                    prev_start: p.start,
                    prev_end: p.end,
                    start: r.start,
                    end: r.end,
                });
            }
            if r.start < p.end {
                return Err(PlanError::RangesOverlap {
                    a_start: p.start,
                    a_end: p.end,
                    b_start: r.start,
                    b_end: r.end,
                });
            }
        }
        match groups.last_mut() {
            Some(g) if r.start - g.range.end <= max_gap => {
                g.range.end = r.end;
                g.items.end = i + 1;
            }
            _ => groups.push(RangeGroup {
                range: r.clone(),
                items: i..i + 1,
            }),
        }
        prev = Some(r);
    }
    Ok(groups)
}

/// Splits each group into parts of at most `part_size` bytes that start and end on needed bytes;
/// a gap that would straddle a part boundary is not fetched.
///
/// A group is cut into as few parts as `part_size` allows, of even size: a group one byte longer
/// than two parts is three parts of a third each, not two full parts and a one-byte request. (DCP
/// stores each tensor with a small header, so a tensor of a multiple of the part size would
/// otherwise end in a request for a few hundred bytes that costs a whole round trip, and the
/// group's bytes would arrive only when its full-size parts had.)
pub fn split(ranges: &[Range<u64>], groups: &[RangeGroup], part_size: u64) -> Vec<Part> {
    let mut parts = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let span = g.range.end - g.range.start;
        // The even size of the fewest parts that cover the group.
        let limit = span.div_ceil(span.div_ceil(part_size).max(1)).max(1);
        let mut current: Option<Range<u64>> = None;
        for r in &ranges[g.items.clone()] {
            if r.is_empty() {
                continue;
            }
            let mut start = r.start;
            while start < r.end {
                match &mut current {
                    // Extend the current part over the gap and as much of this range as fits.
                    Some(p) if start - p.start < limit => {
                        let end = r.end.min(p.start.saturating_add(limit));
                        p.end = end;
                        start = end;
                    }
                    _ => {
                        if let Some(p) = current.take() {
                            parts.push(Part {
                                range: p,
                                group: gi,
                            });
                        }
                        let end = r.end.min(start.saturating_add(limit));
                        current = Some(start..end);
                        start = end;
                    }
                }
            }
        }
        if let Some(p) = current {
            parts.push(Part {
                range: p,
                group: gi,
            });
        }
    }
    parts
}

impl FilePlan {
    /// Sorts, deduplicates and validates a file's items, then groups and splits them.
    pub fn new(
        name: ObjectName,
        mut items: Vec<PlanItem>,
        opts: PlanOptions,
        fqn_of: &dyn Fn(usize) -> String,
    ) -> Result<FilePlan, PlanError> {
        if opts.part_size == 0 {
            return Err(PlanError::ZeroPartSize);
        }
        items.retain(|i| !i.is_empty());
        items.sort_by(|a, b| {
            a.range
                .start
                .cmp(&b.range.start)
                .then(a.range.end.cmp(&b.range.end))
        });
        // Identical ranges are one item; distinct overlapping ranges are an error.
        let mut merged: Vec<PlanItem> = Vec::with_capacity(items.len());
        for item in items {
            match merged.last_mut() {
                // Duplicates are removed below, once per item: a scan here would be quadratic
                // when many copies share one range.
                Some(last) if last.range == item.range => last.storage.extend(item.storage),
                Some(last) if item.range.start < last.range.end => {
                    return Err(PlanError::Overlap {
                        file: name.to_string(),
                        a_fqn: fqn_of(last.storage[0]),
                        a_start: last.range.start,
                        a_end: last.range.end,
                        b_fqn: fqn_of(item.storage[0]),
                        b_start: item.range.start,
                        b_end: item.range.end,
                    });
                }
                _ => merged.push(item),
            }
        }
        for item in merged.iter_mut().filter(|i| i.storage.len() > 1) {
            let mut seen = HashSet::with_capacity(item.storage.len());
            item.storage.retain(|s| seen.insert(*s));
        }
        let ranges: Vec<Range<u64>> = merged.iter().map(|i| i.range.clone()).collect();
        let groups = coalesce(&ranges, opts.max_gap)?;
        let parts = split(&ranges, &groups, opts.part_size);
        Ok(FilePlan {
            name,
            items: merged,
            groups,
            parts,
        })
    }

    /// Fails when an item ends past the file's actual size.
    pub fn check_size(&self, size: u64, fqn_of: &dyn Fn(usize) -> String) -> Result<(), PlanError> {
        match self.items.iter().find(|i| i.range.end > size) {
            Some(i) => Err(PlanError::PastEnd {
                file: self.name.to_string(),
                fqn: fqn_of(i.storage[0]),
                start: i.range.start,
                end: i.range.end,
                size,
            }),
            None => Ok(()),
        }
    }
}

impl Plan {
    /// A plan that reads each given storage entry as an item of its own (the byte checks of
    /// `verify`: every stored copy is checked, selected or not). With `whole_files`, the size of
    /// every file to read whole: the bytes between and around the items become items with no
    /// storage entry, so that every byte of those files passes the sink (a sha256 manifest).
    pub fn of_storage(
        ck: &Checkpoint,
        storage: &[usize],
        opts: PlanOptions,
        whole_files: Option<&HashMap<ObjectName, u64>>,
    ) -> Result<Plan, PlanError> {
        let fqn_of = |s: usize| describe_storage(ck, s);
        let mut by_file: BTreeMap<ObjectName, Vec<PlanItem>> = BTreeMap::new();
        for &s in storage {
            let info = &ck.storage[s].info;
            let Some(range) = ck.storage[s].range() else {
                return Err(PlanError::Overflow {
                    file: info.relative_path.to_string(),
                    fqn: fqn_of(s),
                    offset: info.offset,
                    length: info.length,
                });
            };
            by_file
                .entry(ObjectName::new(&info.relative_path)?)
                .or_default()
                .push(PlanItem {
                    range,
                    storage: vec![s],
                });
        }
        if let Some(sizes) = whole_files {
            for name in sizes.keys() {
                by_file.entry(name.clone()).or_default();
            }
        }
        let mut files = Vec::with_capacity(by_file.len());
        for (name, items) in by_file {
            let mut plan = FilePlan::new(name, items, opts, &fqn_of)?;
            if let Some(size) = whole_files.and_then(|sizes| sizes.get(&plan.name)) {
                let mut items = plan.items.clone();
                let mut pos = 0;
                for it in &plan.items {
                    if it.range.start > pos {
                        items.push(PlanItem {
                            range: pos..it.range.start,
                            storage: Vec::new(),
                        });
                    }
                    pos = pos.max(it.range.end);
                }
                if pos < *size {
                    items.push(PlanItem {
                        range: pos..*size,
                        storage: Vec::new(),
                    });
                }
                plan = FilePlan::new(plan.name, items, opts, &fqn_of)?;
            }
            files.push(plan);
        }
        files.sort_by(|a, b| natural_cmp(a.name.as_str(), b.name.as_str()));
        Ok(Plan {
            options: opts,
            files,
        })
    }
}

impl Plan {
    /// Plans the stored copies of the selected chunks.
    pub fn build(
        ck: &Checkpoint,
        selected: &[Selected],
        opts: PlanOptions,
    ) -> Result<Plan, PlanError> {
        let fqn_of = |s: usize| describe_storage(ck, s);
        let mut by_file: BTreeMap<&str, Vec<PlanItem>> = BTreeMap::new();
        for si in stored_copies(ck, selected) {
            let s = &ck.storage[si];
            refuse_raw(ck, si)?;
            let Some(range) = s.range() else {
                return Err(PlanError::Overflow {
                    file: s.info.relative_path.to_string(),
                    fqn: fqn_of(si),
                    offset: s.info.offset,
                    length: s.info.length,
                });
            };
            by_file
                .entry(&s.info.relative_path)
                .or_default()
                .push(PlanItem {
                    range,
                    storage: vec![si],
                });
        }
        let mut files = Vec::with_capacity(by_file.len());
        for (name, items) in by_file {
            files.push(FilePlan::new(ObjectName::new(name)?, items, opts, &fqn_of)?);
        }
        files.sort_by(|a, b| natural_cmp(a.name.as_str(), b.name.as_str()));
        Ok(Plan {
            options: opts,
            files,
        })
    }

    /// The same plan without some items (already fetched), regrouped.
    pub fn without(
        &self,
        done: &dyn Fn(&ObjectName, &PlanItem) -> bool,
        ck: &Checkpoint,
    ) -> Result<Plan, PlanError> {
        let fqn_of = |s: usize| describe_storage(ck, s);
        let mut files = Vec::new();
        for f in &self.files {
            let items: Vec<PlanItem> = f
                .items
                .iter()
                .filter(|i| !done(&f.name, i))
                .cloned()
                .collect();
            if !items.is_empty() {
                files.push(FilePlan::new(f.name.clone(), items, self.options, &fqn_of)?);
            }
        }
        Ok(Plan {
            options: self.options,
            files,
        })
    }
}

/// `fqn` or `fqn [offsets]`, for messages.
pub fn describe_storage(ck: &Checkpoint, storage: usize) -> String {
    let s = &ck.storage[storage];
    match &s.chunk_offsets {
        Some(o) => format!("{} chunk {o:?}", s.fqn),
        None => s.fqn.to_string(),
    }
}

/// One of `count` shares of a plan's work (`--shard I/N`, 0-based): N workers that each fetch
/// their share fetch every needed byte exactly once.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Share {
    pub index: u32,
    pub count: u32,
}

impl Share {
    /// The whole plan: one share.
    pub const WHOLE: Share = Share { index: 0, count: 1 };

    /// `index` of `count`; `None` unless `index < count`.
    pub fn new(index: u32, count: u32) -> Option<Share> {
        (index < count).then_some(Share { index, count })
    }

    pub fn is_whole(self) -> bool {
        self.count == 1
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Where a share may begin and end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// At any part boundary: an item larger than a part can be split between shares, each of
    /// which gets a clipped item (the item's bytes inside its parts, same storage entries). A
    /// sparse folder is written by byte range, so the pieces add up to the item.
    Parts,
    /// Between items: every item is whole in one share (a stream's items are standalone
    /// archives, and verification checks an item as a whole).
    Items,
}

impl Plan {
    /// The plan's work divided into `count` shares, each a plan of its own. The units (with
    /// [`Cut::Parts`] the parts, with [`Cut::Items`] the items), in plan order, are laid end to end
    /// by their bytes (fetched bytes of parts, needed bytes of items), and a unit goes to the
    /// share in which its first byte falls when that length is divided into `count` equal spans.
    /// So shares are contiguous runs of the plan, together hold every needed byte exactly once,
    /// and each differs from the mean by less than the largest unit (one part size with
    /// [`Cut::Parts`]). With [`Cut::Parts`], the parts of a share are the plan's own (re-planning
    /// its clipped items gives the same parts: a part's end depends only on where it starts);
    /// with [`Cut::Items`], a share's items are planned anew. Deterministic: the same plan gives
    /// the same shares.
    pub fn shares(&self, count: u32, cut: Cut) -> Result<Vec<Plan>, PlanError> {
        let count = count.max(1);
        let share_of = |at: u64, total: u64| {
            if total == 0 {
                0
            } else {
                (u128::from(at) * u128::from(count) / u128::from(total)) as usize
            }
        };
        let mut at = 0u64;
        match cut {
            Cut::Parts => {
                let total = self.fetched();
                let mut runs: Vec<Vec<(usize, Range<usize>)>> = vec![Vec::new(); count as usize];
                for (fi, f) in self.files.iter().enumerate() {
                    for (pi, p) in f.parts.iter().enumerate() {
                        let runs = &mut runs[share_of(at, total)];
                        match runs.last_mut() {
                            Some((last, r)) if *last == fi => r.end = pi + 1,
                            _ => runs.push((fi, pi..pi + 1)),
                        }
                        at += p.range.end - p.range.start;
                    }
                }
                runs.iter().map(|r| self.sub_plan(r)).collect()
            }
            Cut::Items => {
                let total = self.needed();
                let mut items: Vec<Vec<(usize, Vec<PlanItem>)>> = vec![Vec::new(); count as usize];
                for (fi, f) in self.files.iter().enumerate() {
                    for item in &f.items {
                        let items = &mut items[share_of(at, total)];
                        match items.last_mut() {
                            Some((last, v)) if *last == fi => v.push(item.clone()),
                            _ => items.push((fi, vec![item.clone()])),
                        }
                        at += item.len();
                    }
                }
                items
                    .into_iter()
                    .map(|files| {
                        let files = files
                            .into_iter()
                            .map(|(fi, items)| {
                                let name = self.files[fi].name.clone();
                                FilePlan::new(name, items, self.options, &|_| String::new())
                            })
                            .collect::<Result<_, _>>()?;
                        Ok(Plan {
                            options: self.options,
                            files,
                        })
                    })
                    .collect()
            }
        }
    }

    /// One share of the plan (see [`Plan::shares`]).
    pub fn share(&self, share: Share, cut: Cut) -> Result<Plan, PlanError> {
        if share.is_whole() {
            return Ok(self.clone());
        }
        let mut all = self.shares(share.count, cut)?;
        Ok(all.swap_remove(share.index as usize))
    }

    /// The plan of the given runs of parts (file index, part indexes): the items clipped to the
    /// runs' bytes.
    fn sub_plan(&self, runs: &[(usize, Range<usize>)]) -> Result<Plan, PlanError> {
        let mut files = Vec::with_capacity(runs.len());
        for (fi, parts) in runs {
            let f = &self.files[*fi];
            let span = f.parts[parts.start].range.start..f.parts[parts.end - 1].range.end;
            let first = f.items.partition_point(|i| i.range.end <= span.start);
            let items: Vec<PlanItem> = f.items[first..]
                .iter()
                .take_while(|i| i.range.start < span.end)
                .map(|i| PlanItem {
                    range: i.range.start.max(span.start)..i.range.end.min(span.end),
                    storage: i.storage.clone(),
                })
                .collect();
            let mut sub = FilePlan::new(f.name.clone(), items, self.options, &|_| String::new())?;
            // The share's requests are the whole plan's: split afresh, a group cut at the share's
            // edge would be split into other (even) parts. Each part lies in one group of the
            // share, since the gaps inside a part are gaps inside one group.
            sub.parts = f.parts[parts.clone()]
                .iter()
                .map(|p| Part {
                    range: p.range.clone(),
                    group: sub.groups.partition_point(|g| g.range.end <= p.range.start),
                })
                .collect();
            files.push(sub);
        }
        Ok(Plan {
            options: self.options,
            files,
        })
    }
}

/// What every worker of a split fetch must agree on, so that their shares fit together: the
/// number of shares, the plan options and the whole plan (its items and parts, by hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Split {
    pub shares: u32,
    pub part_size: u64,
    /// `u64::MAX`: no limit.
    pub max_gap: u64,
    /// Items and needed bytes of the whole plan.
    pub items: u64,
    pub bytes: u64,
    /// The sha256 of every item's and part's file and byte range, in plan order.
    pub plan_sha256: String,
}

impl Split {
    /// The split of `plan` (the whole plan, before [`Plan::share`]) into `shares`.
    pub fn of(plan: &Plan, shares: u32) -> Split {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for f in &plan.files {
            for i in &f.items {
                h.update(format!("i {} {} {}\n", f.name, i.range.start, i.range.end));
            }
            for p in &f.parts {
                h.update(format!("p {} {} {}\n", f.name, p.range.start, p.range.end));
            }
        }
        Split {
            shares,
            part_size: plan.options.part_size,
            max_gap: plan.options.max_gap,
            items: plan.items() as u64,
            bytes: plan.needed(),
            plan_sha256: crate::units::hex(&h.finalize()),
        }
    }

    /// What differs from an `earlier` split, in words; `None` when nothing does.
    pub fn difference(&self, earlier: &Split) -> Option<String> {
        if self.shares != earlier.shares {
            return Some(format!(
                "it is split into {} shares, this one into {}",
                earlier.shares, self.shares
            ));
        }
        if self.part_size != earlier.part_size {
            return Some(format!(
                "its --part-size is {} bytes, this one's {}",
                earlier.part_size, self.part_size
            ));
        }
        if self.max_gap != earlier.max_gap {
            let gap = |g: u64| {
                if g == u64::MAX {
                    "inf".to_owned()
                } else {
                    format!("{g} bytes")
                }
            };
            return Some(format!(
                "its --max-gap-size is {}, this one's {}",
                gap(earlier.max_gap),
                gap(self.max_gap)
            ));
        }
        if self.plan_sha256 != earlier.plan_sha256 {
            return Some(format!(
                "it selects other items ({} items, {} bytes; this one {} items, {} bytes)",
                earlier.items, earlier.bytes, self.items, self.bytes
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn groups_of(ranges: &[Range<u64>], gap: u64) -> Vec<Range<u64>> {
        coalesce(ranges, gap)
            .unwrap()
            .into_iter()
            .map(|g| g.range)
            .collect()
    }

    /// The cases s3torchconnector's tests spell out.
    #[test]
    fn gap_boundary_is_inclusive() {
        assert_eq!(groups_of(&[0..10, 20..30], 10), vec![0..30]);
        assert_eq!(groups_of(&[0..10, 20..30], 9), vec![0..10, 20..30]);
        assert_eq!(groups_of(&[0..10, 10..20], 0), vec![0..20]);
        assert_eq!(groups_of(&[0..10, 11..20], 0), vec![0..10, 11..20]);
        assert_eq!(
            groups_of(&[0..10, 1000..1001, 1 << 40..(1 << 40) + 1], u64::MAX),
            vec![0..(1 << 40) + 1]
        );
        assert_eq!(groups_of(&[0..0, 5..5, 7..9], 0), vec![7..9]);
        assert_eq!(groups_of(&[], 0), Vec::<Range<u64>>::new());
    }

    #[test]
    fn unsorted_and_overlapping_ranges_are_errors() {
        let e = coalesce(&[10..20, 0..5], 0).unwrap_err();
        assert!(
            e.to_string().contains("10..20") && e.to_string().contains("0..5"),
            "{e}"
        );
        let e = coalesce(&[0..10, 5..20], 0).unwrap_err();
        assert!(
            e.to_string().contains("0..10") && e.to_string().contains("5..20"),
            "{e}"
        );
    }

    #[test]
    fn parts_start_and_end_on_needed_bytes() {
        let ranges = [0..10, 12..30, 100..105];
        let groups = coalesce(&ranges, u64::MAX).unwrap();
        let parts: Vec<_> = split(&ranges, &groups, 16)
            .into_iter()
            .map(|p| p.range)
            .collect();
        // The group spans 105 bytes: 7 parts of 16 at most, so parts of 15 at most. 0..15 (item 0,
        // gap, start of item 1), 15..30 (rest), then the gap to 100 is skipped.
        assert_eq!(parts, vec![0..15, 15..30, 100..105]);
        let parts: Vec<_> = split(&ranges, &groups, 1000)
            .into_iter()
            .map(|p| p.range)
            .collect();
        assert_eq!(parts, vec![0..105]);
    }

    #[test]
    fn a_group_just_over_whole_parts_is_split_evenly() {
        // A 16 MiB tensor as DCP stores it (854 bytes of header) with 8 MiB parts: three parts of
        // about 5.3 MiB, not 8 MiB, 8 MiB and a request for 854 bytes. A group of whole parts
        // (the second, 16 MiB exactly, after a gap) stays as it was.
        let first = 1000..1000 + (16 << 20) + 854;
        let second = first.end + 10..first.end + 10 + (16 << 20);
        let ranges = [first, second];
        let groups = coalesce(&ranges, 0).unwrap();
        assert_eq!(groups.len(), 2);
        let lens: Vec<(usize, u64)> = split(&ranges, &groups, 8 << 20)
            .iter()
            .map(|p| (p.group, p.range.end - p.range.start))
            .collect();
        let third = ((16 << 20) + 854) / 3;
        assert_eq!(
            lens,
            vec![
                (0, third),
                (0, third),
                (0, third),
                (1, 8 << 20),
                (1, 8 << 20)
            ]
        );
    }

    #[test]
    fn a_share_keeps_the_whole_plans_parts() {
        // Share 1 of 2 starts inside the group: it fetches the whole plan's last two parts, not
        // its own even split of what is left of the group.
        let plan = plan_of(&[vec![0..150, 150..301]], 0, 100);
        let all: Vec<_> = plan.files[0]
            .parts
            .iter()
            .map(|p| p.range.clone())
            .collect();
        assert_eq!(all, vec![0..76, 76..152, 152..228, 228..301]);
        let share = plan
            .share(Share { index: 1, count: 2 }, Cut::Parts)
            .unwrap();
        let parts: Vec<_> = share.files[0]
            .parts
            .iter()
            .map(|p| p.range.clone())
            .collect();
        assert_eq!(parts, vec![152..228, 228..301]);
    }

    fn arb_ranges() -> impl Strategy<Value = Vec<Range<u64>>> {
        proptest::collection::vec((0u64..50, 0u64..40), 0..40).prop_map(|v| {
            let mut pos = 0;
            v.into_iter()
                .map(|(gap, len)| {
                    let start = pos + gap;
                    pos = start + len;
                    start..pos
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn coalescing_invariants(ranges in arb_ranges(), gap in prop_oneof![0u64..60, Just(u64::MAX)], part in 1u64..80) {
            let groups = coalesce(&ranges, gap).unwrap();
            // Every non-empty range is in exactly one group, in order.
            let mut seen = vec![0; ranges.len()];
            for g in &groups {
                for i in g.items.clone() {
                    if !ranges[i].is_empty() {
                        seen[i] += 1;
                        prop_assert!(g.range.start <= ranges[i].start && ranges[i].end <= g.range.end);
                    }
                }
            }
            for (i, r) in ranges.iter().enumerate() {
                prop_assert_eq!(seen[i], usize::from(!r.is_empty()));
            }
            // Groups are separated by more than the gap; members by at most it.
            for w in groups.windows(2) {
                prop_assert!(w[1].range.start - w[0].range.end > gap);
            }
            for g in &groups {
                let members: Vec<_> = ranges[g.items.clone()].iter().filter(|r| !r.is_empty()).collect();
                for w in members.windows(2) {
                    prop_assert!(w[1].start - w[0].end <= gap);
                }
            }
            // Parts: sorted, disjoint, at most `part` long, inside their group, start and end on
            // needed bytes, and every needed byte is covered exactly once.
            let parts = split(&ranges, &groups, part);
            for w in parts.windows(2) {
                prop_assert!(w[0].range.end <= w[1].range.start);
            }
            let needed = |x: u64| ranges.iter().any(|r| r.contains(&x));
            for p in &parts {
                prop_assert!(!p.range.is_empty() && p.range.end - p.range.start <= part);
                let g = &groups[p.group];
                prop_assert!(g.range.start <= p.range.start && p.range.end <= g.range.end);
                prop_assert!(needed(p.range.start) && needed(p.range.end - 1));
            }
            for r in &ranges {
                for x in r.clone() {
                    prop_assert_eq!(parts.iter().filter(|p| p.range.contains(&x)).count(), 1);
                }
            }
            // As few parts as the part size allows, and no part of a group much smaller than
            // another: a group without gaps has parts of one size, give or take a byte each.
            for (gi, g) in groups.iter().enumerate() {
                let lens: Vec<u64> = parts
                    .iter()
                    .filter(|p| p.group == gi)
                    .map(|p| p.range.end - p.range.start)
                    .collect();
                let span = g.range.end - g.range.start;
                prop_assert!(lens.len() as u64 <= span.div_ceil(part).max(1));
                let gaps = g.range.end - g.range.start
                    != ranges[g.items.clone()].iter().map(|r| r.end - r.start).sum::<u64>();
                if !gaps {
                    let (min, max) = (lens.iter().min(), lens.iter().max());
                    if let (Some(min), Some(max)) = (min, max) {
                        prop_assert!(max - min < lens.len() as u64, "{:?}", lens);
                    }
                }
            }
        }
    }

    fn plan_of(files: &[Vec<Range<u64>>], gap: u64, part: u64) -> Plan {
        let mut storage = 0;
        let files = files
            .iter()
            .enumerate()
            .map(|(fi, ranges)| {
                let items = ranges
                    .iter()
                    .map(|r| {
                        storage += 1;
                        PlanItem {
                            range: r.clone(),
                            storage: vec![storage],
                        }
                    })
                    .collect();
                let opts = PlanOptions {
                    max_gap: gap,
                    part_size: part,
                };
                let name = ObjectName::new(&format!("__{fi}_0.distcp")).unwrap();
                FilePlan::new(name, items, opts, &|_| String::new()).unwrap()
            })
            .collect();
        Plan {
            options: PlanOptions {
                max_gap: gap,
                part_size: part,
            },
            files,
        }
    }

    /// Every (file, byte) a plan's items need, with the storage entries of the item holding it.
    fn needed_bytes(plan: &Plan) -> Vec<(String, u64, Vec<usize>)> {
        let mut v = Vec::new();
        for f in &plan.files {
            for i in &f.items {
                for x in i.range.clone() {
                    v.push((f.name.to_string(), x, i.storage.clone()));
                }
            }
        }
        v.sort();
        v
    }

    fn parts_of(plan: &Plan) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = plan
            .files
            .iter()
            .flat_map(|f| {
                f.parts
                    .iter()
                    .map(|p| (f.name.to_string(), p.range.start, p.range.end))
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_item_larger_than_a_part_is_clipped_or_kept_whole() {
        // One 100-byte item, parts of 10: two shares of 50 bytes, each with half the item.
        let item: Range<u64> = 0..100;
        let plan = plan_of(&[vec![item]], 0, 10);
        let shares = plan.shares(2, Cut::Parts).unwrap();
        let items: Vec<_> = shares
            .iter()
            .map(|s| s.files[0].items[0].range.clone())
            .collect();
        assert_eq!(items, vec![0..50, 50..100]);
        assert_eq!(shares[1].files[0].items[0].storage, vec![1]);
        // Whole items: the item is in share 0; share 1 is empty.
        let shares = plan.shares(2, Cut::Items).unwrap();
        assert_eq!(shares[0].files[0].items[0].range, 0..100);
        assert!(shares[1].files.is_empty());
        // More shares than parts: the extra shares are empty.
        let shares = plan.shares(20, Cut::Parts).unwrap();
        assert_eq!(shares.iter().filter(|s| s.files.is_empty()).count(), 10);
        assert_eq!(plan.share(Share::WHOLE, Cut::Parts).unwrap(), plan);
    }

    proptest! {
        #[test]
        fn shares_partition_the_plan(
            files in proptest::collection::vec(arb_ranges(), 1..4),
            gap in prop_oneof![0u64..60, Just(u64::MAX)],
            part in 1u64..80,
            count in 1u32..9,
        ) {
            let plan = plan_of(&files, gap, part);
            for cut in [Cut::Parts, Cut::Items] {
                let shares = plan.shares(count, cut).unwrap();
                prop_assert_eq!(shares.len(), count as usize);
                // Deterministic.
                prop_assert_eq!(&shares, &plan.shares(count, cut).unwrap());
                // Together, the shares hold every needed byte exactly once (and, cut at parts,
                // every part).
                let mut parts = Vec::new();
                let mut bytes = Vec::new();
                for s in &shares {
                    parts.extend(parts_of(s));
                    bytes.extend(needed_bytes(s));
                }
                parts.sort();
                bytes.sort();
                prop_assert_eq!(bytes, needed_bytes(&plan));
                // Every part lies in its own group.
                for f in shares.iter().flat_map(|s| &s.files) {
                    for p in &f.parts {
                        let g = &f.groups[p.group].range;
                        prop_assert!(g.start <= p.range.start && p.range.end <= g.end);
                    }
                }
                // Balanced: each share within one unit (a part, or an item) of the mean.
                let (largest, size): (u64, fn(&Plan) -> u64) = match cut {
                    Cut::Parts => {
                        prop_assert_eq!(parts, parts_of(&plan));
                        let p = plan.files.iter().flat_map(|f| &f.parts);
                        (p.map(|p| p.range.end - p.range.start).max().unwrap_or(0), Plan::fetched)
                    }
                    Cut::Items => {
                        let i = plan.files.iter().flat_map(|f| &f.items);
                        (i.map(PlanItem::len).max().unwrap_or(0), Plan::needed)
                    }
                };
                let mean = size(&plan) as f64 / f64::from(count);
                for s in &shares {
                    prop_assert!((size(s) as f64 - mean).abs() < largest.max(1) as f64,
                        "share of {} bytes, mean {mean}, largest unit {largest}", size(s));
                }
                // Whole items stay whole.
                if cut == Cut::Items {
                    let whole: Vec<_> = plan.files.iter().flat_map(|f| f.items.iter().map(|i| i.range.clone())).collect();
                    for s in &shares {
                        for f in &s.files {
                            for i in &f.items {
                                prop_assert!(whole.contains(&i.range));
                            }
                        }
                    }
                }
            }
        }
    }
}
