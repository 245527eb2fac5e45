//! Byte sizes as people write them (`32MiB`, `1GB`, `inf`) and as we print them, the natural
//! order of names (`layers.2` before `layers.10`), and bytes as lowercase hex (digests).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A byte count; `inf` is `u64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const INF: ByteSize = ByteSize(u64::MAX);

    pub fn is_inf(self) -> bool {
        self.0 == u64::MAX
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("inf") || t.eq_ignore_ascii_case("infinity") {
            return Ok(ByteSize::INF);
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, KB, MB, GB or inf)"
                ));
            }
        };
        if num.is_empty() {
            return Err(format!(
                "{s:?}: expected a number such as 0, 512KiB, 32MiB, 1GB or inf"
            ));
        }
        let bytes = if let Some((whole, frac)) = num.split_once('.') {
            let value: f64 = format!("{}.{}", if whole.is_empty() { "0" } else { whole }, frac)
                .parse()
                .map_err(|_| format!("{s:?}: not a number"))?;
            let b = value * mult as f64;
            if !b.is_finite() || b >= u64::MAX as f64 {
                return Err(format!("{s:?}: too large (use inf for no limit)"));
            }
            b.round() as u64
        } else {
            let n: u64 = num.parse().map_err(|_| format!("{s:?}: not a number"))?;
            n.checked_mul(mult)
                .ok_or_else(|| format!("{s:?}: too large (use inf for no limit)"))?
        };
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_inf() {
            return f.write_str("inf");
        }
        f.write_str(&human(self.0))
    }
}

/// `1536` -> `1.5 KiB`; exact below 1 KiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else if value >= 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// `1 file`, `2 files`, `3 entries`: a count and a regular English noun.
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        return format!("1 {noun}");
    }
    match noun.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

/// Compares names so that runs of digits compare as numbers: `layers.2` < `layers.10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                let ta = trim_zeros(na);
                let tb = trim_zeros(nb);
                let ord = ta
                    .len()
                    .cmp(&tb.len())
                    .then_with(|| ta.cmp(tb))
                    .then_with(|| da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|c| **c == b'0').count();
    &d[z..]
}

/// Bytes as lowercase hex, two digits each (`[0x0f, 0xa0]` -> `0fa0`).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The SHA-256 of some bytes, in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_sizes() {
        let table = [
            ("0", 0),
            ("4096", 4096),
            ("512KiB", 512 << 10),
            ("32MiB", 32 << 20),
            ("32 MiB", 32 << 20),
            ("1GB", 1_000_000_000),
            ("1.5MiB", 3 << 19),
            ("8mib", 8 << 20),
            ("inf", u64::MAX),
        ];
        for (s, want) in table {
            assert_eq!(s.parse::<ByteSize>().unwrap(), ByteSize(want), "{s}");
        }
        for bad in [
            "",
            "MiB",
            "-1",
            "12XB",
            "99999999999999999999",
            "20000000000TiB",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn prints_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(32 << 20), "32.0 MiB");
        assert_eq!(human(300 << 30), "300 GiB");
        assert_eq!(ByteSize::INF.to_string(), "inf");
    }

    #[test]
    fn counts() {
        assert_eq!(count(1u64, "file"), "1 file");
        assert_eq!(count(0u64, "file"), "0 files");
        assert_eq!(count(3u32, "request"), "3 requests");
        assert_eq!(count(2u64, "bytes entry"), "2 bytes entries");
        assert_eq!(count(2u64, "key"), "2 keys");
    }

    #[test]
    fn natural_order() {
        let mut names = vec![
            "layers.10.w",
            "layers.2.w",
            "layers.1.w",
            "a",
            "layers.02.w",
            "b1",
            "b01",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            vec![
                "a",
                "b1",
                "b01",
                "layers.1.w",
                "layers.2.w",
                "layers.02.w",
                "layers.10.w"
            ]
        );
    }

    #[test]
    fn hex_digits() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    proptest! {
        #[test]
        fn hex_is_two_digits_a_byte(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = hex(&data);
            prop_assert_eq!(h.len(), 2 * data.len());
            let back: Vec<u8> = (0..data.len())
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            prop_assert_eq!(back, data);
            prop_assert!(!h.bytes().any(|c| c.is_ascii_uppercase()));
        }

        #[test]
        fn natural_order_is_a_total_order(a in "[a-c0-9.]{0,8}", b in "[a-c0-9.]{0,8}", c in "[a-c0-9.]{0,8}") {
            prop_assert_eq!(natural_cmp(&a, &b), natural_cmp(&b, &a).reverse());
            prop_assert_eq!(natural_cmp(&a, &b) == Ordering::Equal, a == b);
            if natural_cmp(&a, &b) != Ordering::Greater && natural_cmp(&b, &c) != Ordering::Greater {
                prop_assert_ne!(natural_cmp(&a, &c), Ordering::Greater);
            }
        }
    }
}
