//! Writing a value graph back as a pickle: for tests and fuzzing, which edit a real `.metadata`
//! into a damaged one and check that reading and writing agree. Behind the `pickle-writer`
//! feature, so that the dcpfetch binary carries no pickle writer.

use std::collections::HashMap;

use super::{CallKind, Limits, Node, Pickle, Value};

impl Pickle {
    /// The node a value refers to, to change it (tests and tools that make damaged files).
    pub fn node_mut(&mut self, value: Value) -> Option<&mut Node> {
        match value {
            Value::Node(id) => self.nodes.get_mut(id as usize),
            _ => None,
        }
    }

    /// Writes the graph back as a protocol 2 pickle. A node used in several places is written
    /// once and referred to through the memo after that; a graph nested deeper than
    /// `max_depth` (or cyclic) is refused.
    pub fn write(&self) -> Result<Vec<u8>, &'static str> {
        let mut out = vec![0x80, 2];
        let shared = self.shared_nodes();
        let mut writer = Writer {
            shared: &shared,
            memo: HashMap::new(),
        };
        self.write_value(self.root, &mut out, &mut writer, 0)?;
        out.push(b'.');
        Ok(out)
    }

    /// The children of a node.
    fn children(&self, node: &Node) -> Vec<Value> {
        match node {
            Node::Tuple(s) | Node::FrozenSet(s) => self.pool[s.range()].to_vec(),
            Node::List(v) | Node::Set(v) => v.clone(),
            Node::Dict(pairs) => pairs.iter().flat_map(|(k, v)| [*k, *v]).collect(),
            Node::Object(i) => {
                let o = &self.objects[*i as usize];
                let mut c = vec![o.callable, o.args];
                c.extend(o.kwargs());
                c.extend(o.state);
                c.extend(o.items());
                c.extend(o.dict_items().iter().flat_map(|(k, v)| [*k, *v]));
                c
            }
            Node::PersistentId(v) => vec![*v],
            Node::BigInt(_) | Node::Str(_) | Node::Bytes(_) | Node::Global(_) => Vec::new(),
        }
    }

    /// The nodes referred to from more than one place (counted once per edge, each node visited
    /// once, so this is linear in the graph).
    fn shared_nodes(&self) -> std::collections::HashSet<u32> {
        let mut refs: HashMap<u32, u32> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut todo = vec![self.root];
        while let Some(v) = todo.pop() {
            let Value::Node(id) = v else { continue };
            if !seen.insert(id) {
                continue;
            }
            for c in self.children(&self.nodes[id as usize]) {
                if let Value::Node(cid) = c {
                    *refs.entry(cid).or_default() += 1;
                    todo.push(c);
                }
            }
        }
        refs.into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(id, _)| id)
            .collect()
    }

    /// Writes one value; a node written before is referenced through the memo (so shared nodes
    /// cost one write, however often they are used).
    fn write_value(
        &self,
        v: Value,
        out: &mut Vec<u8>,
        memo: &mut Writer,
        depth: u32,
    ) -> Result<(), &'static str> {
        if depth > Limits::default().max_depth {
            return Err("the graph is too deep (or cyclic) to write");
        }
        let d = depth + 1;
        match v {
            Value::None => out.push(b'N'),
            Value::Bool(b) => out.push(if b { 0x88 } else { 0x89 }),
            Value::Int(i) => {
                if let Ok(small) = i32::try_from(i) {
                    out.push(b'J');
                    out.extend_from_slice(&small.to_le_bytes());
                } else {
                    out.extend_from_slice(&[0x8a, 8]);
                    out.extend_from_slice(&i.to_le_bytes());
                }
            }
            Value::Float(f) => {
                out.push(b'G');
                out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Node(id) if memo.memo.contains_key(&id) => {
                out.push(b'j');
                out.extend_from_slice(&memo.memo[&id].to_le_bytes());
            }
            Value::Node(id) => {
                self.write_node(v, out, memo, d)?;
                if memo.shared.contains(&id) {
                    let index = memo.memo.len() as u32;
                    memo.memo.insert(id, index);
                    out.push(b'r');
                    out.extend_from_slice(&index.to_le_bytes());
                }
            }
        }
        Ok(())
    }

    fn write_node(
        &self,
        v: Value,
        out: &mut Vec<u8>,
        memo: &mut Writer,
        d: u32,
    ) -> Result<(), &'static str> {
        {
            match self.node(v).ok_or("dangling node")? {
                Node::BigInt(b) => {
                    out.push(0x8b);
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(b);
                }
                Node::Str(s) => {
                    out.push(b'X');
                    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                Node::Bytes(b) => {
                    out.push(b'B');
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(b);
                }
                Node::Tuple(span) | Node::FrozenSet(span) => {
                    out.push(b'(');
                    for i in &self.pool[span.range()] {
                        self.write_value(*i, out, memo, d)?;
                    }
                    out.push(if matches!(self.node(v), Some(Node::Tuple(_))) {
                        b't'
                    } else {
                        0x91
                    });
                }
                Node::List(items) | Node::Set(items) => {
                    out.push(if matches!(self.node(v), Some(Node::List(_))) {
                        b']'
                    } else {
                        0x8f
                    });
                    out.push(b'(');
                    for i in items {
                        self.write_value(*i, out, memo, d)?;
                    }
                    out.push(if matches!(self.node(v), Some(Node::List(_))) {
                        b'e'
                    } else {
                        0x90
                    });
                }
                Node::Dict(pairs) => {
                    out.extend_from_slice(b"}(");
                    for (k, val) in pairs {
                        self.write_value(*k, out, memo, d)?;
                        self.write_value(*val, out, memo, d)?;
                    }
                    out.push(b'u');
                }
                Node::Global(g) => {
                    out.push(b'c');
                    for part in [&g.module, &g.name] {
                        if part.contains('\n') {
                            return Err("a global name with a newline");
                        }
                        out.extend_from_slice(part.as_bytes());
                        out.push(b'\n');
                    }
                }
                Node::Object(i) => {
                    let o = &self.objects[*i as usize];
                    self.write_value(o.callable, out, memo, d)?;
                    self.write_value(o.args, out, memo, d)?;
                    match (o.kind, o.kwargs()) {
                        (CallKind::NewObj, Some(kw)) => {
                            self.write_value(kw, out, memo, d)?;
                            out.push(0x92);
                        }
                        (CallKind::NewObj, None) => out.push(0x81),
                        _ => out.push(b'R'),
                    }
                    if !o.items().is_empty() {
                        out.push(b'(');
                        for i in o.items() {
                            self.write_value(*i, out, memo, d)?;
                        }
                        out.push(b'e');
                    }
                    if !o.dict_items().is_empty() {
                        out.push(b'(');
                        for (k, val) in o.dict_items() {
                            self.write_value(*k, out, memo, d)?;
                            self.write_value(*val, out, memo, d)?;
                        }
                        out.push(b'u');
                    }
                    if let Some(state) = o.state {
                        self.write_value(state, out, memo, d)?;
                        out.push(b'b');
                    }
                }
                Node::PersistentId(id) => {
                    self.write_value(*id, out, memo, d)?;
                    out.push(b'Q');
                }
            }
        }
        Ok(())
    }
}

/// The writer's state: which nodes are shared, and where those already written are in the memo.
struct Writer<'a> {
    shared: &'a std::collections::HashSet<u32>,
    memo: HashMap<u32, u32>,
}

#[cfg(test)]
mod tests {
    use super::super::tests::{DICT_P4, OS_SYSTEM_P2};
    use super::*;

    #[test]
    fn shared_nodes_are_written_once() {
        // 60 levels of (t, t, t): 3**60 tuples if expanded. Found by the unpickler fuzz target,
        // whose round trip through the writer timed out before shared nodes went through the memo.
        let mut data = b"\x80\x04)".to_vec();
        for _ in 0..60 {
            data.extend_from_slice(b"22\x87");
        }
        data.push(b'.');
        let p = Pickle::parse(&data).unwrap();
        let written = p.write().unwrap();
        assert!(written.len() < 2000, "{}", written.len());
        assert_eq!(
            Pickle::parse(&written).unwrap().node_count(),
            p.node_count()
        );
    }

    #[test]
    fn written_pickles_read_back_the_same() {
        for data in [
            DICT_P4,
            OS_SYSTEM_P2,
            b"\x80\x04\x8a\x05\x05\x00\x00\x00\x01\x8a\x01\xff\x86.",
        ] {
            let p = Pickle::parse(data).unwrap();
            let again = Pickle::parse(&p.write().unwrap()).unwrap();
            assert_eq!(again.write().unwrap(), p.write().unwrap());
            assert_eq!(again.globals.len(), p.globals.len());
        }
    }
}
