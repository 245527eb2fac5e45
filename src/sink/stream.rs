//! Items onto a byte stream (stdout): raw, back to back in plan order, or as a tar archive with one
//! entry per item. An optional JSON manifest maps every item to its place in the stream.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{IoSlice, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use crate::fetch::{Sink, SinkError};
use crate::metadata::Checkpoint;
use crate::plan::{FilePlan, Plan, PlanItem};

/// What the stream holds (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StreamFormat {
    /// The items' bytes back to back, in plan order (file, then offset).
    Raw,
    /// A tar stream with one entry per item, each a standalone torch.save archive.
    Tar,
}

/// The `--manifest` document (docs/output.md).
#[derive(Debug, Serialize)]
pub struct StreamManifest {
    pub format: StreamFormat,
    pub total_bytes: u64,
    pub items: Vec<StreamManifestItem>,
}

/// One stored item in the stream. An item shared by several selected chunks is listed once per
/// chunk, with the same stream offset.
#[derive(Debug, Serialize)]
pub struct StreamManifestItem {
    pub fqn: String,
    pub kind: &'static str,
    pub chunk_offsets: Option<Vec<u64>>,
    pub chunk_sizes: Option<Vec<u64>>,
    pub file: String,
    pub offset: u64,
    pub length: u64,
    pub transform_descriptors: Vec<String>,
    /// Where the item's first byte is in the stream.
    pub stream_offset: u64,
    /// The tar entry's name (tar format only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tar_name: Option<String>,
}

/// Writes items to a stream.
pub struct StreamSink {
    out: Box<dyn Write + Send>,
    format: StreamFormat,
    /// The checkpoint, for the tar entry names (given as the items start, in plan order, as the
    /// manifest gives them).
    ck: Arc<Checkpoint>,
    tar_names: TarNames,
    offset: u64,
    /// Pieces not yet written: gathered so that one `writev` takes many of them, without copying.
    pending: Vec<Bytes>,
    pending_bytes: usize,
}

/// Write the gathered pieces once they hold this many bytes, or this many pieces. Small enough that
/// the received buffers are written and freed while still in the CPU's cache and reused for the
/// next bytes: at 4 MiB most bytes were received into memory the cache had lost, and a stream of
/// everything from nginx on loopback took 1.1x the time and 1.2x the CPU (docs/performance.md
/// "Gathering less for stdout").
const GATHER_BYTES: usize = 256 << 10;
const GATHER_PIECES: usize = 512;

impl std::fmt::Debug for StreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSink")
            .field("format", &self.format)
            .field("offset", &self.offset)
            .finish()
    }
}

const BLOCK: usize = 512;
/// Longest tar entry name before its extension, so that names extract on common file systems.
const MAX_NAME: usize = 200;

/// stdout as a file of its own (unbuffered, written from any thread).
pub fn stdout_file() -> Result<std::fs::File, SinkError> {
    use std::os::fd::AsFd;
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(SinkError::io("duplicating stdout"))?;
    Ok(std::fs::File::from(out))
}

impl StreamSink {
    /// A sink for `plan`'s items. The manifest is known from the plan alone, so it is written
    /// (to `manifest_path`) before the first byte: a reader that stops early still has it. Without
    /// one, nothing is made per item before the stream starts.
    pub fn new(
        out: Box<dyn Write + Send>,
        format: StreamFormat,
        ck: &Arc<Checkpoint>,
        plan: &Plan,
        manifest_path: Option<&Path>,
    ) -> Result<Self, SinkError> {
        if let Some(path) = manifest_path {
            let manifest = layout(format, ck, plan);
            let text = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
            std::fs::write(path, text).map_err(SinkError::io(format!(
                "writing the manifest {}",
                path.display()
            )))?;
        }
        Ok(StreamSink {
            out,
            format,
            ck: ck.clone(),
            tar_names: TarNames::default(),
            offset: 0,
            pending: Vec::new(),
            pending_bytes: 0,
        })
    }

    /// A sink writing to stdout through a duplicate of fd 1 as a plain file: no line buffering to
    /// scan or copy the bytes, and writes of many pieces at once (it shares the offset and flags,
    /// so `>>` appends).
    pub fn stdout(
        format: StreamFormat,
        ck: &Arc<Checkpoint>,
        plan: &Plan,
        manifest_path: Option<&Path>,
    ) -> Result<Self, SinkError> {
        StreamSink::new(Box::new(stdout_file()?), format, ck, plan, manifest_path)
    }

    /// Queues bytes for the stream.
    fn emit(&mut self, data: Bytes) -> Result<(), SinkError> {
        self.offset += data.len() as u64;
        self.pending_bytes += data.len();
        self.pending.push(data);
        if self.pending_bytes >= GATHER_BYTES || self.pending.len() >= GATHER_PIECES {
            self.flush_pending()?;
        }
        Ok(())
    }

    /// Writes the queued pieces with as few `writev` calls as the stream takes.
    fn flush_pending(&mut self) -> Result<(), SinkError> {
        let mut slices: Vec<IoSlice> = self.pending.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = self
                .out
                .write_vectored(rest)
                .map_err(SinkError::io("writing to stdout"))?;
            if n == 0 {
                return Err(SinkError::io("writing to stdout")(
                    std::io::ErrorKind::WriteZero.into(),
                ));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    fn start_item(&mut self, item: &PlanItem) -> Result<(), SinkError> {
        if self.format == StreamFormat::Tar {
            let name = tar_name(&self.ck, item, &mut self.tar_names);
            self.emit(Bytes::from(tar_header(&name, item.len())))?;
        }
        Ok(())
    }
}

/// Where every item of `plan` lands in the stream, in plan order (the order the engine delivers
/// them), with the tar entry names the stream will give them: the manifest.
fn layout(format: StreamFormat, ck: &Checkpoint, plan: &Plan) -> StreamManifest {
    let mut items = Vec::new();
    let mut taken = TarNames::default();
    let mut offset = 0u64;
    for file in &plan.files {
        for item in &file.items {
            let tar_name = match format {
                StreamFormat::Raw => None,
                StreamFormat::Tar => {
                    let name = tar_name(ck, item, &mut taken);
                    offset += tar_header(&name, item.len()).len() as u64;
                    Some(name)
                }
            };
            for &si in &item.storage {
                let s = &ck.storage[si];
                items.push(StreamManifestItem {
                    fqn: s.fqn.to_string(),
                    kind: if s.chunk_offsets.is_some() {
                        "tensor"
                    } else {
                        "bytes"
                    },
                    chunk_offsets: s.chunk_offsets.as_deref().map(<[u64]>::to_vec),
                    chunk_sizes: ck
                        .chunk_of(si)
                        .and_then(|c| c.sizes.as_deref().map(<[u64]>::to_vec)),
                    file: file.name.to_string(),
                    offset: item.range.start,
                    length: item.len(),
                    transform_descriptors: s.info.transform_descriptors.clone(),
                    stream_offset: offset,
                    tar_name: tar_name.clone(),
                });
            }
            offset += item.len();
            if format == StreamFormat::Tar {
                offset += tar_padding(item.len()) as u64;
            }
        }
    }
    if format == StreamFormat::Tar {
        offset += 2 * BLOCK as u64;
    }
    StreamManifest {
        format,
        total_bytes: offset,
        items,
    }
}

/// The names given so far (by a 64-bit hash: a name whose hash an earlier one has also gets a
/// suffix, which costs nothing but the shorter name), and for each base name the next `~N` suffix
/// to try (so that k copies of one name cost k tries, not k squared).
#[derive(Default)]
struct TarNames {
    taken: HashSet<u64>,
    next: HashMap<String, u64>,
}

/// A name's key in [`TarNames::taken`]: SipHash with fixed keys, the same in every run.
fn name_key(name: &str) -> u64 {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

/// A tar entry name for an item: the fqn (percent-encoded to one safe path component), `@` and
/// the chunk offsets for tensors, `.pt` (`.pt.zst` for ZStandard items); `~N` before the
/// extension makes repeated names unique.
fn tar_name(ck: &Checkpoint, item: &PlanItem, names: &mut TarNames) -> String {
    let s = &ck.storage[item.storage[0]];
    let (base, ext) = entry_name(
        &s.fqn,
        s.chunk_offsets.as_deref(),
        &s.info.transform_descriptors,
    );
    let mut name = format!("{base}{ext}");
    if names.taken.insert(name_key(&name)) {
        return name;
    }
    let n = names.next.entry(format!("{base}{ext}")).or_insert(2);
    loop {
        name = format!("{base}~{n}{ext}");
        *n += 1;
        if names.taken.insert(name_key(&name)) {
            return name;
        }
    }
}

/// Zero bytes after a tar entry's data, up to the next block.
fn tar_padding(len: u64) -> usize {
    (BLOCK - (len % BLOCK as u64) as usize) % BLOCK
}

impl Sink for StreamSink {
    /// A stream is written in plan order.
    fn ordered(&self) -> bool {
        true
    }

    fn write(
        &mut self,
        _: &FilePlan,
        item: &PlanItem,
        at: u64,
        data: Bytes,
    ) -> Result<(), SinkError> {
        if at == 0 {
            self.start_item(item)?;
        }
        self.emit(data)
    }

    fn item_done(&mut self, _: &FilePlan, item: &PlanItem) -> Result<(), SinkError> {
        if self.format == StreamFormat::Tar {
            let pad = tar_padding(item.len());
            self.emit(Bytes::from_static(&[0u8; BLOCK][..pad]))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        if self.format == StreamFormat::Tar {
            self.emit(Bytes::from_static(&[0u8; 2 * BLOCK]))?;
        }
        self.flush_pending()?;
        self.out
            .flush()
            .map_err(SinkError::io("writing to stdout"))?;
        Ok(())
    }
}

/// The name of an item's tar entry, as (base, extension): the fqn percent-encoded into one safe
/// path component, `@` and the chunk offsets for tensors; `.pt`, then `.zst` for the ZStandard
/// transform (any other transform: its encoded descriptor). A base longer than [`MAX_NAME`] bytes
/// keeps its start and gets a hash of the whole, since file systems allow 255 bytes per name.
fn entry_name(fqn: &str, chunk_offsets: Option<&[u64]>, transforms: &[String]) -> (String, String) {
    let mut base = encode_component(fqn);
    if let Some(o) = chunk_offsets {
        base.push('@');
        base.push_str(&o.iter().map(u64::to_string).collect::<Vec<_>>().join("_"));
    }
    let mut ext = ".pt".to_owned();
    for d in transforms {
        ext.push('.');
        ext.push_str(&if d.starts_with("stream.zstd/") {
            "zst".to_owned()
        } else {
            encode_component(d)
        });
    }
    if base.len() > MAX_NAME {
        let digest = crate::units::sha256_hex(base.as_bytes());
        let mut cut = MAX_NAME - 20;
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        base = format!("{}~{}", &base[..cut], &digest[..16]);
    }
    (base, ext)
}

/// Percent-encodes everything but `[A-Za-z0-9._-]`, so the result is one path component that is
/// never `.` or `..` once a suffix is added.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The header block(s) of a regular file entry: ustar, preceded by a PAX extended header when the
/// name is longer than 100 bytes or the size does not fit 11 octal digits.
fn tar_header(name: &str, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 * BLOCK);
    let long_name = name.len() > 100;
    let big = size >= 8 << 30;
    if long_name || big {
        let mut records = String::new();
        if long_name {
            records.push_str(&pax_record("path", name));
        }
        if big {
            records.push_str(&pax_record("size", &size.to_string()));
        }
        out.extend(ustar_block("PaxHeader", records.len() as u64, b'x'));
        out.extend_from_slice(records.as_bytes());
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    let short: String = name
        .chars()
        .take_while({
            let mut n = 0;
            move |c| {
                n += c.len_utf8();
                n <= 100
            }
        })
        .collect();
    out.extend(ustar_block(&short, if big { 0 } else { size }, b'0'));
    out
}

/// A PAX record: `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len = len.to_string().len() + body.len();
    }
    format!("{len}{body}")
}

fn ustar_block(name: &str, size: u64, kind: u8) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let put = |h: &mut [u8; BLOCK], at: usize, bytes: &[u8]| {
        h[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut h, 0, &name.as_bytes()[..name.len().min(100)]);
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, b"00000000000\0");
    h[156] = kind;
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    put(&mut h, 148, b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_themselves() {
        for value in ["a", &"x".repeat(90), &"y".repeat(995)] {
            let r = pax_record("path", value);
            let (len, _) = r.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "{r}");
        }
    }

    #[test]
    fn names_are_one_safe_component() {
        assert_eq!(encode_component("model.layers.0.w"), "model.layers.0.w");
        assert_eq!(encode_component("../etc/passwd"), "..%2Fetc%2Fpasswd");
        assert_eq!(encode_component("a b"), "a%20b");
    }

    #[test]
    fn entry_names() {
        let zstd = vec!["stream.zstd/1".to_owned()];
        assert_eq!(
            entry_name("model.w", Some(&[0, 128]), &[]),
            ("model.w@0_128".into(), ".pt".into())
        );
        assert_eq!(
            entry_name("step", None, &zstd),
            ("step".into(), ".pt.zst".into())
        );
        assert_eq!(entry_name("s", Some(&[]), &[]).0, "s@");
        // Long names (and long multi-byte ones) stay under 255 bytes and stay distinct.
        for unit in ["layer.", "слой.", "層."] {
            let a = entry_name(&unit.repeat(100), Some(&[0]), &[]);
            let b = entry_name(&format!("{}x", unit.repeat(100)), Some(&[0]), &[]);
            assert!(a.0.len() + a.1.len() <= 255, "{}", a.0.len());
            assert_ne!(a.0, b.0);
        }
    }

    #[test]
    fn header_checksum_and_size() {
        let h = tar_header("x.pt", 1234);
        assert_eq!(h.len(), 512);
        assert_eq!(&h[124..136], b"00000002322\0");
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut copy = h.clone();
        copy[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, copy.iter().map(|&b| b as u32).sum::<u32>());
        let long = tar_header(&"n".repeat(150), 1);
        assert_eq!(long.len(), 3 * 512);
        assert_eq!(long[156], b'x');
    }
}
