//! Where a chunk's values are inside its stored item.
//!
//! An item is a `torch.save` archive: `data.pkl` says which record holds the tensor's storage and
//! at which offset and strides the values lie. A large plain item is located before its bytes are
//! fetched, from its first and last [`PROBE`] bytes (the pickle and the record's local header lead
//! the archive, the central directory ends it), so that its values can be placed as they arrive.
//! A small, compressed or non-contiguous item is read whole and its values gathered in memory.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::item::archive::{self, Record};
use crate::item::tensor::{self, StoredTensor};
use crate::metadata::{Checkpoint, dtype};
use crate::plan::{FilePlan, Plan, PlanItem, describe_storage};
use crate::source::{ObjectMeta, ObjectName, Source, SourceError};
use crate::units::human;

/// Bytes read from each end of a large item to locate its values.
pub const PROBE: u64 = 64 << 10;

/// Where the chunk's row-major bytes are in a plain item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The values, relative to the item.
    pub values: Range<u64>,
    /// The storage record holding them, and the CRC32 the archive gives it (0: saved without).
    pub record: Range<u64>,
    pub crc: u32,
}

/// What the chunk is, as the metadata says: its dtype and sizes.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub dtype: &'a str,
    pub sizes: &'a [u64],
}

/// Checks the stored tensor against the chunk and finds its storage record.
fn storage_record<'r>(
    t: &StoredTensor,
    records: &'r [Record],
    expect: Expect<'_>,
) -> Result<&'r Record, String> {
    if let Some(difference) = t.differences(expect.dtype, expect.sizes).into_iter().next() {
        return Err(difference);
    }
    let suffix = t.storage_suffix();
    let record = records
        .iter()
        .find(|r| r.name.ends_with(&suffix))
        .ok_or(format!("the archive has no data/{} record", t.key))?;
    let elem = dtype::element_size(&t.dtype).ok_or(format!("unknown dtype {}", t.dtype))?;
    let need = t
        .required_elements()
        .and_then(|n| n.checked_mul(elem))
        .ok_or("the tensor's strides overflow")?;
    if need > record.data.end - record.data.start {
        return Err(format!(
            "the storage record is {} bytes; the tensor's elements at offset {} and strides {:?} need {need}",
            record.data.end - record.data.start,
            t.storage_offset,
            t.stride
        ));
    }
    Ok(record)
}

/// Whether the tensor's elements lie row-major and without gaps from its storage offset.
fn contiguous(t: &StoredTensor) -> bool {
    let mut want = 1i64;
    for (&size, &stride) in t.size.iter().zip(&t.stride).rev() {
        if size != 1 && stride != want {
            return false;
        }
        want = want.saturating_mul(size as i64);
    }
    true
}

/// Locates the values of a plain item of `len` bytes from its `head` (bytes `[0, head.len())`)
/// and its `tail` (the bytes that end it). `Ok(None)` when the tensor is stored with strides that
/// are not row-major (it must be gathered whole).
pub fn locate(
    len: u64,
    head: &[u8],
    tail: &[u8],
    expect: Expect<'_>,
) -> Result<Option<Located>, String> {
    let tail_start = len - tail.len() as u64;
    let bytes = |a: u64, b: u64| -> Option<Cow<'_, [u8]>> {
        if a <= b && b <= head.len() as u64 {
            return Some(Cow::Borrowed(&head[a as usize..b as usize]));
        }
        if a >= tail_start && a <= b && b <= len {
            return Some(Cow::Borrowed(
                &tail[(a - tail_start) as usize..(b - tail_start) as usize],
            ));
        }
        None
    };
    let (t, record) = read_tensor(len, tail_start, &bytes, expect)?;
    if !contiguous(&t) {
        return Ok(None);
    }
    let elem = dtype::element_size(&t.dtype).expect("checked by storage_record");
    let numel = t.size.iter().product::<u64>();
    let start = record.data.start + t.storage_offset * elem;
    Ok(Some(Located {
        values: start..start + numel * elem,
        record: record.data.clone(),
        crc: record.crc,
    }))
}

/// The tensor an archive of `len` bytes holds (its `data.pkl` read, CRC checked, and checked
/// against the chunk) and the record of its storage, reading bytes with `bytes(a, b)` (the end
/// records looked for from `window_from` on).
fn read_tensor<'b>(
    len: u64,
    window_from: u64,
    bytes: &dyn Fn(u64, u64) -> Option<Cow<'b, [u8]>>,
    expect: Expect<'_>,
) -> Result<(StoredTensor, Record), String> {
    let records = archive::locate(len, window_from, bytes)?;
    let pkl = records
        .iter()
        .find(|r| r.name.ends_with("/data.pkl"))
        .ok_or("the archive has no data.pkl record")?;
    let data = bytes(pkl.data.start, pkl.data.end)
        .ok_or("data.pkl is not among the item's first bytes")?;
    check_crc(&data, pkl)?;
    let t = tensor::read(&data)?;
    let record = storage_record(&t, &records, expect)?.clone();
    Ok((t, record))
}

/// Checks a record's CRC32 against its `data` (a record saved without one, CRC 0, passes).
fn check_crc(data: &[u8], r: &Record) -> Result<(), String> {
    let actual = crc32fast::hash(data);
    if r.crc != 0 && actual != r.crc {
        return Err(format!(
            "record {} (bytes {}..{} of the item): CRC32 is {actual:08x}, the archive says {:08x}",
            r.name, r.data.start, r.data.end, r.crc
        ));
    }
    Ok(())
}

/// The chunk's row-major bytes from a whole item (the CRCs of its pickle and storage checked).
pub fn gather<'i>(item: &'i [u8], expect: Expect<'_>) -> Result<Cow<'i, [u8]>, String> {
    let len = item.len() as u64;
    let (t, record) = read_tensor(
        len,
        0,
        &|a, b| (a <= b && b <= len).then(|| Cow::Borrowed(&item[a as usize..b as usize])),
        expect,
    )?;
    let storage = &item[record.data.start as usize..record.data.end as usize];
    check_crc(storage, &record)?;
    let elem = dtype::element_size(&t.dtype).expect("checked by storage_record") as usize;
    let numel = t.size.iter().product::<u64>() as usize;
    let offset = t.storage_offset as usize * elem;
    if contiguous(&t) {
        return Ok(Cow::Borrowed(&storage[offset..offset + numel * elem]));
    }
    let mut out = Vec::with_capacity(numel * elem);
    if numel > 0 {
        let strides: Vec<usize> = t.stride.iter().map(|&s| s as usize).collect();
        let sizes: Vec<usize> = t.size.iter().map(|&s| s as usize).collect();
        let mut idx = vec![0usize; sizes.len()];
        loop {
            let at = offset + idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>() * elem;
            out.extend_from_slice(&storage[at..at + elem]);
            // The next index, last dimension fastest.
            let mut d = sizes.len();
            loop {
                if d == 0 {
                    return Ok(Cow::Owned(out));
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < sizes[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
    Ok(Cow::Owned(out))
}

/// Items located before the fetch, by file and item start.
pub type LocatedItems = HashMap<ObjectName, HashMap<u64, Located>>;

/// Why an item cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("cannot read {file} bytes {start}..{end}")]
    Read {
        file: String,
        start: u64,
        end: u64,
        #[source]
        source: SourceError,
    },
    #[error("{file} bytes {start}..{end} ({what}): {problem}")]
    Bad {
        file: String,
        start: u64,
        end: u64,
        what: String,
        problem: String,
    },
}

/// Locates the values of every plain item longer than `whole_below` bytes (`in_flight` at a
/// time), reading its two ends. An item that must be gathered whole instead (compressed, or
/// stored with strides) must fit in `max_memory`.
pub async fn locate_all(
    source: &Source,
    ck: &Arc<Checkpoint>,
    plan: &Plan,
    objects: &HashMap<ObjectName, ObjectMeta>,
    whole_below: u64,
    max_memory: u64,
    in_flight: usize,
) -> Result<LocatedItems, ItemError> {
    let bad = |f: &FilePlan, it: &PlanItem, problem: String| ItemError::Bad {
        file: f.name.to_string(),
        start: it.range.start,
        end: it.range.end,
        what: describe_storage(ck, it.storage[0]),
        problem,
    };
    let gate = Arc::new(Semaphore::new(in_flight.max(1)));
    let mut tasks = JoinSet::new();
    for (fi, f) in plan.files.iter().enumerate() {
        for (ii, it) in f.items.iter().enumerate() {
            let s = it.storage[0];
            if !ck.storage[s].info.transform_descriptors.is_empty() {
                if it.len() > max_memory {
                    return Err(bad(
                        f,
                        it,
                        format!(
                            "a compressed item of {} is decoded whole in memory, more than --max-memory ({}); raise --max-memory",
                            human(it.len()),
                            human(max_memory)
                        ),
                    ));
                }
                continue;
            }
            if it.len() <= whole_below {
                continue;
            }
            let (source, meta, gate) = (source.clone(), objects[&f.name].clone(), gate.clone());
            let (name, range) = (f.name.clone(), it.range.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.expect("never closed");
                let n = PROBE.min(range.end - range.start);
                let head = source
                    .read_all_range(name.as_str(), range.start..range.start + n, &meta)
                    .await;
                let tail = source
                    .read_all_range(name.as_str(), range.end - n..range.end, &meta)
                    .await;
                (fi, ii, head, tail)
            });
        }
    }
    let mut out: LocatedItems = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (fi, ii, head, tail) = done.expect("a probe does not panic");
        let (f, it) = (&plan.files[fi], &plan.files[fi].items[ii]);
        let read = |source| ItemError::Read {
            file: f.name.to_string(),
            start: it.range.start,
            end: it.range.end,
            source,
        };
        let (head, tail) = (head.map_err(read)?, tail.map_err(read)?);
        let s = it.storage[0];
        let (Some(entry), Some(chunk)) = (ck.entry_of(s), ck.chunk_of(s)) else {
            return Err(bad(f, it, "not a tensor chunk".into()));
        };
        let (Some(t), Some(sizes)) = (&entry.tensor, &chunk.sizes) else {
            return Err(bad(f, it, "not a tensor chunk".into()));
        };
        let expect = Expect {
            dtype: &t.dtype,
            sizes,
        };
        match locate(it.len(), &head, &tail, expect).map_err(|e| bad(f, it, e))? {
            Some(loc) => {
                out.entry(f.name.clone())
                    .or_default()
                    .insert(it.range.start, loc);
            }
            None if it.len() > max_memory => {
                return Err(bad(
                    f,
                    it,
                    format!(
                        "the tensor is stored with strides that are not row-major, so it is gathered whole in memory: {} is more than --max-memory ({}); raise --max-memory",
                        human(it.len()),
                        human(max_memory)
                    ),
                ));
            }
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(size: &[u64], stride: &[i64]) -> StoredTensor {
        StoredTensor {
            dtype: "float32".into(),
            key: "0".into(),
            storage_bytes: 0,
            storage_offset: 0,
            size: size.to_vec(),
            stride: stride.to_vec(),
        }
    }

    #[test]
    fn row_major_strides_are_contiguous_whatever_the_unit_dimensions() {
        assert!(contiguous(&t(&[3, 4], &[4, 1])));
        assert!(contiguous(&t(&[1, 4], &[99, 1])));
        assert!(contiguous(&t(&[], &[])));
        assert!(!contiguous(&t(&[4, 3], &[1, 4])));
        assert!(!contiguous(&t(&[16, 4], &[16, 1])));
    }
}
