//! The bytes that lead an exported file: a safetensors header, an npy header, and the index of a
//! Hugging Face folder. Facts in the project's export-formats notes: safetensors is an 8-byte
//! little-endian length, that much JSON (padded with spaces so the data starts 8-aligned), then
//! the tensors back to back; npy 1.0 is a magic, a version, a 2-byte length and a Python dict
//! literal padded so the data starts 64-aligned.

use std::collections::BTreeMap;

use serde_json::json;

use crate::metadata::dtype;

/// The safetensors dtype of a torch dtype; `None` for those safetensors cannot hold (complex128,
/// quantized, sub-byte).
pub fn safetensors_dtype(torch: &str) -> Option<&'static str> {
    Some(match dtype::canonical(torch) {
        "float64" => "F64",
        "float32" => "F32",
        "float16" => "F16",
        "bfloat16" => "BF16",
        "int64" => "I64",
        "int32" => "I32",
        "int16" => "I16",
        "int8" => "I8",
        "uint64" => "U64",
        "uint32" => "U32",
        "uint16" => "U16",
        "uint8" => "U8",
        "bool" => "BOOL",
        "float8_e4m3fn" => "F8_E4M3",
        "float8_e4m3fnuz" => "F8_E4M3FNUZ",
        "float8_e5m2" => "F8_E5M2",
        "float8_e5m2fnuz" => "F8_E5M2FNUZ",
        "complex64" => "C64",
        _ => return None,
    })
}

/// numpy's `descr` of a torch dtype; `None` for those numpy has no type for (bfloat16, fp8,
/// quantized).
pub fn npy_descr(torch: &str) -> Option<&'static str> {
    Some(match dtype::canonical(torch) {
        "float64" => "<f8",
        "float32" => "<f4",
        "float16" => "<f2",
        "int64" => "<i8",
        "int32" => "<i4",
        "int16" => "<i2",
        "int8" => "|i1",
        "uint64" => "<u8",
        "uint32" => "<u4",
        "uint16" => "<u2",
        "uint8" => "|u1",
        "bool" => "|b1",
        "complex64" => "<c8",
        "complex128" => "<c16",
        _ => return None,
    })
}

/// One tensor of a safetensors file: its name, dtype, shape and bytes `[begin, end)` of the data.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub dtype: &'static str,
    pub shape: &'a [u64],
    pub data: (u64, u64),
}

/// A whole safetensors header: length, JSON, padding.
pub fn safetensors_header(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    for e in entries {
        map.insert(
            e.name.to_owned(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [e.data.0, e.data.1]}),
        );
    }
    let mut text = serde_json::to_vec(&map).expect("a map of strings and numbers");
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out
}

/// A whole npy 1.0 header for a C-order array; `None` when it would exceed 1.0's 64 KiB.
pub fn npy_header(descr: &str, shape: &[u64]) -> Option<Vec<u8>> {
    let dims = match shape {
        [] => "()".to_owned(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    while !(10 + dict.len() + 1).is_multiple_of(64) {
        dict.push(' ');
    }
    dict.push('\n');
    let len = u16::try_from(dict.len()).ok()?;
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    Some(out)
}

/// `model.safetensors.index.json` of a folder: every tensor's file, and the data's total size.
pub fn index(total_size: u64, weight_map: &BTreeMap<&str, &str>) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(&json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    }))
    .expect("strings and numbers");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_safetensors_header_starts_the_data_eight_aligned() {
        let h = safetensors_header(&[Entry {
            name: "w",
            dtype: "F32",
            shape: &[2, 3],
            data: (0, 24),
        }]);
        assert_eq!(h.len() % 8, 0);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n, h.len() - 8);
        let v: serde_json::Value = serde_json::from_slice(&h[8..]).unwrap();
        assert_eq!(v["w"]["data_offsets"], json!([0, 24]));
        assert_eq!(v["w"]["shape"], json!([2, 3]));
        assert_eq!(v["__metadata__"]["format"], "pt");
    }

    #[test]
    fn an_npy_header_is_what_numpy_writes() {
        // numpy.save of np.zeros((3, 4), '<f4'), header bytes.
        let h = npy_header("<f4", &[3, 4]).unwrap();
        assert_eq!(h.len(), 128);
        assert_eq!(&h[..10], b"\x93NUMPY\x01\x00\x76\x00");
        assert!(h.starts_with(
            b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"
        ));
        assert_eq!(h.last(), Some(&b'\n'));
        assert!(
            String::from_utf8_lossy(&npy_header("<f8", &[]).unwrap()).contains("'shape': (), ")
        );
        assert!(String::from_utf8_lossy(&npy_header("<f8", &[7]).unwrap()).contains("(7,)"));
    }

    #[test]
    fn dtypes_safetensors_cannot_hold_have_no_code() {
        assert_eq!(safetensors_dtype("bfloat16"), Some("BF16"));
        assert_eq!(safetensors_dtype("float8_e4m3fn"), Some("F8_E4M3"));
        assert_eq!(safetensors_dtype("complex128"), None);
        assert_eq!(safetensors_dtype("qint8"), None);
        assert_eq!(npy_descr("bfloat16"), None);
    }
}
