//! [`Dims`]: the dimensions of a shape or of a chunk's offsets or sizes.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// Dimensions (a shape, or a chunk's offsets or sizes) as a `[u64]`: up to two kept inline, more
/// in one allocation of exactly their length. A checkpoint names millions of these and nearly all
/// have one or two dimensions, so most cost no allocation; 24 bytes, as a `Vec`.
#[derive(Clone)]
pub struct Dims(Repr);

#[derive(Clone)]
enum Repr {
    /// The first `.0` of the array (at most 2).
    Inline(u8, [u64; 2]),
    Heap(Box<[u64]>),
}

impl Dims {
    /// No dimensions (the shape of a scalar).
    pub const fn new() -> Dims {
        Dims(Repr::Inline(0, [0; 2]))
    }
}

impl Default for Dims {
    fn default() -> Dims {
        Dims::new()
    }
}

impl Deref for Dims {
    type Target = [u64];

    #[inline]
    fn deref(&self) -> &[u64] {
        match &self.0 {
            Repr::Inline(n, a) => a.get(..usize::from(*n)).unwrap_or_default(),
            Repr::Heap(b) => b,
        }
    }
}

impl From<&[u64]> for Dims {
    #[inline]
    fn from(d: &[u64]) -> Dims {
        match *d {
            [] => Dims::new(),
            [a] => Dims(Repr::Inline(1, [a, 0])),
            [a, b] => Dims(Repr::Inline(2, [a, b])),
            _ => Dims(Repr::Heap(d.into())),
        }
    }
}

impl<const N: usize> From<[u64; N]> for Dims {
    fn from(d: [u64; N]) -> Dims {
        Dims::from(&d[..])
    }
}

impl From<Vec<u64>> for Dims {
    fn from(d: Vec<u64>) -> Dims {
        if d.len() <= 2 {
            Dims::from(&d[..])
        } else {
            Dims(Repr::Heap(d.into_boxed_slice()))
        }
    }
}

impl From<Box<[u64]>> for Dims {
    fn from(d: Box<[u64]>) -> Dims {
        if d.len() <= 2 {
            Dims::from(&d[..])
        } else {
            Dims(Repr::Heap(d))
        }
    }
}

impl From<Dims> for Vec<u64> {
    fn from(d: Dims) -> Vec<u64> {
        match d.0 {
            Repr::Heap(b) => b.into_vec(),
            Repr::Inline(..) => d.to_vec(),
        }
    }
}

/// Equal when the dimensions are: however they are kept.
impl PartialEq for Dims {
    #[inline]
    fn eq(&self, other: &Dims) -> bool {
        **self == **other
    }
}

impl Eq for Dims {}

impl Hash for Dims {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl PartialOrd for Dims {
    fn partial_cmp(&self, other: &Dims) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dims {
    fn cmp(&self, other: &Dims) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

/// As the slice: `[2, 3]`.
impl fmt::Debug for Dims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// As the slice: a JSON array of numbers.
impl serde::Serialize for Dims {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_dims_however_kept() {
        for d in [&[][..], &[7], &[1, 2], &[1, 2, 3], &[u64::MAX; 5]] {
            let a = Dims::from(d);
            let b = Dims::from(d.to_vec());
            let c = Dims::from(Box::<[u64]>::from(d));
            assert_eq!(&*a, d);
            assert_eq!(a, b);
            assert_eq!(b, c);
            assert_eq!(Vec::from(c.clone()), d);
            assert_eq!(format!("{a:?}"), format!("{d:?}"));
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                serde_json::to_string(d).unwrap()
            );
            let h = |x: &dyn Fn(&mut std::collections::hash_map::DefaultHasher)| {
                let mut s = std::collections::hash_map::DefaultHasher::new();
                x(&mut s);
                s.finish()
            };
            assert_eq!(h(&|s| a.hash(s)), h(&|s| d.hash(s)));
        }
        assert_eq!(std::mem::size_of::<Dims>(), 24);
        assert_eq!(std::mem::size_of::<Option<Dims>>(), 24);
    }
}
