//! A non-executing reader for Python pickles (protocols 0 to 5).
//!
//! Python's `pickle.load` imports and calls whatever a file names. This reader does neither: it
//! interprets the opcodes into a value graph in which globals, calls (`REDUCE`, `NEWOBJ`) and object
//! states (`BUILD`) are plain data. The DCP model in [`super::model`] reads the classes it knows
//! from that graph and ignores the rest; every global the file names is reported so that callers
//! can flag the unexpected ones.
//!
//! Containers live in an arena and are referred to by index, so memo references share instead of
//! copying (a "memo bomb" cannot expand) and dropping the graph never recurses. Every length read
//! from the input is checked against the bytes that remain before anything is allocated.
//!
//! With the `pickle-writer` feature (tests and fuzzing, not the binary), `Pickle::write` writes a
//! graph back to bytes and `Pickle::node_mut` edits it.

use std::collections::HashMap;
use std::fmt;

#[cfg(feature = "pickle-writer")]
mod write;

/// Hard limits that bound time and memory on hostile input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest pickle accepted, in bytes.
    pub max_input: usize,
    /// Deepest container nesting accepted.
    pub max_depth: u32,
    /// Most memo entries accepted.
    pub max_memo: usize,
    /// Most elements in one container.
    pub max_container: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_input: 2 << 30,
            max_depth: 200,
            max_memo: 1 << 28,
            max_container: 1 << 28,
        }
    }
}

/// A value on the unpickler's stack: scalars inline, everything else a node of the arena.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Node(u32),
}

/// How an object node was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `REDUCE`: `callable(*args)`.
    Reduce,
    /// `NEWOBJ` / `NEWOBJ_EX`: `cls.__new__(cls, *args)`.
    NewObj,
    /// `INST` / `OBJ` (protocols 0 and 1).
    Inst,
}

/// A heap value of the graph (kept to 32 bytes: large variants are boxed).
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// An integer wider than 64 bits: little-endian two's complement bytes.
    BigInt(Box<[u8]>),
    Str(Box<str>),
    Bytes(Box<[u8]>),
    /// Tuples live in one shared pool: they never change once made.
    Tuple(Span),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    FrozenSet(Span),
    /// A global reference (`module.name`), never imported.
    Global(Box<GlobalName>),
    /// A call that was never made: an index into the objects of the graph (see
    /// [`Pickle::object`]).
    Object(u32),
    /// A persistent id (`PERSID`/`BINPERSID`); torch.save archives use them for storages.
    PersistentId(Value),
}

/// Where a tuple's elements are in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// `module.name` of a global.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalName {
    pub module: String,
    pub name: String,
}

/// A call that was never made, with whatever `BUILD`, `APPEND(S)` and `SETITEM(S)` applied to its
/// result.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub callable: Value,
    pub args: Value,
    pub kind: CallKind,
    pub state: Option<Value>,
    /// What few objects have (kept apart so that objects stay small).
    extra: Option<Box<ObjectExtra>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct ObjectExtra {
    kwargs: Option<Value>,
    items: Vec<Value>,
    dict_items: Vec<(Value, Value)>,
}

impl Object {
    /// The keyword arguments of a `NEWOBJ_EX`.
    pub fn kwargs(&self) -> Option<Value> {
        self.extra.as_ref().and_then(|e| e.kwargs)
    }

    /// What `APPEND(S)` added to the object (a list subclass).
    pub fn items(&self) -> &[Value] {
        self.extra.as_ref().map_or(&[], |e| &e.items)
    }

    /// What `SETITEM(S)` added to the object (a dict subclass such as `OrderedDict`).
    pub fn dict_items(&self) -> &[(Value, Value)] {
        self.extra.as_ref().map_or(&[], |e| &e.dict_items)
    }

    fn extra_mut(&mut self) -> &mut ObjectExtra {
        self.extra.get_or_insert_with(Box::default)
    }
}

/// A global that the pickle names, with the offset of the opcode that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalRef {
    pub offset: u64,
    pub module: String,
    pub name: String,
}

/// The result of reading a pickle.
#[derive(Debug, Clone)]
pub struct Pickle {
    nodes: Vec<Node>,
    objects: Vec<Object>,
    /// The elements of every tuple.
    pool: Vec<Value>,
    /// The object `STOP` returned.
    pub root: Value,
    /// Every global named, in file order.
    pub globals: Vec<GlobalRef>,
    /// The highest protocol declared by `PROTO` (0 when absent).
    pub protocol: u8,
}

/// What went wrong, without the position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleErrorKind {
    #[error("input ends early")]
    Truncated,
    #[error("no STOP opcode before the end of the input")]
    NoStop,
    #[error("unknown opcode")]
    UnknownOpcode,
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("stack underflow")]
    StackUnderflow,
    #[error("MARK expected but not found")]
    NoMark,
    #[error("memo entry {0} is not defined")]
    MissingMemo(u64),
    #[error("more than {0} memo entries")]
    TooManyMemo(usize),
    #[error("declared length {declared} exceeds the {remaining} bytes that remain")]
    LengthPastEnd { declared: u64, remaining: u64 },
    #[error("input of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("nesting deeper than {0}")]
    TooDeep(u32),
    #[error("container with more than {0} elements")]
    ContainerTooLarge(usize),
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("malformed text argument")]
    BadText,
    #[error("{0}")]
    Invalid(&'static str),
    #[error("unsupported protocol {0}")]
    BadProtocol(u8),
}

/// A malformed pickle: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pickle at byte {offset}{}: {kind}", opcode_label(*.opcode))]
pub struct PickleError {
    pub offset: u64,
    pub opcode: Option<u8>,
    pub kind: PickleErrorKind,
}

fn opcode_label(op: Option<u8>) -> String {
    match op {
        Some(op) => match opcode_name(op) {
            Some(name) => format!(" (opcode {name})"),
            None => format!(" (opcode 0x{op:02x})"),
        },
        None => String::new(),
    }
}

/// The name Python's `pickletools` gives an opcode.
pub fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        b'L' => "LONG",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8e => "BINBYTES8",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'V' => "UNICODE",
        0x8c => "SHORT_BINUNICODE",
        b'X' => "BINUNICODE",
        0x8d => "BINUNICODE8",
        b'F' => "FLOAT",
        b'G' => "BINFLOAT",
        b']' => "EMPTY_LIST",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b'l' => "LIST",
        b')' => "EMPTY_TUPLE",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b'}' => "EMPTY_DICT",
        b'd' => "DICT",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        b'0' => "POP",
        b'2' => "DUP",
        b'(' => "MARK",
        b'1' => "POP_MARK",
        b'g' => "GET",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'R' => "REDUCE",
        b'b' => "BUILD",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x80 => "PROTO",
        b'.' => "STOP",
        0x95 => "FRAME",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        _ => return None,
    })
}

impl Pickle {
    /// Reads one pickle from `data` with the default limits.
    pub fn parse(data: &[u8]) -> Result<Pickle, PickleError> {
        Self::parse_with(data, Limits::default())
    }

    /// Reads one pickle from `data`. Bytes after `STOP` are ignored, as Python does.
    pub fn parse_with(data: &[u8], limits: Limits) -> Result<Pickle, PickleError> {
        if data.len() > limits.max_input {
            return Err(PickleError {
                offset: 0,
                opcode: None,
                kind: PickleErrorKind::TooLarge {
                    size: data.len(),
                    limit: limits.max_input,
                },
            });
        }
        Machine::new(data, limits).run()
    }

    /// The node a value refers to, if it is not a scalar.
    pub fn node(&self, value: Value) -> Option<&Node> {
        match value {
            Value::Node(id) => self.nodes.get(id as usize),
            _ => None,
        }
    }

    /// The string a value holds.
    pub fn str(&self, value: Value) -> Option<&str> {
        match self.node(value)? {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of a tuple or list.
    pub fn seq(&self, value: Value) -> Option<&[Value]> {
        match self.node(value)? {
            Node::Tuple(s) => Some(&self.pool[s.range()]),
            Node::List(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of a tuple.
    pub fn tuple(&self, value: Value) -> Option<&[Value]> {
        match self.node(value)? {
            Node::Tuple(s) => Some(&self.pool[s.range()]),
            _ => None,
        }
    }

    /// The pairs of a dict, or of an object built as a dict subclass (`OrderedDict`).
    pub fn pairs(&self, value: Value) -> Option<&[(Value, Value)]> {
        match self.node(value)? {
            Node::Dict(v) => Some(v),
            Node::Object(i) => Some(self.objects[*i as usize].dict_items()),
            _ => None,
        }
    }

    /// The value stored under a string key in a dict: the last one when the key is set more than
    /// once, as in Python.
    pub fn get(&self, dict: Value, key: &str) -> Option<Value> {
        self.pairs(dict)?
            .iter()
            .rev()
            .find(|(k, _)| self.str(*k) == Some(key))
            .map(|(_, v)| *v)
    }

    /// The object a value refers to.
    pub fn object(&self, value: Value) -> Option<&Object> {
        match self.node(value)? {
            Node::Object(i) => Some(&self.objects[*i as usize]),
            _ => None,
        }
    }

    /// The `(module, name)` of a global.
    pub fn global(&self, value: Value) -> Option<(&str, &str)> {
        match self.node(value)? {
            Node::Global(g) => Some((&g.module, &g.name)),
            _ => None,
        }
    }

    /// Number of nodes in the graph.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_start: usize,
    op: u8,
    limits: Limits,
    nodes: Vec<Node>,
    objects: Vec<Object>,
    pool: Vec<Value>,
    depth: Vec<u32>,
    stack: Vec<Value>,
    marks: Vec<usize>,
    /// Memo entries at the indexes Python's pickler uses (0, 1, 2, ...).
    memo: Vec<Option<Value>>,
    /// Entries at indexes far from those (any `u32` is allowed, as in Python).
    sparse_memo: HashMap<u64, Value>,
    memo_len: usize,
    globals: Vec<GlobalRef>,
    protocol: u8,
}

type Step<T> = Result<T, PickleErrorKind>;

/// An empty vector with room for `n` elements, or less if the system refuses that much.
fn reserved<T>(n: usize) -> Vec<T> {
    let mut v = Vec::new();
    let _ = v.try_reserve_exact(n);
    v
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], limits: Limits) -> Self {
        // torch's metadata makes a node for every 7 bytes or so: reserve a little more, so that
        // large files never copy the arena as it grows (a copy touches as much memory again).
        // Reserved pages cost nothing until they are written; a reservation the system refuses
        // is skipped.
        let expected_nodes = data.len() / 6;
        Machine {
            data,
            pos: 0,
            op_start: 0,
            op: 0,
            limits,
            nodes: reserved(expected_nodes),
            objects: reserved(expected_nodes / 4),
            pool: reserved(expected_nodes / 2),
            depth: reserved(expected_nodes),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: Vec::new(),
            sparse_memo: HashMap::new(),
            memo_len: 0,
            globals: Vec::new(),
            protocol: 0,
        }
    }

    fn run(mut self) -> Result<Pickle, PickleError> {
        loop {
            self.op_start = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                return Err(self.error(None, PickleErrorKind::NoStop));
            };
            self.op = op;
            self.pos += 1;
            match self.step(op) {
                Ok(true) => {
                    let root = self
                        .stack
                        .pop()
                        .ok_or_else(|| self.error(Some(op), PickleErrorKind::StackUnderflow))?;
                    return Ok(Pickle {
                        nodes: self.nodes,
                        objects: self.objects,
                        pool: self.pool,
                        root,
                        globals: self.globals,
                        protocol: self.protocol,
                    });
                }
                Ok(false) => {}
                Err(kind) => return Err(self.error(Some(op), kind)),
            }
        }
    }

    fn error(&self, opcode: Option<u8>, kind: PickleErrorKind) -> PickleError {
        PickleError {
            offset: self.op_start as u64,
            opcode,
            kind,
        }
    }

    // ---- reading arguments -------------------------------------------------------------------

    fn take(&mut self, n: u64) -> Step<&'a [u8]> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(if self.is_length_op() {
                PickleErrorKind::LengthPastEnd {
                    declared: n,
                    remaining,
                }
            } else {
                PickleErrorKind::Truncated
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.data[start..self.pos])
    }

    /// Whether the current opcode carries a declared length (for a clearer message).
    fn is_length_op(&self) -> bool {
        matches!(
            self.op,
            b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 | 0x8c | b'X' | 0x8d | 0x8a | 0x8b | 0x95
        ) && self.pos > self.op_start + 1 + 1
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Step<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Step<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Step<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Reads `n` bytes whose count was declared by the input.
    fn declared(&mut self, n: u64) -> Step<&'a [u8]> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(PickleErrorKind::LengthPastEnd {
                declared: n,
                remaining,
            });
        }
        self.take(n)
    }

    /// A text argument ending in `\n` (protocol 0 opcodes).
    fn line(&mut self) -> Step<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(PickleErrorKind::Truncated);
        };
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    fn line_str(&mut self) -> Step<&'a str> {
        std::str::from_utf8(self.line()?).map_err(|_| PickleErrorKind::BadText)
    }

    // ---- the stack and the arena -------------------------------------------------------------

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Step<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(PickleErrorKind::StackUnderflow);
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Step<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(PickleErrorKind::StackUnderflow);
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let mark = self.marks.pop().ok_or(PickleErrorKind::NoMark)?;
        Ok(self.stack.split_off(mark))
    }

    fn depth_of(&self, v: Value) -> u32 {
        match v {
            Value::Node(id) => self.depth[id as usize],
            _ => 0,
        }
    }

    fn alloc(&mut self, node: Node, depth: u32) -> Step<Value> {
        if depth > self.limits.max_depth {
            return Err(PickleErrorKind::TooDeep(self.limits.max_depth));
        }
        let id = u32::try_from(self.nodes.len())
            .map_err(|_| PickleErrorKind::Invalid("too many objects"))?;
        self.nodes.push(node);
        self.depth.push(depth);
        Ok(Value::Node(id))
    }

    fn container(&mut self, make: fn(Vec<Value>) -> Node, items: Vec<Value>) -> Step<Value> {
        if items.len() > self.limits.max_container {
            return Err(PickleErrorKind::ContainerTooLarge(
                self.limits.max_container,
            ));
        }
        let depth = 1 + items.iter().map(|v| self.depth_of(*v)).max().unwrap_or(0);
        self.alloc(make(items), depth)
    }

    /// A tuple (or frozenset) of the stack's items from index `from` up, moved into the pool.
    fn pooled(&mut self, from: usize, make: fn(Span) -> Node) -> Step<Value> {
        let len = self.stack.len() - from;
        if len > self.limits.max_container {
            return Err(PickleErrorKind::ContainerTooLarge(
                self.limits.max_container,
            ));
        }
        let depth = 1 + self.stack[from..]
            .iter()
            .map(|v| self.depth_of(*v))
            .max()
            .unwrap_or(0);
        let start = u32::try_from(self.pool.len())
            .map_err(|_| PickleErrorKind::Invalid("too many tuple elements"))?;
        self.pool.extend(self.stack.drain(from..));
        self.alloc(
            make(Span {
                start,
                len: len as u32,
            }),
            depth,
        )
    }

    /// A tuple of the items above the topmost mark.
    fn pooled_from_mark(&mut self, make: fn(Span) -> Node) -> Step<Value> {
        let mark = self.marks.pop().ok_or(PickleErrorKind::NoMark)?;
        self.pooled(mark, make)
    }

    /// A tuple of the given values.
    fn pooled_from(&mut self, items: Vec<Value>) -> Step<Value> {
        let from = self.stack.len();
        self.stack.extend(items);
        self.pooled(from, Node::Tuple)
    }

    fn string(&mut self, bytes: &[u8]) -> Step<Value> {
        let s = std::str::from_utf8(bytes).map_err(|_| PickleErrorKind::InvalidUtf8)?;
        self.alloc(Node::Str(s.into()), 0)
    }

    fn bytes(&mut self, bytes: &[u8]) -> Step<Value> {
        self.alloc(Node::Bytes(bytes.into()), 0)
    }

    fn long(&mut self, bytes: &[u8]) -> Step<Value> {
        if bytes.is_empty() {
            return Ok(Value::Int(0));
        }
        if bytes.len() <= 8 {
            let negative = bytes[bytes.len() - 1] & 0x80 != 0;
            let mut a = [if negative { 0xff } else { 0 }; 8];
            a[..bytes.len()].copy_from_slice(bytes);
            return Ok(Value::Int(i64::from_le_bytes(a)));
        }
        self.alloc(Node::BigInt(bytes.into()), 0)
    }

    /// The value of an integer read from text: inline when it fits in 64 bits.
    fn int_value(&mut self, int: PyInt) -> Step<Value> {
        match int {
            PyInt::Small(i) => Ok(Value::Int(i)),
            PyInt::Big(bytes) => self.alloc(Node::BigInt(bytes.into()), 0),
        }
    }

    fn global(&mut self, module: String, name: String) -> Step<Value> {
        self.globals.push(GlobalRef {
            offset: self.op_start as u64,
            module: module.clone(),
            name: name.clone(),
        });
        self.alloc(Node::Global(Box::new(GlobalName { module, name })), 0)
    }

    fn object(
        &mut self,
        callable: Value,
        args: Value,
        kwargs: Option<Value>,
        kind: CallKind,
    ) -> Step<Value> {
        let depth = 1 + self
            .depth_of(callable)
            .max(self.depth_of(args))
            .max(kwargs.map_or(0, |k| self.depth_of(k)));
        let index = u32::try_from(self.objects.len())
            .map_err(|_| PickleErrorKind::Invalid("too many objects"))?;
        self.objects.push(Object {
            callable,
            args,
            kind,
            state: None,
            extra: kwargs.map(|k| {
                Box::new(ObjectExtra {
                    kwargs: Some(k),
                    ..ObjectExtra::default()
                })
            }),
        });
        self.alloc(Node::Object(index), depth)
    }

    /// Raises the recorded depth of `target` after children were added to it.
    fn deepen(&mut self, target: u32, children_depth: u32) -> Step<()> {
        let d = &mut self.depth[target as usize];
        *d = (*d).max(children_depth + 1);
        if *d > self.limits.max_depth {
            return Err(PickleErrorKind::TooDeep(self.limits.max_depth));
        }
        Ok(())
    }

    fn node_id(v: Value) -> Step<u32> {
        match v {
            Value::Node(id) => Ok(id),
            _ => Err(PickleErrorKind::Invalid("target is not a container")),
        }
    }

    fn append(&mut self, target: Value, items: Vec<Value>) -> Step<()> {
        let children = items.iter().map(|v| self.depth_of(*v)).max().unwrap_or(0);
        let max = self.limits.max_container;
        let id = Self::node_id(target)?;
        let list = match &mut self.nodes[id as usize] {
            Node::List(v) => v,
            Node::Object(o) => &mut self.objects[*o as usize].extra_mut().items,
            _ => return Err(PickleErrorKind::Invalid("APPEND target is not a list")),
        };
        if list.len() + items.len() > max {
            return Err(PickleErrorKind::ContainerTooLarge(max));
        }
        list.extend(items);
        self.deepen(id, children)
    }

    fn set_items(&mut self, target: Value, flat: Vec<Value>) -> Step<()> {
        if !flat.len().is_multiple_of(2) {
            return Err(PickleErrorKind::Invalid("odd number of items for SETITEMS"));
        }
        let children = flat.iter().map(|v| self.depth_of(*v)).max().unwrap_or(0);
        let max = self.limits.max_container;
        let id = Self::node_id(target)?;
        let dict = match &mut self.nodes[id as usize] {
            Node::Dict(v) => v,
            Node::Object(o) => &mut self.objects[*o as usize].extra_mut().dict_items,
            _ => return Err(PickleErrorKind::Invalid("SETITEM target is not a dict")),
        };
        if dict.len() + flat.len() / 2 > max {
            return Err(PickleErrorKind::ContainerTooLarge(max));
        }
        dict.extend(flat.chunks_exact(2).map(|p| (p[0], p[1])));
        self.deepen(id, children)
    }

    fn memo_put(&mut self, index: u64, v: Value) -> Step<()> {
        let index = usize::try_from(index)
            .map_err(|_| PickleErrorKind::TooManyMemo(self.limits.max_memo))?;
        if index >= self.limits.max_memo {
            return Err(PickleErrorKind::TooManyMemo(self.limits.max_memo));
        }
        if self.memo_len >= self.limits.max_memo {
            return Err(PickleErrorKind::TooManyMemo(self.limits.max_memo));
        }
        // Dense indexes grow the vector; an index far beyond it (a declared number, not an
        // allocation size) goes to the map.
        let fresh = if index <= self.memo.len() + 1024 {
            if index >= self.memo.len() {
                self.memo.resize(index + 1, None);
            }
            self.memo[index].replace(v).is_none()
        } else {
            self.sparse_memo.insert(index as u64, v).is_none()
        };
        if fresh {
            self.memo_len += 1;
        }
        Ok(())
    }

    fn memo_get(&self, index: u64) -> Step<Value> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.memo.get(i).copied().flatten())
            .or_else(|| self.sparse_memo.get(&index).copied())
            .ok_or(PickleErrorKind::MissingMemo(index))
    }

    // ---- the opcodes -------------------------------------------------------------------------

    /// Runs one opcode; `Ok(true)` on `STOP`.
    fn step(&mut self, op: u8) -> Step<bool> {
        match op {
            0x80 => {
                let p = self.u8()?;
                if p > 5 {
                    return Err(PickleErrorKind::BadProtocol(p));
                }
                self.protocol = self.protocol.max(p);
            }
            0x95 => {
                // FRAME: a length hint; the framed opcodes follow inline.
                let n = self.u64()?;
                let remaining = (self.data.len() - self.pos) as u64;
                if n > remaining {
                    return Err(PickleErrorKind::LengthPastEnd {
                        declared: n,
                        remaining,
                    });
                }
            }
            b'.' => return Ok(true),

            // Scalars.
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let b = self.take(4)?;
                self.push(Value::Int(
                    i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64
                ));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v as i64));
            }
            0x8a => {
                let n = self.u8()? as u64;
                let b = self.declared(n)?;
                let v = self.long(b)?;
                self.push(v);
            }
            0x8b => {
                let n = self.u32()? as u64;
                let b = self.declared(n)?;
                let v = self.long(b)?;
                self.push(v);
            }
            b'I' => {
                // `00`/`01` are the booleans of protocol 0.
                let line = self.line()?;
                let v = match line {
                    b"00" => Value::Bool(false),
                    b"01" => Value::Bool(true),
                    t => {
                        // CPython's `_pickle` tries C's `strtol(text, 0)` first (so `010` is
                        // octal 8), then `int(text, 0)` for what that does not read whole.
                        let int = c_strtol(t)
                            .map(PyInt::Small)
                            .or_else(|| py_int(t))
                            .ok_or(PickleErrorKind::BadText)?;
                        self.int_value(int)?
                    }
                };
                self.push(v);
            }
            b'L' => {
                // Python: `int(text, 0)` after dropping one trailing `L` (Python 2 wrote `12L`).
                let line = self.line()?;
                let t = line.strip_suffix(b"L").unwrap_or(line);
                let int = py_int(t).ok_or(PickleErrorKind::BadText)?;
                let v = self.int_value(int)?;
                self.push(v);
            }
            b'G' => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                self.push(Value::Float(f64::from_be_bytes(a)));
            }
            b'F' => {
                let text = self.line_str()?;
                let v = text.trim().parse().map_err(|_| PickleErrorKind::BadText)?;
                self.push(Value::Float(v));
            }

            // Strings and bytes.
            0x8c => {
                let n = self.u8()? as u64;
                let b = self.declared(n)?;
                let v = self.string(b)?;
                self.push(v);
            }
            b'X' => {
                let n = self.u32()? as u64;
                let b = self.declared(n)?;
                let v = self.string(b)?;
                self.push(v);
            }
            0x8d => {
                let n = self.u64()?;
                let b = self.declared(n)?;
                let v = self.string(b)?;
                self.push(v);
            }
            b'V' => {
                let line = self.line()?;
                let s = raw_unicode_escape(line).ok_or(PickleErrorKind::BadText)?;
                let v = self.alloc(Node::Str(s.into()), 0)?;
                self.push(v);
            }
            b'U' | b'T' => {
                // Python 2 `str`: Python 3 decodes it as ASCII by default; keep text when it is.
                let n = if op == b'U' {
                    self.u8()? as u64
                } else {
                    self.u32()? as u64
                };
                let b = self.declared(n)?;
                let v = if b.is_ascii() {
                    self.string(b)?
                } else {
                    self.bytes(b)?
                };
                self.push(v);
            }
            b'S' => {
                // A quoted Python 2 `str` literal: decoded like SHORT_BINSTRING (text when ASCII).
                let line = self.line()?;
                let b = py_string_literal(line).ok_or(PickleErrorKind::BadText)?;
                let v = if b.is_ascii() {
                    self.string(&b)?
                } else {
                    self.bytes(&b)?
                };
                self.push(v);
            }
            b'C' => {
                let n = self.u8()? as u64;
                let b = self.declared(n)?;
                let v = self.bytes(b)?;
                self.push(v);
            }
            b'B' => {
                let n = self.u32()? as u64;
                let b = self.declared(n)?;
                let v = self.bytes(b)?;
                self.push(v);
            }
            0x8e | 0x96 => {
                let n = self.u64()?;
                let b = self.declared(n)?;
                let v = self.bytes(b)?;
                self.push(v);
            }

            // Containers.
            b')' => {
                let v = self.pooled(self.stack.len(), Node::Tuple)?;
                self.push(v);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let floor = self.marks.last().copied().unwrap_or(0);
                if self.stack.len() < floor + n {
                    return Err(PickleErrorKind::StackUnderflow);
                }
                let v = self.pooled(self.stack.len() - n, Node::Tuple)?;
                self.push(v);
            }
            b't' => {
                let v = self.pooled_from_mark(Node::Tuple)?;
                self.push(v);
            }
            b']' => {
                let v = self.container(Node::List, Vec::new())?;
                self.push(v);
            }
            b'l' => {
                let items = self.pop_mark()?;
                let v = self.container(Node::List, items)?;
                self.push(v);
            }
            b'}' => {
                let v = self.alloc(Node::Dict(Vec::new()), 1)?;
                self.push(v);
            }
            b'd' => {
                let items = self.pop_mark()?;
                let v = self.alloc(Node::Dict(Vec::new()), 1)?;
                self.set_items(v, items)?;
                self.push(v);
            }
            0x8f => {
                let v = self.container(Node::Set, Vec::new())?;
                self.push(v);
            }
            0x91 => {
                let v = self.pooled_from_mark(Node::FrozenSet)?;
                self.push(v);
            }
            b'a' => {
                let item = self.pop()?;
                let target = self.top()?;
                self.append(target, vec![item])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                let target = self.top()?;
                self.append(target, items)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                let target = self.top()?;
                self.set_items(target, vec![key, value])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let target = self.top()?;
                self.set_items(target, items)?;
            }
            0x90 => {
                let items = self.pop_mark()?;
                let target = self.top()?;
                let children = items.iter().map(|v| self.depth_of(*v)).max().unwrap_or(0);
                let max = self.limits.max_container;
                let id = Self::node_id(target)?;
                let Node::Set(set) = &mut self.nodes[id as usize] else {
                    return Err(PickleErrorKind::Invalid("ADDITEMS target is not a set"));
                };
                if set.len() + items.len() > max {
                    return Err(PickleErrorKind::ContainerTooLarge(max));
                }
                set.extend(items);
                self.deepen(id, children)?;
            }

            // Stack manipulation.
            b'(' => {
                if self.marks.len() as u32 >= self.limits.max_depth {
                    return Err(PickleErrorKind::TooDeep(self.limits.max_depth));
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                // POP discards the top item, or the topmost mark when nothing is above it.
                let floor = self.marks.last().copied();
                if floor == Some(self.stack.len()) {
                    self.marks.pop();
                } else {
                    self.pop()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?;
                self.push(v);
            }

            // Memo.
            0x94 => {
                let v = self.top()?;
                let index = self.memo.len() as u64;
                self.memo_put(index, v)?;
            }
            b'q' => {
                let i = self.u8()? as u64;
                let v = self.top()?;
                self.memo_put(i, v)?;
            }
            b'r' => {
                let i = self.u32()? as u64;
                let v = self.top()?;
                self.memo_put(i, v)?;
            }
            b'p' => {
                let i = self
                    .line_str()?
                    .trim()
                    .parse()
                    .map_err(|_| PickleErrorKind::BadText)?;
                let v = self.top()?;
                self.memo_put(i, v)?;
            }
            b'h' => {
                let i = self.u8()? as u64;
                let v = self.memo_get(i)?;
                self.push(v);
            }
            b'j' => {
                let i = self.u32()? as u64;
                let v = self.memo_get(i)?;
                self.push(v);
            }
            b'g' => {
                let i = self
                    .line_str()?
                    .trim()
                    .parse()
                    .map_err(|_| PickleErrorKind::BadText)?;
                let v = self.memo_get(i)?;
                self.push(v);
            }

            // Globals and objects: recorded, never resolved or called.
            b'c' => {
                let module = self.line_str()?.to_owned();
                let name = self.line_str()?.to_owned();
                let v = self.global(module, name)?;
                self.push(v);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Some(Node::Str(module)), Some(Node::Str(name))) =
                    (self.node_ref(module), self.node_ref(name))
                else {
                    return Err(PickleErrorKind::Invalid("STACK_GLOBAL needs two strings"));
                };
                let (module, name) = (module.to_string(), name.to_string());
                let v = self.global(module, name)?;
                self.push(v);
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.object(callable, args, None, CallKind::Reduce)?;
                self.push(v);
            }
            0x81 => {
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = self.object(cls, args, None, CallKind::NewObj)?;
                self.push(v);
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = self.object(cls, args, Some(kwargs), CallKind::NewObj)?;
                self.push(v);
            }
            b'i' => {
                let module = self.line_str()?.to_owned();
                let name = self.line_str()?.to_owned();
                let args = self.pop_mark()?;
                let cls = self.global(module, name)?;
                let args = self.pooled_from(args)?;
                let v = self.object(cls, args, None, CallKind::Inst)?;
                self.push(v);
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return Err(PickleErrorKind::StackUnderflow);
                }
                let cls = items.remove(0);
                let args = self.pooled_from(items)?;
                let v = self.object(cls, args, None, CallKind::Inst)?;
                self.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                let target = self.top()?;
                let depth = self.depth_of(state);
                let id = Self::node_id(target)?;
                let Node::Object(o) = self.nodes[id as usize] else {
                    return Err(PickleErrorKind::Invalid("BUILD target is not an object"));
                };
                self.objects[o as usize].state = Some(state);
                self.deepen(id, depth)?;
            }
            b'P' => {
                // Python decodes the id as ASCII.
                let line = self.line()?;
                if !line.is_ascii() {
                    return Err(PickleErrorKind::BadText);
                }
                let id = self.string(line)?;
                let v = self.alloc(Node::PersistentId(id), 1)?;
                self.push(v);
            }
            b'Q' => {
                let pid = self.pop()?;
                let depth = self.depth_of(pid) + 1;
                let v = self.alloc(Node::PersistentId(pid), depth)?;
                self.push(v);
            }
            0x82..=0x84 => {
                return Err(PickleErrorKind::Unsupported(
                    "the extension registry (EXT1/2/4)",
                ));
            }
            0x97 | 0x98 => return Err(PickleErrorKind::Unsupported("out-of-band buffers")),
            _ => return Err(PickleErrorKind::UnknownOpcode),
        }
        Ok(false)
    }

    fn node_ref(&self, v: Value) -> Option<&Node> {
        match v {
            Value::Node(id) => self.nodes.get(id as usize),
            _ => None,
        }
    }
}

/// The most digits a text integer may have: Python's own limit for `int(text)` in base 10
/// (`sys.get_int_max_str_digits()`), applied to every base here.
const MAX_INT_DIGITS: usize = 4300;

/// An integer read from text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PyInt {
    Small(i64),
    /// Little-endian two's complement, as [`Node::BigInt`] holds it.
    Big(Vec<u8>),
}

/// Parses a text integer as Python's `int(text, 0)` does: surrounding whitespace, a sign, an
/// optional `0x`/`0o`/`0b` prefix, single underscores between digits, and no leading zeros on a
/// decimal number other than zero. `None` when Python would raise.
fn py_int(text: &[u8]) -> Option<PyInt> {
    let t = text.trim_ascii();
    let (negative, t) = match t.first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = match t {
        [b'0', b'x' | b'X', rest @ ..] => (16, rest),
        [b'0', b'o' | b'O', rest @ ..] => (8, rest),
        [b'0', b'b' | b'B', rest @ ..] => (2, rest),
        _ => (10, t),
    };
    // With a prefix, one underscore may follow it (`0x_ff`).
    let digits = if radix != 10 {
        digits.strip_prefix(b"_").unwrap_or(digits)
    } else {
        digits
    };
    if digits.is_empty()
        || digits.len() > MAX_INT_DIGITS * 2
        || digits.first() == Some(&b'_')
        || digits.last() == Some(&b'_')
        || digits.windows(2).any(|w| w == b"__")
    {
        return None;
    }
    let values: Vec<u8> = digits
        .iter()
        .filter(|&&b| b != b'_')
        .map(|&b| (b as char).to_digit(radix).map(|d| d as u8))
        .collect::<Option<_>>()?;
    if values.len() > MAX_INT_DIGITS {
        return None;
    }
    if radix == 10 && values.len() > 1 && values[0] == 0 && values.iter().any(|&d| d != 0) {
        return None;
    }
    // Magnitude in 32-bit limbs, little-endian: multiply by the radix and add each digit.
    let mut limbs: Vec<u32> = vec![0];
    for d in values {
        let mut carry = u64::from(d);
        for limb in &mut limbs {
            let x = u64::from(*limb) * u64::from(radix) + carry;
            *limb = x as u32;
            carry = x >> 32;
        }
        if carry > 0 {
            limbs.push(carry as u32);
        }
    }
    if limbs.len() <= 2 {
        let magnitude = u64::from(limbs[0]) | limbs.get(1).map_or(0, |&h| u64::from(h) << 32);
        if negative {
            if magnitude <= 1 << 63 {
                return Some(PyInt::Small((magnitude as i64).wrapping_neg()));
            }
        } else if let Ok(i) = i64::try_from(magnitude) {
            return Some(PyInt::Small(i));
        }
    }
    // Two's complement bytes, with room for the sign bit.
    let mut bytes: Vec<u8> = limbs.iter().flat_map(|l| l.to_le_bytes()).collect();
    bytes.push(0);
    if negative {
        let mut carry = true;
        for b in &mut bytes {
            let (v, c) = (!*b).overflowing_add(u8::from(carry));
            *b = v;
            carry = c;
        }
    }
    // Drop redundant sign bytes.
    let fill = if negative { 0xff } else { 0 };
    while bytes.len() > 1
        && bytes[bytes.len() - 1] == fill
        && (bytes[bytes.len() - 2] & 0x80 != 0) == negative
    {
        bytes.pop();
    }
    Some(PyInt::Big(bytes))
}

/// C's `strtol(text, &end, 0)` where `end` must reach the end of the text: leading whitespace,
/// a sign, `0x` for hexadecimal, a leading `0` for octal. `None` when it stops early or overflows.
fn c_strtol(text: &[u8]) -> Option<i64> {
    let t = text.trim_ascii_start();
    let (negative, t) = match t.first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = match t {
        [b'0', b'x' | b'X', d, ..] if d.is_ascii_hexdigit() => (16, &t[2..]),
        [b'0', ..] => (8, t),
        _ => (10, t),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i128 = 0;
    for &b in digits {
        let d = (b as char).to_digit(radix)?;
        v = v * i128::from(radix) + i128::from(d);
        if v > 1 << 63 {
            return None;
        }
    }
    i64::try_from(if negative { -v } else { v }).ok()
}

/// Decodes a protocol 0 `STRING` argument: a Python 2 `repr` of a `str`, in single or double
/// quotes, with backslash escapes (`\n`, `\xhh`, octal `\ooo`, ...), as Python's
/// `codecs.escape_decode` reads it. `None` when the quotes do not match or an escape is cut short.
fn py_string_literal(line: &[u8]) -> Option<Vec<u8>> {
    let inner = match line {
        [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
        _ => return None,
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let e = *inner.get(i)?;
        i += 1;
        match e {
            b'\n' => {}
            b'\\' | b'\'' | b'"' => out.push(e),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'x' => {
                let hex = inner.get(i..i + 2)?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                out.push(v);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match inner.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            // Unknown escapes stay as written.
            other => out.extend_from_slice(&[b'\\', other]),
        }
    }
    Some(out)
}

/// Decodes Python's `raw-unicode-escape`: bytes are Latin-1 except `\uXXXX` and `\UXXXXXXXX`.
fn raw_unicode_escape(line: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if b == b'\\' && i + 1 < line.len() && (line[i + 1] == b'u' || line[i + 1] == b'U') {
            let n = if line[i + 1] == b'u' { 4 } else { 8 };
            let hex = line.get(i + 2..i + 2 + n)?;
            let code = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(char::from_u32(code)?);
            i += 2 + n;
        } else {
            out.push(b as char);
            i += 1;
        }
    }
    Some(out)
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::None => write!(f, "None"),
            Value::Bool(b) => write!(f, "{}", if *b { "True" } else { "False" }),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Node(id) => write!(f, "<object #{id}>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `pickle.dumps({'a': [1, (2, 'x')], 'b': None}, protocol=4)`
    pub(super) const DICT_P4: &[u8] = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01K\x02\x8c\x01x\x94\x86\x94e\x8c\x01b\x94Nu.";

    #[test]
    fn reads_plain_data() {
        let p = Pickle::parse(DICT_P4).unwrap();
        let a = p.get(p.root, "a").unwrap();
        let items = p.seq(a).unwrap();
        assert_eq!(items[0], Value::Int(1));
        let t = p.seq(items[1]).unwrap();
        assert_eq!(t[0], Value::Int(2));
        assert_eq!(p.str(t[1]), Some("x"));
        assert_eq!(p.get(p.root, "b"), Some(Value::None));
        assert_eq!(p.protocol, 4);
    }

    /// `pickle.dumps` of an object whose `__reduce__` returns `(os.system, ('echo hi',))`, protocol 2.
    pub(super) const OS_SYSTEM_P2: &[u8] =
        b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";

    #[test]
    fn records_globals_without_calling_them() {
        let p = Pickle::parse(OS_SYSTEM_P2).unwrap();
        assert_eq!(
            p.globals,
            vec![GlobalRef {
                offset: 2,
                module: "posix".into(),
                name: "system".into()
            }]
        );
        let o = p.object(p.root).expect("the root is an object");
        assert_eq!(o.kind, CallKind::Reduce);
        assert_eq!(p.global(o.callable), Some(("posix", "system")));
        assert_eq!(p.str(p.seq(o.args).unwrap()[0]), Some("echo hi"));
    }

    #[test]
    fn long_opcodes_sign_extend() {
        // LONG1 with 5 bytes: 2**32 + 5, then -1 in one byte, then STOP on a tuple.
        let data = b"\x80\x04\x8a\x05\x05\x00\x00\x00\x01\x8a\x01\xff\x86.";
        let p = Pickle::parse(data).unwrap();
        assert_eq!(
            p.seq(p.root).unwrap(),
            &[Value::Int((1 << 32) + 5), Value::Int(-1)]
        );
    }

    #[test]
    fn errors_name_offset_and_opcode() {
        let cases: &[(&[u8], u64, &str)] = &[
            (b"", 0, "no STOP"),
            (b"\x80\x04\x8c\x05ab", 2, "SHORT_BINUNICODE"),
            (
                b"\x80\x04X\xff\xff\xff\xffab.",
                2,
                "declared length 4294967295",
            ),
            (b"\x80\x04h\x07.", 2, "memo entry 7"),
            (b"\x80\x04a.", 2, "stack underflow"),
            (b"\x80\x04\xff.", 2, "unknown opcode"),
            (b"\x80\x04\x82\x01.", 2, "extension registry"),
            (b"\x80\x09.", 0, "unsupported protocol 9"),
            (b"\x80\x04\x8c\x02\xff\xfe.", 2, "UTF-8"),
        ];
        for (data, offset, needle) in cases {
            let err = Pickle::parse(data).unwrap_err();
            assert_eq!(err.offset, *offset, "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 10,000 nested one-element lists: ]( ... ) built with EMPTY_LIST + APPEND.
        let mut data = b"\x80\x04".to_vec();
        for _ in 0..10_000 {
            data.extend_from_slice(b"]");
        }
        for _ in 0..9_999 {
            data.extend_from_slice(b"a");
        }
        data.push(b'.');
        let err = Pickle::parse(&data).unwrap_err();
        assert!(matches!(err.kind, PickleErrorKind::TooDeep(_)), "{err}");
    }

    #[test]
    fn memo_sharing_does_not_expand() {
        // A list that appends itself twice per step: Python would share, so do we.
        let mut data = b"\x80\x04]\x94".to_vec();
        for _ in 0..100_000 {
            data.extend_from_slice(b"h\x00h\x00\x86\x94");
        }
        data.push(b'.');
        let p = Pickle::parse(&data).unwrap();
        assert!(p.node_count() <= 100_001);
    }

    #[test]
    fn huge_memo_index_is_refused() {
        let data = b"\x80\x04Nr\xff\xff\xff\x7f.";
        let err = Pickle::parse(data).unwrap_err();
        assert!(err.to_string().contains("memo"), "{err}");
    }

    #[test]
    fn sparse_memo_indexes_are_kept_without_allocating_to_them() {
        // PUT at 100,000 and 50,000,000, then GET both: Python accepts any index.
        let data = b"\x80\x04Kxr\xa0\x86\x01\x00Kyr\x80\xf0\xfa\x02j\xa0\x86\x01\x00j\x80\xf0\xfa\x02\x86.";
        let p = Pickle::parse(data).unwrap();
        assert_eq!(p.seq(p.root).unwrap(), &[Value::Int(120), Value::Int(121)]);
    }

    #[test]
    fn size_limit_is_enforced() {
        let limits = Limits {
            max_input: 4,
            ..Limits::default()
        };
        let err = Pickle::parse_with(DICT_P4, limits).unwrap_err();
        assert!(matches!(err.kind, PickleErrorKind::TooLarge { .. }));
    }

    /// A protocol 0 pickle of one value: the opcode's text, then STOP.
    fn one(text: &[u8]) -> Result<Pickle, PickleError> {
        let mut data = text.to_vec();
        data.push(b'.');
        Pickle::parse(&data)
    }

    #[test]
    fn text_integers_read_as_python_reads_them() {
        // INT and LONG: `int(text, 0)`, booleans `00`/`01`, a trailing `L`, wider than 64 bits.
        let cases: &[(&[u8], Value)] = &[
            (b"I42\n", Value::Int(42)),
            (b"I-7\n", Value::Int(-7)),
            (b"I 12 \n", Value::Int(12)),
            (b"I0\n", Value::Int(0)),
            (b"I00\n", Value::Bool(false)),
            (b"I01\n", Value::Bool(true)),
            (b"I0x1f\n", Value::Int(31)),
            (b"I-0b101\n", Value::Int(-5)),
            (b"I0o17\n", Value::Int(15)),
            // C's strtol reads a leading 0 as octal, as CPython's unpickler does.
            (b"I010\n", Value::Int(8)),
            (b"I-0x10\n", Value::Int(-16)),
            (b"I1_000\n", Value::Int(1000)),
            (b"I9223372036854775807\n", Value::Int(i64::MAX)),
            (b"I-9223372036854775808\n", Value::Int(i64::MIN)),
            (b"L5L\n", Value::Int(5)),
            (b"L-3\n", Value::Int(-3)),
            (b"L0\n", Value::Int(0)),
        ];
        for (text, want) in cases {
            let p = one(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(p.root, *want, "{text:?}");
        }
        // Wider than 64 bits: little-endian two's complement, as LONG1 stores it.
        let big: &[(&[u8], &[u8])] = &[
            (b"L9223372036854775808L\n", &[0, 0, 0, 0, 0, 0, 0, 0x80, 0]),
            (
                b"I-9223372036854775809\n",
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff],
            ),
            (b"L18446744073709551616\n", &[0, 0, 0, 0, 0, 0, 0, 0, 1]),
            (b"L-18446744073709551616\n", &[0, 0, 0, 0, 0, 0, 0, 0, 0xff]),
            (b"L0x100000000000000000\n", &[0, 0, 0, 0, 0, 0, 0, 0, 0x10]),
        ];
        for (text, want) in big {
            let p = one(text).unwrap();
            assert_eq!(
                p.node(p.root),
                Some(&Node::BigInt((*want).into())),
                "{text:?}"
            );
        }
    }

    #[test]
    fn malformed_text_opcodes_are_errors_with_offsets() {
        let cases: &[&[u8]] = &[
            b"I\n",
            b"I12x\n",
            b"I1__0\n",
            b"I_1\n",
            b"I1_\n",
            b"L010\n",
            b"I08\n",
            b"I0x\n",
            b"I--1\n",
            b"I\xff\n",
            b"ILL\n",
            b"L\n",
            b"L12LL\n",
            b"F\n",
            b"Fabc\n",
            b"S\n",
            b"Sabc\n",
            b"S'abc\n",
            b"S'abc\"\n",
            b"S'\\x4'\n",
            b"S'\\'\n",
            b"V\\u12\n",
            // A lone surrogate, which Python keeps and a Rust string cannot hold: refused.
            b"V\\ud800\n",
            b"g-1\n",
            b"gx\n",
            b"p\n",
            b"P\xc3\xa9\n",
            b"ctorch\n",
        ];
        for text in cases {
            // Each after a leading NONE, so that the offset of the opcode is 1.
            let mut data = b"N".to_vec();
            data.extend_from_slice(text);
            data.push(b'.');
            let err = Pickle::parse(&data).unwrap_err();
            assert_eq!(err.offset, 1, "{text:?}: {err}");
            assert!(err.opcode.is_some(), "{text:?}: {err}");
        }
        // Lines without their newline are truncated input.
        for text in [
            &b"I12"[..],
            b"L1",
            b"F1.5",
            b"S'a'",
            b"Vab",
            b"p0",
            b"g0",
            b"cmod",
            b"cmod\nname",
        ] {
            let err = Pickle::parse(text).unwrap_err();
            assert_eq!(err.kind, PickleErrorKind::Truncated, "{text:?}: {err}");
        }
        // Python's own limit on the digits of a text integer.
        let mut long = b"L".to_vec();
        long.extend(std::iter::repeat_n(b'7', MAX_INT_DIGITS + 1));
        long.extend_from_slice(b"\n.");
        assert_eq!(
            Pickle::parse(&long).unwrap_err().kind,
            PickleErrorKind::BadText
        );
    }

    #[test]
    fn text_floats_and_strings() {
        let p = one(b"F1.5\n").unwrap();
        assert_eq!(p.root, Value::Float(1.5));
        let p = one(b"F-1e+100\n").unwrap();
        assert_eq!(p.root, Value::Float(-1e100));
        let p = one(b"Finf\n").unwrap();
        assert_eq!(p.root, Value::Float(f64::INFINITY));
        // STRING: a quoted Python 2 literal with escapes; text when ASCII, bytes otherwise.
        let strings: &[(&[u8], &str)] = &[
            (b"S'abc'\n", "abc"),
            (b"S\"it's\"\n", "it's"),
            (b"S'a\\nb\\t\\\\\\''\n", "a\nb\t\\'"),
            (b"S'\\x41\\101\\7'\n", "AA\x07"),
            (b"S'\\q'\n", "\\q"),
            (b"S''\n", ""),
        ];
        for (text, want) in strings {
            let p = one(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(p.str(p.root), Some(*want), "{text:?}");
        }
        let p = one(b"S'\\xff\\x00'\n").unwrap();
        assert_eq!(p.node(p.root), Some(&Node::Bytes(vec![0xff, 0][..].into())));
        // UNICODE: raw-unicode-escape.
        let p = one(b"Vcaf\\u00e9 \\U0001F600\n").unwrap();
        assert_eq!(p.str(p.root), Some("caf\u{e9} \u{1F600}"));
        // PERSID: an ASCII id.
        let p = one(b"P0\n").unwrap();
        assert!(matches!(p.node(p.root), Some(Node::PersistentId(_))));
    }

    #[test]
    fn protocol_0_containers_memo_and_objects() {
        // pickle.dumps({'a': [1, (2, 'x')], 'b': None}, protocol=0)
        let p0: &[u8] = b"(dp0\nVa\np1\n(lp2\nI1\na(I2\nVx\np3\ntp4\nasVb\np5\nNs.";
        let p = Pickle::parse(p0).unwrap();
        let items = p.seq(p.get(p.root, "a").unwrap()).unwrap();
        assert_eq!(items[0], Value::Int(1));
        let t = p.tuple(items[1]).unwrap();
        assert_eq!((t[0], p.str(t[1])), (Value::Int(2), Some("x")));
        assert_eq!(p.get(p.root, "b"), Some(Value::None));
        assert_eq!(p.protocol, 0);
        // The same with protocol 1 (BINPUT, BININT1, BINUNICODE, EMPTY_DICT, MARK + SETITEMS).
        let p1: &[u8] = b"}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01(K\x02X\x01\x00\x00\x00xq\x03tq\x04eX\x01\x00\x00\x00bq\x05Nu.";
        let q = Pickle::parse(p1).unwrap();
        let items = q.seq(q.get(q.root, "a").unwrap()).unwrap();
        assert_eq!(items[0], Value::Int(1));
        assert_eq!(q.get(q.root, "b"), Some(Value::None));
        // GET of a PUT, INST and OBJ: recorded calls with their offsets, never made.
        let inst: &[u8] = b"(I1\nI2\nios\nsystem\np0\n(g0\nVx\no.";
        let p = Pickle::parse(inst).unwrap();
        assert_eq!(
            p.globals,
            vec![GlobalRef {
                offset: 7,
                module: "os".into(),
                name: "system".into()
            }]
        );
        let outer = p.object(p.root).unwrap();
        assert_eq!(outer.kind, CallKind::Inst);
        let inner = p.object(outer.callable).unwrap();
        assert_eq!(inner.kind, CallKind::Inst);
        assert_eq!(p.seq(inner.args).unwrap(), &[Value::Int(1), Value::Int(2)]);
        // Malformed: OBJ without a class, INST without a mark, GET of nothing, DICT of an odd count.
        for bad in [
            &b"(o."[..],
            b"ios\nsystem\n.",
            b"g7\n.",
            b"(I1\nd.",
            b"t.",
            b"l.",
        ] {
            let err = Pickle::parse(bad).unwrap_err();
            assert!(err.opcode.is_some(), "{bad:?}: {err}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Pickle::parse(&data);
        }

        #[test]
        fn mutated_pickles_never_panic(
            flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..6),
            text in any::<bool>(),
        ) {
            // The protocol 4 pickle, or its protocol 0 twin (text opcodes).
            let mut data = if text {
                b"(dp0\nVa\np1\n(lp2\nI1\na(I2\nVx\np3\ntp4\nasVb\np5\nNs.".to_vec()
            } else {
                DICT_P4.to_vec()
            };
            for (i, b) in flips {
                let i = i % data.len();
                data[i] = b;
            }
            let _ = Pickle::parse(&data);
        }
    }
}
