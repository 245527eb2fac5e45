//! Shards written with `serialization_format=SAFETENSORS`: torch records `.metadata` offsets that
//! do not locate the tensors (every item points at the start of the data), so the real ranges
//! come from the file's safetensors header: an 8-byte little-endian length, then that much JSON.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Largest header accepted.
pub const MAX_HEADER: u64 = 100 << 20;

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HeaderTensor {
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data_offsets: (u64, u64),
}

/// A parsed header: tensors by name, and where the data section starts in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub tensors: BTreeMap<String, HeaderTensor>,
    pub data_start: u64,
}

/// The header's length, from the first 9 bytes of a safetensors file (a length, then `{`).
pub fn header_len(first: &[u8]) -> Option<u64> {
    let n = u64::from_le_bytes(first.get(..8)?.try_into().ok()?);
    ((2..=MAX_HEADER).contains(&n) && first.get(8) == Some(&b'{')).then_some(n)
}

/// Parses the header JSON that starts at file offset `at + 8`.
pub fn parse(json: &[u8], at: u64) -> Result<Header, String> {
    let value: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| format!("the safetensors header is not valid JSON: {e}"))?;
    let mut tensors = BTreeMap::new();
    for (name, v) in value {
        if name == "__metadata__" {
            continue;
        }
        let t: HeaderTensor = serde_json::from_value(v)
            .map_err(|e| format!("safetensors header entry {name:?}: {e}"))?;
        tensors.insert(name, t);
    }
    Ok(Header {
        tensors,
        data_start: at + 8 + json.len() as u64,
    })
}

/// The torch dtype name of a safetensors dtype.
pub fn torch_dtype(st: &str) -> Option<&'static str> {
    Some(match st {
        "F64" => "float64",
        "F32" => "float32",
        "F16" => "float16",
        "BF16" => "bfloat16",
        "I64" => "int64",
        "I32" => "int32",
        "I16" => "int16",
        "I8" => "int8",
        "U8" => "uint8",
        "U16" => "uint16",
        "U32" => "uint32",
        "U64" => "uint64",
        "BOOL" => "bool",
        "F8_E4M3" => "float8_e4m3fn",
        "F8_E5M2" => "float8_e5m2",
        "C64" => "complex64",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_header() {
        let json = br#"{"__metadata__":{"a":"b"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json);
        assert_eq!(header_len(&file), Some(json.len() as u64));
        let h = parse(json, 0).unwrap();
        assert_eq!(h.data_start, 8 + json.len() as u64);
        assert_eq!(h.tensors["w"].shape, vec![2, 3]);
        assert_eq!(torch_dtype("BF16"), Some("bfloat16"));
        assert_eq!(header_len(b"PK\x03\x04\x00\x00\x08\x08\x00"), None);
        assert!(parse(b"{not json", 0).is_err());
    }
}
