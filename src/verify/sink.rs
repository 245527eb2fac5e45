//! The byte checks: a sink that checks items instead of keeping them (each item's archive
//! structure and CRCs, its ZStandard transform, and its tensor against the metadata; with a
//! manifest, the sha256 of every shard file, the plan then covering whole files, gaps included),
//! and the run of the fetch engine that feeds it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{Check, Checks, Finding, VerifyError, VerifyOptions};
use crate::fetch::{self, Cancel, Progress, Sink, SinkError};
use crate::item::archive::{self, Archive, ArchiveChecker};
use crate::item::tensor;
use crate::metadata::{Checkpoint, dtype};
use crate::plan::{FilePlan, Plan, PlanItem, describe_storage};
use crate::source::{ObjectMeta, ObjectName, Source};

/// Reads the given storage entries through the fetch engine into a [`VerifySink`]; with
/// `whole_files`, every byte of every file in `objects` too (for their sha256).
pub async fn check_bytes(
    source: &Source,
    ck: &Arc<Checkpoint>,
    storage: &[usize],
    objects: &HashMap<ObjectName, ObjectMeta>,
    whole_files: bool,
    opts: &VerifyOptions,
) -> Result<VerifyResults, VerifyError> {
    let sizes: Option<HashMap<ObjectName, u64>> = whole_files.then(|| {
        objects
            .iter()
            .map(|(name, meta)| (name.clone(), meta.size))
            .collect()
    });
    let plan = Arc::new(
        Plan::of_storage(ck, storage, opts.plan, sizes.as_ref()).map_err(VerifyError::Plan)?,
    );
    let results = Arc::new(Mutex::new(VerifyResults::default()));
    let sink = VerifySink::new(ck.clone(), whole_files, results.clone());
    let progress = Progress::new(plan.fetched(), plan.items() as u64, !opts.progress);
    fetch::run(
        source,
        plan,
        objects,
        opts.engine,
        Box::new(sink),
        progress,
        Cancel::on_ctrl_c(),
    )
    .await
    .map_err(VerifyError::Fetch)?;
    let mut r = std::mem::take(&mut *results.lock().expect("not poisoned"));
    // An empty file has no bytes to pass the hasher.
    for (name, meta) in objects.iter().filter(|_| whole_files) {
        if meta.size == 0 {
            r.file_sha256
                .insert(name.to_string(), crate::units::sha256_hex(b""));
        }
    }
    Ok(r)
}

/// What the byte checks found for one item.
#[derive(Debug, Clone, Default)]
pub struct ItemResult {
    /// The storage entries stored at this range.
    pub storage: Vec<usize>,
    /// `items.archive`: the problem, if any.
    pub archive: Option<String>,
    /// `items.transform`: whether the item had a transform, and its problem.
    pub transformed: bool,
    pub transform: Option<String>,
    /// `items.tensor`: whether it was checked (tensor items with a sound archive), and problems.
    pub tensor_checked: bool,
    pub tensor: Vec<String>,
    /// Records saved without CRC.
    pub unchecked_crc: Vec<String>,
    /// Dtypes dcpfetch does not know, whose tensors were not checked.
    pub unknown_dtypes: Vec<String>,
}

/// Everything the sink found.
#[derive(Debug, Default)]
pub struct VerifyResults {
    pub items: Vec<ItemResult>,
    /// sha256 of every file the plan covered whole (with a manifest).
    pub file_sha256: BTreeMap<String, String>,
}

enum Current {
    Archive(ArchiveChecker),
    /// A transformed item, kept whole until it can be decoded.
    Transformed(Vec<u8>),
    /// Bytes between items, read only for the files' sha256.
    Filler,
}

/// Checks items as they stream past.
pub struct VerifySink {
    ck: Arc<Checkpoint>,
    hash_files: bool,
    hashers: HashMap<String, Sha256>,
    current: Option<Current>,
    results: Arc<Mutex<VerifyResults>>,
}

impl std::fmt::Debug for VerifySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifySink")
            .field("hash_files", &self.hash_files)
            .finish()
    }
}

impl VerifySink {
    /// A sink that records into `results`; with `hash_files`, the plan must cover whole files.
    pub fn new(ck: Arc<Checkpoint>, hash_files: bool, results: Arc<Mutex<VerifyResults>>) -> Self {
        VerifySink {
            ck,
            hash_files,
            hashers: HashMap::new(),
            current: None,
            results,
        }
    }

    fn check_item(&self, item: &PlanItem, current: Current) -> ItemResult {
        let mut r = ItemResult {
            storage: item.storage.clone(),
            ..ItemResult::default()
        };
        let archive = match current {
            Current::Filler => return r,
            Current::Archive(c) => c.finish(),
            Current::Transformed(data) => {
                r.transformed = true;
                match self.decode(item, &data) {
                    Ok(c) => c.finish(),
                    Err(e) => {
                        r.transform = Some(e);
                        return r;
                    }
                }
            }
        };
        let archive = match archive {
            Ok(a) => a,
            Err(e) => {
                r.archive = Some(e);
                return r;
            }
        };
        r.unchecked_crc = archive.unchecked_crc.clone();
        for &s in &item.storage {
            if let Some(link) = self.ck.storage[s].chunk
                && let Some(t) = &self.ck.entries[link.entry].tensor
            {
                if t.element_size().is_none() {
                    r.unknown_dtypes.push(t.dtype.to_string());
                    continue;
                }
                r.tensor_checked = true;
                r.tensor
                    .extend(self.check_tensor(&archive, link.entry, link.chunk));
            }
        }
        r
    }

    /// Decodes a ZStandard item into an archive checker.
    fn decode(&self, item: &PlanItem, data: &[u8]) -> Result<ArchiveChecker, String> {
        let descriptors = &self.ck.storage[item.storage[0]].info.transform_descriptors;
        let expected = item
            .storage
            .iter()
            .filter_map(|&s| self.ck.raw_tensor_len(s))
            .max()
            .unwrap_or(0);
        let decoded = archive::undo_transform(descriptors, data, expected)?;
        let mut checker = ArchiveChecker::new();
        checker.feed(Bytes::from(decoded));
        Ok(checker)
    }

    /// `items.tensor` for one chunk.
    fn check_tensor(&self, archive: &Archive, entry: usize, chunk: usize) -> Vec<String> {
        let e = &self.ck.entries[entry];
        let meta = e.tensor.as_ref().expect("a tensor entry");
        let sizes = e.chunks[chunk].sizes.clone().unwrap_or_default();
        let Some(pkl) = archive.data("/data.pkl") else {
            return vec!["the archive has no data.pkl record".into()];
        };
        let t = match tensor::read(pkl) {
            Ok(t) => t,
            Err(msg) => return vec![msg],
        };
        let mut problems = t.differences(&meta.dtype, &sizes);
        let Some(record) = archive.record(&t.storage_suffix()) else {
            problems.push(format!(
                "the archive has no data/{} record for the tensor's storage",
                t.key
            ));
            return problems;
        };
        let record_len = record.data.end - record.data.start;
        if record_len != t.storage_bytes {
            problems.push(format!(
                "the storage record is {record_len} bytes but data.pkl declares {}",
                t.storage_bytes
            ));
        }
        let elem = dtype::element_size(&t.dtype).unwrap_or(1);
        match t.required_elements().and_then(|n| n.checked_mul(elem)) {
            Some(need) if need != record_len => problems.push(format!(
                "the storage record is {record_len} bytes; the chunk's {} elements of {} at strides {:?} need {need}",
                e.chunks[chunk]
                    .numel()
                    .map_or_else(|| "uncountable".to_owned(), |n| n.to_string()),
                meta.dtype,
                t.stride
            )),
            Some(_) => {}
            None => problems.push("the tensor's strides overflow".into()),
        }
        problems
    }
}

impl Sink for VerifySink {
    /// Files are hashed, and items checked, in order.
    fn ordered(&self) -> bool {
        true
    }

    fn write(
        &mut self,
        file: &FilePlan,
        item: &PlanItem,
        at: u64,
        data: Bytes,
    ) -> Result<(), SinkError> {
        if self.hash_files {
            self.hashers
                .entry(file.name.to_string())
                .or_default()
                .update(&data);
        }
        if at == 0 {
            self.current = Some(if item.storage.is_empty() {
                Current::Filler
            } else if self.ck.storage[item.storage[0]]
                .info
                .transform_descriptors
                .is_empty()
            {
                Current::Archive(ArchiveChecker::new())
            } else {
                Current::Transformed(Vec::with_capacity(item.len().min(64 << 20) as usize))
            });
        }
        match &mut self.current {
            Some(Current::Archive(c)) => c.feed(data),
            Some(Current::Transformed(buf)) => buf.extend_from_slice(&data),
            _ => {}
        }
        Ok(())
    }

    fn item_done(&mut self, _: &FilePlan, item: &PlanItem) -> Result<(), SinkError> {
        if let Some(current) = self.current.take() {
            let r = self.check_item(item, current);
            if !r.storage.is_empty() {
                self.results.lock().expect("not poisoned").items.push(r);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        let mut results = self.results.lock().expect("not poisoned");
        for (name, h) in self.hashers.drain() {
            results
                .file_sha256
                .insert(name, crate::units::hex(&h.finalize()));
        }
        Ok(())
    }
}

impl VerifyResults {
    /// Records what the sink found as the results of the byte checks.
    pub fn record(&self, ck: &Checkpoint, checks: &mut Checks) {
        let results = self;
        let (mut archive, mut transform, mut tensor) = (Vec::new(), Vec::new(), Vec::new());
        let (mut n_archive, mut n_transform, mut n_tensor) = (0u64, 0u64, 0u64);
        let mut unchecked = Vec::new();
        let mut unchecked_tensors = Vec::new();
        for r in &results.items {
            let s = r.storage[0];
            if r.transformed {
                n_transform += 1;
                if let Some(e) = &r.transform {
                    transform.push(Finding::item(ck, s, e.clone()));
                    continue;
                }
            }
            n_archive += 1;
            if let Some(e) = &r.archive {
                archive.push(Finding::item(ck, s, e.clone()));
                continue;
            }
            for name in &r.unchecked_crc {
                unchecked.push(format!(
                    "{}: record {name} has no CRC32 (saved with compute_crc32=False)",
                    describe_storage(ck, s)
                ));
            }
            for dtype in &r.unknown_dtypes {
                unchecked_tensors.push(format!(
                    "{}: dtype {dtype} is unknown to dcpfetch: its archive was checked, its tensor was not",
                    describe_storage(ck, s)
                ));
            }
            if r.tensor_checked {
                n_tensor += 1;
                tensor.extend(r.tensor.iter().map(|m| Finding::item(ck, s, m.clone())));
            }
        }
        checks.record(Check::ItemsArchive, n_archive, archive);
        checks.get(Check::ItemsArchive).notes.extend(unchecked);
        if n_transform > 0 {
            checks.record(Check::ItemsTransform, n_transform, transform);
        } else {
            checks
                .get(Check::ItemsTransform)
                .notes
                .push("no item has a transform".into());
        }
        checks.record(Check::ItemsTensor, n_tensor, tensor);
        checks
            .get(Check::ItemsTensor)
            .notes
            .extend(unchecked_tensors);
    }
}
