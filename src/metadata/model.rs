//! The DCP `Metadata` object, read from the value graph of [`super::pickle`].
//!
//! Only the classes torch writes are interpreted; anything else the file holds (extra attributes,
//! Megatron's `mcore_data`) is ignored. Names of classes are matched under both the current module
//! path (`torch.distributed.checkpoint`) and the legacy one of torch 1.13
//! (`torch.distributed._shard.checkpoint`, whose `TensorProperties` and `MEM_FORMAT_ENCODING` live
//! in `torch.distributed._shard.sharded_tensor.metadata`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::dtype;
use super::pickle::{CallKind, Node, Object, Pickle, Value};
use super::{Dims, Entry, Storage};

/// One `.metadata` file, as written by one save (or by one rank with `use_collectives=False`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankMetadata {
    /// `Metadata.version` (`"1.0.0"` on torch >= 2.5; absent before).
    pub version: Option<String>,
    pub storage_meta: Option<StorageMeta>,
    /// `state_dict_metadata`, in file order, as the checkpoint keeps it (chunks not yet linked to
    /// their storage).
    pub entries: Vec<Entry>,
    /// `storage_data`, in file order, as the checkpoint keeps it: each item's `metadata_file` is
    /// 0 and its `chunk` is `None` until [`super::Checkpoint`] merges and links the files (so
    /// that a million items are not copied once more). `MetadataIndex.index`, a lookup hint, is
    /// checked and not kept.
    pub storage: Vec<Storage>,
    /// `planner_data`: fqn -> the un-flattened key path, when recorded.
    pub planner_data: Option<Vec<(String, Vec<PathPart>)>>,
    /// fqns that `state_dict_metadata` sets more than once (the last value is kept).
    pub duplicate_keys: Vec<String>,
}

/// `StorageMeta`: identifiers of the save.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageMeta {
    pub checkpoint_id: Option<String>,
    pub save_id: Option<String>,
    pub load_id: Option<String>,
    pub modules: Vec<String>,
}

/// One element of a `planner_data` key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPart {
    Key(String),
    Index(i64),
}

/// What `state_dict_metadata` says about one fqn.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryMeta {
    Tensor(TensorMeta),
    Bytes,
}

/// `TensorStorageMetadata` with its `TensorProperties`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// dtype name as torch pickles it (`float32`, `bfloat16`, ...). This and the other names
    /// are shared by every tensor that has them (one allocation per distinct name).
    pub dtype: Arc<str>,
    pub layout: Arc<str>,
    pub requires_grad: bool,
    pub memory_format: Arc<str>,
    pub pin_memory: bool,
    /// Present in the 6-tuple form of `TensorProperties` (newer torch).
    pub strides: Option<Vec<i64>>,
    pub shape: Dims,
    pub chunks: Vec<ChunkMeta>,
}

impl TensorMeta {
    /// Size in bytes of one element, when the dtype is known.
    pub fn element_size(&self) -> Option<u64> {
        dtype::element_size(&self.dtype)
    }
}

/// `ChunkStorageMetadata`: the box of the tensor one stored chunk covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkMeta {
    pub offsets: Dims,
    pub sizes: Dims,
}

/// `MetadataIndex`: the key of a storage entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MetadataIndex {
    fqn: Arc<str>,
    /// The chunk's offsets; `None` for bytes entries.
    offset: Option<Dims>,
}

/// `_StorageInfo`: where an item's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageInfo {
    /// Shared by every item of the same file (one allocation per file name).
    pub relative_path: Arc<str>,
    pub offset: u64,
    pub length: u64,
    pub transform_descriptors: Vec<String>,
}

/// Why a `.metadata` graph is not a DCP `Metadata`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{context}: {problem}")]
pub struct ModelError {
    pub context: String,
    pub problem: String,
}

impl ModelError {
    /// The same error, inside an outer context (built only when there is an error).
    fn within(self, outer: impl FnOnce() -> String) -> ModelError {
        let outer = outer();
        ModelError {
            context: if self.context.is_empty() {
                outer
            } else {
                format!("{outer} {}", self.context)
            },
            problem: self.problem,
        }
    }
}

fn err<T>(context: impl Into<String>, problem: impl Into<String>) -> Result<T, ModelError> {
    Err(ModelError {
        context: context.into(),
        problem: problem.into(),
    })
}

/// One shared allocation per distinct string: fqns (named once by `state_dict_metadata` and
/// again by every storage key of the tensor) and file names (one per shard file).
///
/// A small direct-mapped cache of strings seen more than once sits in front of the set: torch's
/// files name the same few files and dtypes over and over, and a hit costs a cheap hash and a
/// comparison instead of a probe of the set. The cache cannot be flooded (a slot is overwritten,
/// never chained); the set keeps a randomly seeded hash (foldhash).
#[derive(Debug, Default)]
pub(crate) struct Interner {
    set: hashbrown::HashSet<Arc<str>>,
    /// `(cheap hash, string)`: strings seen at least twice.
    recent: Vec<(u64, Option<Arc<str>>)>,
}

impl Interner {
    const RECENT: usize = 256;

    pub(crate) fn get(&mut self, s: &str) -> Arc<str> {
        if self.recent.is_empty() {
            self.recent.resize(Self::RECENT, (0, None));
        }
        let h = Self::cheap_hash(s);
        let slot = (h >> 56) as usize % Self::RECENT;
        if let (seen, Some(a)) = &self.recent[slot]
            && *seen == h
            && **a == *s
        {
            return a.clone();
        }
        let before = self.set.len();
        let a = self.set.get_or_insert_with(s, |s| Arc::from(s)).clone();
        // A string seen for the first time (most fqns) does not take the place of one that
        // comes back (a file name, a dtype).
        if self.set.len() == before {
            self.recent[slot] = (h, Some(a.clone()));
        }
        a
    }

    fn cheap_hash(s: &str) -> u64 {
        let mut h = s.len() as u64;
        for w in s.as_bytes().chunks(8) {
            let mut a = [0u8; 8];
            a[..w.len()].copy_from_slice(w);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(a)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        h
    }
}

/// The address of an interned string: equal strings of one [`Interner`] share it.
pub(crate) fn interned_key(s: &Arc<str>) -> usize {
    Arc::as_ptr(s) as *const u8 as usize
}

/// A hash for addresses (not chosen by the input).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        // murmur3's finalizer.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }

    fn write_usize(&mut self, i: usize) {
        self.0 = i as u64;
    }
}

pub(crate) type AddressMap<V> = HashMap<usize, V, std::hash::BuildHasherDefault<AddressHasher>>;

/// The hashes of `state_dict_metadata`'s keys, in order, by one randomly seeded hasher, for
/// [`dedup_entries`]. The fast reader takes each as it reads the key, while its text is in the
/// cache: afterwards each would be a cache miss (a tenth of `plan`'s wait at a million entries).
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyHashes {
    state: hashbrown::DefaultHashBuilder,
    hashes: Vec<u64>,
}

impl KeyHashes {
    /// Keys hashed into `room` (emptied first).
    pub(crate) fn new(mut room: Vec<u64>) -> Self {
        room.clear();
        KeyHashes {
            state: Default::default(),
            hashes: room,
        }
    }

    pub(crate) fn push(&mut self, key: &str) {
        use std::hash::BuildHasher;
        self.hashes.push(self.state.hash_one(key));
    }

    fn of(entries: &[Entry]) -> Self {
        let mut keys = Self::new(Vec::with_capacity(entries.len()));
        for e in entries {
            keys.push(&e.fqn);
        }
        keys
    }
}

/// `state_dict_metadata` as a Python dict reads it: a key set twice keeps its first place and
/// takes its last value. Keys are compared by their text (by `keys`, the hash of each), so the
/// fqns need not come from one [`Interner`].
pub(crate) fn dedup_entries(
    entries: Vec<Entry>,
    keys: KeyHashes,
    duplicate_keys: &mut Vec<String>,
) -> Vec<Entry> {
    let hashes = &keys.hashes;
    if hashes.len() == entries.len() && u32::try_from(entries.len()).is_ok() {
        // A table of positions (4 bytes a slot), not of strings: a million fit in a few MB.
        let hash = |i: &u32| hashes[*i as usize];
        let mut seen: hashbrown::HashTable<u32> = hashbrown::HashTable::new();
        let _ = seen.try_reserve(entries.len(), hash);
        let unique = entries.iter().zip(hashes).enumerate().all(|(i, (e, &h))| {
            match seen.entry(
                h,
                |j| hashes[*j as usize] == h && entries[*j as usize].fqn == e.fqn,
                hash,
            ) {
                hashbrown::hash_table::Entry::Occupied(_) => false,
                hashbrown::hash_table::Entry::Vacant(v) => {
                    v.insert(i as u32);
                    true
                }
            }
        });
        if unique {
            return entries;
        }
    }
    let mut position: hashbrown::HashMap<Arc<str>, usize> = hashbrown::HashMap::new();
    let mut out: Vec<Entry> = Vec::with_capacity(entries.len());
    for e in entries {
        match position.get(&e.fqn) {
            Some(&i) => {
                duplicate_keys.push(e.fqn.to_string());
                out[i] = e;
            }
            None => {
                position.insert(e.fqn.clone(), out.len());
                out.push(e);
            }
        }
    }
    out
}

/// The name `_MEM_FORMAT_ENCODING(i)` stands for.
pub(crate) fn memory_format_name(i: i64) -> std::borrow::Cow<'static, str> {
    match i {
        0 => "contiguous_format".into(),
        1 => "channels_last".into(),
        2 => "preserve_format".into(),
        3 => "channels_last_3d".into(),
        other => format!("unknown ({other})").into(),
    }
}

pub(crate) const METADATA_MODULES: [&str; 2] = [
    "torch.distributed.checkpoint.metadata",
    "torch.distributed._shard.checkpoint.metadata",
];
pub(crate) const FILESYSTEM_MODULES: [&str; 2] = [
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed._shard.checkpoint.filesystem",
];
/// Where torch 1.13 kept `TensorProperties` and `MEM_FORMAT_ENCODING` (no leading underscore).
pub(crate) const SHARDED_TENSOR_MODULE: &str = "torch.distributed._shard.sharded_tensor.metadata";
const PROPERTIES_MODULES: [&str; 3] = [
    METADATA_MODULES[0],
    METADATA_MODULES[1],
    SHARDED_TENSOR_MODULE,
];
/// torch's planner classes: Megatron-Core's `torch_dist` checkpoints keep the save plans in
/// `.metadata` (`Metadata.all_local_plans`: `SavePlan`s of `WriteItem`s).
const PLANNER_MODULES: [&str; 2] = [
    "torch.distributed.checkpoint.planner",
    "torch.distributed._shard.checkpoint.planner",
];
const PLANNER_CLASSES: [&str; 8] = [
    "SavePlan",
    "LoadPlan",
    "WriteItem",
    "ReadItem",
    "WriteItemType",
    "LoadItemType",
    "TensorWriteData",
    "BytesIOWriteData",
];
/// What protocols 0 and 1 call to make an object of a plain class:
/// `copyreg._reconstructor(cls, object, None)` (`copy_reg` and `__builtin__` with Python 2 names).
const RECONSTRUCTOR_MODULES: [&str; 2] = ["copyreg", "copy_reg"];
const METADATA_CLASSES: [&str; 8] = [
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
];

/// Whether a global is one that torch's own loading of a `.metadata` resolves and that does
/// nothing but build data. Anything else is a security finding.
pub fn is_known_global(module: &str, name: &str) -> bool {
    match module {
        m if METADATA_MODULES.contains(&m) => METADATA_CLASSES.contains(&name),
        m if FILESYSTEM_MODULES.contains(&m) => name == "_StorageInfo",
        m if PLANNER_MODULES.contains(&m) => PLANNER_CLASSES.contains(&name),
        SHARDED_TENSOR_MODULE => matches!(name, "TensorProperties" | "MEM_FORMAT_ENCODING"),
        "torch" => name == "Size" || dtype::is_dtype_name(name),
        // `_reconstructor(cls, object, state)` is `object.__new__(cls)`: it runs no code of its
        // own, and `cls` is a global of its own, checked like any other.
        m if RECONSTRUCTOR_MODULES.contains(&m) => name == "_reconstructor",
        "builtins" | "__builtin__" => name == "object",
        "torch.serialization" => name == "_get_layout",
        "pathlib" => matches!(
            name,
            "PosixPath" | "PurePosixPath" | "WindowsPath" | "PureWindowsPath"
        ),
        "collections" => name == "OrderedDict",
        _ => false,
    }
}

struct Reader<'p> {
    p: &'p Pickle,
    intern: RefCell<Interner>,
}

impl<'p> Reader<'p> {
    /// `(module, name)` of the class that made an object: the callable, or the class a
    /// protocol 0/1 `copyreg._reconstructor(cls, object, None)` call makes.
    fn class_of(&self, v: Value) -> Option<(&'p str, &'p str)> {
        let o = self.p.object(v)?;
        let callable = self.p.global(o.callable)?;
        if o.kind == CallKind::Reduce
            && RECONSTRUCTOR_MODULES.contains(&callable.0)
            && callable.1 == "_reconstructor"
            && let Some([cls, base, _state]) = self.p.seq(o.args)
            && matches!(
                self.p.global(*base),
                Some(("builtins" | "__builtin__", "object"))
            )
        {
            return self.p.global(*cls);
        }
        Some(callable)
    }

    fn is_class(&self, v: Value, modules: &[&str], name: &str) -> bool {
        matches!(self.class_of(v), Some((m, n)) if n == name && modules.contains(&m))
    }

    fn describe(&self, v: Value) -> String {
        match self.p.node(v) {
            None => v.to_string(),
            Some(Node::Str(s)) => format!("the string {s:?}"),
            Some(Node::Global(g)) => format!("the global {}.{}", g.module, g.name),
            Some(Node::Object(_)) => match self.class_of(v) {
                Some((m, n)) => format!("an object of {m}.{n}"),
                None => "an object of an unnamed class".to_string(),
            },
            Some(Node::Tuple(_)) => "a tuple".into(),
            Some(Node::List(_)) => "a list".into(),
            Some(Node::Dict(_)) => "a dict".into(),
            Some(Node::Set(_) | Node::FrozenSet(_)) => "a set".into(),
            Some(Node::Bytes(_)) => "bytes".into(),
            Some(Node::BigInt(_)) => "an integer wider than 64 bits".into(),
            Some(Node::PersistentId(_)) => "a persistent id".into(),
        }
    }

    /// The attribute dict of an object: its `BUILD` state, or the dict half of a
    /// `(dict, slots)` state.
    fn attrs(&self, obj: Value, ctx: &str) -> Result<Option<Value>, ModelError> {
        let Some(Object { state, .. }) = self.p.object(obj) else {
            return err(
                ctx,
                format!("expected an object, found {}", self.describe(obj)),
            );
        };
        let Some(state) = *state else { return Ok(None) };
        match self.p.node(state) {
            Some(Node::Dict(_)) => Ok(Some(state)),
            Some(Node::Tuple(_)) if self.p.tuple(state).is_some_and(|t| t.len() == 2) => {
                let t = self.p.tuple(state).expect("checked");
                // (dict or None, slots dict): prefer the slots when the dict is empty.
                for half in [t[1], t[0]] {
                    if matches!(self.p.node(half), Some(Node::Dict(d)) if !d.is_empty()) {
                        return Ok(Some(half));
                    }
                }
                Ok(None)
            }
            _ if state == Value::None => Ok(None),
            _ => err(
                ctx,
                format!("unexpected object state {}", self.describe(state)),
            ),
        }
    }

    fn attr(&self, attrs: Option<Value>, key: &str) -> Option<Value> {
        attrs
            .and_then(|a| self.p.get(a, key))
            .filter(|v| *v != Value::None)
    }

    fn string(&self, v: Value, ctx: &str) -> Result<String, ModelError> {
        match self.p.str(v) {
            Some(s) => Ok(s.to_owned()),
            None => err(
                ctx,
                format!("expected a string, found {}", self.describe(v)),
            ),
        }
    }

    fn int(&self, v: Value, ctx: &str) -> Result<i64, ModelError> {
        match v {
            Value::Int(i) => Ok(i),
            Value::Bool(b) => Ok(b as i64),
            _ => err(
                ctx,
                format!("expected an integer, found {}", self.describe(v)),
            ),
        }
    }

    fn uint(&self, v: Value, ctx: &str) -> Result<u64, ModelError> {
        let i = self.int(v, ctx)?;
        u64::try_from(i).or_else(|_| err(ctx, format!("negative value {i}")))
    }

    fn bool(&self, v: Value, ctx: &str) -> Result<bool, ModelError> {
        match v {
            Value::Bool(b) => Ok(b),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            _ => err(ctx, format!("expected a bool, found {}", self.describe(v))),
        }
    }

    /// A `torch.Size` (REDUCE of `torch.Size` with `(dims,)`), or a plain tuple of ints.
    fn size(&self, v: Value, ctx: &str) -> Result<Vec<u64>, ModelError> {
        let dims = match self.p.object(v) {
            Some(Object {
                callable,
                args,
                kind,
                ..
            }) if *kind == CallKind::Reduce
                && self.p.global(*callable) == Some(("torch", "Size")) =>
            {
                match self.p.seq(*args) {
                    Some([]) => return Ok(Vec::new()),
                    Some([dims]) => *dims,
                    _ => return err(ctx, "torch.Size takes one tuple of dimensions"),
                }
            }
            _ => v,
        };
        let Some(items) = self.p.seq(dims) else {
            return err(
                ctx,
                format!("expected a torch.Size, found {}", self.describe(v)),
            );
        };
        items.iter().map(|d| self.uint(*d, ctx)).collect()
    }

    fn ints(&self, v: Value, ctx: &str) -> Result<Vec<i64>, ModelError> {
        let Some(items) = self.p.seq(v) else {
            return err(
                ctx,
                format!("expected a tuple of integers, found {}", self.describe(v)),
            );
        };
        items.iter().map(|d| self.int(*d, ctx)).collect()
    }

    /// The argument of a REDUCE of a known helper, such as `_get_layout('torch.strided')`.
    fn reduce_arg(
        &self,
        v: Value,
        module: &[&str],
        name: &str,
        ctx: &str,
    ) -> Result<Value, ModelError> {
        if let Some(Object {
            callable,
            args,
            kind,
            ..
        }) = self.p.object(v)
            && *kind == CallKind::Reduce
            && let Some((m, n)) = self.p.global(*callable)
            && n == name
            && module.contains(&m)
            && let Some([arg]) = self.p.seq(*args)
        {
            return Ok(*arg);
        }
        err(
            ctx,
            format!(
                "expected {}.{name}(...), found {}",
                module[0],
                self.describe(v)
            ),
        )
    }

    fn dtype(&self, v: Value, ctx: &str) -> Result<String, ModelError> {
        match self.p.global(v) {
            // A dtype dcpfetch does not know keeps its name; its element size is unknown.
            Some(("torch", name)) if dtype::is_dtype_name(name) => {
                Ok(dtype::canonical(name).to_owned())
            }
            _ => err(
                ctx,
                format!("expected a torch dtype, found {}", self.describe(v)),
            ),
        }
    }

    fn layout(&self, v: Value, ctx: &str) -> Result<String, ModelError> {
        let arg = self.reduce_arg(v, &["torch.serialization"], "_get_layout", ctx)?;
        let s = self.string(arg, ctx)?;
        Ok(s.strip_prefix("torch.").unwrap_or(&s).to_owned())
    }

    fn memory_format(&self, v: Value, ctx: &str) -> Result<String, ModelError> {
        let arg = self
            .reduce_arg(v, &METADATA_MODULES, "_MEM_FORMAT_ENCODING", ctx)
            .or_else(|current| {
                // torch 1.13's name; an error speaks of the current one.
                self.reduce_arg(v, &[SHARDED_TENSOR_MODULE], "MEM_FORMAT_ENCODING", ctx)
                    .map_err(|_| current)
            })?;
        Ok(memory_format_name(self.int(arg, ctx)?).into_owned())
    }

    fn metadata(&self, root: Value) -> Result<RankMetadata, ModelError> {
        let ctx = "Metadata";
        if !self.is_class(root, &METADATA_MODULES, "Metadata") {
            return err(
                ctx,
                format!(
                    "the pickle holds {}, not torch.distributed.checkpoint.metadata.Metadata",
                    self.describe(root)
                ),
            );
        }
        let attrs = self.attrs(root, ctx)?;
        let mut md = RankMetadata::default();
        if let Some(v) = self.attr(attrs, "version") {
            md.version = Some(self.string(v, "Metadata.version")?);
        }
        if let Some(v) = self.attr(attrs, "storage_meta") {
            md.storage_meta = Some(self.storage_meta(v)?);
        }
        let Some(sdm) = self.attr(attrs, "state_dict_metadata") else {
            return err(ctx, "no state_dict_metadata");
        };
        let Some(pairs) = self.p.pairs(sdm) else {
            return err(
                "Metadata.state_dict_metadata",
                format!("expected a dict, found {}", self.describe(sdm)),
            );
        };
        let mut entries = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let fqn = self.string(*k, "state_dict_metadata key")?;
            let entry = self
                .entry(*v)
                .map_err(|e| e.within(|| format!("entry {fqn:?}")))?;
            let fqn = self.intern.borrow_mut().get(&fqn);
            entries.push(Entry::new(fqn, entry));
        }
        let keys = KeyHashes::of(&entries);
        md.entries = dedup_entries(entries, keys, &mut md.duplicate_keys);
        if let Some(sd) = self.attr(attrs, "storage_data") {
            let Some(pairs) = self.p.pairs(sd) else {
                return err(
                    "Metadata.storage_data",
                    format!("expected a dict, found {}", self.describe(sd)),
                );
            };
            md.storage.reserve(pairs.len());
            for (k, v) in pairs {
                let index = self.metadata_index(*k)?;
                let info = self
                    .storage_info(*v)
                    .map_err(|e| e.within(|| format!("storage entry for {:?}", index.fqn)))?;
                md.storage.push(Storage {
                    metadata_file: 0,
                    fqn: index.fqn,
                    chunk_offsets: index.offset,
                    info,
                    chunk: None,
                });
            }
        }
        if let Some(pd) = self.attr(attrs, "planner_data") {
            md.planner_data = self.planner_data(pd);
        }
        Ok(md)
    }

    fn storage_meta(&self, v: Value) -> Result<StorageMeta, ModelError> {
        let ctx = "Metadata.storage_meta";
        if !self.is_class(v, &METADATA_MODULES, "StorageMeta") {
            return err(
                ctx,
                format!("expected StorageMeta, found {}", self.describe(v)),
            );
        }
        let attrs = self.attrs(v, ctx)?;
        let mut sm = StorageMeta::default();
        if let Some(id) = self.attr(attrs, "checkpoint_id") {
            sm.checkpoint_id = Some(self.path_like(id, "StorageMeta.checkpoint_id")?);
        }
        if let Some(s) = self.attr(attrs, "save_id") {
            sm.save_id = Some(self.string(s, "StorageMeta.save_id")?);
        }
        if let Some(s) = self.attr(attrs, "load_id") {
            sm.load_id = Some(self.string(s, "StorageMeta.load_id")?);
        }
        if let Some(m) = self.attr(attrs, "modules")
            && let Some(items) = self.p.seq(m)
        {
            for item in items {
                sm.modules.push(self.string(*item, "StorageMeta.modules")?);
            }
        }
        Ok(sm)
    }

    /// A `str` or a `pathlib.PosixPath` (REDUCE of the class with its parts).
    fn path_like(&self, v: Value, ctx: &str) -> Result<String, ModelError> {
        if let Some(s) = self.p.str(v) {
            return Ok(s.to_owned());
        }
        if let Some(Object { callable, args, .. }) = self.p.object(v)
            && let Some(("pathlib", _)) = self.p.global(*callable)
            && let Some(parts) = self.p.seq(*args)
        {
            let mut out = String::new();
            for part in parts {
                let part = self.string(*part, ctx)?;
                if !out.is_empty() && !out.ends_with('/') {
                    out.push('/');
                }
                out.push_str(&part);
            }
            return Ok(out);
        }
        err(
            ctx,
            format!("expected a string or path, found {}", self.describe(v)),
        )
    }

    fn entry(&self, v: Value) -> Result<EntryMeta, ModelError> {
        let ctx = "";
        if self.is_class(v, &METADATA_MODULES, "BytesStorageMetadata") {
            return Ok(EntryMeta::Bytes);
        }
        if !self.is_class(v, &METADATA_MODULES, "TensorStorageMetadata") {
            return err(
                ctx,
                format!(
                    "expected TensorStorageMetadata or BytesStorageMetadata, found {}",
                    self.describe(v)
                ),
            );
        }
        let attrs = self.attrs(v, ctx)?;
        let Some(props) = self.attr(attrs, "properties") else {
            return err(ctx, "no properties");
        };
        let Some(size) = self.attr(attrs, "size") else {
            return err(ctx, "no size");
        };
        let shape = self.size(size, "size")?;
        let mut t = self.properties(props, shape)?;
        if let Some(chunks) = self.attr(attrs, "chunks") {
            let Some(items) = self.p.seq(chunks) else {
                return err(
                    ctx,
                    format!("chunks: expected a list, found {}", self.describe(chunks)),
                );
            };
            t.chunks.reserve(items.len());
            for c in items {
                t.chunks.push(self.chunk(*c)?);
            }
        }
        Ok(EntryMeta::Tensor(t))
    }

    fn properties(&self, v: Value, shape: Vec<u64>) -> Result<TensorMeta, ModelError> {
        let ctx = "properties";
        if !self.is_class(v, &PROPERTIES_MODULES, "TensorProperties") {
            return err(
                ctx,
                format!("expected TensorProperties, found {}", self.describe(v)),
            );
        }
        let Some(Object {
            state: Some(state), ..
        }) = self.p.object(v)
        else {
            return err(ctx, "no state");
        };
        // Newer torch: a (dtype, layout, requires_grad, memory_format, pin_memory[, strides]) tuple.
        // Older torch (a plain dataclass): a dict of the same fields.
        let field = |i: usize, name: &str| -> Option<Value> {
            match self.p.node(*state) {
                Some(Node::Tuple(_)) => self.p.tuple(*state)?.get(i).copied(),
                Some(Node::Dict(_)) => self.p.get(*state, name),
                _ => None,
            }
        };
        if !self
            .p
            .tuple(*state)
            .is_some_and(|t| t.len() == 5 || t.len() == 6)
            && !matches!(self.p.node(*state), Some(Node::Dict(_)))
        {
            return err(
                ctx,
                format!(
                    "expected a 5- or 6-tuple state, found {}",
                    self.describe(*state)
                ),
            );
        }
        let Some(dtype) = field(0, "dtype") else {
            return err(ctx, "no dtype");
        };
        let dtype = self.dtype(dtype, ctx)?;
        let layout = match field(1, "layout") {
            Some(l) if l != Value::None => self.layout(l, ctx)?,
            _ => "strided".into(),
        };
        let requires_grad = match field(2, "requires_grad") {
            Some(b) => self.bool(b, ctx)?,
            None => false,
        };
        let memory_format = match field(3, "memory_format") {
            Some(m) if m != Value::None => self.memory_format(m, ctx)?,
            _ => "contiguous_format".into(),
        };
        let pin_memory = match field(4, "pin_memory") {
            Some(b) => self.bool(b, ctx)?,
            None => false,
        };
        let strides = match field(5, "strides") {
            Some(s) if s != Value::None => Some(self.ints(s, "properties strides")?),
            _ => None,
        };
        let mut intern = self.intern.borrow_mut();
        Ok(TensorMeta {
            dtype: intern.get(&dtype),
            layout: intern.get(&layout),
            requires_grad,
            memory_format: intern.get(&memory_format),
            pin_memory,
            strides,
            shape: shape.into(),
            chunks: Vec::new(),
        })
    }

    fn chunk(&self, v: Value) -> Result<ChunkMeta, ModelError> {
        let ctx = "chunk";
        if !self.is_class(v, &METADATA_MODULES, "ChunkStorageMetadata") {
            return err(
                ctx,
                format!("expected ChunkStorageMetadata, found {}", self.describe(v)),
            );
        }
        let attrs = self.attrs(v, ctx)?;
        let (Some(offsets), Some(sizes)) = (self.attr(attrs, "offsets"), self.attr(attrs, "sizes"))
        else {
            return err(ctx, "offsets or sizes missing");
        };
        Ok(ChunkMeta {
            offsets: self.size(offsets, "chunk offsets")?.into(),
            sizes: self.size(sizes, "chunk sizes")?.into(),
        })
    }

    fn metadata_index(&self, v: Value) -> Result<MetadataIndex, ModelError> {
        let ctx = "storage_data key";
        if !self.is_class(v, &METADATA_MODULES, "MetadataIndex") {
            return err(
                ctx,
                format!("expected MetadataIndex, found {}", self.describe(v)),
            );
        }
        let attrs = self.attrs(v, ctx)?;
        let Some(fqn) = self.attr(attrs, "fqn") else {
            return err(ctx, "MetadataIndex without fqn");
        };
        let fqn = self.string(fqn, ctx)?;
        let within = |e: ModelError| e.within(|| format!("storage key for {fqn:?}"));
        let offset = match self.attr(attrs, "offset") {
            Some(o) => Some(self.size(o, "offset").map_err(within)?.into()),
            None => None,
        };
        if let Some(i) = self.attr(attrs, "index") {
            self.int(i, "index").map_err(within)?;
        }
        let fqn = self.intern.borrow_mut().get(&fqn);
        Ok(MetadataIndex { fqn, offset })
    }

    fn storage_info(&self, v: Value) -> Result<StorageInfo, ModelError> {
        let ctx = "";
        if !self.is_class(v, &FILESYSTEM_MODULES, "_StorageInfo") {
            return err(
                ctx,
                format!("expected _StorageInfo, found {}", self.describe(v)),
            );
        }
        let attrs = self.attrs(v, ctx)?;
        let (Some(path), Some(offset), Some(length)) = (
            self.attr(attrs, "relative_path"),
            self.attr(attrs, "offset"),
            self.attr(attrs, "length"),
        ) else {
            return err(ctx, "relative_path, offset or length missing");
        };
        let mut transform_descriptors = Vec::new();
        if let Some(t) = self.attr(attrs, "transform_descriptors") {
            let Some(items) = self.p.seq(t) else {
                return err(
                    ctx,
                    format!(
                        "transform_descriptors: expected a list, found {}",
                        self.describe(t)
                    ),
                );
            };
            for item in items {
                transform_descriptors.push(self.string(*item, "transform_descriptors")?);
            }
        }
        let relative_path = self.path_like(path, "relative_path")?;
        Ok(StorageInfo {
            relative_path: self.intern.borrow_mut().get(&relative_path),
            offset: self.uint(offset, "offset")?,
            length: self.uint(length, "length")?,
            transform_descriptors,
        })
    }

    /// Advisory data: anything not in the expected shape is dropped rather than refused.
    fn planner_data(&self, v: Value) -> Option<Vec<(String, Vec<PathPart>)>> {
        let pairs = self.p.pairs(v)?;
        let mut out = Vec::with_capacity(pairs.len());
        for (k, path) in pairs {
            let fqn = self.p.str(*k)?.to_owned();
            let parts = self
                .p
                .seq(*path)?
                .iter()
                .map(|part| match (self.p.str(*part), part) {
                    (Some(s), _) => Some(PathPart::Key(s.to_owned())),
                    (None, Value::Int(i)) => Some(PathPart::Index(*i)),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            out.push((fqn, parts));
        }
        Some(out)
    }
}

/// Reads a DCP `Metadata` from a parsed pickle.
pub fn read(p: &Pickle) -> Result<RankMetadata, ModelError> {
    Reader {
        p,
        intern: RefCell::default(),
    }
    .metadata(p.root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_globals() {
        let known = [
            ("torch.distributed.checkpoint.metadata", "Metadata"),
            (
                "torch.distributed._shard.checkpoint.metadata",
                "ChunkStorageMetadata",
            ),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch", "Size"),
            ("torch", "bfloat16"),
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("torch.distributed.checkpoint.planner", "SavePlan"),
            ("torch.distributed.checkpoint.planner", "WriteItem"),
            ("torch.distributed.checkpoint.planner", "WriteItemType"),
            ("torch.distributed.checkpoint.planner", "TensorWriteData"),
            ("copy_reg", "_reconstructor"),
            ("copyreg", "_reconstructor"),
            ("__builtin__", "object"),
            ("torch", "bcomplex32"),
            (
                "torch.distributed._shard.sharded_tensor.metadata",
                "MEM_FORMAT_ENCODING",
            ),
        ];
        for (m, n) in known {
            assert!(is_known_global(m, n), "{m}.{n}");
        }
        let unknown = [
            ("posix", "system"),
            ("os", "system"),
            ("builtins", "eval"),
            ("builtins", "exec"),
            ("subprocess", "Popen"),
            ("torch", "load"),
            ("torch.hub", "load"),
            ("torch.distributed.checkpoint.metadata", "os"),
            ("torch.distributed.checkpoint.planner", "SavePlanner"),
            ("torch.distributed.checkpoint.planner", "os"),
            ("copyreg", "__newobj__"),
            ("builtins", "getattr"),
            ("torch", "float_power"),
        ];
        for (m, n) in unknown {
            assert!(!is_known_global(m, n), "{m}.{n}");
        }
    }

    #[test]
    fn rejects_a_pickle_that_is_not_metadata() {
        let p = Pickle::parse(b"\x80\x04}\x94.").unwrap();
        let e = read(&p).unwrap_err();
        assert!(
            e.to_string()
                .contains("not torch.distributed.checkpoint.metadata.Metadata"),
            "{e}"
        );
    }
}
