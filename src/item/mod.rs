//! What one stored item is: a `torch.save` archive (a zip of stored records: `data.pkl`, the
//! tensor's storage, small ones) whose `data.pkl` rebuilds the tensor, possibly inside a
//! ZStandard transform. [`archive`] finds and checks the records, in bounded memory as the bytes
//! stream past or from an item's two ends; [`tensor`] reads `data.pkl` without running it. Used by
//! `verify` (checking items) and `export` (finding a chunk's values).

pub mod archive;
pub mod tensor;
