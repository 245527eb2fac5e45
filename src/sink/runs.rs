//! The CRC32 of bytes that arrive out of order: one running CRC per run of bytes received in
//! order, combined (`crc32fast::Hasher::combine`) once the runs cover the whole.

/// Bytes `start .. end` received in order, and their CRC32.
#[derive(Debug)]
struct Run {
    start: u64,
    end: u64,
    crc: crc32fast::Hasher,
}

/// The runs of one span of bytes (an item, a record), offsets relative to its start.
#[derive(Debug, Default)]
pub struct CrcRuns(Vec<Run>);

impl CrcRuns {
    /// Bytes `at .. at + data.len()`.
    pub fn add(&mut self, at: u64, data: &[u8]) {
        let mut crc = crc32fast::Hasher::new();
        crc.update(data);
        let end = at + data.len() as u64;
        match self.0.iter_mut().find(|r| r.end == at) {
            Some(run) => {
                run.crc.combine(&crc);
                run.end = end;
            }
            None => self.0.push(Run {
                start: at,
                end,
                crc,
            }),
        }
    }

    /// The CRC32 of the `len` bytes, if the runs cover them exactly.
    pub fn finish(mut self, len: u64) -> Option<u32> {
        self.0.sort_by_key(|r| r.start);
        let mut crc = crc32fast::Hasher::new();
        let mut at = 0;
        for r in &self.0 {
            if r.start != at {
                return None;
            }
            crc.combine(&r.crc);
            at = r.end;
        }
        (at == len).then(|| crc.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(parts: &[(&[u8], u64)]) -> CrcRuns {
        let mut r = CrcRuns::default();
        for (data, at) in parts {
            r.add(*at, data);
        }
        r
    }

    #[test]
    fn runs_in_any_order_give_the_whole_crc() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = crc32fast::hash(&data);
        let r = runs(&[
            (&data[600..], 600),
            (&data[..250], 0),
            (&data[250..600], 250),
        ]);
        assert_eq!(r.finish(1000), Some(whole));
    }

    #[test]
    fn runs_with_a_hole_or_short_give_none() {
        let data = [1u8; 100];
        assert_eq!(
            runs(&[(&data[..40], 0), (&data[50..], 50)]).finish(100),
            None
        );
        assert_eq!(runs(&[(&data[..40], 0)]).finish(100), None);
        assert_eq!(CrcRuns::default().finish(100), None);
    }
}
