//! Where a checkpoint's bytes come from: a local folder or an S3 prefix, behind one trait.
//!
//! Everything above this module (metadata, plan, fetch) speaks only of object names relative to
//! the checkpoint and half-open byte ranges, through a [`Source`]: a handle on an [`ObjectStore`]
//! (the way mountpoint-s3 injects its object client). The backends turn names and ranges into
//! positional reads or ranged GETs; [`FaultStore`] wraps any backend to inject failures in tests.

pub mod fault;
pub mod http;
mod local;
mod location;
mod name;
mod resume;
pub mod s3;
mod s3_transport;
mod stat;
mod tls;

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

pub use fault::FaultStore;
pub use http::{HttpHeader, HttpOptions, HttpSource, HttpUrl, UrlList};
pub use local::{LocalSource, STATE_DIR, is_dcpfetch_copy};
pub use location::Location;
pub use name::{NameError, ObjectName};
pub use s3::{S3Options, S3Source};
pub use stat::{Ahead, Listing, StatError, stat_all, stat_each};

/// Size and version of one object, seen once and then required of every read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    /// S3: the ETag, sent as `If-Match` on every ranged GET. Local: size and modification time.
    pub version: Option<String>,
}

/// Counters shared by every read of a run.
#[derive(Debug, Default)]
pub struct TransferStats {
    /// Body bytes received (including bytes of attempts that failed part-way).
    pub bytes: AtomicU64,
    /// Requests sent (GET, HEAD, LIST), including retries.
    pub requests: AtomicU64,
    /// Attempts that were retried.
    pub retries: AtomicU64,
}

impl TransferStats {
    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
        )
    }
}

/// How reads are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// First backoff; doubled each attempt, with full jitter.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// A body that delivers nothing for this long is abandoned and resumed.
    pub stall_timeout: Duration,
    /// The longest one request may take, from sending it to the last byte of its answer: a body
    /// that trickles in (faster than `stall_timeout`, slower than useful) is abandoned after
    /// this, and the attempt counts as failed even if some bytes arrived.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt` (1 = the first retry): full jitter over an exponential
    /// ceiling.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        ceiling.mul_f64(jitter())
    }
}

/// A number in [0, 1) that differs between calls (no need for a cryptographic source).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Refuses an object of more than `limit` bytes before its body is read.
pub(crate) fn fits(name: &ObjectName, size: u64, limit: u64) -> Result<(), SourceError> {
    if size > limit {
        return Err(SourceError::TooLarge {
            name: name.to_string(),
            size,
            limit,
        });
    }
    Ok(())
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{name} not found in {location}")]
    NotFound { location: String, name: String },
    #[error("access denied to {name} in {location}: {detail}")]
    AccessDenied {
        location: String,
        name: String,
        detail: String,
        /// The fix this kind of store suggests (a token, a presigned URL), printed as the
        /// error's hint; without one the hint is about AWS credentials.
        hint: Option<&'static str>,
    },
    #[error("{name} changed while it was read (was {expected}, now {found})")]
    Changed {
        name: String,
        expected: String,
        found: String,
    },
    #[error("{name} bytes {start}..{end}: {detail}")]
    BadResponse {
        name: String,
        start: u64,
        end: u64,
        detail: String,
    },
    #[error("{what}: gave up after {}; the last error: {last}", attempts_in_words(*attempts))]
    Exhausted {
        what: String,
        attempts: u32,
        last: String,
    },
    #[error("{name}: {detail}")]
    Request { name: String, detail: String },
    /// The endpoint cannot be reached at all: its host name does not resolve, or nothing listens
    /// on its port. Not retried (DNS and a closed port do not heal within a backoff).
    #[error("{name}: {detail}")]
    Unreachable { name: String, detail: String },
    /// No credentials could be found, or the named profile does not exist.
    #[error("{0}")]
    Credentials(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} is {size} bytes, more than the {limit} bytes dcpfetch reads whole")]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Name(#[from] NameError),
    /// Whoever took the bytes refused more ([`Stopped`]): it holds the reason.
    #[error("{name}: the read was stopped by its receiver")]
    Stopped { name: String },
}

impl SourceError {
    /// Whether the checkpoint itself is at fault (missing or changed objects, short files), as
    /// opposed to the environment (credentials, network, configuration).
    pub fn is_checkpoint_problem(&self) -> bool {
        matches!(
            self,
            SourceError::NotFound { .. }
                | SourceError::Changed { .. }
                | SourceError::BadResponse { .. }
                | SourceError::Name(_)
        )
    }
}

/// "1 attempt", "3 attempts".
fn attempts_in_words(n: u32) -> String {
    if n == 1 {
        "1 attempt".into()
    } else {
        format!("{n} attempts")
    }
}

/// A future returned by an [`ObjectStore`] method: boxed, so that the trait stays dyn-compatible.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A storage backend: what the engine, the metadata reader and the checks need of a place that
/// holds a checkpoint's objects. [`LocalSource`] and [`S3Source`] implement it; [`FaultStore`]
/// wraps any of them to inject failures in tests. To add a backend, implement this trait and
/// build a [`Source`] with [`Source::new`].
///
/// Names come already checked ([`ObjectName`]) and ranges already inside the object: [`Source`]
/// validates both once for every backend.
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// The location as a person would write it.
    fn describe(&self) -> String;

    /// The counters every read of this store adds to.
    fn stats(&self) -> &Arc<TransferStats>;

    /// Whether a read that stops taking bytes leaves the rest with the sender (a network
    /// connection, where a request started early hides its latency), rather than holding a reader
    /// and its buffers here (a local file, read as fast as it is asked). For an ordered sink the
    /// engine starts later parts before there is memory for them only on such a store.
    fn holds_back(&self) -> bool {
        false
    }

    /// Size and version of an object.
    fn stat<'a>(&'a self, name: &'a ObjectName) -> BoxFuture<'a, Result<ObjectMeta, SourceError>>;

    /// The objects directly inside the checkpoint (not in sub-folders), with their size and
    /// version as [`ObjectStore::stat`] gives them.
    fn list(&self) -> BoxFuture<'_, Result<Listing, SourceError>>;

    /// The first page of [`ObjectStore::list`] (one request) and whether it is the whole
    /// listing, where a stat costs a round trip that this one request, sent beside the
    /// metadata's read, saves (S3: a listing page names up to 1,000 objects with the size and
    /// ETag a HEAD would give). `None` where stats are cheap or there is no listing.
    fn list_first_page(&self) -> Option<BoxFuture<'_, Result<(Listing, bool), SourceError>>> {
        None
    }

    /// A whole object of at most `limit` bytes (refused with [`SourceError::TooLarge`] before its
    /// body is read), and its size and version. The default stats the object and reads its whole
    /// range; a store that can do it in fewer requests (one GET on S3) overrides it.
    fn read_object<'a>(
        &'a self,
        name: &'a ObjectName,
        limit: u64,
    ) -> BoxFuture<'a, Result<(ObjectMeta, Vec<Bytes>), SourceError>> {
        Box::pin(read_object_by_range(self, name, limit))
    }

    /// The bytes `range` (inside the object) of an object, handed to `into` in order as they
    /// arrive (a retry resumes after the last byte handed over). Fails unless the object is still
    /// the version `meta` describes ([`SourceError::Changed`]), and with [`SourceError::Stopped`]
    /// when `into` refuses more bytes.
    fn read_range<'a>(
        &'a self,
        name: &'a ObjectName,
        range: Range<u64>,
        meta: &'a ObjectMeta,
        into: &'a mut dyn Receive,
    ) -> BoxFuture<'a, Result<(), SourceError>>;
}

/// A whole object of at most `limit` bytes read as [`ObjectStore::read_object`]'s default does: a
/// stat, then its whole range.
pub(crate) async fn read_object_by_range<S: ObjectStore + ?Sized>(
    store: &S,
    name: &ObjectName,
    limit: u64,
) -> Result<(ObjectMeta, Vec<Bytes>), SourceError> {
    let meta = store.stat(name).await?;
    fits(name, meta.size, limit)?;
    let mut chunks = Vec::new();
    store
        .read_range(name, 0..meta.size, &meta, &mut chunks)
        .await?;
    Ok((meta, chunks))
}

/// Where the bytes of a ranged read go as they arrive: held in memory (`Vec<Bytes>`, for small
/// reads), or passed on at once (the fetch engine), so that a read holds no more than the chunk in
/// hand.
pub trait Receive: Send {
    /// The next bytes of the range, in order from its start. It may wait (whoever takes the bytes
    /// is slower than the network); an error stops the read, and the receiver keeps the reason.
    fn receive(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), Stopped>>;
}

/// A [`Receive`] refused more bytes; it knows why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

impl Receive for Vec<Bytes> {
    fn receive(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), Stopped>> {
        if !data.is_empty() {
            self.push(data);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A checkpoint location opened for reading: a cheap-to-clone handle on an [`ObjectStore`] that
/// checks names and ranges once for every backend.
#[derive(Debug, Clone)]
pub struct Source(Arc<dyn ObjectStore>);

impl Source {
    /// See [`ObjectStore::holds_back`].
    pub fn holds_back(&self) -> bool {
        self.0.holds_back()
    }

    /// A handle on any store (a test double, another backend).
    pub fn new(store: Arc<dyn ObjectStore>) -> Source {
        Source(store)
    }

    /// Opens a location: a folder needs nothing; S3 builds a client from the default chain and
    /// `opts`; HTTP(S) a client with the headers and CA bundle of `http`.
    pub async fn open(
        location: &Location,
        opts: &S3Options,
        http: &HttpOptions,
        stats: Arc<TransferStats>,
    ) -> Result<Source, SourceError> {
        Ok(match location {
            Location::Local(path) => Source::new(Arc::new(LocalSource::new(path.clone(), stats))),
            Location::S3 { bucket, prefix } => Source::new(Arc::new(
                S3Source::connect(bucket.clone(), prefix.clone(), opts, stats).await?,
            )),
            Location::Http { base } => {
                Source::new(Arc::new(HttpSource::new(base.clone(), http, stats)?))
            }
        })
    }

    /// The location as a person would write it.
    pub fn describe(&self) -> String {
        self.0.describe()
    }

    /// The counters every read of this source adds to.
    pub fn stats(&self) -> &Arc<TransferStats> {
        self.0.stats()
    }

    /// Size and version of an object.
    pub async fn stat(&self, name: &str) -> Result<ObjectMeta, SourceError> {
        let name = ObjectName::new(name)?;
        self.0.stat(&name).await
    }

    /// The objects directly inside the checkpoint (not in sub-folders), with their size and
    /// version as [`Source::stat`] gives them: one listing request per 1,000 objects on S3.
    pub async fn list(&self) -> Result<Listing, SourceError> {
        self.0.list().await
    }

    /// A whole object of at most `limit` bytes, and its size and version, in as few requests as
    /// the store allows (one GET on S3).
    pub async fn read_object(
        &self,
        name: &str,
        limit: u64,
    ) -> Result<(ObjectMeta, Vec<u8>), SourceError> {
        let name = ObjectName::new(name)?;
        let (meta, mut chunks) = self.0.read_object(&name, limit).await?;
        // One chunk (a local file) is taken as it is, without a copy.
        let data = match chunks.len() {
            1 => Vec::from(chunks.swap_remove(0)),
            _ => chunks.concat(),
        };
        received_whole(&name, 0..meta.size, data.len())?;
        Ok((meta, data))
    }

    /// A (small) range of an object in one buffer.
    pub async fn read_all_range(
        &self,
        name: &str,
        range: Range<u64>,
        meta: &ObjectMeta,
    ) -> Result<Vec<u8>, SourceError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let chunks = self.read_range(name, range.clone(), meta).await?;
        let data = chunks.concat();
        received_whole(&ObjectName::new(name)?, range, data.len())?;
        Ok(data)
    }

    /// The bytes `range` of an object as received (zero-copy chunks), in order. Fails unless the
    /// object is still the version `meta` describes and the whole range arrived.
    pub async fn read_range(
        &self,
        name: &str,
        range: Range<u64>,
        meta: &ObjectMeta,
    ) -> Result<Vec<Bytes>, SourceError> {
        let mut chunks = Vec::new();
        self.stream_range(name, range.clone(), meta, &mut chunks)
            .await?;
        let len = chunks.iter().map(|c| c.len()).sum();
        received_whole(&ObjectName::new(name)?, range, len)?;
        Ok(chunks)
    }

    /// The bytes `range` of an object, handed to `into` in order as they arrive. Fails unless the
    /// object is still the version `meta` describes; `into` counts what it was given (a store
    /// may end a range short or run long only by a fault of its own, which `into` must catch).
    pub async fn stream_range(
        &self,
        name: &str,
        range: Range<u64>,
        meta: &ObjectMeta,
        into: &mut dyn Receive,
    ) -> Result<(), SourceError> {
        let name = ObjectName::new(name)?;
        if range.end > meta.size || range.start > range.end {
            return Err(SourceError::BadResponse {
                name: name.to_string(),
                start: range.start,
                end: range.end,
                detail: format!("range is outside the object's {} bytes", meta.size),
            });
        }
        self.0.read_range(&name, range, meta, into).await
    }
}

/// Refuses a buffer whose length is not that of the range it was read for.
fn received_whole(name: &ObjectName, range: Range<u64>, len: usize) -> Result<(), SourceError> {
    let want = range.end - range.start;
    if len as u64 != want {
        return Err(SourceError::BadResponse {
            name: name.to_string(),
            start: range.start,
            end: range.end,
            detail: format!("{len} bytes arrived for a range of {want}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let p = RetryPolicy::default();
        for attempt in 0..40 {
            let d = p.backoff(attempt);
            assert!(d <= p.max_delay, "{attempt}: {d:?}");
        }
        assert!(p.backoff(1) <= p.base_delay * 2);
    }

    #[test]
    fn attempts_are_counted_in_words() {
        let e = |attempts| {
            SourceError::Exhausted {
                what: "a bytes 0..1".into(),
                attempts,
                last: "x".into(),
            }
            .to_string()
        };
        assert_eq!(
            e(1),
            "a bytes 0..1: gave up after 1 attempt; the last error: x"
        );
        assert_eq!(
            e(3),
            "a bytes 0..1: gave up after 3 attempts; the last error: x"
        );
    }
}
