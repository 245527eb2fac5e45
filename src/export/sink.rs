//! The export's sink: each piece of an item goes where its values belong in the output.
//!
//! An item located beforehand ([`item::locate`]) is placed as its pieces arrive, in any order,
//! and the CRC32 of its storage record is checked from runs once the item is in. Any other item
//! (small, compressed, or stored with strides) is gathered whole first ([`item::gather`]).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::item::{self, Expect, Located};
use super::output::Output;
use super::{Layout, Tensor};
use crate::fetch::{Sink, SinkError};
use crate::item::archive;
use crate::metadata::Checkpoint;
use crate::plan::{FilePlan, PlanItem, describe_storage};
use crate::sink::runs::CrcRuns;
use crate::source::ObjectName;

/// An item on its way in.
enum Pending {
    Whole(Vec<u8>),
    Placed(CrcRuns),
}

/// Writes whole tensors from the fetched items.
pub struct ExportSink {
    ck: Arc<Checkpoint>,
    layout: Arc<Layout>,
    /// Items located beforehand, by file and item start.
    located: HashMap<ObjectName, HashMap<u64, Located>>,
    pending: HashMap<ObjectName, HashMap<u64, Pending>>,
    output: Output,
    ordered: bool,
    /// Bytes written per tensor.
    written: Vec<u64>,
    /// Most bytes an item may take once decoded.
    max_memory: u64,
}

impl std::fmt::Debug for ExportSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportSink")
            .field("output", &self.output)
            .finish()
    }
}

/// Writes the runs of `chunk` bytes `[a, b)` (held by `data`, whose first byte is chunk byte
/// `data_at`) into every tensor that stored copy `storage` feeds.
fn place(
    layout: &Layout,
    output: &mut Output,
    written: &mut [u64],
    storage: usize,
    data: &Bytes,
    data_at: u64,
    (a, b): (u64, u64),
) -> Result<(), SinkError> {
    let Some(feeds) = layout.feeds.get(&storage) else {
        return Ok(());
    };
    let mut result = Ok(());
    for feed in feeds {
        let t: &Tensor = &layout.tensors[feed.tensor];
        feed.placement.runs(a, b, |chunk, out, len| {
            if result.is_err() {
                return;
            }
            let from = (chunk - data_at) as usize;
            written[feed.tensor] += len;
            result = output.write(
                t.file,
                t.offset + out,
                data.slice(from..from + len as usize),
            );
        });
        if result.is_err() {
            break;
        }
    }
    result
}

impl ExportSink {
    pub fn new(
        ck: Arc<Checkpoint>,
        layout: Arc<Layout>,
        located: HashMap<ObjectName, HashMap<u64, Located>>,
        output: Output,
        ordered: bool,
        max_memory: u64,
    ) -> ExportSink {
        let written = vec![0; layout.tensors.len()];
        ExportSink {
            ck,
            layout,
            located,
            pending: HashMap::new(),
            output,
            ordered,
            written,
            max_memory,
        }
    }

    fn refuse(&self, file: &FilePlan, item: &PlanItem, msg: String) -> SinkError {
        SinkError::Bad(format!(
            "{} bytes {}..{} ({}): {msg}",
            file.name,
            item.range.start,
            item.range.end,
            describe_storage(&self.ck, item.storage[0])
        ))
    }

    /// What the metadata says the item holds.
    fn expect(&self, storage: usize) -> Option<Expect<'_>> {
        let entry = self.ck.entry_of(storage)?;
        Some(Expect {
            dtype: &entry.tensor.as_ref()?.dtype,
            sizes: self.ck.chunk_of(storage)?.sizes.as_deref()?,
        })
    }

    /// A whole item: its values gathered, then placed.
    fn whole(&mut self, file: &FilePlan, item: &PlanItem, data: Vec<u8>) -> Result<(), SinkError> {
        let s = item.storage[0];
        let info = &self.ck.storage[s].info;
        let data = if info.transform_descriptors.is_empty() {
            data
        } else {
            // Decoded in memory: never more than --max-memory, whatever the metadata claims.
            let raw = self
                .ck
                .raw_tensor_len(s)
                .unwrap_or(0)
                .min(self.max_memory.saturating_sub(archive::MAX_DECODED_SLACK));
            archive::undo_transform(&info.transform_descriptors, &data, raw)
                .map_err(|e| self.refuse(file, item, e))?
        };
        let expect = self
            .expect(s)
            .ok_or_else(|| self.refuse(file, item, "not a tensor chunk".into()))?;
        let values = item::gather(&data, expect).map_err(|e| self.refuse(file, item, e))?;
        let values = Bytes::from(values.into_owned());
        let len = values.len() as u64;
        for &s in &item.storage {
            place(
                &self.layout,
                &mut self.output,
                &mut self.written,
                s,
                &values,
                0,
                (0, len),
            )?;
        }
        Ok(())
    }
}

impl Sink for ExportSink {
    fn ordered(&self) -> bool {
        self.ordered
    }

    fn write(
        &mut self,
        file: &FilePlan,
        item: &PlanItem,
        at: u64,
        data: Bytes,
    ) -> Result<(), SinkError> {
        let start = item.range.start;
        let located = self
            .located
            .get(&file.name)
            .and_then(|m| m.get(&start))
            .cloned();
        if !self.pending.contains_key(&file.name) {
            self.pending.insert(file.name.clone(), HashMap::new());
        }
        let pending = self
            .pending
            .get_mut(&file.name)
            .expect("inserted above")
            .entry(start)
            .or_insert_with(|| match &located {
                Some(_) => Pending::Placed(CrcRuns::default()),
                None => Pending::Whole(vec![0; item.len() as usize]),
            });
        let end = at + data.len() as u64;
        match (pending, located) {
            (Pending::Whole(buf), _) => {
                buf[at as usize..end as usize].copy_from_slice(&data);
                Ok(())
            }
            (Pending::Placed(runs), Some(loc)) => {
                let (ra, rb) = (at.max(loc.record.start), end.min(loc.record.end));
                if ra < rb {
                    runs.add(
                        ra - loc.record.start,
                        &data[(ra - at) as usize..(rb - at) as usize],
                    );
                }
                let (va, vb) = (at.max(loc.values.start), end.min(loc.values.end));
                if va < vb {
                    // Chunk byte of the piece's first byte (may lie before the values).
                    let data_at = at as i128 - loc.values.start as i128;
                    let piece = if data_at < 0 {
                        data.slice((loc.values.start - at) as usize..)
                    } else {
                        data
                    };
                    let piece_at = data_at.max(0) as u64;
                    for &s in &item.storage {
                        place(
                            &self.layout,
                            &mut self.output,
                            &mut self.written,
                            s,
                            &piece,
                            piece_at,
                            (va - loc.values.start, vb - loc.values.start),
                        )?;
                    }
                }
                Ok(())
            }
            (Pending::Placed(_), None) => unreachable!("placed items are located"),
        }
    }

    fn item_done(&mut self, file: &FilePlan, item: &PlanItem) -> Result<(), SinkError> {
        let pending = self
            .pending
            .get_mut(&file.name)
            .and_then(|m| m.remove(&item.range.start));
        match pending {
            Some(Pending::Whole(data)) => self.whole(file, item, data),
            Some(Pending::Placed(runs)) => {
                let loc = &self.located[&file.name][&item.range.start];
                let got = runs.finish(loc.record.end - loc.record.start);
                match got {
                    Some(crc) if loc.crc == 0 || crc == loc.crc => Ok(()),
                    Some(crc) => Err(self.refuse(
                        file,
                        item,
                        format!(
                            "the tensor's record (bytes {}..{} of the item): CRC32 is {crc:08x}, the archive says {:08x}",
                            loc.record.start, loc.record.end, loc.crc
                        ),
                    )),
                    None => Err(self.refuse(file, item, "its bytes did not all arrive".into())),
                }
            }
            None => Ok(()),
        }
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        for (t, &n) in self.layout.tensors.iter().zip(&self.written) {
            if n != t.len {
                return Err(SinkError::Refused(format!(
                    "{} received {n} of its {} bytes (its stored chunks overlap or are missing)",
                    t.fqn, t.len
                )));
            }
        }
        self.output.publish()
    }
}
