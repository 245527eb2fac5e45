//! Where fetched items go: a sparse copy of the checkpoint ([`folder`]), a byte or tar stream
//! ([`stream`]), or nowhere ([`null`], for measurements).

pub mod folder;
pub mod null;
pub mod stream;
pub mod verify;

pub use folder::{FolderOptions, FolderSink};
pub use null::NullSink;
pub use stream::{StreamFormat, StreamSink};
pub use verify::{VerifyResults, VerifySink};
