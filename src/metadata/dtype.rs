//! torch dtypes as `.metadata` names them (`torch.float32` is pickled as the global `torch`, `float32`).

/// Element size in bytes of a torch dtype, by the name torch pickles it under.
///
/// Sub-byte types are stored packed in one-byte elements (`float4_e2m1fn_x2`, `quint4x2`).
pub fn element_size(name: &str) -> Option<u64> {
    Some(match name {
        "bool" | "uint8" | "int8" | "quint8" | "qint8" | "quint4x2" | "quint2x4" | "bits8"
        | "bits1x8" | "bits2x4" | "bits4x2" | "float8_e4m3fn" | "float8_e4m3fnuz"
        | "float8_e5m2" | "float8_e5m2fnuz" | "float8_e8m0fnu" | "float4_e2m1fn_x2" => 1,
        "float16" | "half" | "bfloat16" | "int16" | "short" | "uint16" | "bits16" => 2,
        "float32" | "float" | "int32" | "int" | "uint32" | "qint32" | "complex32" | "chalf" => 4,
        "float64" | "double" | "int64" | "long" | "uint64" | "complex64" | "cfloat" => 8,
        "complex128" | "cdouble" => 16,
        _ => return None,
    })
}

/// Whether a name of the `torch` module is shaped like a dtype that dcpfetch does not know (yet):
/// a family (`float`, `bfloat`, `complex`, `bcomplex`, `int`, `uint`, `bits`, `qint`, `quint`)
/// followed by a digit, then only lowercase letters, digits and underscores (`bcomplex32`,
/// `float4_e2m1fn_x2`, `int4`). No function of `torch` has such a name: `pickle.load` would
/// resolve it to a dtype object (data) or fail, never call it. Known dtypes also match.
pub fn is_dtype_name(name: &str) -> bool {
    if element_size(name).is_some() {
        return true;
    }
    const FAMILIES: [&str; 9] = [
        "bcomplex", "complex", "bfloat", "float", "quint", "qint", "uint", "int", "bits",
    ];
    FAMILIES.iter().any(|f| {
        name.strip_prefix(f).is_some_and(|rest| {
            rest.starts_with(|c: char| c.is_ascii_digit())
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
    })
}

/// The canonical name torch prints for a dtype (`torch.float` is printed `torch.float32`).
pub fn canonical(name: &str) -> &str {
    match name {
        "half" => "float16",
        "float" => "float32",
        "double" => "float64",
        "short" => "int16",
        "int" => "int32",
        "long" => "int64",
        "chalf" => "complex32",
        "cfloat" => "complex64",
        "cdouble" => "complex128",
        other => other,
    }
}

/// The storage class name that `torch.save` archives use for a dtype (`FloatStorage`), when torch
/// has one.
pub fn legacy_storage_class(name: &str) -> Option<&'static str> {
    Some(match canonical(name) {
        "float32" => "FloatStorage",
        "float64" => "DoubleStorage",
        "float16" => "HalfStorage",
        "bfloat16" => "BFloat16Storage",
        "complex64" => "ComplexFloatStorage",
        "complex128" => "ComplexDoubleStorage",
        "uint8" => "ByteStorage",
        "int8" => "CharStorage",
        "int16" => "ShortStorage",
        "int32" => "IntStorage",
        "int64" => "LongStorage",
        "bool" => "BoolStorage",
        "qint8" => "QInt8Storage",
        "quint8" => "QUInt8Storage",
        "qint32" => "QInt32Storage",
        "quint4x2" => "QUInt4x2Storage",
        "quint2x4" => "QUInt2x4Storage",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_of_common_dtypes() {
        let table = [
            ("float32", Some(4)),
            ("bfloat16", Some(2)),
            ("float8_e4m3fn", Some(1)),
            ("complex128", Some(16)),
            ("bool", Some(1)),
            ("int64", Some(8)),
            ("not_a_dtype", None),
        ];
        for (name, size) in table {
            assert_eq!(element_size(name), size, "{name}");
        }
        assert_eq!(canonical("long"), "int64");
        for name in [
            "bcomplex32",
            "float4_e2m1fn_x2",
            "int4",
            "uint7",
            "float8_e4m3fn",
        ] {
            assert!(is_dtype_name(name), "{name}");
        }
        for name in [
            "load",
            "save",
            "Size",
            "float",
            "int_repr",
            "float_power",
            "Float32",
            "float32.x",
            "bfloat",
            "complex",
            "",
            "int8 ",
            "float8-e4m3",
        ] {
            assert_eq!(is_dtype_name(name), element_size(name).is_some(), "{name}");
        }
        assert_eq!(legacy_storage_class("bfloat16"), Some("BFloat16Storage"));
    }
}
