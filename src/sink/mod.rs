//! Where fetched items go: a sparse copy of the checkpoint ([`folder`]), a byte or tar stream
//! ([`stream`]), or nowhere ([`null`], for measurements). The sink that checks items instead lives
//! with the other checks, in [`crate::verify::sink`].

pub mod dir;
pub mod folder;
pub mod journal;
pub mod null;
pub mod runs;
pub mod stream;

pub use folder::{FolderOptions, FolderSink, local_root};
pub use null::NullSink;
pub use stream::{StreamFormat, StreamSink};
