//! What a tensor item's `data.pkl` says (read with the non-executing unpickler): the storage
//! record, dtype, shape, strides and offset that `torch.load` would rebuild the tensor from.

use crate::metadata::dtype;
use crate::metadata::pickle::{CallKind, Node, Pickle, Value};

/// The tensor a `torch.save` archive holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    pub dtype: String,
    /// The record holding the storage (`data/<key>`).
    pub key: String,
    /// Bytes the storage holds, per the pickle.
    pub storage_bytes: u64,
    pub storage_offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<i64>,
}

impl StoredTensor {
    /// How the tensor differs from the chunk the metadata describes (its `dtype`, canonical as
    /// the metadata's are, and its `sizes`), in words; empty when it does not.
    pub fn differences(&self, dtype: &str, sizes: &[u64]) -> Vec<String> {
        let mut out = Vec::new();
        if dtype::canonical(&self.dtype) != dtype {
            out.push(format!(
                "the item holds {}, the metadata says {dtype}",
                self.dtype
            ));
        }
        if *self.size != *sizes {
            out.push(format!(
                "the item holds a tensor of size {:?}, the chunk is {sizes:?}",
                self.size
            ));
        }
        out
    }

    /// How the name of the record that holds its storage ends (`/data/<key>`).
    pub fn storage_suffix(&self) -> String {
        format!("/data/{}", self.key)
    }

    /// Elements of the storage the tensor reaches: offset plus the span of its strides.
    pub fn required_elements(&self) -> Option<u64> {
        if self.size.contains(&0) {
            return Some(0);
        }
        let mut span: u64 = 1;
        for (s, st) in self.size.iter().zip(&self.stride) {
            let st = u64::try_from(*st).ok()?;
            span = span.checked_add((s - 1).checked_mul(st)?)?;
        }
        self.storage_offset.checked_add(span)
    }
}

/// Globals a torch.save of a plain tensor names; anything else would run code under
/// `torch.load(weights_only=False)`.
pub fn is_known_global(module: &str, name: &str) -> bool {
    match module {
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor_v2" | "_rebuild_tensor_v3" | "_rebuild_parameter" | "_rebuild_qtensor"
        ),
        "torch" => {
            name.ends_with("Storage")
                || dtype::element_size(name).is_some()
                || matches!(
                    name,
                    "per_tensor_affine" | "per_channel_affine" | "per_channel_affine_float_qparams"
                )
        }
        "torch.storage" => name == "UntypedStorage",
        "collections" => name == "OrderedDict",
        _ => false,
    }
}

fn ints(p: &Pickle, v: Value) -> Option<Vec<i64>> {
    p.seq(v)?
        .iter()
        .map(|x| match x {
            Value::Int(i) => Some(*i),
            _ => None,
        })
        .collect()
}

/// Reads the rebuild call of a tensor archive's `data.pkl`.
pub fn read(data: &[u8]) -> Result<StoredTensor, String> {
    let p = Pickle::parse(data).map_err(|e| format!("data.pkl: {e}"))?;
    if let Some(g) = p
        .globals
        .iter()
        .find(|g| !is_known_global(&g.module, &g.name))
    {
        return Err(format!(
            "data.pkl names the global {}.{} at byte {}, which torch.load(weights_only=False) would call",
            g.module, g.name, g.offset
        ));
    }
    let mut call = p.object(p.root).ok_or("data.pkl does not hold a tensor")?;
    // A Parameter wraps the tensor's rebuild call.
    if p.global(call.callable) == Some(("torch._utils", "_rebuild_parameter")) {
        let inner = p
            .seq(call.args)
            .and_then(|a| a.first().copied())
            .ok_or("malformed _rebuild_parameter")?;
        call = p.object(inner).ok_or("malformed _rebuild_parameter")?;
    }
    // Quantized tensors (`_rebuild_qtensor`) take their storage, offset, size and stride in the
    // same places as `_rebuild_tensor_v2`.
    let version = match p.global(call.callable) {
        Some(("torch._utils", "_rebuild_tensor_v2" | "_rebuild_qtensor")) => 2,
        Some(("torch._utils", "_rebuild_tensor_v3")) => 3,
        _ => return Err(
            "data.pkl does not hold a plain tensor (no _rebuild_tensor_v2/v3 or _rebuild_qtensor)"
                .into(),
        ),
    };
    if call.kind != CallKind::Reduce {
        return Err("data.pkl does not hold a plain tensor".into());
    }
    let args = p.seq(call.args).ok_or("malformed rebuild arguments")?;
    if args.len() < 4 || (version == 3 && args.len() < 7) {
        return Err(format!(
            "_rebuild_tensor_v{version} with {} arguments",
            args.len()
        ));
    }
    let Some(Node::PersistentId(pid)) = p.node(args[0]) else {
        return Err("the tensor's storage is not a persistent id".into());
    };
    let pid = p.seq(*pid).ok_or("malformed storage id")?;
    let (Some("storage"), Some(class), Some(key), Some(Value::Int(numel))) = (
        pid.first().and_then(|v| p.str(*v)),
        pid.get(1).and_then(|v| p.global(*v)),
        pid.get(2).and_then(|v| p.str(*v)),
        pid.get(4),
    ) else {
        return Err(
            "malformed storage id (expected ('storage', class, key, location, size))".into(),
        );
    };
    let numel = u64::try_from(*numel).map_err(|_| "negative storage size")?;
    let (dtype_name, storage_bytes) = match class {
        ("torch.storage", "UntypedStorage") => {
            let Some(("torch", d)) = args.get(6).and_then(|v| p.global(*v)) else {
                return Err("an untyped storage without a dtype".into());
            };
            (dtype::canonical(d).to_owned(), numel)
        }
        ("torch", storage) => {
            let d = dtype_of_storage(storage)
                .ok_or(format!("unknown storage class torch.{storage}"))?;
            let size = dtype::element_size(d).ok_or(format!("unknown element size of {d}"))?;
            (
                d.to_owned(),
                numel.checked_mul(size).ok_or("storage size overflows")?,
            )
        }
        (m, n) => return Err(format!("unknown storage class {m}.{n}")),
    };
    let storage_offset = match args[1] {
        Value::Int(o) => u64::try_from(o).map_err(|_| "negative storage offset")?,
        _ => return Err("malformed storage offset".into()),
    };
    let size = ints(&p, args[2])
        .ok_or("malformed size")?
        .into_iter()
        .map(|d| u64::try_from(d).map_err(|_| "negative dimension"))
        .collect::<Result<Vec<_>, _>>()?;
    let stride = ints(&p, args[3]).ok_or("malformed stride")?;
    if stride.len() != size.len() {
        return Err(format!(
            "{} strides for {} dimensions",
            stride.len(),
            size.len()
        ));
    }
    Ok(StoredTensor {
        dtype: dtype_name,
        key: key.to_owned(),
        storage_bytes,
        storage_offset,
        size,
        stride,
    })
}

fn dtype_of_storage(class: &str) -> Option<&'static str> {
    const ALL: [&str; 17] = [
        "float32",
        "float64",
        "float16",
        "bfloat16",
        "complex64",
        "complex128",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "bool",
        "qint8",
        "quint8",
        "qint32",
        "quint4x2",
        "quint2x4",
    ];
    ALL.into_iter()
        .find(|d| dtype::legacy_storage_class(d) == Some(class))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `data.pkl` of `torch.save(torch.arange(12.).reshape(3, 4).t())` (torch 2.15).
    const TRANSPOSED: &[u8] = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((X\x07\x00\x00\x00storageq\x01ctorch\nFloatStorage\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04K\x0ctq\x05QK\x00K\x04K\x03\x86q\x06K\x01K\x04\x86q\x07\x89ccollections\nOrderedDict\nq\x08)Rq\ttq\nRq\x0b.";

    #[test]
    fn reads_a_rebuild_call() {
        let t = read(TRANSPOSED).unwrap();
        assert_eq!(t.dtype, "float32");
        assert_eq!(t.key, "0");
        assert_eq!(t.storage_bytes, 48);
        assert_eq!(t.size, vec![4, 3]);
        assert_eq!(t.stride, vec![1, 4]);
        assert_eq!(t.required_elements(), Some(12));
    }

    /// `data.pkl` of `torch.save(torch.quantize_per_tensor(torch.arange(4.), 0.5, 1, torch.qint8))`.
    const QTENSOR: &[u8] = b"\x80\x02ctorch._utils\n_rebuild_qtensor\nq\x00((X\x07\x00\x00\x00storageq\x01ctorch\nQInt8Storage\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04K\x04tq\x05QK\x00K\x04\x85q\x06K\x01\x85q\x07ctorch\nper_tensor_affine\nq\x08G?\xe0\x00\x00\x00\x00\x00\x00K\x01\x87q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\r.";

    #[test]
    fn reads_a_quantized_tensor() {
        let t = read(QTENSOR).unwrap();
        assert_eq!(t.dtype, "qint8");
        assert_eq!(t.storage_bytes, 4);
        assert_eq!(t.size, vec![4]);
    }

    #[test]
    fn refuses_other_globals() {
        let evil = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00hi\x85R.";
        assert!(read(evil).unwrap_err().contains("posix.system"));
    }
}
