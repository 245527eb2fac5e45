//! The fast path for the `.metadata` files torch writes: one pass over the opcodes straight into
//! [`RankMetadata`], without the general value graph of [`super::pickle`].
//!
//! torch pickles the same few shapes a million times (`MetadataIndex`, `_StorageInfo`,
//! `ChunkStorageMetadata`, each `NEWOBJ` + `BUILD` of a state dict, and `torch.Size` as a `REDUCE`).
//! This reader interprets the binary opcodes of protocols 2 to 5 with compact values (strings are
//! spans of the input, dimensions spans of one `u64` pool) and turns each object of a known class
//! into its record at its `BUILD`; the containers `state_dict_metadata`, `storage_data` and a
//! tensor's `chunks` take the records as they are filled, and everything an object no longer needs
//! (its state dict, the `torch.Size` tuples) is freed at once. A first pass over the opcodes finds
//! the memo entries that are ever read back, and only those are kept.
//!
//! A large input is read by two threads: the second reads `storage_data` (from its key on) while
//! the first reads `state_dict_metadata`, and the first takes the second's values only once it
//! has checked, where the second started, everything the second assumed (see [`read_split`]); it
//! reads on by itself otherwise. The answer is always the one-thread read's.
//!
//! It never fails: on anything it does not know (an opcode, a global outside its set, a class or a
//! field of another shape, a limit reached, malformed input) it returns `None` and the caller reads
//! the file with the general unpickler and [`super::model`], which give the findings and the
//! errors. So it keeps every safety property of those: it calls nothing, its memory is linear in
//! the input, and a result it returns is the one the general path gives (a property test and the
//! `metadata` fuzz target compare the two).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::dtype;
use super::model::{
    self, EntryMeta, Interner, PathPart, RankMetadata, StorageInfo, StorageMeta, TensorMeta,
};
use super::pickle::Limits;
use super::{Chunk, Dims, Entry, Storage};

/// What the fast path read.
#[derive(Debug)]
pub(crate) struct Read {
    pub md: RankMetadata,
    /// The highest protocol declared by `PROTO`.
    pub protocol: u8,
    /// For each item of `md.storage`, the index in `md.entries` of the entry it names, where the
    /// file names both by one memo entry (torch's files: the storage key reads back the fqn the
    /// entry's key wrote); `u32::MAX` where it does not. `None` when the entries had a duplicate
    /// key. [`super::Checkpoint`] links by it instead of looking each fqn up.
    pub owners: Option<Vec<u32>>,
}

/// Reads a torch `.metadata` pickle, or `None` when it is not one of the shapes this reader knows.
pub(crate) fn read(data: &[u8], limits: Limits) -> Option<Read> {
    read_split(data, limits, SPLIT_MIN).0
}

/// The smallest input whose `storage_data` is read on a second thread: below it the thread and the
/// second look at the memo cost more than they save.
const SPLIT_MIN: usize = 8 << 20;

/// How a read went, for the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// One thread read it all (a small input, one core, no `storage_data` key, or no thread).
    No,
    /// The second thread's part was taken.
    Merged,
    /// The second thread's part was refused (it gave up, or what it assumed did not hold): the
    /// first read on from the split point.
    Refused,
    /// The split read failed, and the one-thread read gave the answer.
    Again,
}

/// [`read`], splitting off `storage_data` when the input has at least `min` bytes.
///
/// The first pass notes where the (last) `storage_data` key ends. A second thread learns from
/// the opcodes before that point the memo entries that are plain strings and globals, then reads
/// from there (its own stack, objects and pools) until an opcode would reach below its start,
/// while this thread reads up to that point. There this thread checks every assumption the other
/// made (the memo count, each memo entry it read, the nesting of marks) and takes its values, or
/// reads on by itself. Whatever goes wrong, the answer is the one-thread read's.
fn read_split(data: &[u8], limits: Limits, min: usize) -> (Option<Read>, Split) {
    if data.len() > limits.max_input || u32::try_from(data.len()).is_err() {
        return (None, Split::No);
    }
    let Some(FirstPass {
        mut referenced,
        split,
    }) = referenced_memo(data, &limits)
    else {
        return (None, Split::No);
    };
    if referenced.rank_all().is_none() {
        return (None, Split::No);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one_thread = || Machine::new(data, limits, &referenced).and_then(Machine::run);
    let Some(at) = split.filter(|_| data.len() >= min && cores >= 2) else {
        return (one_thread(), Split::No);
    };
    let cancel = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("metadata-split".into())
            .spawn_scoped(s, || Part::read(data, limits, &referenced, at, &cancel))
            .ok()?;
        let mut join = Some(move || {
            worker
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        });
        let r =
            Machine::new(data, limits, &referenced).and_then(|m| m.run_split(at.pos, &mut join));
        // When this thread stopped before the split point, the other need not go on.
        cancel.store(true, Ordering::Relaxed);
        r
    });
    match r {
        Some((r, how)) => (Some(r), how),
        None => (one_thread(), Split::Again),
    }
}

/// Reads `data` both ways and panics if the fast path returns a model the general path does not
/// give (a different one, or one where the general path fails or finds an unknown global), or if
/// the fast path split at `storage_data` (whatever the size) does not give what one thread gives.
/// Returns whether the fast path read it. For the tests and the `metadata` fuzz target.
#[doc(hidden)]
pub fn check_against_general(data: &[u8]) -> bool {
    let (split, _) = read_split(data, Limits::default(), 0);
    let (one, _) = read_split(data, Limits::default(), usize::MAX);
    let (split, fast) = match (split, one) {
        (None, None) => return false,
        (Some(split), Some(fast)) => (split, fast),
        (split, _) => panic!(
            "the split read {} a pickle the one-thread read {}",
            if split.is_some() { "reads" } else { "refuses" },
            if split.is_some() { "refuses" } else { "reads" },
        ),
    };
    assert!(
        split.md == fast.md && split.protocol == fast.protocol && split.owners == fast.owners,
        "the split read reads another model than the one-thread read"
    );
    let p = super::pickle::Pickle::parse(data)
        .unwrap_or_else(|e| panic!("the fast path read a pickle the general path refuses: {e}"));
    if let Some(g) = p
        .globals
        .iter()
        .find(|g| !model::is_known_global(&g.module, &g.name))
    {
        panic!(
            "the fast path read a pickle that names {}.{}",
            g.module, g.name
        );
    }
    let md = model::read(&p)
        .unwrap_or_else(|e| panic!("the fast path read a pickle the model refuses: {e}"));
    assert!(
        fast.md == md,
        "the fast path reads another model than the general path"
    );
    assert_eq!(fast.protocol, p.protocol);
    true
}

/// Most nesting of general containers the fast path follows (torch's files need 3).
const MAX_NESTING: u8 = 16;

/// A set of memo indexes, and the rank of each in the set (so that the memo holds only those, in
/// one dense vector, without hashing).
struct Bits {
    words: Vec<u64>,
    /// How many indexes the set holds below each word.
    ranks: Vec<u32>,
    /// How many it holds.
    count: usize,
}

impl Bits {
    fn set(&mut self, i: usize) {
        let w = i / 64;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (i % 64);
    }

    /// Fills the ranks once every index is set; returns how many there are.
    fn rank_all(&mut self) -> Option<usize> {
        self.ranks = Vec::with_capacity(self.words.len());
        let mut n = 0u32;
        for w in &self.words {
            self.ranks.push(n);
            n = n.checked_add(w.count_ones())?;
        }
        self.count = n as usize;
        Some(self.count)
    }

    /// How many indexes below `i` the set holds.
    fn below(&self, i: usize) -> usize {
        match self.words.get(i / 64) {
            Some(w) => {
                self.ranks[i / 64] as usize + (w & ((1u64 << (i % 64)) - 1)).count_ones() as usize
            }
            None => self.count,
        }
    }

    /// The rank of `i` when it is in the set.
    fn rank(&self, i: usize) -> Option<usize> {
        let w = *self.words.get(i / 64)?;
        let bit = 1u64 << (i % 64);
        if w & bit == 0 {
            return None;
        }
        Some(self.ranks[i / 64] as usize + (w & (bit - 1)).count_ones() as usize)
    }
}

/// The input, read from the start: opcodes and their arguments, never past the end.
struct Ops<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Ops<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let b = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(b)
    }

    fn uint(&mut self, n: usize) -> Option<u64> {
        let b = self.take(n)?;
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> Option<&'a [u8]> {
        let rest = self.data.get(self.pos..)?;
        let end = rest.iter().position(|&b| b == b'\n')?;
        self.pos += end + 1;
        Some(&rest[..end])
    }

    /// The argument of a string opcode (`SHORT_BINUNICODE`, `BINUNICODE`, `BINUNICODE8`).
    fn string_arg(&mut self, op: u8) -> Option<&'a [u8]> {
        let n = match op {
            0x8c => self.uint(1)?,
            b'X' => self.uint(4)?,
            _ => self.uint(8)?,
        };
        self.take(usize::try_from(n).ok()?)
    }
}

/// For the first pass: 1 + the length of the argument of each opcode that it skips by a fixed
/// length and that is not a memo opcode; 0 for every other.
const SKIP: [u8; 256] = {
    let mut t = [0u8; 256];
    let none = [
        b'N', 0x88, 0x89, b')', 0x85, 0x86, 0x87, b't', b']', b'}', b'a', b'e', b's', b'u', b'(',
        0x93, b'R', 0x81, b'b',
    ];
    let mut i = 0;
    while i < none.len() {
        t[none[i] as usize] = 1;
        i += 1;
    }
    t[b'K' as usize] = 2;
    t[0x80] = 2;
    t[b'M' as usize] = 3;
    t[b'J' as usize] = 5;
    t[0x95] = 9;
    t[b'G' as usize] = 9;
    t
};

/// What the first pass finds.
struct FirstPass {
    /// The memo indexes a `GET` reads.
    referenced: Bits,
    /// Where the last `storage_data` string (and its memo write) ends.
    split: Option<SplitAt>,
}

/// A point between two opcodes, and how many memo entries were written before it.
#[derive(Debug, Clone, Copy)]
struct SplitAt {
    pos: usize,
    next: u32,
}

/// The little-endian unsigned integer of `n` (at most 8) bytes at `i` of the input, for the two
/// scans that skip opcodes by their arguments' lengths.
#[inline]
fn le_at(data: &[u8], i: usize, n: usize) -> Option<usize> {
    let b = data.get(i..i.checked_add(n)?)?;
    let mut a = [0u8; 8];
    a.get_mut(..n)?.copy_from_slice(b);
    usize::try_from(u64::from_le_bytes(a)).ok()
}

/// The first pass: which memo indexes a `GET` reads, with every memo write at the next index (as
/// Python's pickler writes them), and where the `storage_data` key ends.
fn referenced_memo(data: &[u8], limits: &Limits) -> Option<FirstPass> {
    let mut bits = Bits {
        words: Vec::new(),
        ranks: Vec::new(),
        count: 0,
    };
    let mut split = None;
    let mut next = 0usize;
    let mut pos = 0usize;
    let byte = |i: usize| data.get(i).copied().map(usize::from);
    let le = |i: usize, n: usize| le_at(data, i, n);
    loop {
        let op = *data.get(pos)?;
        pos += 1;
        // Only the memo opcodes are read here; the others are skipped by their length (the
        // second pass checks them). The most frequent first, without the jump of the match:
        // a memo write, a short string, and the opcodes of a fixed length.
        if op == 0x94 {
            next += 1;
            if next > limits.max_memo {
                return None;
            }
            continue;
        }
        if op == 0x8c {
            let n = byte(pos)?;
            if n == 12 && data.get(pos + 1..pos + 13) == Some(b"storage_data") {
                split = Some((pos + 13, next));
            }
            pos += 1 + n;
            continue;
        }
        let skip = SKIP[usize::from(op)];
        if skip != 0 {
            pos += usize::from(skip - 1);
            continue;
        }
        match op {
            b'.' => {
                // The split point is after the key's memo write, when it has one.
                let split = split.and_then(|(pos, next): (usize, usize)| {
                    let (pos, next) = match data.get(pos) {
                        Some(0x94) => (pos + 1, next + 1),
                        _ => (pos, next),
                    };
                    Some(SplitAt {
                        pos,
                        next: u32::try_from(next).ok()?,
                    })
                });
                return Some(FirstPass {
                    referenced: bits,
                    split,
                });
            }
            b'q' | b'r' => {
                if op == b'q' {
                    if byte(pos)? != next {
                        return None;
                    }
                    pos += 1;
                } else if op == b'r' {
                    if le(pos, 4)? != next {
                        return None;
                    }
                    pos += 4;
                }
                next += 1;
                if next > limits.max_memo {
                    return None;
                }
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    pos += 1;
                    byte(pos - 1)?
                } else {
                    pos += 4;
                    le(pos - 4, 4)?
                };
                if i >= next {
                    return None;
                }
                bits.set(i);
            }
            b'X' => pos = pos.checked_add(4 + le(pos, 4)?)?,
            0x8a => pos += 1 + byte(pos)?,
            0x8d => pos = pos.checked_add(8)?.checked_add(le(pos, 8)?)?,
            b'c' => {
                for _ in 0..2 {
                    pos += data.get(pos..)?.iter().position(|&b| b == b'\n')? + 1;
                }
            }
            // The opcodes of `SKIP` do not come here.
            _ => return None,
        }
    }
}

/// A class or function the fast path knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Metadata,
    TensorStorage,
    BytesStorage,
    Chunk,
    Properties,
    Index,
    StorageMeta,
    StorageInfo,
    MemFormat,
    Size,
    Layout,
    Path,
    /// `torch.<dtype>`: the span of its name in the input.
    Dtype(u32, u32),
}

fn class_of(module: &str, name: &str, span: (u32, u32)) -> Option<Class> {
    if !model::is_known_global(module, name) {
        return None;
    }
    let metadata = model::METADATA_MODULES.contains(&module);
    Some(match (module, name) {
        (_, "Metadata") if metadata => Class::Metadata,
        (_, "TensorStorageMetadata") if metadata => Class::TensorStorage,
        (_, "BytesStorageMetadata") if metadata => Class::BytesStorage,
        (_, "ChunkStorageMetadata") if metadata => Class::Chunk,
        (_, "MetadataIndex") if metadata => Class::Index,
        (_, "StorageMeta") if metadata => Class::StorageMeta,
        (_, "_MEM_FORMAT_ENCODING") if metadata => Class::MemFormat,
        (_, "TensorProperties") if metadata || module == model::SHARDED_TENSOR_MODULE => {
            Class::Properties
        }
        (model::SHARDED_TENSOR_MODULE, "MEM_FORMAT_ENCODING") => Class::MemFormat,
        (m, "_StorageInfo") if model::FILESYSTEM_MODULES.contains(&m) => Class::StorageInfo,
        ("torch", "Size") => Class::Size,
        ("torch", n) if dtype::is_dtype_name(n) => Class::Dtype(span.0, span.1),
        ("torch.serialization", "_get_layout") => Class::Layout,
        ("pathlib", _) => Class::Path,
        _ => return None,
    })
}

/// A value on the stack, in the memo or in a container: 16 bytes, no allocation of its own.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Val {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A string: its span of the input (checked UTF-8), and, once a memo entry that is read back
    /// holds it, 1 + that entry's rank in `Machine::referenced` (its index in `Machine::strs`;
    /// 0 before).
    Str(u32, u32, u32),
    Global(Class),
    /// A tuple of non-negative integers: its span of the dims pool.
    Dims(u32, u32),
    /// `torch.Size(dims)`: its span of the dims pool.
    Size(u32, u32),
    /// Any other tuple of flat values (no tuples, objects or containers in it): its span of the
    /// tuple pool.
    Tup(u32, u32),
    /// `_get_layout(name)`: the span of the name.
    Layout(u32, u32),
    /// `_MEM_FORMAT_ENCODING(i)`.
    MemFormat(i64),
    /// A `pathlib` path of its parts: their span of the tuple pool (strings).
    Path(u32, u32),
    Obj(u32),
    Cont(u32),
}

/// An object: a known class until its `BUILD`, then what the model keeps of it.
#[derive(Debug, Clone)]
enum Rec {
    Free,
    /// Moved out; the slot is freed when its value is released.
    Taken,
    Pending(Class),
    /// A chunk as the entry keeps it (not yet linked to storage).
    Chunk(Chunk),
    /// The fqn, the memo string it was read back from (as `Val::Str` numbers it, or 0) and the
    /// offset.
    Index(Arc<str>, u32, Option<Dims>),
    Info(StorageInfo),
    Properties(Box<TensorMeta>),
    /// A tensor's properties and shape, and its chunks.
    Tensor(Box<TensorMeta>, Vec<Chunk>),
    StorageMeta(Box<StorageMeta>),
    Metadata(Box<RankMetadata>, Option<Vec<u32>>),
}

#[derive(Debug, Clone)]
enum Cont {
    Free,
    Taken,
    Dict(Vec<(Val, Val)>),
    List(Vec<Val>),
    /// `state_dict_metadata`: a dict of strings to tensor or bytes entries, the memo string of
    /// each key (as [`Rec::Index`] has it) and the hash of each key.
    Entries(Vec<Entry>, Vec<u32>, Box<model::KeyHashes>),
    /// `storage_data`: a dict of `MetadataIndex` to `_StorageInfo`, and the memo string of each
    /// key's fqn.
    Storage(Vec<Storage>, Vec<u32>),
    /// A tensor's `chunks`: a list of `ChunkStorageMetadata`.
    Chunks(Vec<Chunk>),
}

struct Slot<T> {
    /// The memo holds it (a `GET` may read it again): never moved out or freed.
    pinned: bool,
    /// Nesting of general containers (containers only).
    depth: u8,
    value: T,
}

/// Slots that are reused once freed.
struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    fn alloc(&mut self, value: T, depth: u8) -> Option<u32> {
        let slot = Slot {
            pinned: false,
            depth,
            value,
        };
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = slot;
            return Some(i);
        }
        let i = u32::try_from(self.slots.len()).ok()?;
        self.slots.push(slot);
        Some(i)
    }

    fn get(&self, i: u32) -> Option<&Slot<T>> {
        self.slots.get(i as usize)
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut Slot<T>> {
        self.slots.get_mut(i as usize)
    }
}

/// Whether a value may go into a tuple of the pool: nothing that holds other values.
fn is_flat(v: &Val) -> bool {
    !matches!(v, Val::Tup(..) | Val::Path(..) | Val::Obj(_) | Val::Cont(_))
}

/// The fields of an object's state dict that a class reads, and the dict's pairs (to release
/// once read, when they are the reader's).
struct Fields<const N: usize> {
    values: [Option<Val>; N],
    pairs: Vec<(Val, Val)>,
    owned: bool,
}

/// The string a span of the input was interned as last.
type LastInterned = Option<(Val, Arc<str>)>;

/// The last tensor properties' dtype, layout and memory format, by what named them (the dtype's
/// name, the layout and memory format values).
type LastProperties<'a> = Option<((&'a str, Val, Val), [Arc<str>; 3])>;

/// `planner_data`: fqn -> key path.
type PlannerData = Vec<(String, Vec<PathPart>)>;

struct Machine<'a> {
    data: &'a [u8],
    limits: Limits,
    referenced: &'a Bits,
    /// For the second thread's part: the memo ranks below its start (the entries it did not
    /// write), and which of them it read. 0 and empty for the first thread.
    outside: u32,
    outside_read: Vec<u64>,
    /// The most marks the stack held.
    max_marks: usize,
    /// The fqn of a `MetadataIndex` the part reads from a memo entry outside it; the first
    /// thread puts its own string in place (see [`Machine::take_part`]).
    placeholder: Option<Arc<str>>,
    stack: Vec<Val>,
    marks: Vec<usize>,
    /// Emptied vectors of released dicts, reused.
    spare_dicts: Vec<Vec<(Val, Val)>>,
    /// The memo entries a `GET` reads, by their rank in `referenced`.
    memo: Vec<Option<Val>>,
    memo_next: u32,
    /// Dimensions of `Val::Dims` and `Val::Size`, and the elements of `Val::Tup`/`Val::Path`:
    /// freed from the end as their values are released, except below the floors (the spans the
    /// memo holds).
    dims: Vec<u64>,
    dims_floor: usize,
    tuples: Vec<Val>,
    tuples_floor: usize,
    objs: Slab<Rec>,
    conts: Slab<Cont>,
    intern: Interner,
    /// The interned strings of memo entries that are read back, by their rank in `referenced`.
    strs: Vec<Option<Arc<str>>>,
    last_fqn: LastInterned,
    last_path: LastInterned,
    last_properties: LastProperties<'a>,
    /// Whether the first `state_dict_metadata` and `storage_data` got their room.
    reserved_entries: bool,
    reserved_storage: bool,
    protocol: u8,
}

type Step<T> = Option<T>;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], limits: Limits, referenced: &'a Bits) -> Option<Self> {
        let read_back = referenced.count;
        let memo = vec![None; read_back];
        Some(Machine {
            data,
            limits,
            referenced,
            outside: 0,
            outside_read: Vec::new(),
            max_marks: 0,
            placeholder: None,
            stack: Vec::new(),
            marks: Vec::new(),
            spare_dicts: Vec::new(),
            memo,
            memo_next: 0,
            dims: Vec::new(),
            dims_floor: 0,
            tuples: Vec::new(),
            tuples_floor: 0,
            objs: Slab::new(),
            conts: Slab::new(),
            // The strings read back (most of them fqns) are not interned: each memo entry is
            // one allocation, shared by every value that reads it back.
            intern: Interner::default(),
            strs: vec![None; read_back],
            last_fqn: None,
            last_path: None,
            last_properties: None,
            reserved_entries: false,
            reserved_storage: false,
            protocol: 0,
        })
    }

    fn run(self) -> Option<Read> {
        self.run_split(usize::MAX, &mut None::<fn() -> Option<Part<'a>>>)
            .map(|r| r.0)
    }

    /// Reads the whole input; at `at`, takes the other thread's part from `join` (when it is
    /// `Some`: it is `None` afterwards).
    fn run_split(
        mut self,
        at: usize,
        join: &mut Option<impl FnOnce() -> Option<Part<'a>>>,
    ) -> Option<(Read, Split)> {
        let mut ops = Ops {
            data: self.data,
            pos: 0,
        };
        let mut how = Split::No;
        loop {
            if ops.pos == at
                && let Some(join) = join.take()
            {
                how = Split::Refused;
                if let Some(part) = join()
                    && let Some(end) = self.take_part(part)?
                {
                    ops.pos = end;
                    how = Split::Merged;
                }
            }
            let op = *ops.data.get(ops.pos)?;
            ops.pos += 1;
            if op == b'.' {
                let root = self.pop()?;
                let Val::Obj(id) = root else { return None };
                let Rec::Metadata(md, owners) = self.take_obj(id)? else {
                    return None;
                };
                let read = Read {
                    md: *md,
                    protocol: self.protocol,
                    owners,
                };
                return Some((read, how));
            }
            if op == 0x95 {
                Self::frame(&mut ops)?;
                continue;
            }
            self.step(op, &mut ops)?;
        }
    }

    /// `FRAME`: its declared length must be within the input, as the general reader checks.
    fn frame(ops: &mut Ops<'a>) -> Step<()> {
        if ops.uint(8)? > (ops.data.len() - ops.pos) as u64 {
            return None;
        }
        Some(())
    }

    // ---- the second thread -------------------------------------------------------------------

    /// The second thread's part: reads from `from` until an opcode would take a value or a mark
    /// from below its start, or `STOP`; returns where that opcode is.
    fn run_part(&mut self, from: usize, cancel: &AtomicBool) -> Option<usize> {
        let mut ops = Ops {
            data: self.data,
            pos: from,
        };
        loop {
            let at = ops.pos;
            let op = *ops.data.get(at)?;
            if self.marks.is_empty() && self.stack.len() < usize::from(NEEDS[usize::from(op)]) {
                return Some(at);
            }
            if cancel.load(Ordering::Relaxed) {
                return None;
            }
            ops.pos += 1;
            if op == 0x95 {
                Self::frame(&mut ops)?;
                continue;
            }
            self.step(op, &mut ops)?;
        }
    }

    /// Takes the second thread's part when everything it assumed holds here (the memo count at
    /// its start, each memo entry it read from before its start, the nesting of marks): moves its
    /// values onto this stack and its memo entries into this memo, and returns where it ended.
    /// `Some(None)` when it is refused (this thread reads on from here), `None` when taking it
    /// failed (the read fails).
    fn take_part(&mut self, mut part: Part<'a>) -> Step<Option<usize>> {
        let b = &mut part.m;
        if self.memo_next != part.start_next
            || self.marks.len() + b.max_marks > self.limits.max_depth as usize
        {
            return Some(None);
        }
        for (w, &word) in b.outside_read.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let r = w * 64 + word.trailing_zeros() as usize;
                word &= word - 1;
                let assumed = b.memo.get(r).copied().flatten();
                if assumed.is_none() || self.memo.get(r).copied().flatten() != assumed {
                    return Some(None);
                }
            }
        }
        self.protocol = self.protocol.max(b.protocol);
        let mut moved = Moved {
            objs: vec![u32::MAX; b.objs.slots.len()],
            conts: vec![u32::MAX; b.conts.slots.len()],
        };
        let outside = b.outside as usize;
        for r in outside..b.strs.len() {
            if let Some(a) = b.strs[r].take() {
                *self.strs.get_mut(r)? = Some(a);
            }
        }
        for r in outside..b.memo.len() {
            if let Some(v) = b.memo[r] {
                let v = self.adopt(b, &mut moved, v)?;
                self.pin(v);
                *self.memo.get_mut(r)? = Some(v);
            }
        }
        for v in std::mem::take(&mut b.stack) {
            let v = self.adopt(b, &mut moved, v)?;
            self.stack.push(v);
        }
        self.memo_next = b.memo_next;
        // What came from the part is never cut from the pools (a pinned container's dimensions
        // among it are not pinned one by one).
        self.dims_floor = self.dims.len();
        self.tuples_floor = self.tuples.len();
        Some(Some(part.end))
    }

    /// A fqn of the part that is a placeholder (it names a memo string from before the part's
    /// start): this thread's string of that memo entry.
    fn fqn_for(&self, b: &Machine<'a>, id: u32) -> Option<Option<Arc<str>>> {
        if !b.is_outside(id) {
            return Some(None);
        }
        Some(Some(self.strs.get(id as usize - 1)?.clone()?))
    }

    /// A value of the part, moved into this machine (its objects and containers once each, as
    /// `moved` records).
    fn adopt(&mut self, b: &mut Machine<'a>, moved: &mut Moved, v: Val) -> Step<Val> {
        Some(match v {
            Val::Dims(s, l) | Val::Size(s, l) => {
                let start = u32::try_from(self.dims.len()).ok()?;
                self.dims.extend_from_slice(b.dims_slice(s, l)?);
                match v {
                    Val::Dims(..) => Val::Dims(start, l),
                    _ => Val::Size(start, l),
                }
            }
            Val::Tup(s, l) | Val::Path(s, l) => {
                let items = b.tuples.get(s as usize..s as usize + l as usize)?.to_vec();
                let items = items
                    .into_iter()
                    .map(|e| self.adopt(b, moved, e))
                    .collect::<Option<Vec<Val>>>()?;
                let start = u32::try_from(self.tuples.len()).ok()?;
                self.tuples.extend_from_slice(&items);
                match v {
                    Val::Tup(..) => Val::Tup(start, l),
                    _ => Val::Path(start, l),
                }
            }
            Val::Obj(i) => {
                let j = *moved.objs.get(i as usize)?;
                if j != u32::MAX {
                    return Some(Val::Obj(j));
                }
                let slot = b.objs.get_mut(i)?;
                let pinned = slot.pinned;
                let rec = match std::mem::replace(&mut slot.value, Rec::Free) {
                    Rec::Free | Rec::Taken => return None,
                    Rec::Index(fqn, id, offset) => {
                        Rec::Index(self.fqn_for(b, id)?.unwrap_or(fqn), id, offset)
                    }
                    rec => rec,
                };
                let j = self.objs.alloc(rec, 0)?;
                self.objs.get_mut(j)?.pinned = pinned;
                moved.objs[i as usize] = j;
                Val::Obj(j)
            }
            Val::Cont(i) => {
                let j = *moved.conts.get(i as usize)?;
                if j != u32::MAX {
                    return Some(Val::Cont(j));
                }
                let slot = b.conts.get_mut(i)?;
                let (pinned, depth) = (slot.pinned, slot.depth);
                let c = std::mem::replace(&mut slot.value, Cont::Free);
                // The slot first: a container may hold itself.
                let j = self.conts.alloc(Cont::Taken, depth)?;
                self.conts.get_mut(j)?.pinned = pinned;
                moved.conts[i as usize] = j;
                let c = match c {
                    Cont::Free | Cont::Taken => return None,
                    Cont::Dict(d) => Cont::Dict(
                        d.into_iter()
                            .map(|(k, v)| {
                                Some((self.adopt(b, moved, k)?, self.adopt(b, moved, v)?))
                            })
                            .collect::<Option<_>>()?,
                    ),
                    Cont::List(l) => Cont::List(
                        l.into_iter()
                            .map(|v| self.adopt(b, moved, v))
                            .collect::<Option<_>>()?,
                    ),
                    Cont::Storage(mut items, ids) => {
                        for (item, &id) in items.iter_mut().zip(&ids) {
                            if let Some(fqn) = self.fqn_for(b, id)? {
                                item.fqn = fqn;
                            }
                        }
                        Cont::Storage(items, ids)
                    }
                    c => c,
                };
                self.conts.get_mut(j)?.value = c;
                Val::Cont(j)
            }
            v => v,
        })
    }

    // ---- the stack -------------------------------------------------------------------------

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Step<Val> {
        if self.stack.len() <= self.floor() {
            return None;
        }
        self.stack.pop()
    }

    fn top(&self) -> Step<Val> {
        if self.stack.len() <= self.floor() {
            return None;
        }
        self.stack.last().copied()
    }

    /// Runs `f` on the value below the topmost mark (`None` when there is none above the next
    /// mark) and the items above the mark, in place, then removes the items and the mark.
    fn with_mark<T>(
        &mut self,
        f: impl FnOnce(&mut Self, Option<Val>, &[Val]) -> Step<T>,
    ) -> Step<T> {
        let mark = self.marks.pop()?;
        let below = (mark > self.floor())
            .then(|| self.stack.get(mark.wrapping_sub(1)).copied())
            .flatten();
        let stack = std::mem::take(&mut self.stack);
        let r = match stack.get(mark..) {
            Some(items) => f(self, below, items),
            None => None,
        };
        self.stack = stack;
        self.stack.truncate(mark);
        r
    }

    /// An interned string, the same `Arc` as last time when it is the same span of the input
    /// (torch's files name a tensor's fqn by a memo reference for each of its chunks).
    fn intern_span(&mut self, v: Val, last: fn(&mut Self) -> &mut LastInterned) -> Step<Arc<str>> {
        if let Some((span, a)) = last(self)
            && *span == v
        {
            return Some(a.clone());
        }
        let a = self.interned(v)?;
        *last(self) = Some((v, a.clone()));
        Some(a)
    }

    /// A string interned: a memo entry's by its rank, any other (and, in the second thread's
    /// part, one the part did not write) by the interner.
    fn interned(&mut self, v: Val) -> Step<Arc<str>> {
        if let Val::Str(_, _, i @ 1..) = v
            && let Some(Some(a)) = self.strs.get(i as usize - 1)
        {
            return Some(a.clone());
        }
        Some(self.intern.get(self.str_of(v)?))
    }

    /// Whether a memo string (as `Val::Str` numbers it) is one the second thread's part did not
    /// write.
    fn is_outside(&self, id: u32) -> bool {
        id != 0 && id - 1 < self.outside
    }

    /// The memo string a value was read back from: 1 + its rank in `referenced`, or 0 (not a
    /// string read back), as [`Read::owners`] matches keys by.
    fn memo_string(v: Val) -> u32 {
        match v {
            Val::Str(_, _, i) => i,
            _ => 0,
        }
    }

    /// Whether a value is the string `name`.
    fn is_str(&self, v: Val, name: &str) -> bool {
        // Field names are short: compared in place, not by a call to `memcmp`.
        matches!(v, Val::Str(s, l, _) if l as usize == name.len()
            && self.span(s, l).iter().zip(name.as_bytes()).all(|(a, b)| a == b))
    }

    fn span(&self, start: u32, len: u32) -> &'a [u8] {
        &self.data[start as usize..start as usize + len as usize]
    }

    fn str_of(&self, v: Val) -> Option<&'a str> {
        match v {
            // Checked UTF-8 when read.
            Val::Str(s, l, _) => std::str::from_utf8(self.span(s, l)).ok(),
            _ => None,
        }
    }

    fn string(&self, bytes: &'a [u8]) -> Step<Val> {
        // Nearly every string torch writes is ASCII: checked a word at a time.
        if !bytes.is_ascii() {
            std::str::from_utf8(bytes).ok()?;
        }
        let start = bytes.as_ptr() as usize - self.data.as_ptr() as usize;
        Some(Val::Str(
            u32::try_from(start).ok()?,
            u32::try_from(bytes.len()).ok()?,
            0,
        ))
    }

    // ---- ownership ---------------------------------------------------------------------------

    /// Marks a value the memo holds: it may be read again, so it is never moved out or freed.
    fn pin(&mut self, v: Val) {
        match v {
            Val::Dims(s, l) | Val::Size(s, l) => {
                self.dims_floor = self.dims_floor.max(s as usize + l as usize);
            }
            Val::Tup(s, l) | Val::Path(s, l) => {
                self.tuples_floor = self.tuples_floor.max(s as usize + l as usize);
                for i in s as usize..s as usize + l as usize {
                    let e = self.tuples[i];
                    self.pin(e);
                }
            }
            Val::Obj(i) => {
                if let Some(slot) = self.objs.get_mut(i) {
                    slot.pinned = true;
                }
            }
            Val::Cont(i) => {
                let Some(slot) = self.conts.get_mut(i) else {
                    return;
                };
                if slot.pinned {
                    return;
                }
                slot.pinned = true;
                let inner: Vec<Val> = match &slot.value {
                    Cont::Dict(d) => d.iter().flat_map(|(k, v)| [*k, *v]).collect(),
                    Cont::List(l) => l.clone(),
                    _ => Vec::new(),
                };
                for e in inner {
                    self.pin(e);
                }
            }
            _ => {}
        }
    }

    /// Frees a value that nothing refers to any more (the memo's stay).
    fn release(&mut self, v: Val) {
        match v {
            Val::Dims(s, l) | Val::Size(s, l) => {
                let (s, end) = (s as usize, s as usize + l as usize);
                if end == self.dims.len() && s >= self.dims_floor {
                    self.dims.truncate(s);
                }
            }
            Val::Tup(s, l) | Val::Path(s, l) => {
                let (s, end) = (s as usize, s as usize + l as usize);
                if end == self.tuples.len() && s >= self.tuples_floor {
                    for i in (s..end).rev() {
                        let e = self.tuples[i];
                        self.release(e);
                    }
                    self.tuples.truncate(s);
                }
            }
            Val::Obj(i) => {
                if let Some(slot) = self.objs.get_mut(i)
                    && !slot.pinned
                    && !matches!(slot.value, Rec::Free)
                {
                    slot.value = Rec::Free;
                    self.objs.free.push(i);
                }
            }
            Val::Cont(i) => {
                let Some(slot) = self.conts.get_mut(i) else {
                    return;
                };
                if slot.pinned || matches!(slot.value, Cont::Free) {
                    return;
                }
                let inner = std::mem::replace(&mut slot.value, Cont::Free);
                self.conts.free.push(i);
                match inner {
                    Cont::Dict(mut d) => {
                        for (k, v) in d.drain(..).rev() {
                            self.release(v);
                            self.release(k);
                        }
                        self.spare_dicts.push(d);
                    }
                    Cont::List(l) => {
                        for v in l.into_iter().rev() {
                            self.release(v);
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Frees a tuple of the pool without its elements (which live on in another value).
    fn release_shell(&mut self, v: Val) {
        if let Val::Tup(s, l) = v {
            let (s, end) = (s as usize, s as usize + l as usize);
            if end == self.tuples.len() && s >= self.tuples_floor {
                self.tuples.truncate(s);
            }
        }
    }

    /// The dimensions of a span of the dims pool.
    fn dims_slice(&self, s: u32, l: u32) -> Option<&[u64]> {
        if l == 0 {
            return Some(&[]);
        }
        self.dims.get(s as usize..s as usize + l as usize)
    }

    /// An object's record, moved out (a copy when the memo holds it). The slot stays until the
    /// value is released.
    fn take_obj(&mut self, i: u32) -> Step<Rec> {
        let slot = self.objs.get_mut(i)?;
        let rec = if slot.pinned {
            slot.value.clone()
        } else {
            std::mem::replace(&mut slot.value, Rec::Taken)
        };
        match rec {
            Rec::Free | Rec::Taken => None,
            rec => Some(rec),
        }
    }

    /// A container's contents, moved out (a copy when the memo holds it), and whether they are
    /// the caller's to release.
    fn take_cont(&mut self, i: u32) -> Step<(Cont, bool)> {
        let slot = self.conts.get_mut(i)?;
        let owned = !slot.pinned;
        let c = if owned {
            std::mem::replace(&mut slot.value, Cont::Taken)
        } else {
            slot.value.clone()
        };
        match c {
            Cont::Free | Cont::Taken => None,
            c => Some((c, owned)),
        }
    }

    fn peek_obj(&self, v: Val) -> Option<&Rec> {
        match v {
            Val::Obj(i) => self.objs.get(i).map(|s| &s.value),
            _ => None,
        }
    }

    fn depth(&self, v: Val) -> u8 {
        match v {
            Val::Cont(i) => self.conts.get(i).map_or(0, |s| s.depth),
            _ => 0,
        }
    }

    // ---- the opcodes -------------------------------------------------------------------------

    /// Runs one opcode (not `STOP` or `FRAME`), reading its argument from `ops`.
    #[inline(always)]
    fn step(&mut self, op: u8, ops: &mut Ops<'a>) -> Step<()> {
        match op {
            0x80 => {
                let p = ops.uint(1)?;
                if p > 5 {
                    return None;
                }
                self.protocol = self.protocol.max(p as u8);
            }
            b'N' => self.stack.push(Val::None),
            0x88 => self.stack.push(Val::Bool(true)),
            0x89 => self.stack.push(Val::Bool(false)),
            b'K' => self.stack.push(Val::Int(ops.uint(1)? as i64)),
            b'M' => self.stack.push(Val::Int(ops.uint(2)? as i64)),
            b'J' => self
                .stack
                .push(Val::Int(i64::from(ops.uint(4)? as u32 as i32))),
            0x8a => {
                let n = ops.uint(1)? as usize;
                let b = ops.take(n)?;
                if b.len() > 8 {
                    return None;
                }
                let v = if b.is_empty() {
                    0
                } else {
                    let negative = b[b.len() - 1] & 0x80 != 0;
                    let mut a = [if negative { 0xff } else { 0 }; 8];
                    a[..b.len()].copy_from_slice(b);
                    i64::from_le_bytes(a)
                };
                self.stack.push(Val::Int(v));
            }
            b'G' => {
                let b = ops.take(8)?;
                self.stack
                    .push(Val::Float(f64::from_be_bytes(b.try_into().ok()?)));
            }
            0x8c | b'X' | 0x8d => {
                let b = ops.string_arg(op)?;
                let v = self.string(b)?;
                self.stack.push(v);
            }
            b')' => self.stack.push(Val::Dims(self.dims.len() as u32, 0)),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < self.floor() + n {
                    return None;
                }
                let from = self.stack.len() - n;
                let stack = std::mem::take(&mut self.stack);
                let v = self.tuple(&stack[from..]);
                self.stack = stack;
                self.stack.truncate(from);
                self.stack.push(v?);
            }
            b't' => {
                let v = self.with_mark(|m, _, items| m.tuple(items))?;
                self.stack.push(v);
            }
            b']' => {
                let i = self.conts.alloc(Cont::List(Vec::new()), 1)?;
                self.stack.push(Val::Cont(i));
            }
            b'}' => {
                let d = self.spare_dicts.pop().unwrap_or_default();
                let i = self.conts.alloc(Cont::Dict(d), 1)?;
                self.stack.push(Val::Cont(i));
            }
            b'a' => {
                let item = self.pop()?;
                let target = self.top()?;
                self.append(target, &[item])?;
            }
            b'e' => {
                self.with_mark(|m, target, items| m.append(target?, items))?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                let target = self.top()?;
                self.set_items(target, &[key, value])?;
            }
            b'u' => {
                self.with_mark(|m, target, items| m.set_items(target?, items))?;
            }
            b'(' => {
                if self.marks.len() as u32 >= self.limits.max_depth {
                    return None;
                }
                self.marks.push(self.stack.len());
                self.max_marks = self.max_marks.max(self.marks.len());
            }
            0x94 | b'q' | b'r' => {
                match op {
                    b'q' => ops.take(1)?,
                    b'r' => ops.take(4)?,
                    _ => &[],
                };
                // The first pass checked that every write is at the next index. The value is
                // read only for the writes read back (most are not): the stack need only hold
                // one.
                if self.stack.len() <= self.floor() {
                    return None;
                }
                let i = self.memo_next;
                self.memo_next = i.checked_add(1)?;
                if let Some(r) = self.referenced.rank(i as usize) {
                    let mut v = self.top()?;
                    // A string read back (an fqn named again by each of its storage entries) is
                    // allocated once, here, and found again by its index.
                    if let Val::Str(s, l, 0) = v {
                        let a: Arc<str> = Arc::from(self.str_of(v)?);
                        *self.strs.get_mut(r)? = Some(a);
                        v = Val::Str(s, l, u32::try_from(r + 1).ok()?);
                        *self.stack.last_mut()? = v;
                    }
                    self.pin(v);
                    *self.memo.get_mut(r)? = Some(v);
                }
            }
            b'h' | b'j' => {
                let i = ops.uint(if op == b'h' { 1 } else { 4 })?;
                let r = self.referenced.rank(usize::try_from(i).ok()?)?;
                let v = (*self.memo.get(r)?)?;
                if r < self.outside as usize {
                    self.outside_read[r / 64] |= 1 << (r % 64);
                }
                self.stack.push(v);
            }
            b'c' => {
                let (module, name) = (ops.line()?, ops.line()?);
                let module = std::str::from_utf8(module).ok()?;
                let n = std::str::from_utf8(name).ok()?;
                let Val::Str(s, l, _) = self.string(name)? else {
                    return None;
                };
                self.stack.push(Val::Global(class_of(module, n, (s, l))?));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Some(m), Some(n), Val::Str(s, l, _)) =
                    (self.str_of(module), self.str_of(name), name)
                else {
                    return None;
                };
                self.stack.push(Val::Global(class_of(m, n, (s, l))?));
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.reduce(callable, args)?;
                match v {
                    // The dims stay with the size, the parts with the path: only the tuple that
                    // held them goes.
                    Val::Size(..) => self.release_shell(args),
                    Val::Path(..) => {}
                    _ => self.release(args),
                }
                self.stack.push(v);
            }
            0x81 => {
                let args = self.pop()?;
                let cls = self.pop()?;
                let (Val::Global(c), Val::Dims(_, 0)) = (cls, args) else {
                    return None;
                };
                if !matches!(
                    c,
                    Class::Metadata
                        | Class::TensorStorage
                        | Class::BytesStorage
                        | Class::Chunk
                        | Class::Properties
                        | Class::Index
                        | Class::StorageMeta
                        | Class::StorageInfo
                ) {
                    return None;
                }
                let i = self.objs.alloc(Rec::Pending(c), 0)?;
                self.stack.push(Val::Obj(i));
            }
            b'b' => {
                let state = self.pop()?;
                let Val::Obj(i) = self.top()? else {
                    return None;
                };
                let class = match self.peek_obj(Val::Obj(i)) {
                    Some(Rec::Pending(class)) => *class,
                    _ => return None,
                };
                // The memo refers to the slot, so a GET after this BUILD reads the record.
                let rec = self.build(class, state)?;
                self.objs.get_mut(i)?.value = rec;
            }
            _ => return None,
        }
        Some(())
    }

    /// Room for the items of `state_dict_metadata` or `storage_data`, so that a million are never
    /// copied as the vector grows: torch pickles either in more than 100 bytes an item (reserved
    /// pages that are never written cost nothing). Only the first dict of each kind gets it (a
    /// file of many small ones must not reserve for each), and a reservation the system refuses
    /// is skipped.
    fn room<T>(input_len: usize, first: bool) -> Vec<T> {
        let mut v = Vec::new();
        if first {
            let _ = v.try_reserve_exact(input_len / 100);
        }
        v
    }

    fn tuple(&mut self, items: &[Val]) -> Step<Val> {
        if items.len() > self.limits.max_container {
            return None;
        }
        if items.iter().all(|v| matches!(v, Val::Int(i) if *i >= 0)) {
            let start = u32::try_from(self.dims.len()).ok()?;
            self.dims.extend(items.iter().map(|v| match v {
                Val::Int(i) => *i as u64,
                _ => 0,
            }));
            return Some(Val::Dims(start, items.len() as u32));
        }
        if !items.iter().all(is_flat) {
            return None;
        }
        let start = u32::try_from(self.tuples.len()).ok()?;
        let len = items.len() as u32;
        self.tuples.extend_from_slice(items);
        Some(Val::Tup(start, len))
    }

    fn tuple_items(&self, v: Val) -> Option<&[Val]> {
        match v {
            Val::Tup(s, l) | Val::Path(s, l) => {
                self.tuples.get(s as usize..s as usize + l as usize)
            }
            Val::Dims(_, 0) => Some(&[]),
            _ => None,
        }
    }

    fn reduce(&mut self, callable: Val, args: Val) -> Step<Val> {
        let Val::Global(c) = callable else {
            return None;
        };
        let items = self.tuple_items(args);
        Some(match (c, items) {
            (Class::Size, _) if matches!(args, Val::Dims(_, 0)) => {
                Val::Size(self.dims.len() as u32, 0)
            }
            (Class::Size, Some([Val::Dims(s, l)])) => Val::Size(*s, *l),
            (Class::Layout, Some([Val::Str(s, l, _)])) => Val::Layout(*s, *l),
            (Class::MemFormat, Some([Val::Int(i)])) => Val::MemFormat(*i),
            (Class::MemFormat, _) if matches!(args, Val::Dims(_, 1)) => {
                let Val::Dims(s, l) = args else { return None };
                Val::MemFormat(i64::try_from(self.dims_slice(s, l)?[0]).ok()?)
            }
            (Class::Path, Some(parts))
                if !parts.is_empty() && parts.iter().all(|p| matches!(p, Val::Str(..))) =>
            {
                // The path keeps the tuple's span of the pool.
                let Val::Tup(s, l) = args else { return None };
                Val::Path(s, l)
            }
            _ => return None,
        })
    }

    fn append(&mut self, target: Val, items: &[Val]) -> Step<()> {
        let Val::Cont(t) = target else { return None };
        let max = self.limits.max_container;
        let chunks = matches!(self.conts.get(t)?.value, Cont::List(ref l) if l.is_empty())
            && items
                .first()
                .is_some_and(|v| matches!(self.peek_obj(*v), Some(Rec::Chunk(_))));
        if chunks {
            self.conts.get_mut(t)?.value = Cont::Chunks(Vec::new());
        }
        if let Cont::Chunks(list) = &mut self.conts.get_mut(t)?.value {
            if list.len() + items.len() > max {
                return None;
            }
            // Exactly the room they take: most tensors have one chunk, appended alone.
            list.reserve_exact(items.len());
            for &v in items {
                let Val::Obj(i) = v else { return None };
                let Rec::Chunk(c) = self.take_obj(i)? else {
                    return None;
                };
                self.release(v);
                let Cont::Chunks(list) = &mut self.conts.get_mut(t)?.value else {
                    return None;
                };
                list.push(c);
            }
            return Some(());
        }
        let children = items.iter().map(|v| self.depth(*v)).max().unwrap_or(0);
        let slot = self.conts.get_mut(t)?;
        let pinned = slot.pinned;
        let Cont::List(list) = &mut slot.value else {
            return None;
        };
        if list.len() + items.len() > max {
            return None;
        }
        slot.depth = slot.depth.max(children + 1);
        if slot.depth > MAX_NESTING {
            return None;
        }
        list.extend_from_slice(items);
        if pinned {
            for &v in items {
                self.pin(v);
            }
        }
        Some(())
    }

    fn set_items(&mut self, target: Val, flat: &[Val]) -> Step<()> {
        if !flat.len().is_multiple_of(2) {
            return None;
        }
        let Val::Cont(t) = target else { return None };
        let max = self.limits.max_container;
        if let Cont::Dict(d) = &self.conts.get(t)?.value
            && d.is_empty()
            && let [k, v, ..] = *flat
        {
            let kind = match (k, self.peek_obj(k), self.peek_obj(v)) {
                (Val::Str(..), _, Some(Rec::Tensor(..) | Rec::Pending(Class::BytesStorage))) => {
                    let first = !std::mem::replace(&mut self.reserved_entries, true);
                    let n = self.data.len();
                    Some(Cont::Entries(
                        Self::room(n, first),
                        Self::room(n, first),
                        Box::new(model::KeyHashes::new(Self::room(n, first))),
                    ))
                }
                (_, Some(Rec::Index(..)), Some(Rec::Info(_))) => {
                    let first = !std::mem::replace(&mut self.reserved_storage, true);
                    let n = self.data.len();
                    Some(Cont::Storage(Self::room(n, first), Self::room(n, first)))
                }
                _ => None,
            };
            if let Some(kind) = kind {
                self.conts.get_mut(t)?.value = kind;
            }
        }
        match &self.conts.get(t)?.value {
            Cont::Entries(..) => {
                // The vectors are taken out of the slot while the items go straight in (an
                // entry is moved once, not twice); a failure leaves the slot taken, and the
                // whole read fails.
                let Cont::Entries(mut add, mut keys, mut hashes) =
                    std::mem::replace(&mut self.conts.get_mut(t)?.value, Cont::Taken)
                else {
                    return None;
                };
                if add.len() + flat.len() / 2 > max {
                    return None;
                }
                for pair in flat.chunks_exact(2) {
                    let (k, v) = (pair[0], pair[1]);
                    let Val::Obj(i) = v else { return None };
                    let rec = self.take_obj(i)?;
                    self.release(v);
                    keys.push(Self::memo_string(k));
                    let fqn = self.interned(k)?;
                    hashes.push(&fqn);
                    add.push(match rec {
                        Rec::Tensor(t, chunks) => Entry {
                            fqn,
                            tensor: Some(*t),
                            chunks,
                        },
                        Rec::Pending(Class::BytesStorage) => Entry::new(fqn, EntryMeta::Bytes),
                        _ => return None,
                    });
                }
                self.conts.get_mut(t)?.value = Cont::Entries(add, keys, hashes);
            }
            Cont::Storage(..) => {
                let Cont::Storage(mut add, mut keys) =
                    std::mem::replace(&mut self.conts.get_mut(t)?.value, Cont::Taken)
                else {
                    return None;
                };
                if add.len() + flat.len() / 2 > max {
                    return None;
                }
                for pair in flat.chunks_exact(2) {
                    let (k, v) = (pair[0], pair[1]);
                    let (Val::Obj(ki), Val::Obj(vi)) = (k, v) else {
                        return None;
                    };
                    let (Rec::Index(fqn, id, offset), Rec::Info(info)) =
                        (self.take_obj(ki)?, self.take_obj(vi)?)
                    else {
                        return None;
                    };
                    self.release(v);
                    self.release(k);
                    keys.push(id);
                    add.push(Storage {
                        metadata_file: 0,
                        fqn,
                        chunk_offsets: offset,
                        info,
                        chunk: None,
                    });
                }
                self.conts.get_mut(t)?.value = Cont::Storage(add, keys);
            }
            Cont::Dict(_) => {
                let children = flat.iter().map(|v| self.depth(*v)).max().unwrap_or(0);
                let slot = self.conts.get_mut(t)?;
                let pinned = slot.pinned;
                let Cont::Dict(d) = &mut slot.value else {
                    return None;
                };
                if d.len() + flat.len() / 2 > max {
                    return None;
                }
                slot.depth = slot.depth.max(children + 1);
                if slot.depth > MAX_NESTING {
                    return None;
                }
                d.extend(flat.chunks_exact(2).map(|p| (p[0], p[1])));
                if pinned {
                    for &v in flat {
                        self.pin(v);
                    }
                }
            }
            _ => return None,
        }
        Some(())
    }

    // ---- objects -----------------------------------------------------------------------------

    /// The fields of an object's state dict that `names` lists (the last value of a key set twice,
    /// `None` values as absent, as the model reads them), and the pairs to release afterwards.
    fn fields<const N: usize>(&mut self, state: Val, names: [&str; N]) -> Step<Fields<N>> {
        let Val::Cont(i) = state else { return None };
        let (Cont::Dict(pairs), owned) = self.take_cont(i)? else {
            return None;
        };
        let mut out = [None; N];
        for (k, v) in &pairs {
            let Val::Str(..) = k else { return None };
            if let Some(f) = names.iter().position(|n| self.is_str(*k, n)) {
                out[f] = Some(*v);
            }
        }
        for v in &mut out {
            if *v == Some(Val::None) {
                *v = None;
            }
        }
        Some(Fields {
            values: out,
            pairs,
            owned,
        })
    }

    /// Releases a state dict after its fields were read.
    fn release_state<const N: usize>(&mut self, state: Val, fields: Fields<N>) {
        let Fields {
            mut pairs, owned, ..
        } = fields;
        if owned {
            for (k, v) in pairs.drain(..).rev() {
                self.release(v);
                self.release(k);
            }
            self.spare_dicts.push(pairs);
        }
        self.release(state);
    }

    fn dims_of(&self, v: Val) -> Option<Dims> {
        match v {
            Val::Size(s, l) | Val::Dims(s, l) => self.dims_slice(s, l).map(Into::into),
            _ => None,
        }
    }

    fn uint(v: Val) -> Option<u64> {
        match v {
            Val::Int(i) => u64::try_from(i).ok(),
            _ => None,
        }
    }

    fn bool(v: Val) -> Option<bool> {
        match v {
            Val::Bool(b) => Some(b),
            Val::Int(0) => Some(false),
            Val::Int(1) => Some(true),
            _ => None,
        }
    }

    /// A string, or a `pathlib` path joined as the model joins it.
    fn path_like(&self, v: Val) -> Option<String> {
        if let Some(s) = self.str_of(v) {
            return Some(s.to_owned());
        }
        let Val::Path(..) = v else { return None };
        let mut out = String::new();
        for part in self.tuple_items(v)? {
            let part = self.str_of(*part)?;
            if !out.is_empty() && !out.ends_with('/') {
                out.push('/');
            }
            out.push_str(part);
        }
        Some(out)
    }

    /// The strings of a list or tuple.
    fn strings(&mut self, v: Val) -> Option<Vec<String>> {
        let items: Vec<Val> = match v {
            Val::Cont(i) => match &self.conts.get(i)?.value {
                Cont::List(l) => l.clone(),
                _ => return None,
            },
            v => self.tuple_items(v)?.to_vec(),
        };
        items
            .iter()
            .map(|s| self.str_of(*s).map(str::to_owned))
            .collect()
    }

    fn build(&mut self, class: Class, state: Val) -> Step<Rec> {
        let rec = match class {
            Class::Chunk => {
                let f = self.fields(state, ["offsets", "sizes"])?;
                let [offsets, sizes] = f.values;
                let rec = Rec::Chunk(Chunk {
                    offsets: Some(self.dims_of(offsets?)?),
                    sizes: Some(self.dims_of(sizes?)?),
                    storage: Vec::new(),
                });
                self.release_state(state, f);
                rec
            }
            Class::Index => {
                let f = self.fields(state, ["fqn", "offset", "index"])?;
                let [fqn, offset, index] = f.values;
                let fqn_val = fqn?;
                let id = Self::memo_string(fqn_val);
                let fqn = match &self.placeholder {
                    Some(p) if self.is_outside(id) => p.clone(),
                    _ => self.intern_span(fqn_val, |m| &mut m.last_fqn)?,
                };
                let offset = match offset {
                    Some(o) => Some(self.dims_of(o)?),
                    None => None,
                };
                if let Some(i) = index {
                    let Val::Int(_) = i else { return None };
                }
                self.release_state(state, f);
                Rec::Index(fqn, id, offset)
            }
            Class::StorageInfo => {
                let f = self.fields(
                    state,
                    ["relative_path", "offset", "length", "transform_descriptors"],
                )?;
                let [path, offset, length, transforms] = f.values;
                let transform_descriptors = match transforms {
                    Some(t) => self.strings(t)?,
                    None => Vec::new(),
                };
                let path = path?;
                let relative_path = match path {
                    Val::Str(..) => self.intern_span(path, |m| &mut m.last_path)?,
                    _ => {
                        let p = self.path_like(path)?;
                        self.intern.get(&p)
                    }
                };
                let info = StorageInfo {
                    relative_path,
                    offset: Self::uint(offset?)?,
                    length: Self::uint(length?)?,
                    transform_descriptors,
                };
                self.release_state(state, f);
                Rec::Info(info)
            }
            Class::Properties => {
                let items = match state {
                    Val::Tup(..) => self.tuple_items(state)?.to_vec(),
                    _ => return None,
                };
                if items.len() != 5 && items.len() != 6 {
                    return None;
                }
                let Val::Global(Class::Dtype(s, l)) = items[0] else {
                    return None;
                };
                let name = std::str::from_utf8(self.span(s, l)).ok()?;
                // Every tensor's properties name the same few: the last ones are kept.
                let key = (name, items[1], items[3]);
                let [dtype, layout, memory_format] = match &self.last_properties {
                    Some((k, names)) if *k == key => names.clone(),
                    _ => {
                        let layout = match items[1] {
                            Val::None => self.intern.get("strided"),
                            Val::Layout(s, l) => {
                                let n = std::str::from_utf8(self.span(s, l)).ok()?;
                                self.intern.get(n.strip_prefix("torch.").unwrap_or(n))
                            }
                            _ => return None,
                        };
                        let memory_format = match items[3] {
                            Val::None => self.intern.get("contiguous_format"),
                            Val::MemFormat(i) => self.intern.get(&model::memory_format_name(i)),
                            _ => return None,
                        };
                        let names = [
                            self.intern.get(dtype::canonical(name)),
                            layout,
                            memory_format,
                        ];
                        self.last_properties = Some((key, names.clone()));
                        names
                    }
                };
                let strides = match items.get(5) {
                    None | Some(Val::None) => None,
                    Some(Val::Dims(s, l)) => Some(
                        self.dims_slice(*s, *l)?
                            .iter()
                            .map(|d| i64::try_from(*d).ok())
                            .collect::<Option<Vec<i64>>>()?,
                    ),
                    Some(Val::Tup(..)) => Some(
                        self.tuple_items(items[5])?
                            .iter()
                            .map(|d| match d {
                                Val::Int(i) => Some(*i),
                                _ => None,
                            })
                            .collect::<Option<Vec<i64>>>()?,
                    ),
                    _ => return None,
                };
                let t = TensorMeta {
                    dtype,
                    layout,
                    requires_grad: Self::bool(items[2])?,
                    memory_format,
                    pin_memory: Self::bool(items[4])?,
                    strides,
                    shape: Dims::new(),
                    chunks: Vec::new(),
                };
                self.release(state);
                Rec::Properties(Box::new(t))
            }
            Class::TensorStorage => {
                let f = self.fields(state, ["properties", "size", "chunks"])?;
                let [props, size, chunks] = f.values;
                let (Val::Obj(pi), size) = (props?, size?) else {
                    return None;
                };
                let shape = self.dims_of(size)?;
                let Rec::Properties(mut t) = self.take_obj(pi)? else {
                    return None;
                };
                t.shape = shape;
                let mut list = Vec::new();
                if let Some(c) = chunks {
                    let Val::Cont(ci) = c else { return None };
                    list = match self.take_cont(ci)? {
                        (Cont::Chunks(c), _) => c,
                        (Cont::List(l), _) if l.is_empty() => Vec::new(),
                        _ => return None,
                    };
                }
                self.release_state(state, f);
                Rec::Tensor(t, list)
            }
            Class::BytesStorage => {
                // The model reads nothing of its state.
                let (Val::Cont(_) | Val::None) = state else {
                    return None;
                };
                self.release(state);
                Rec::Pending(Class::BytesStorage)
            }
            Class::StorageMeta => {
                let f = self.fields(state, ["checkpoint_id", "save_id", "load_id", "modules"])?;
                let [id, save, load, modules] = f.values;
                let mut sm = StorageMeta::default();
                if let Some(v) = id {
                    sm.checkpoint_id = Some(self.path_like(v)?);
                }
                if let Some(v) = save {
                    sm.save_id = Some(self.str_of(v)?.to_owned());
                }
                if let Some(v) = load {
                    sm.load_id = Some(self.str_of(v)?.to_owned());
                }
                if let Some(v) = modules {
                    sm.modules = self.strings(v)?;
                }
                self.release_state(state, f);
                Rec::StorageMeta(Box::new(sm))
            }
            // The part's strings are not all its own (and it has no reason to read the root).
            Class::Metadata if self.placeholder.is_some() => return None,
            Class::Metadata => {
                let f = self.fields(
                    state,
                    [
                        "version",
                        "storage_meta",
                        "state_dict_metadata",
                        "storage_data",
                        "planner_data",
                    ],
                )?;
                let [version, storage_meta, sdm, storage, planner] = f.values;
                let mut md = RankMetadata::default();
                if let Some(v) = version {
                    md.version = Some(self.str_of(v)?.to_owned());
                }
                if let Some(v) = storage_meta {
                    let Val::Obj(i) = v else { return None };
                    let Rec::StorageMeta(sm) = self.take_obj(i)? else {
                        return None;
                    };
                    md.storage_meta = Some(*sm);
                }
                let Val::Cont(i) = sdm? else { return None };
                let (entries, entry_ids, hashes) = match self.take_cont(i)? {
                    (Cont::Entries(e, ids, hashes), _) => (e, ids, *hashes),
                    (Cont::Dict(d), _) if d.is_empty() => {
                        (Vec::new(), Vec::new(), Default::default())
                    }
                    _ => return None,
                };
                md.entries = model::dedup_entries(entries, hashes, &mut md.duplicate_keys);
                let mut storage_ids = Vec::new();
                if let Some(v) = storage {
                    let Val::Cont(i) = v else { return None };
                    (md.storage, storage_ids) = match self.take_cont(i)? {
                        (Cont::Storage(s, ids), _) => (s, ids),
                        (Cont::Dict(d), _) if d.is_empty() => (Vec::new(), Vec::new()),
                        _ => return None,
                    };
                }
                let owners = md
                    .duplicate_keys
                    .is_empty()
                    .then(|| self.owners(&entry_ids, &storage_ids));
                if let Some(v) = planner {
                    md.planner_data = self.planner_data(v)?;
                }
                self.release_state(state, f);
                Rec::Metadata(Box::new(md), owners)
            }
            _ => return None,
        };
        Some(rec)
    }

    /// [`Read::owners`]: the entry of each storage item whose fqn reads back the memo string of an
    /// entry's key (the entries are unique: one entry per memo string).
    fn owners(&self, entry_ids: &[u32], storage_ids: &[u32]) -> Vec<u32> {
        let mut entry_of = vec![u32::MAX; self.strs.len() + 1];
        for (e, &id) in entry_ids.iter().enumerate() {
            if id != 0
                && let (Some(slot), Ok(e)) = (entry_of.get_mut(id as usize), u32::try_from(e))
            {
                *slot = e;
            }
        }
        storage_ids
            .iter()
            .map(|&id| entry_of.get(id as usize).copied().unwrap_or(u32::MAX))
            .collect()
    }

    /// `planner_data`, or `Some(None)` where the model drops it (advisory data in another shape).
    fn planner_data(&self, v: Val) -> Option<Option<PlannerData>> {
        let Val::Cont(i) = v else { return None };
        let Cont::Dict(pairs) = &self.conts.get(i)?.value else {
            return None;
        };
        let mut out = Vec::with_capacity(pairs.len());
        for (k, path) in pairs {
            let Some(fqn) = self.str_of(*k) else {
                return Some(None);
            };
            let parts: Option<Vec<PathPart>> = match path {
                Val::Dims(s, l) => Some(
                    self.dims_slice(*s, *l)?
                        .iter()
                        .map(|d| i64::try_from(*d).ok().map(PathPart::Index))
                        .collect::<Option<_>>()?,
                ),
                Val::Tup(..) => self
                    .tuple_items(*path)?
                    .iter()
                    .map(|p| match p {
                        Val::Str(..) => self.str_of(*p).map(|s| PathPart::Key(s.to_owned())),
                        Val::Int(i) => Some(PathPart::Index(*i)),
                        _ => None,
                    })
                    .collect(),
                // A list, or anything else: the general reader decides.
                _ => return None,
            };
            match parts {
                Some(parts) => out.push((fqn.to_owned(), parts)),
                None => return Some(None),
            }
        }
        Some(Some(out))
    }
}

/// For each opcode, how many values the second thread's part needs on its stack (when it holds
/// no mark) to run it by itself: with fewer, the opcode reads below the part's start, and the
/// part ends. 255 for the opcodes that take a mark, and `STOP`.
const NEEDS: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b'.' as usize] = 255;
    t[b't' as usize] = 255;
    t[b'e' as usize] = 255;
    t[b'u' as usize] = 255;
    t[b'a' as usize] = 2;
    t[b's' as usize] = 3;
    t[b'R' as usize] = 2;
    t[0x81] = 2;
    t[b'b' as usize] = 2;
    t[0x93] = 2;
    t[0x85] = 1;
    t[0x86] = 2;
    t[0x87] = 3;
    t[0x94] = 1;
    t[b'q' as usize] = 1;
    t[b'r' as usize] = 1;
    t
};

/// Where the part's objects and containers went in the first thread's slabs (`u32::MAX`: not
/// yet).
struct Moved {
    objs: Vec<u32>,
    conts: Vec<u32>,
}

/// What the second thread read: from the split point to `end`.
struct Part<'a> {
    m: Machine<'a>,
    end: usize,
    /// The memo count at the split point.
    start_next: u32,
}

impl<'a> Part<'a> {
    /// The machine that reads the part, its memo filled with what it can know of the entries
    /// before `at`.
    fn machine(
        data: &'a [u8],
        limits: Limits,
        referenced: &'a Bits,
        at: SplitAt,
    ) -> Option<Machine<'a>> {
        let mut m = Machine::new(data, limits, referenced)?;
        let outside = referenced.below(at.next as usize);
        m.outside = u32::try_from(outside).ok()?;
        m.outside_read = vec![0; outside.div_ceil(64)];
        m.placeholder = Some(Arc::from(""));
        m.memo_next = at.next;
        outside_memo(data, referenced, at, m.memo.get_mut(..outside)?)?;
        Some(m)
    }

    /// Reads from `at` as far as it can by itself; `None` when it gives up (or `cancel` is set).
    fn read(
        data: &'a [u8],
        limits: Limits,
        referenced: &'a Bits,
        at: SplitAt,
        cancel: &AtomicBool,
    ) -> Option<Part<'a>> {
        let mut m = Self::machine(data, limits, referenced, at)?;
        let end = m.run_part(at.pos, cancel)?;
        Some(Part {
            m,
            end,
            start_next: at.next,
        })
    }
}

/// The memo entries written before `at`, as far as a look at the last two values pushed tells
/// them: a string (its memo write right after it) or a global (named by two strings); the others
/// stay `None` (the part gives up on reading one). The first thread checks each one the part
/// read against its own memo.
fn outside_memo(
    data: &[u8],
    referenced: &Bits,
    at: SplitAt,
    memo: &mut [Option<Val>],
) -> Option<()> {
    let mut pos = 0usize;
    let mut next = 0usize;
    // The top two values of the stack, where known.
    let (mut top, mut below): (Option<Val>, Option<Val>) = (None, None);
    let str_of =
        |s: u32, l: u32| std::str::from_utf8(data.get(s as usize..s as usize + l as usize)?).ok();
    let le = |i: usize, n: usize| le_at(data, i, n);
    let span = |start: usize, len: usize| -> Option<Val> {
        data.get(start..start + len)?;
        Some(Val::Str(
            u32::try_from(start).ok()?,
            u32::try_from(len).ok()?,
            0,
        ))
    };
    while pos < at.pos {
        let op = *data.get(pos)?;
        pos += 1;
        // The most frequent first, as in the first pass: a memo write, a short string, the
        // opcodes of a fixed length.
        let pushed = if op == 0x94 || op == b'q' || op == b'r' {
            pos += match op {
                b'q' => 1,
                b'r' => 4,
                _ => 0,
            };
            let i = next;
            next += 1;
            if let Some(r) = referenced.rank(i) {
                if let Some(Val::Str(s, l, 0)) = top {
                    top = Some(Val::Str(s, l, u32::try_from(r + 1).ok()?));
                }
                *memo.get_mut(r)? = top;
            }
            continue;
        } else if op == 0x8c {
            let n = usize::from(*data.get(pos)?);
            pos += 1 + n;
            span(pos - n, n)
        } else if op == b'h' || op == b'j' {
            let n = if op == b'h' { 1 } else { 4 };
            let i = le(pos, n)?;
            pos += n;
            memo.get(referenced.rank(i)?).copied().flatten()
        } else if op == 0x93 {
            let g = match (below, top) {
                (Some(Val::Str(ms, ml, _)), Some(Val::Str(s, l, _))) => {
                    class_of(str_of(ms, ml)?, str_of(s, l)?, (s, l)).map(Val::Global)
                }
                _ => None,
            };
            (top, below) = (g, None);
            continue;
        } else if op == 0x95 || op == 0x80 {
            // FRAME and PROTO leave the stack as it is.
            pos += if op == 0x95 { 8 } else { 1 };
            continue;
        } else if SKIP[usize::from(op)] != 0 {
            // Any other: what it leaves on top is not known here.
            pos += usize::from(SKIP[usize::from(op)] - 1);
            (top, below) = (None, None);
            continue;
        } else {
            match op {
                b'X' | 0x8d => {
                    let w = if op == b'X' { 4 } else { 8 };
                    let n = le(pos, w)?;
                    pos = pos.checked_add(w)?.checked_add(n)?;
                    span(pos - n, n)
                }
                b'c' => {
                    let mut ops = Ops { data, pos };
                    let (module, name) = (ops.line()?, ops.line()?);
                    pos = ops.pos;
                    let s = u32::try_from(name.as_ptr() as usize - data.as_ptr() as usize).ok()?;
                    let l = u32::try_from(name.len()).ok()?;
                    class_of(std::str::from_utf8(module).ok()?, str_of(s, l)?, (s, l))
                        .map(Val::Global)
                }
                0x8a => {
                    pos += 1 + usize::from(*data.get(pos)?);
                    (top, below) = (None, None);
                    continue;
                }
                _ => return None,
            }
        };
        (top, below) = (pushed, top);
    }
    (pos == at.pos).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Path, PathBuf};

    fn agrees(data: &[u8]) -> bool {
        check_against_general(data)
    }

    fn same(a: &Option<Read>, b: &Option<Read>) {
        match (a, b) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                assert!(a.md == b.md, "the split read gives another model");
                assert_eq!(a.protocol, b.protocol);
                assert_eq!(a.owners, b.owners);
            }
            _ => panic!(
                "the split read {} where the one-thread read {}",
                if a.is_some() { "reads" } else { "fails" },
                if b.is_some() { "reads" } else { "fails" },
            ),
        }
    }

    /// Reads `data` split at its `storage_data` key whatever its size, and with one thread: the
    /// same answer. Returns how the split went.
    fn split_agrees(data: &[u8], limits: Limits) -> Split {
        let (split, how) = read_split(data, limits, 0);
        let (one, one_how) = read_split(data, limits, usize::MAX);
        assert_eq!(one_how, Split::No);
        same(&split, &one);
        how
    }

    fn two_cores() -> bool {
        std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2
    }

    fn metadata_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(metadata_files(&p));
            } else if p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".metadata"))
            {
                out.push(p);
            }
        }
        out.sort();
        out
    }

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// Every torch-written fixture: the same model both ways; only those in shapes the fast path
    /// leaves to the general one (protocols 0 and 1, Megatron's save plans) fall back.
    #[test]
    fn fixtures_read_the_same_both_ways() {
        let mut fast = Vec::new();
        let mut general_only = Vec::new();
        for f in metadata_files(&root().join("fixtures")) {
            let data = std::fs::read(&f).unwrap();
            if agrees(&data) {
                fast.push(f);
            } else {
                general_only.push(f);
            }
        }
        let names = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
                .collect::<Vec<_>>()
        };
        assert!(fast.len() >= 10, "fast: {:?}", names(&fast));
        for f in names(&general_only) {
            assert!(
                ["protocol0", "protocol1", "megatron"]
                    .iter()
                    .any(|d| f.contains(d)),
                "{f} takes the general path"
            );
        }
    }

    /// torch's files name each storage key's fqn by the memo entry of its entry's key: the reader
    /// gives the entry of every item, and it is the entry of that name.
    #[test]
    fn owners_of_torch_files() {
        let data = std::fs::read(root().join("fixtures/single/.metadata")).unwrap();
        let r = read(&data, Limits::default()).unwrap();
        let owners = r.owners.unwrap();
        assert_eq!(owners.len(), r.md.storage.len());
        assert!(!owners.is_empty());
        for (s, &e) in r.md.storage.iter().zip(&owners) {
            assert_eq!(r.md.entries[e as usize].fqn, s.fqn);
        }
    }

    /// The hostile corpus: whatever the fast path reads agrees (most give up, for the general path
    /// to report).
    #[test]
    fn hostile_files_agree_or_fall_back() {
        for f in metadata_files(&root().join("tests/hostile")) {
            let data = std::fs::read(&f).unwrap();
            agrees(&data);
        }
    }

    fn seeds() -> Vec<Vec<u8>> {
        [
            "fixtures/single",
            "fixtures/per_rank",
            "fixtures/zstd",
            "fixtures/torch2_5",
        ]
        .iter()
        .flat_map(|d| metadata_files(&root().join(d)))
        .map(|f| std::fs::read(f).unwrap())
        .collect()
    }

    fn single() -> Vec<u8> {
        std::fs::read(root().join("fixtures/single/.metadata")).unwrap()
    }

    /// Every torch fixture the fast path reads, split at its `storage_data` key: the second
    /// thread's part is taken, and the answer is the one-thread read's.
    #[test]
    fn fixtures_split_the_same() {
        let mut merged = 0;
        for f in metadata_files(&root().join("fixtures")) {
            let data = std::fs::read(&f).unwrap();
            let how = split_agrees(&data, Limits::default());
            let split = referenced_memo(&data, &Limits::default()).and_then(|p| p.split);
            if two_cores() && split.is_some() && read(&data, Limits::default()).is_some() {
                assert_eq!(how, Split::Merged, "{}", f.display());
                merged += 1;
            }
        }
        assert!(!two_cores() || merged >= 10, "{merged} merged");
    }

    /// The split read's storage items share their fqn with their entry (not the placeholder,
    /// not a copy).
    #[test]
    fn split_storage_shares_the_entries_fqns() {
        let (r, how) = read_split(&single(), Limits::default(), 0);
        let r = r.unwrap();
        assert!(!two_cores() || how == Split::Merged);
        let owners = r.owners.unwrap();
        for (s, &e) in r.md.storage.iter().zip(&owners) {
            assert!(Arc::ptr_eq(&r.md.entries[e as usize].fqn, &s.fqn));
        }
    }

    /// Runs the first thread with the part that `tweak` changed (as a part that assumed
    /// something else would be): returns how it went, and checks that the answer is the
    /// one-thread read's all the same.
    fn split_with(data: &[u8], tweak: impl FnOnce(&mut Part<'_>)) -> Split {
        let limits = Limits::default();
        let FirstPass {
            mut referenced,
            split,
        } = referenced_memo(data, &limits).unwrap();
        referenced.rank_all().unwrap();
        let at = split.unwrap();
        let mut part = Part::read(data, limits, &referenced, at, &AtomicBool::new(false));
        if let Some(p) = &mut part {
            tweak(p);
        }
        let r = Machine::new(data, limits, &referenced)
            .unwrap()
            .run_split(at.pos, &mut Some(move || part));
        let (r, how) = match r {
            Some((r, how)) => (Some(r), how),
            None => (None, Split::Again),
        };
        same(&r, &read_split(data, limits, usize::MAX).0);
        how
    }

    /// The first memo rank the part read from before its start.
    fn first_outside_read(p: &Part<'_>) -> usize {
        let (w, word) =
            p.m.outside_read
                .iter()
                .enumerate()
                .find(|(_, w)| **w != 0)
                .unwrap();
        w * 64 + word.trailing_zeros() as usize
    }

    /// Each check the first thread makes before it takes the part refuses a part that assumed
    /// otherwise; the answer is the same.
    #[test]
    fn a_part_that_assumed_otherwise_is_refused() {
        let data = single();
        assert_eq!(split_with(&data, |_| {}), Split::Merged);
        // A memo entry from before the split point that is not what the part read.
        assert_eq!(
            split_with(&data, |p| {
                let r = first_outside_read(p);
                p.m.memo[r] = Some(Val::Int(7));
            }),
            Split::Refused
        );
        assert_eq!(
            split_with(&data, |p| {
                let r = first_outside_read(p);
                if let Some(Val::Str(s, l, id)) = p.m.memo[r] {
                    p.m.memo[r] = Some(Val::Str(s + 1, l - 1, id));
                }
            }),
            Split::Refused
        );
        // Another memo count at the split point.
        assert_eq!(split_with(&data, |p| p.start_next += 1), Split::Refused);
        // Marks nested deeper than the limit, counting the first thread's.
        assert_eq!(
            split_with(&data, |p| p.m.max_marks =
                Limits::default().max_depth as usize),
            Split::Refused
        );
    }

    /// A part that reads a memo entry from before its start that it does not know (not a plain
    /// string or global) gives up.
    #[test]
    fn a_part_gives_up_on_a_memo_entry_it_does_not_know() {
        let data = single();
        let limits = Limits::default();
        let FirstPass {
            mut referenced,
            split,
        } = referenced_memo(&data, &limits).unwrap();
        referenced.rank_all().unwrap();
        let at = split.unwrap();
        let cancel = AtomicBool::new(false);
        let mut m = Part::machine(&data, limits, &referenced, at).unwrap();
        let outside = m.outside as usize;
        assert!(m.memo[..outside].iter().any(Option::is_some));
        m.memo[..outside].fill(None);
        assert_eq!(m.run_part(at.pos, &cancel), None);
        let mut m = Part::machine(&data, limits, &referenced, at).unwrap();
        assert!(m.run_part(at.pos, &cancel).is_some());
        cancel.store(true, Ordering::Relaxed);
        let mut m = Part::machine(&data, limits, &referenced, at).unwrap();
        assert_eq!(m.run_part(at.pos, &cancel), None);
    }

    /// `data` with `with` in place of the last `from`, and its one frame (after `PROTO`) as
    /// long as the rest.
    fn edited(data: &[u8], from: &[u8], with: &[u8]) -> Vec<u8> {
        let i = data.windows(from.len()).rposition(|w| w == from).unwrap();
        let mut out = [&data[..i], with, &data[i + from.len()..]].concat();
        assert_eq!(out[2], 0x95);
        let rest = (out.len() - 11) as u64;
        out[3..11].copy_from_slice(&rest.to_le_bytes());
        out
    }

    /// Crafted files: each reads the same split and not.
    #[test]
    fn crafted_splits_agree() {
        let data = single();
        // A `storage_data` string after the key (here `save_id`): the split point is there.
        let at = edited(
            &data,
            b"\x8c\x07save_id\x94\x8c\x24",
            b"\x8c\x07save_id\x94\x8c\x0cstorage_data",
        );
        let at = edited(&at, b"e5d9535d-e168-441e-b103-7a04970b2945", b"");
        assert!(agrees(&at));
        // The part ends early (a `SETITEMS` of the root's state after `storage_data`), and the
        // root's state names `storage_data` again after that by a memo reference to the dict the
        // part read: the first thread reads the part's memo entry.
        let FirstPass { split, .. } = referenced_memo(&data, &Limits::default()).unwrap();
        let dict = split.unwrap().next;
        let mut again = b"X\x0c\x00\x00\x00storage_datj".to_vec();
        again[16] = b'a';
        again.push(b'j');
        again.extend_from_slice(&dict.to_le_bytes());
        let early = edited(&data, b"\x8c\x0cstorage_meta", b"u(\x8c\x0cstorage_meta");
        let early = edited(&early, b"ub.", &[&again[..], b"ub."].concat());
        assert!(agrees(&early));
        assert!(!two_cores() || split_agrees(&early, Limits::default()) == Split::Merged);
        // Limits on the nesting of marks, from too few to enough: the same both ways.
        for max_depth in 0..8 {
            let limits = Limits {
                max_depth,
                ..Limits::default()
            };
            split_agrees(&data, limits);
            split_agrees(&early, limits);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// Damaged torch files: the fast path never disagrees with the general one and never
        /// panics.
        #[test]
        fn damaged_files_agree_or_fall_back(
            seed in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<Option<prop::sample::Index>>(),
        ) {
            let seeds = seeds();
            let mut data = seed.get(&seeds).clone();
            for (i, b) in flips {
                let i = i.index(data.len());
                data[i] = b;
            }
            if let Some(c) = cut {
                data.truncate(c.index(data.len()));
            }
            agrees(&data);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read(&data, Limits::default());
        }
    }
}
