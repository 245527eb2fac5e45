//! A sink that drops everything: the fetch alone, for benchmarks.

use bytes::Bytes;

use crate::fetch::{Sink, SinkError};
use crate::plan::{FilePlan, PlanItem};

/// Counts the bytes it is given and keeps none.
#[derive(Debug, Default)]
pub struct NullSink {
    pub bytes: u64,
    pub items: u64,
}

impl Sink for NullSink {
    /// Nothing is kept, so order does not matter.
    fn ordered(&self) -> bool {
        false
    }

    fn write(&mut self, _: &FilePlan, _: &PlanItem, _: u64, data: Bytes) -> Result<(), SinkError> {
        self.bytes += data.len() as u64;
        Ok(())
    }

    fn item_done(&mut self, _: &FilePlan, _: &PlanItem) -> Result<(), SinkError> {
        self.items += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
