//! Checking a `torch.save` archive (a stored, uncompressed zip) as its bytes stream past, in
//! bounded memory whatever its size.
//!
//! The checker keeps the first [`HEAD`] bytes, a rolling window of the last [`TAIL`] bytes (both as
//! references to the received pieces, not copies), and the CRC32 of every [`BLOCK`]-sized block. At the end it reads the central directory from the tail,
//! finds each record's data through its local header, and computes the record's CRC32 by
//! combining block CRCs with the CRCs of the partial blocks at its edges (which lie in the kept
//! head or tail: torch writes one large record, the tensor data, between small ones).

use std::borrow::Cow;
use std::collections::VecDeque;

use bytes::Bytes;
use crc32fast::Hasher;

/// Bytes kept from the start of the archive.
pub const HEAD: usize = 256 << 10;
/// Bytes kept from the end of the archive.
pub const TAIL: usize = 256 << 10;
/// CRC block size.
pub const BLOCK: u64 = 64 << 10;

/// One record (file) of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    /// Where the record's data is, relative to the archive's start.
    pub data: std::ops::Range<u64>,
    pub crc: u32,
}

/// A well-formed archive's records, with the bytes of the small ones that were kept.
#[derive(Debug, Clone)]
pub struct Archive {
    pub records: Vec<Record>,
    /// The records' data when it lies in the kept head or tail.
    kept: Vec<Option<Vec<u8>>>,
    /// Records saved without a CRC (torch's `compute_crc32=False`): their data was not checked.
    pub unchecked_crc: Vec<String>,
}

impl Archive {
    /// The data of a record whose name ends with `suffix` (`/data.pkl`), if it was kept.
    pub fn data(&self, suffix: &str) -> Option<&[u8]> {
        let i = self.records.iter().position(|r| r.name.ends_with(suffix))?;
        self.kept[i].as_deref()
    }

    /// The record whose name ends with `suffix`.
    pub fn record(&self, suffix: &str) -> Option<&Record> {
        self.records.iter().find(|r| r.name.ends_with(suffix))
    }
}

/// Feeds bytes in order, then [`ArchiveChecker::finish`].
#[derive(Debug)]
pub struct ArchiveChecker {
    len: u64,
    /// Pieces covering `[0, head_len)`.
    head: Vec<Bytes>,
    head_len: u64,
    /// Pieces covering `[tail_start, len)`.
    tail: VecDeque<Bytes>,
    tail_start: u64,
    blocks: Vec<u32>,
    current: Hasher,
}

/// The bytes `[a, b)` of consecutive pieces that start at `start`: borrowed when one piece holds
/// them, copied together otherwise.
fn gather<'p>(
    pieces: impl IntoIterator<Item = &'p Bytes>,
    start: u64,
    a: u64,
    b: u64,
) -> Cow<'p, [u8]> {
    let mut pos = start;
    let mut out: Option<Vec<u8>> = None;
    for p in pieces {
        let end = pos + p.len() as u64;
        if end > a && pos < b {
            let from = (a.max(pos) - pos) as usize;
            let to = (b.min(end) - pos) as usize;
            if out.is_none() && a >= pos && b <= end {
                return Cow::Borrowed(&p[from..to]);
            }
            out.get_or_insert_with(|| Vec::with_capacity((b - a) as usize))
                .extend_from_slice(&p[from..to]);
        }
        if end >= b {
            break;
        }
        pos = end;
    }
    Cow::Owned(out.unwrap_or_default())
}

impl Default for ArchiveChecker {
    fn default() -> Self {
        Self::new()
    }
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64le(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

const LOCAL: u32 = 0x0403_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const EOCD: u32 = 0x0605_4b50;
const EOCD64: u32 = 0x0606_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;

impl ArchiveChecker {
    pub fn new() -> Self {
        ArchiveChecker {
            len: 0,
            head: Vec::new(),
            head_len: 0,
            tail: VecDeque::new(),
            tail_start: 0,
            blocks: Vec::new(),
            current: Hasher::new(),
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next bytes of the archive (kept by reference where needed, never copied).
    pub fn feed(&mut self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        if self.head_len < HEAD as u64 {
            let n = (HEAD as u64 - self.head_len).min(piece.len() as u64) as usize;
            self.head.push(piece.slice(..n));
            self.head_len += n as u64;
        }
        self.tail.push_back(piece.clone());
        let mut kept = self.len + piece.len() as u64 - self.tail_start;
        while let Some(front) = self.tail.front() {
            if kept - (front.len() as u64) < TAIL as u64 {
                break;
            }
            kept -= front.len() as u64;
            self.tail_start += front.len() as u64;
            self.tail.pop_front();
        }
        let mut data: &[u8] = &piece;
        while !data.is_empty() {
            let in_block = (self.len % BLOCK) as usize;
            let n = (BLOCK as usize - in_block).min(data.len());
            self.current.update(&data[..n]);
            self.len += n as u64;
            data = &data[n..];
            if self.len.is_multiple_of(BLOCK) {
                let done = std::mem::replace(&mut self.current, Hasher::new());
                self.blocks.push(done.finalize());
            }
        }
    }

    /// The bytes `[a, b)` if they were kept.
    fn bytes(&self, a: u64, b: u64) -> Option<Cow<'_, [u8]>> {
        if a > b {
            return None;
        }
        if b <= self.head_len {
            return Some(gather(&self.head, 0, a, b));
        }
        if a >= self.tail_start && b <= self.len {
            return Some(gather(&self.tail, self.tail_start, a, b));
        }
        None
    }

    /// CRC32 of `[a, b)`, from kept bytes and block CRCs.
    fn crc(&self, a: u64, b: u64) -> Option<u32> {
        if let Some(bytes) = self.bytes(a, b) {
            return Some(crc32fast::hash(&bytes));
        }
        let first_full = a.div_ceil(BLOCK);
        let last_full = b / BLOCK; // blocks [first_full, last_full) are whole inside [a, b)
        if first_full >= last_full {
            return None;
        }
        let mut h = Hasher::new();
        h.update(&self.bytes(a, first_full * BLOCK)?);
        for blk in first_full..last_full {
            let crc = *self.blocks.get(blk as usize)?;
            h.combine(&Hasher::new_with_initial_len(crc, BLOCK));
        }
        let mut rest = Hasher::new();
        rest.update(&self.bytes(last_full * BLOCK, b)?);
        h.combine(&rest);
        Some(h.finalize())
    }

    /// Checks the archive; the error names what is wrong.
    pub fn finish(self) -> Result<Archive, String> {
        let records = locate(self.len, self.tail_start, &|a, b| self.bytes(a, b))?;
        let mut kept = Vec::new();
        let mut unchecked_crc = Vec::new();
        for r in &records {
            let (name, data_start, data_end, crc) = (&r.name, r.data.start, r.data.end, r.crc);
            let actual = self.crc(data_start, data_end).ok_or(format!(
                "record {name}: its edges were not kept, so its CRC cannot be checked"
            ))?;
            if actual != crc {
                if crc == 0 {
                    unchecked_crc.push(name.clone());
                } else {
                    return Err(format!(
                        "record {name} (bytes {data_start}..{data_end} of the item): CRC32 is {actual:08x}, the archive says {crc:08x}"
                    ));
                }
            }
            kept.push(self.bytes(data_start, data_end).map(Cow::into_owned));
        }
        Ok(Archive {
            records,
            kept,
            unchecked_crc,
        })
    }
}

/// The records of an archive of `len` bytes, found through its central directory and their local
/// headers, reading bytes with `bytes(a, b)` (`None` when `[a, b)` is not at hand). The CRCs are
/// the archive's, not checked here. The end records are looked for from `window_from` on (the
/// first byte of the kept end).
pub fn locate<'b>(
    len: u64,
    window_from: u64,
    bytes: &dyn Fn(u64, u64) -> Option<Cow<'b, [u8]>>,
) -> Result<Vec<Record>, String> {
    if len < 22 {
        return Err(format!("{len} bytes is too short for a torch.save archive"));
    }
    if bytes(0, 4).is_none_or(|b| u32le(&b, 0) != LOCAL) {
        return Err(
            "does not start with a zip local header (PK\\x03\\x04): not a torch.save archive"
                .into(),
        );
    }
    // End of central directory: the last 22 + up to 65535 bytes of comment.
    let window_start = len.saturating_sub(22 + 65_535).max(window_from);
    let window = bytes(window_start, len).ok_or("the end of the archive was not kept")?;
    let window: &[u8] = &window;
    let eocd = (0..=window.len() - 22)
        .rev()
        .find(|&i| u32le(window, i) == EOCD)
        .ok_or("no end-of-central-directory record: the archive is truncated or not a zip")?;
    let e = &window[eocd..];
    let eocd_at = window_start + eocd as u64;
    let mut entries = u16le(e, 10) as u64;
    let mut cd_size = u32le(e, 12) as u64;
    let mut cd_offset = u32le(e, 16) as u64;
    if u16le(e, 4) != 0 || u16le(e, 6) != 0 || u16le(e, 8) != u16le(e, 10) {
        return Err(
            "the end-of-central-directory record describes a multi-disk archive: corrupt".into(),
        );
    }
    // torch writes a zip64 end record and its locator right before the end record; when they
    // are there they must agree with it (and they hold the sizes when those overflow).
    let locator = eocd_at
        .checked_sub(20)
        .and_then(|at| bytes(at, eocd_at))
        .filter(|l| u32le(l, 0) == EOCD64_LOCATOR);
    let saturated = entries == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff;
    match locator {
        Some(loc) => {
            if u32le(&loc, 4) != 0 || u32le(&loc, 16) != 1 {
                return Err("the zip64 locator describes a multi-disk archive: corrupt".into());
            }
            let at = u64le(&loc, 8);
            let rec = at
                .checked_add(56)
                .and_then(|end| bytes(at, end))
                .filter(|r| r.len() == 56 && u32le(r, 0) == EOCD64)
                .ok_or("the zip64 locator points at no zip64 end record: corrupt")?;
            let (entries64, cd_size64, cd_offset64) =
                (u64le(&rec, 32), u64le(&rec, 40), u64le(&rec, 48));
            if u32le(&rec, 16) != 0
                || u32le(&rec, 20) != 0
                || u64le(&rec, 24) != entries64
                || at < cd_offset64.saturating_add(cd_size64)
            {
                return Err("the zip64 end record is inconsistent: corrupt".into());
            }
            if !saturated
                && (entries64 != entries || cd_size64 != cd_size || cd_offset64 != cd_offset)
            {
                return Err("the zip64 end record disagrees with the end-of-central-directory record: corrupt".into());
            }
            (entries, cd_size, cd_offset) = (entries64, cd_size64, cd_offset64);
        }
        None if saturated => return Err("zip64 sizes without a zip64 locator".into()),
        None => {}
    }
    let cd_end = cd_offset
        .checked_add(cd_size)
        .ok_or("central directory size overflows")?;
    if cd_end > eocd_at {
        return Err(format!(
            "the central directory ({cd_offset}..{cd_end}) runs past its end record at {eocd_at}: truncated or corrupt"
        ));
    }
    let cd = bytes(cd_offset, cd_end)
        .ok_or("the central directory was not kept (it is unusually large)")?;
    let cd: &[u8] = &cd;

    let mut records = Vec::new();
    let mut pos = 0usize;
    for i in 0..entries {
        if pos + 46 > cd.len() || u32le(cd, pos) != CENTRAL {
            return Err(format!("central directory entry {i} is malformed"));
        }
        let method = u16le(cd, pos + 10);
        let crc = u32le(cd, pos + 16);
        let mut csize = u32le(cd, pos + 20) as u64;
        let mut usize_ = u32le(cd, pos + 24) as u64;
        let name_len = u16le(cd, pos + 28) as usize;
        let extra_len = u16le(cd, pos + 30) as usize;
        let comment_len = u16le(cd, pos + 32) as usize;
        let mut local = u32le(cd, pos + 42) as u64;
        let end = pos + 46 + name_len + extra_len + comment_len;
        if end > cd.len() {
            return Err(format!(
                "central directory entry {i} runs past the directory"
            ));
        }
        let name = String::from_utf8_lossy(&cd[pos + 46..pos + 46 + name_len]).into_owned();
        // Zip64 extra field: the 0xffffffff fields, in order.
        let mut extra = &cd[pos + 46 + name_len..pos + 46 + name_len + extra_len];
        while extra.len() >= 4 {
            let (id, n) = (u16le(extra, 0), u16le(extra, 2) as usize);
            let body = extra
                .get(4..4 + n)
                .ok_or(format!("record {name}: malformed extra field"))?;
            if id == 1 {
                let mut f = body;
                for field in [&mut usize_, &mut csize, &mut local] {
                    if *field == 0xffff_ffff && f.len() >= 8 {
                        *field = u64le(f, 0);
                        f = &f[8..];
                    }
                }
            }
            extra = &extra[4 + n..];
        }
        pos = end;
        if method != 0 {
            return Err(format!(
                "record {name} is compressed (method {method}); torch.save writes stored records"
            ));
        }
        if csize != usize_ {
            return Err(format!(
                "record {name}: stored sizes differ ({csize} vs {usize_})"
            ));
        }
        let header = bytes(local, local.saturating_add(30).min(len))
            .filter(|h| h.len() == 30)
            .ok_or(format!(
                "record {name}: its local header at {local} is outside the archive or not kept"
            ))?;
        let header: &[u8] = &header;
        if u32le(header, 0) != LOCAL {
            return Err(format!("record {name}: no local header at {local}"));
        }
        let lname = u16le(header, 26) as u64;
        let lextra = u16le(header, 28) as u64;
        let data_start = local + 30 + lname + lextra;
        let data_end = data_start
            .checked_add(csize)
            .ok_or(format!("record {name}: size overflows"))?;
        if data_end > cd_offset {
            return Err(format!(
                "record {name}: data {data_start}..{data_end} runs into the central directory"
            ));
        }
        match bytes(local + 30, local + 30 + lname) {
            Some(n) if n == name.as_bytes() => {}
            Some(_) => {
                return Err(format!(
                    "record {name}: the local header names another file"
                ));
            }
            None => return Err(format!("record {name}: local header not kept")),
        }
        records.push(Record {
            name,
            data: data_start..data_end,
            crc,
        });
    }
    let mut order: Vec<&Record> = records.iter().collect();
    order.sort_by_key(|r| r.data.start);
    for w in order.windows(2) {
        if w[0].data.end > w[1].data.start {
            return Err(format!("records {} and {} overlap", w[0].name, w[1].name));
        }
    }
    Ok(records)
}

/// Decompressed size beyond an item's raw tensor data at which a ZStandard item is refused (a
/// decompression bomb).
pub const MAX_DECODED_SLACK: u64 = 64 << 20;

/// Undoes an item's transform (torch's `stream.zstd` extension: one ZStandard stream), refusing
/// more than `raw_len` plus [`MAX_DECODED_SLACK`] bytes of output.
pub fn undo_transform(
    descriptors: &[String],
    data: &[u8],
    raw_len: u64,
) -> Result<Vec<u8>, String> {
    use std::io::Read;
    if descriptors.len() != 1 || !descriptors[0].starts_with("stream.zstd") {
        return Err(format!("unknown transform {descriptors:?}"));
    }
    let limit = raw_len.saturating_add(MAX_DECODED_SLACK);
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(data)
        .map_err(|e| format!("not a zstd stream: {e}"))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = decoder
            .read(&mut buf)
            .map_err(|e| format!("zstd stream is corrupt: {e}"))?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() as u64 > limit {
            return Err(format!("decompresses to more than {limit} bytes: refused"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal stored zip with the given records, as torch writes them (local headers, data,
    /// central directory, end record).
    pub(crate) fn zip(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in records {
            let offset = out.len() as u32;
            let crc = crc32fast::hash(data);
            out.extend_from_slice(&LOCAL.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            central.extend_from_slice(&CENTRAL.to_le_bytes());
            central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&crc.to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(&EOCD.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&(records.len() as u16).to_le_bytes());
        out.extend_from_slice(&(records.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    fn check(data: &[u8], piece: usize) -> Result<Archive, String> {
        let mut c = ArchiveChecker::new();
        for p in data.chunks(piece.max(1)) {
            c.feed(Bytes::copy_from_slice(p));
        }
        c.finish()
    }

    #[test]
    fn a_large_record_is_checked_through_block_crcs() {
        // 3 MiB of data: more than head + tail, so its CRC must come from combined blocks.
        let big: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let z = zip(&[
            ("archive/data.pkl", b"pickle"),
            ("archive/data/0", &big),
            ("archive/version", b"3\n"),
        ]);
        let a = check(&z, 100_000).unwrap();
        assert_eq!(a.records.len(), 3);
        assert_eq!(a.data("/data.pkl"), Some(&b"pickle"[..]));
        assert_eq!(a.data("/data/0"), None, "the big record is not kept");
        assert_eq!(
            a.record("/data/0").unwrap().data.end - a.record("/data/0").unwrap().data.start,
            3 << 20
        );

        let mut bad = z.clone();
        let mid = z.len() / 2;
        bad[mid] ^= 1;
        let e = check(&bad, 65_536).unwrap_err();
        assert!(e.contains("archive/data/0") && e.contains("CRC32"), "{e}");
    }

    #[test]
    fn damage_is_named() {
        let z = zip(&[
            ("archive/data.pkl", b"pickle"),
            ("archive/data/0", b"0123456789"),
        ]);
        assert!(check(&z, 7).is_ok());
        let e = check(&z[..z.len() - 5], 7).unwrap_err();
        assert!(e.contains("end-of-central-directory"), "{e}");
        let e = check(&z[4..], 7).unwrap_err();
        assert!(e.contains("local header"), "{e}");
        let mut flipped = z.clone();
        flipped[30 + "archive/data.pkl".len() + 1] ^= 0x20;
        let e = check(&flipped, 7).unwrap_err();
        assert!(e.contains("archive/data.pkl") && e.contains("CRC32"), "{e}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400), piece in 1usize..64) {
            let _ = check(&data, piece);
        }

        #[test]
        fn damaged_archives_never_panic(flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8), piece in 1usize..64) {
            let mut z = zip(&[("archive/data.pkl", b"pickle"), ("archive/data/0", b"0123456789")]);
            for (i, b) in flips {
                let i = i % z.len();
                z[i] = b;
            }
            let _ = check(&z, piece);
        }
    }
}
