//! An S3-protocol HTTP/1.1 server for tests and benchmarks: it serves a local folder, with knobs
//! for first-byte latency, bandwidth and injected faults.
//!
//! Path-style only: the subfolders of the root are buckets, `GET|HEAD /bucket/key` reads the file
//! `root/bucket/key` (whole or one `Range`), `GET /bucket?list-type=2` lists it (ListObjectsV2),
//! `HEAD /bucket`, `GET /bucket?location` and `GET /` answer minimally. Request signatures are
//! ignored. It listens on loopback only, runs on its own thread and tokio runtime, and stops when
//! the [`TestServer`] is dropped.
//!
//! Written by hand on tokio sockets rather than with an HTTP library so that every byte on the wire
//! is under the test's control (a reset after exactly `n` body bytes, a body shorter than its
//! `Content-Length`) and so that serving is as fast as loopback allows: positional reads into two
//! reusable 1 MiB buffers per connection, the next read overlapping the current write.
//!
//! Include it with `#[path = "support/s3_server.rs"] mod s3_server;` (from `tests/`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Size of each positional read of an object (two such buffers per connection).
const CHUNK: usize = 1 << 20;
/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Time given to the client to receive the bytes sent before a reset: `SO_LINGER 0` throws away
/// whatever is still in the send buffer.
const RESET_GRACE: Duration = Duration::from_millis(50);
/// Default `max-keys` of a listing, and its upper bound, as on S3.
const MAX_KEYS: usize = 1000;

/// `127.0.0.1:0`: loopback, any free port.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// How a [`TestServer`] serves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The folder served: each subfolder is a bucket.
    pub root: PathBuf,
    /// Where to listen; must be a loopback address (default `127.0.0.1:0`).
    pub addr: SocketAddr,
    /// Slept before the response headers of every request.
    pub latency: Duration,
    /// Body bytes per second on each connection.
    pub conn_bandwidth: Option<u64>,
    /// Body bytes per second over all connections together.
    pub total_bandwidth: Option<u64>,
    /// Body bytes per second over all connections of one client, told apart by the access key
    /// of their requests (SigV4 `Authorization: ... Credential=KEY/...`; requests without one are
    /// one client): several processes on one machine, each with its own key, are capped as
    /// machines with their own links would be.
    pub client_bandwidth: Option<u64>,
}

impl ServerConfig {
    /// Serves `root` on `127.0.0.1:0` with no latency and no bandwidth limits.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ServerConfig {
            root: root.into(),
            addr: DEFAULT_ADDR,
            latency: Duration::ZERO,
            conn_bandwidth: None,
            total_bandwidth: None,
            client_bandwidth: None,
        }
    }
}

/// What an injected fault does to the request it hits.
///
/// The body faults (reset, stall, short) cut whatever body the response has: object bytes, a
/// listing's XML or an error's XML. A body no longer than their `after` is sent whole before the
/// connection is reset or closed, so the client may not notice. Bytes still in the server's send
/// buffer when it resets are lost, as on a real network; the server waits 50 ms before the reset
/// so that a client that is reading gets every byte sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and S3 error code (XML body; for HEAD only `x-amz-error-code`).
    Status { status: u16, code: &'static str },
    /// Answer 503 SlowDown with `Retry-After` of this many seconds.
    SlowDownFor(u64),
    /// Send the headers and this many body bytes, then reset the connection (RST). A HEAD is
    /// reset before its headers.
    ResetAfter(u64),
    /// Send the headers and `after` body bytes, go silent for `stall`, then close (FIN). A HEAD
    /// stalls before its headers.
    StallAfter { after: u64, stall: Duration },
    /// Send the headers announcing the full length and this many body bytes, then close cleanly
    /// (FIN). A HEAD is closed before its headers.
    ShortBody(u64),
    /// Answer a GET with a `Content-Range` one byte off (later if it fits, else earlier) and the
    /// bytes of that shifted range; a GET without `Range` gets a 206 with a shifted range too.
    /// Matches GETs only; objects under 2 bytes and error responses are served unchanged.
    WrongContentRange,
    /// Give the object a new ETag before serving, as if it had been overwritten. Matches GETs and
    /// HEADs only.
    Replace,
    /// Extra first-byte latency for this request.
    Latency(Duration),
    /// Answer a ranged GET with 200 and the whole object, as a server that ignores `Range` does.
    /// Matches GETs only.
    IgnoreRange,
    /// Answer a GET with the right range but another object size in its `Content-Range`
    /// (`bytes a-b/SIZE+1`). Matches GETs only.
    WrongTotal,
    /// Answer a GET with the range asked for and this many bytes more (`Content-Length` and body
    /// both longer; `Content-Range` as asked). Matches GETs only.
    LongBody(u64),
    /// Serve with another ETag than the object's, ignoring `If-Match`, as a server that swapped
    /// the object between the check and the read would. Matches GETs only.
    WrongEtag,
    /// Send the headers and `after` body bytes, then one byte every `every` (a drip that is
    /// never quite a stall).
    Dribble { after: u64, every: Duration },
}

impl Fault {
    fn applies_to(&self, op: Op) -> bool {
        match self {
            Fault::WrongContentRange
            | Fault::IgnoreRange
            | Fault::WrongTotal
            | Fault::LongBody(_)
            | Fault::WrongEtag => op == Op::Get,
            Fault::Replace => op != Op::List,
            _ => true,
        }
    }
}

/// A fault and the requests it hits.
///
/// Rules are checked in the order they were added; a request takes one use of the first rule
/// that matches it, and a rule with no uses left no longer matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Only requests whose key contains this (for a LIST: whose `prefix` does).
    pub key_contains: Option<String>,
    /// Only this kind of request: `"GET"`, `"HEAD"` or `"LIST"`.
    pub method: Option<&'static str>,
    /// How many matching requests it hits; `u32::MAX` means every one.
    pub times: u32,
    pub fault: Fault,
}

impl FaultRule {
    /// A rule hitting the next request of any kind, once.
    pub fn new(fault: Fault) -> Self {
        FaultRule {
            key_contains: None,
            method: None,
            times: 1,
            fault,
        }
    }

    /// Hits `n` matching requests (`u32::MAX`: all of them).
    pub fn times(mut self, n: u32) -> Self {
        self.times = n;
        self
    }

    /// Hits every matching request.
    pub fn always(self) -> Self {
        self.times(u32::MAX)
    }

    /// Hits only requests whose key contains `part`.
    pub fn on_key(mut self, part: impl Into<String>) -> Self {
        self.key_contains = Some(part.into());
        self
    }

    /// Hits only `"GET"`, `"HEAD"` or `"LIST"` requests.
    pub fn on_method(mut self, method: &'static str) -> Self {
        self.method = Some(method);
        self
    }

    fn matches(&self, op: Op, key: &str) -> bool {
        self.times > 0
            && self.method.is_none_or(|m| m == op.name())
            && self.key_contains.as_deref().is_none_or(|k| key.contains(k))
            && self.fault.applies_to(op)
    }
}

/// The text form used by the `s3-test-server` binary: a kind and `:`-separated fields.
///
/// ```text
/// status:503[:SlowDown]   reset[:after=N]   stall[:after=N][:ms=N]   short[:after=N]
/// wrong-range             replace           latency:ms=N
/// ignore-range            wrong-total       long[:after=N]      wrong-etag
/// dribble[:after=N][:ms=N]
/// ```
/// followed by any of `times=N|always` (default 1), `key=SUBSTR` (no `:` in it) and
/// `method=GET|HEAD|LIST`. `after` defaults to 0 (a long body's to 1), a stall's `ms` to 10000
/// and a dribble's to 1000; a status's code
/// defaults to the usual one for it (503 SlowDown, 500 InternalError, 403 AccessDenied, ...).
impl FromStr for FaultRule {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let mut fields = spec.split(':');
        let kind = fields.next().unwrap_or_default();
        let mut positional = Vec::new();
        let mut times = 1;
        let mut key_contains = None;
        let mut method = None;
        let mut after = None;
        let mut ms = None;
        for field in fields {
            let Some((name, value)) = field.split_once('=') else {
                positional.push(field);
                continue;
            };
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("fault {spec:?}: {name}={value:?} is not a number"))
            };
            match name {
                "times" if value == "always" => times = u32::MAX,
                "times" => {
                    times = value.parse().map_err(|_| {
                        format!("fault {spec:?}: times={value:?} is not a count or `always`")
                    })?
                }
                "key" if value.is_empty() => return Err(format!("fault {spec:?}: key= is empty")),
                "key" => key_contains = Some(value.to_owned()),
                "method" => {
                    method = Some(Op::parse(value).map(Op::name).ok_or_else(|| {
                        format!("fault {spec:?}: method={value:?} is not GET, HEAD or LIST")
                    })?)
                }
                "after" => after = Some(number()?),
                "ms" => ms = Some(number()?),
                _ => return Err(format!("fault {spec:?}: unknown field {name:?}")),
            }
        }
        let fault = match kind {
            "status" => {
                let (status, code) = match positional.as_slice() {
                    [status] => (*status, None),
                    [status, code] if !code.is_empty() => (*status, Some(*code)),
                    _ => {
                        return Err(format!(
                            "fault {spec:?}: expected status:CODE[:S3CODE], e.g. status:503:SlowDown"
                        ));
                    }
                };
                let status: u16 = status
                    .parse()
                    .ok()
                    .filter(|s| (400..=599).contains(s))
                    .ok_or_else(|| {
                        format!("fault {spec:?}: {status:?} is not an HTTP error status (400-599)")
                    })?;
                let code = match code {
                    Some(code) => static_code(code),
                    None => default_code(status),
                };
                Fault::Status { status, code }
            }
            "slow-down-for" => Fault::SlowDownFor(ms.take().unwrap_or(1000) / 1000),
            "reset" => Fault::ResetAfter(after.take().unwrap_or(0)),
            "stall" => Fault::StallAfter {
                after: after.take().unwrap_or(0),
                stall: Duration::from_millis(ms.take().unwrap_or(10_000)),
            },
            "short" => Fault::ShortBody(after.take().unwrap_or(0)),
            "wrong-range" => Fault::WrongContentRange,
            "replace" => Fault::Replace,
            "ignore-range" => Fault::IgnoreRange,
            "wrong-total" => Fault::WrongTotal,
            "long" => Fault::LongBody(after.take().unwrap_or(1)),
            "wrong-etag" => Fault::WrongEtag,
            "dribble" => Fault::Dribble {
                after: after.take().unwrap_or(0),
                every: Duration::from_millis(ms.take().unwrap_or(1000)),
            },
            "latency" => Fault::Latency(Duration::from_millis(
                ms.take()
                    .ok_or_else(|| format!("fault {spec:?}: latency needs ms=N"))?,
            )),
            _ => {
                return Err(format!(
                    "fault {spec:?}: unknown kind {kind:?} (status, slow-down-for, reset, stall, short, wrong-range, replace, latency, ignore-range, wrong-total, long, wrong-etag, dribble)"
                ));
            }
        };
        if kind != "status" && !positional.is_empty() {
            return Err(format!(
                "fault {spec:?}: unexpected field {:?}",
                positional[0]
            ));
        }
        if after.is_some() || ms.is_some() {
            return Err(format!("fault {spec:?}: {kind} takes no after= or ms="));
        }
        Ok(FaultRule {
            key_contains,
            method,
            times,
            fault,
        })
    }
}

/// The text form [`FaultRule::from_str`] reads.
impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fault {
            Fault::Status { status, code } => write!(f, "status:{status}:{code}")?,
            Fault::SlowDownFor(secs) => write!(f, "slow-down-for:ms={}", secs * 1000)?,
            Fault::ResetAfter(n) => write!(f, "reset:after={n}")?,
            Fault::StallAfter { after, stall } => {
                write!(f, "stall:after={after}:ms={}", stall.as_millis())?
            }
            Fault::ShortBody(n) => write!(f, "short:after={n}")?,
            Fault::WrongContentRange => f.write_str("wrong-range")?,
            Fault::Replace => f.write_str("replace")?,
            Fault::Latency(d) => write!(f, "latency:ms={}", d.as_millis())?,
            Fault::IgnoreRange => f.write_str("ignore-range")?,
            Fault::WrongTotal => f.write_str("wrong-total")?,
            Fault::LongBody(n) => write!(f, "long:after={n}")?,
            Fault::WrongEtag => f.write_str("wrong-etag")?,
            Fault::Dribble { after, every } => {
                write!(f, "dribble:after={after}:ms={}", every.as_millis())?
            }
        }
        match self.times {
            u32::MAX => f.write_str(":times=always")?,
            n => write!(f, ":times={n}")?,
        }
        if let Some(m) = self.method {
            write!(f, ":method={m}")?;
        }
        if let Some(k) = &self.key_contains {
            write!(f, ":key={k}")?;
        }
        Ok(())
    }
}

/// The S3 error code usually sent with `status`.
fn default_code(status: u16) -> &'static str {
    match status {
        400 => "InvalidArgument",
        403 => "AccessDenied",
        404 => "NoSuchKey",
        412 => "PreconditionFailed",
        416 => "InvalidRange",
        500 => "InternalError",
        501 => "NotImplemented",
        503 => "SlowDown",
        _ => "InjectedFault",
    }
}

/// `code` as a `&'static str`: the known codes without allocating, others leaked (parsed once).
fn static_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "AccessDenied",
        "NoSuchKey",
        "NoSuchBucket",
        "RequestTimeout",
        "Throttling",
        "InvalidRange",
        "InvalidArgument",
        "PreconditionFailed",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or_else(|| Box::leak(code.to_owned().into_boxed_str()))
}

/// One GET of an object, as logged in [`Stats::get_log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRecord {
    pub bucket: String,
    pub key: String,
    /// The range asked for, half-open: `bytes=a-b` is `(a, b + 1)` as sent; `bytes=a-` and
    /// `bytes=-n` are resolved against the object's size (`None` if it is unknown). `None` without
    /// a `Range` header or with one that is ignored (malformed, several ranges).
    pub range: Option<(u64, u64)>,
    /// The status answered (a faulted response counts with the status it started with).
    pub status: u16,
}

/// What the server has done since it started or since [`TestServer::reset_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted.
    pub connections: u64,
    /// GETs of objects (any outcome).
    pub gets: u64,
    /// HEADs of objects (any outcome).
    pub heads: u64,
    /// Listings of a bucket.
    pub lists: u64,
    /// Everything else: bucket HEAD, location, list of buckets, malformed or unsupported requests.
    pub other: u64,
    /// Object bytes handed to the socket in GET bodies (not headers, listings or error bodies).
    pub body_bytes: u64,
    /// Requests hit by a fault rule.
    pub faults: u64,
    /// Every GET of an object, in the order they arrived.
    pub get_log: Vec<GetRecord>,
}

/// A running server; dropping it stops it and closes its connections.
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .field("root", &self.shared.root)
            .finish_non_exhaustive()
    }
}

impl TestServer {
    /// Binds the address (loopback only), then serves from a thread of its own with its own
    /// multi-thread tokio runtime, so it can be started from plain `#[test]` functions and from
    /// inside other runtimes alike.
    pub fn start(config: ServerConfig) -> io::Result<TestServer> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if !config.addr.ip().is_loopback() {
            return Err(invalid(format!(
                "{} is not a loopback address",
                config.addr
            )));
        }
        if config.conn_bandwidth == Some(0)
            || config.total_bandwidth == Some(0)
            || config.client_bandwidth == Some(0)
        {
            return Err(invalid(
                "a bandwidth limit must be at least 1 byte per second".into(),
            ));
        }
        if !config.root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", config.root.display()),
            ));
        }
        let listener = std::net::TcpListener::bind(config.addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let (shutdown, stop) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let server = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("s3-test-server".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .thread_name("s3-test-server-worker")
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let listener = match runtime.block_on(async { TcpListener::from_std(listener) }) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stop => {}
                        () = accept_loop(listener, server) => {}
                    }
                });
                // Dropping the runtime cancels every connection task, which closes the sockets.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("the server thread died while starting")),
        }
        Ok(TestServer {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for an S3 client's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a rule after the existing ones.
    ///
    /// # Panics
    /// If the rule's method is not `"GET"`, `"HEAD"` or `"LIST"`.
    pub fn add_fault(&self, rule: FaultRule) {
        if let Some(m) = rule.method {
            assert!(
                Op::parse(m).is_some(),
                "fault rule method {m:?} is not GET, HEAD or LIST"
            );
        }
        lock(&self.shared.faults).push(rule);
    }

    /// Removes every rule.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// The rules with their remaining uses.
    pub fn faults(&self) -> Vec<FaultRule> {
        lock(&self.shared.faults).clone()
    }

    /// A snapshot of the counters. Each counter moves before the bytes it counts are sent, so a
    /// client that has seen a response finds it counted.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// Sends no ETags from now on (object headers and listings), as some S3-compatible servers
    /// do; Last-Modified is then the only version an object has. A `Replace` fault makes it one
    /// second newer per replacement.
    pub fn without_etags(&self) {
        self.shared.no_etags.store(true, Ordering::Relaxed);
    }

    /// Puts every bucket in `region` from now on: a request signed for another region gets S3's
    /// answer for a bucket in another region, a 301 `PermanentRedirect` naming the bucket's region
    /// in `x-amz-bucket-region` (counted as `other`).
    pub fn set_bucket_region(&self, region: &str) {
        *lock(&self.shared.bucket_region) = Some(region.to_owned());
    }

    /// Lists ETags without their quotes from now on (object headers keep them), as NetApp ONTAP's
    /// S3 does.
    pub fn unquoted_listing_etags(&self) {
        self.shared
            .unquoted_listing_etags
            .store(true, Ordering::Relaxed);
    }

    /// Ignores `If-Unmodified-Since` from now on (it is honoured by default, as on S3).
    pub fn ignore_if_unmodified_since(&self) {
        self.shared
            .ignore_if_unmodified_since
            .store(true, Ordering::Relaxed);
    }

    /// Sets every counter back to zero and empties the GET log.
    pub fn reset_stats(&self) {
        *lock(&self.shared.stats) = Stats::default();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The kinds of request fault rules tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get,
    Head,
    List,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "GET",
            Op::Head => "HEAD",
            Op::List => "LIST",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        [Op::Get, Op::Head, Op::List]
            .into_iter()
            .find(|op| op.name().eq_ignore_ascii_case(s))
    }
}

/// State shared by the handle and every connection.
struct Shared {
    root: PathBuf,
    latency: Duration,
    conn_bandwidth: Option<u64>,
    total: Option<Mutex<TokenBucket>>,
    client_bandwidth: Option<u64>,
    /// Per access key, the bucket of [`ServerConfig::client_bandwidth`].
    clients: Mutex<HashMap<String, Arc<Mutex<TokenBucket>>>>,
    /// Body bytes per shaped write, small enough for a smooth rate.
    slice: usize,
    faults: Mutex<Vec<FaultRule>>,
    stats: Mutex<Stats>,
    /// Per `bucket/key`: how many times a `Replace` fault has overwritten it.
    generations: Mutex<HashMap<String, u64>>,
    request_ids: AtomicU64,
    /// Send no ETags (headers and listings), as some S3-compatible servers do.
    no_etags: AtomicBool,
    /// List ETags without their quotes.
    unquoted_listing_etags: AtomicBool,
    /// The region every bucket is in, when requests must be signed for it.
    bucket_region: Mutex<Option<String>>,
    /// Ignore `If-Unmodified-Since` (honoured by default, as S3 does).
    ignore_if_unmodified_since: AtomicBool,
}

impl Shared {
    fn new(config: ServerConfig) -> Self {
        let slowest = config
            .conn_bandwidth
            .into_iter()
            .chain(config.total_bandwidth)
            .chain(config.client_bandwidth)
            .min();
        let slice = slowest.map_or(CHUNK, slice_for);
        Shared {
            root: config.root,
            latency: config.latency,
            conn_bandwidth: config.conn_bandwidth,
            total: config
                .total_bandwidth
                .map(|r| Mutex::new(TokenBucket::new(r, slice))),
            client_bandwidth: config.client_bandwidth,
            clients: Mutex::new(HashMap::new()),
            slice,
            faults: Mutex::new(Vec::new()),
            stats: Mutex::new(Stats::default()),
            generations: Mutex::new(HashMap::new()),
            request_ids: AtomicU64::new(1),
            no_etags: AtomicBool::new(false),
            unquoted_listing_etags: AtomicBool::new(false),
            bucket_region: Mutex::new(None),
            ignore_if_unmodified_since: AtomicBool::new(false),
        }
    }

    /// The bucket of the client that sent `req` (by its access key), with a per-client cap.
    fn client_bucket(&self, req: &Request) -> Option<Arc<Mutex<TokenBucket>>> {
        let rate = self.client_bandwidth?;
        let key = req
            .header("authorization")
            .and_then(|a| a.split("Credential=").nth(1))
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
            .to_owned();
        let mut clients = lock(&self.clients);
        let bucket = clients
            .entry(key)
            .or_insert_with(|| Arc::new(Mutex::new(TokenBucket::new(rate, self.slice))));
        Some(Arc::clone(bucket))
    }

    /// Takes one use of the first rule matching this request.
    fn take_fault(&self, op: Op, key: &str) -> Option<Fault> {
        let mut rules = lock(&self.faults);
        let rule = rules.iter_mut().find(|r| r.matches(op, key))?;
        if rule.times != u32::MAX {
            rule.times -= 1;
        }
        let fault = rule.fault.clone();
        drop(rules);
        lock(&self.stats).faults += 1;
        Some(fault)
    }

    fn generation(&self, bucket: &str, key: &str) -> u64 {
        lock(&self.generations)
            .get(&format!("{bucket}/{key}"))
            .copied()
            .unwrap_or(0)
    }

    fn bump_generation(&self, bucket: &str, key: &str) {
        *lock(&self.generations)
            .entry(format!("{bucket}/{key}"))
            .or_default() += 1;
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut lock(&self.stats));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Slices of about 10 ms at `rate`, between 1 KiB and 64 KiB.
fn slice_for(rate: u64) -> usize {
    (rate / 100).clamp(1024, 64 * 1024) as usize
}

/// A token bucket that lends: taking more than is there puts it in debt, and the taker sleeps
/// until the debt is paid, so many takers share the rate fairly.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64, slice: usize) -> Self {
        let rate = rate as f64;
        TokenBucket {
            rate,
            // Room for two slices or 20 ms of sending, so that oversleeping loses no tokens.
            burst: (2.0 * slice as f64).max(rate / 50.0),
            tokens: slice as f64,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens; returns how long to wait before sending them.
    fn take(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(Arc::clone(&shared), stream));
            }
            // Out of file descriptors and the like: wait for connections to close.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One parsed request head.
#[derive(Debug)]
struct Request {
    method: String,
    /// Percent-decoded path, starting with `/`.
    path: String,
    /// Percent-decoded query parameters, in order.
    query: Vec<(String, String)>,
    /// Headers with lowercase names.
    headers: Vec<(String, String)>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_request(head: &[u8]) -> Result<Request, &'static str> {
    let head = std::str::from_utf8(head).map_err(|_| "the request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err("unsupported HTTP version"),
    };
    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("malformed header line")?;
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err("malformed header name");
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    // Absolute form (`http://host/path`) as sent through proxies.
    let target = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    if !raw_path.starts_with('/') {
        return Err("the request target is not a path");
    }
    let path =
        percent_decode(raw_path, false).ok_or("the path is not valid percent-encoded UTF-8")?;
    let mut query = Vec::new();
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name =
            percent_decode(name, true).ok_or("the query is not valid percent-encoded UTF-8")?;
        let value =
            percent_decode(value, true).ok_or("the query is not valid percent-encoded UTF-8")?;
        query.push((name, value));
    }
    let tokens = headers
        .iter()
        .filter(|(n, _)| n == "connection")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    let has = |t: &str| tokens.iter().any(|x| x.eq_ignore_ascii_case(t));
    let keep_alive = if http10 {
        has("keep-alive")
    } else {
        !has("close")
    };
    Ok(Request {
        method: method.to_owned(),
        path,
        query,
        headers,
        keep_alive,
    })
}

fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes all but unreserved characters and `/` (for `encoding-type=url` listings).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A key is `/`-separated components, none empty, `.` or `..`, with no backslash or NUL.
fn valid_key(key: &str) -> bool {
    !key.contains(['\\', '\0'])
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn valid_bucket(bucket: &str) -> bool {
    !bucket.contains(['/', '\\', '\0']) && !bucket.is_empty() && bucket != "." && bucket != ".."
}

/// The body of a response.
#[derive(Debug)]
enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// `len` bytes of `file` from `start`.
    File {
        file: Arc<File>,
        start: u64,
        len: u64,
    },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    /// Announced in `Content-Length`; for a HEAD, the length a GET would have.
    content_length: u64,
    body: Body,
    /// A HEAD: the headers only.
    head: bool,
}

impl Response {
    fn new(status: u16, head: bool) -> Self {
        Response {
            status,
            headers: Vec::new(),
            content_length: 0,
            body: Body::Empty,
            head,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn body(mut self, body: Body) -> Self {
        self.content_length = body.len();
        if !self.head {
            self.body = body;
        }
        self
    }

    fn xml(self, xml: String) -> Self {
        self.header("Content-Type", "application/xml")
            .body(Body::Bytes(xml.into_bytes()))
    }

    /// An S3 error: XML body, or for a HEAD only the `x-amz-error-code` header.
    fn error(status: u16, code: &str, message: &str, resource: &str, head: bool) -> Self {
        if head {
            return Response::new(status, true).header("x-amz-error-code", code);
        }
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message><Resource>{}</Resource></Error>",
            xml_escape(code),
            xml_escape(message),
            xml_escape(resource)
        );
        Response::new(status, false).xml(xml)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        412 => "Precondition Failed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn standard_message(code: &str) -> &'static str {
    match code {
        "NoSuchKey" => "The specified key does not exist.",
        "NoSuchBucket" => "The specified bucket does not exist",
        "InvalidRange" => "The requested range is not satisfiable",
        "PreconditionFailed" => "At least one of the pre-conditions you specified did not hold",
        "SlowDown" => "Please reduce your request rate.",
        "InternalError" => "We encountered an internal error. Please try again.",
        "AccessDenied" => "Access Denied",
        _ => "Injected fault",
    }
}

/// Decides the response to one request (blocking: it opens files and walks folders).
fn route(shared: &Shared, req: &Request) -> (Response, Option<Fault>) {
    let head = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            shared.count(|s| s.other += 1);
            let msg = "The specified method is not allowed against this resource.";
            return (
                Response::error(405, "MethodNotAllowed", msg, &req.path, false),
                None,
            );
        }
    };
    let path = &req.path[1..];
    let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() && key.is_empty() {
        shared.count(|s| s.other += 1);
        return (list_buckets(shared, head), None);
    }
    if !valid_bucket(bucket) {
        shared.count(|s| s.other += 1);
        let msg = "The specified bucket is not valid.";
        return (
            Response::error(400, "InvalidBucketName", msg, &req.path, head),
            None,
        );
    }
    if let Some(region) = lock(&shared.bucket_region).clone() {
        let signed_for = req
            .header("authorization")
            .and_then(|a| a.split("Credential=").nth(1))
            .and_then(|c| c.split('/').nth(2));
        if signed_for.is_some_and(|r| r != region) {
            shared.count(|s| s.other += 1);
            let msg = "The bucket you are attempting to access must be addressed using the \
                       specified endpoint. Please send all future requests to this endpoint.";
            return (
                Response::error(301, "PermanentRedirect", msg, &req.path, head)
                    .header("x-amz-bucket-region", region),
                None,
            );
        }
    }
    if key.is_empty() {
        return bucket_request(shared, req, bucket, head);
    }
    object_request(shared, req, bucket, key, head)
}

/// An object opened for serving.
struct Object {
    file: Arc<File>,
    size: u64,
    mtime: SystemTime,
    etag: String,
}

fn object_request(
    shared: &Shared,
    req: &Request,
    bucket: &str,
    key: &str,
    head: bool,
) -> (Response, Option<Fault>) {
    let op = if head { Op::Head } else { Op::Get };
    shared.count(|s| match op {
        Op::Head => s.heads += 1,
        _ => s.gets += 1,
    });
    let range_header = req.header("range");
    let spec = range_header.and_then(RangeSpec::parse);
    let (response, fault, size) = if valid_key(key) {
        let fault = shared.take_fault(op, key);
        if fault == Some(Fault::Replace) {
            shared.bump_generation(bucket, key);
        }
        let object = open_object(shared, bucket, key, head);
        let size = object.as_ref().ok().map(|o| o.size);
        let response = match (&fault, object) {
            (Some(Fault::Status { status, code }), _) => {
                Response::error(*status, code, standard_message(code), &req.path, head)
            }
            (Some(Fault::SlowDownFor(secs)), _) => Response::error(
                503,
                "SlowDown",
                standard_message("SlowDown"),
                &req.path,
                head,
            )
            .header("Retry-After", secs.to_string()),
            (_, Ok(obj)) => serve_object(shared, req, obj, spec, head, fault.as_ref()),
            (_, Err(resp)) => *resp,
        };
        (response, fault, size)
    } else {
        let msg =
            "The key must be /-separated names, none empty, . or .., without backslash or NUL";
        (
            Response::error(400, "InvalidArgument", msg, &req.path, head),
            None,
            None,
        )
    };
    if !head {
        let range = spec.and_then(|s| s.requested(size));
        let record = GetRecord {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            range,
            status: response.status,
        };
        shared.count(|s| s.get_log.push(record));
    }
    (response, fault)
}

fn open_object(
    shared: &Shared,
    bucket: &str,
    key: &str,
    head: bool,
) -> Result<Object, Box<Response>> {
    let resource = format!("/{bucket}/{key}");
    let bucket_dir = shared.root.join(bucket);
    if !bucket_dir.is_dir() {
        let msg = standard_message("NoSuchBucket");
        return Err(Box::new(Response::error(
            404,
            "NoSuchBucket",
            msg,
            &resource,
            head,
        )));
    }
    let not_found = || {
        Box::new(Response::error(
            404,
            "NoSuchKey",
            standard_message("NoSuchKey"),
            &resource,
            head,
        ))
    };
    let file = match File::open(bucket_dir.join(key)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(Box::new(Response::error(
                403,
                "AccessDenied",
                "Access Denied",
                &resource,
                head,
            )));
        }
        Err(_) => return Err(not_found()),
    };
    let meta = match file.metadata() {
        Ok(m) if m.is_file() => m,
        _ => return Err(not_found()),
    };
    let generation = shared.generation(bucket, key);
    let mtime = replaced_mtime(meta.modified().unwrap_or(UNIX_EPOCH), generation);
    let etag = etag(meta.len(), mtime, generation);
    Ok(Object {
        file: Arc::new(file),
        size: meta.len(),
        mtime,
        etag,
    })
}

/// The modification time of an object replaced `generation` times: a second later per
/// replacement, so that a replaced object has a newer Last-Modified, as on S3.
fn replaced_mtime(mtime: SystemTime, generation: u64) -> SystemTime {
    mtime + Duration::from_secs(generation)
}

/// A quoted hex ETag from the size, modification time and generation (not the contents, which can
/// be GiBs).
fn etag(size: u64, mtime: SystemTime, generation: u64) -> String {
    let nanos = mtime.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut hasher = Sha256::new();
    hasher.update(size.to_le_bytes());
    hasher.update(nanos.to_le_bytes());
    hasher.update(generation.to_le_bytes());
    let digest = hasher.finalize();
    let mut out = String::with_capacity(34);
    out.push('"');
    for b in &digest[..16] {
        let _ = write!(out, "{b:02x}");
    }
    out.push('"');
    out
}

/// Whether an `If-Match` / `If-None-Match` value names `etag` (quoted or not, weak or not, `*`).
fn etag_listed(header: &str, etag: &str) -> bool {
    let bare = etag.trim_matches('"');
    header.split(',').map(str::trim).any(|t| {
        let t = t.strip_prefix("W/").unwrap_or(t);
        t == "*" || t == etag || t == bare
    })
}

/// A `Range` header's single byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeSpec {
    /// `bytes=a-b`, inclusive.
    FromTo(u64, u64),
    /// `bytes=a-`
    From(u64),
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

impl RangeSpec {
    /// `None` for anything that is not one well-formed byte range: such headers are ignored and
    /// the whole object is sent, as S3 does.
    fn parse(header: &str) -> Option<RangeSpec> {
        let spec = header.trim().strip_prefix("bytes=")?.trim();
        let (a, b) = spec.split_once('-')?;
        let num = |s: &str| {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                None
            } else {
                s.parse::<u64>().ok()
            }
        };
        match (a.is_empty(), b.is_empty()) {
            (false, false) => {
                let (a, b) = (num(a)?, num(b)?);
                (a <= b).then_some(RangeSpec::FromTo(a, b))
            }
            (false, true) => Some(RangeSpec::From(num(a)?)),
            (true, false) => Some(RangeSpec::Suffix(num(b)?)),
            (true, true) => None,
        }
    }

    /// The half-open range to send, or `None` if it cannot be satisfied (416).
    fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            RangeSpec::FromTo(a, b) if a < size => Some((a, b.saturating_add(1).min(size))),
            RangeSpec::From(a) if a < size => Some((a, size)),
            RangeSpec::Suffix(n) if n > 0 && size > 0 => Some((size - n.min(size), size)),
            _ => None,
        }
    }

    /// The half-open range asked for, for the GET log.
    fn requested(self, size: Option<u64>) -> Option<(u64, u64)> {
        match self {
            RangeSpec::FromTo(a, b) => Some((a, b.saturating_add(1))),
            RangeSpec::From(a) => size.map(|s| (a, s.max(a))),
            RangeSpec::Suffix(n) => size.map(|s| (s - n.min(s), s)),
        }
    }
}

fn serve_object(
    shared: &Shared,
    req: &Request,
    mut obj: Object,
    spec: Option<RangeSpec>,
    head: bool,
    fault: Option<&Fault>,
) -> Response {
    let resource = &req.path;
    let last_modified = http_date(obj.mtime);
    let wrong_range = fault == Some(&Fault::WrongContentRange);
    let no_etags = shared.no_etags.load(Ordering::Relaxed);
    if fault == Some(&Fault::WrongEtag) {
        // Another version's ETag, and the If-Match it fails is not checked.
        obj.etag = etag(obj.size, obj.mtime, u64::MAX);
    } else if let Some(h) = req.header("if-match")
        && !etag_listed(h, &obj.etag)
    {
        let code = "PreconditionFailed";
        return Response::error(412, code, standard_message(code), resource, head);
    }
    if let Some(h) = req.header("if-unmodified-since")
        && !shared.ignore_if_unmodified_since.load(Ordering::Relaxed)
        && parse_http_date(h).is_some_and(|since| epoch_seconds(obj.mtime) > since)
    {
        let code = "PreconditionFailed";
        return Response::error(412, code, standard_message(code), resource, head);
    }
    if let Some(h) = req.header("if-none-match")
        && etag_listed(h, &obj.etag)
    {
        return Response::new(304, head)
            .header("ETag", obj.etag)
            .header("Last-Modified", last_modified);
    }
    let spec = if fault == Some(&Fault::IgnoreRange) {
        None
    } else {
        spec
    };
    let range = match spec {
        None => None,
        Some(spec) => match spec.resolve(obj.size) {
            Some(r) => Some(r),
            None => {
                let code = "InvalidRange";
                return Response::error(416, code, standard_message(code), resource, head)
                    .header("Content-Range", format!("bytes */{}", obj.size));
            }
        },
    };
    let range = match (range, wrong_range) {
        (r, true) if obj.size >= 2 => {
            let (a, b) = r.unwrap_or((0, obj.size));
            Some(if b < obj.size {
                (a + 1, b + 1)
            } else if a > 0 {
                (a - 1, b - 1)
            } else {
                (1, b)
            })
        }
        (r, _) => r,
    };
    let (status, (start, end)) = match range {
        Some(r) => (206, r),
        None => (200, (0, obj.size)),
    };
    let mut resp = Response::new(status, head).header("Content-Type", "application/octet-stream");
    if !no_etags {
        resp = resp.header("ETag", obj.etag);
    }
    resp = resp
        .header("Last-Modified", last_modified)
        .header("Accept-Ranges", "bytes");
    if status == 206 {
        let total = match fault {
            Some(Fault::WrongTotal) => obj.size + 1,
            _ => obj.size,
        };
        resp = resp.header(
            "Content-Range",
            format!("bytes {start}-{}/{total}", end - 1),
        );
    }
    if let Some(Fault::LongBody(extra)) = fault {
        // The bytes asked for, then `extra` more (past the end of the object if need be).
        let mut bytes = vec![0; (end - start) as usize];
        if obj.file.read_exact_at(&mut bytes, start).is_ok() {
            bytes.resize(bytes.len() + *extra as usize, b'#');
            return resp.body(Body::Bytes(bytes));
        }
    }
    resp.body(Body::File {
        file: obj.file,
        start,
        len: end - start,
    })
}

fn bucket_request(
    shared: &Shared,
    req: &Request,
    bucket: &str,
    head: bool,
) -> (Response, Option<Fault>) {
    let exists = shared.root.join(bucket).is_dir();
    let resource = format!("/{bucket}");
    let no_bucket = |head| {
        let code = "NoSuchBucket";
        Response::error(404, code, standard_message(code), &resource, head)
    };
    if head || req.query("location").is_some() {
        shared.count(|s| s.other += 1);
        if !exists {
            return (no_bucket(head), None);
        }
        if head {
            return (
                Response::new(200, true).header("x-amz-bucket-region", "us-east-1"),
                None,
            );
        }
        // An empty constraint means us-east-1.
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<LocationConstraint xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"/>";
        return (Response::new(200, false).xml(xml.into()), None);
    }
    shared.count(|s| s.lists += 1);
    let prefix = req.query("prefix").unwrap_or_default();
    let fault = shared.take_fault(Op::List, prefix);
    if let Some(Fault::Status { status, code }) = fault {
        return (
            Response::error(status, code, standard_message(code), &resource, false),
            fault,
        );
    }
    if !exists {
        return (no_bucket(false), fault);
    }
    let resp = list_objects(shared, req, bucket).unwrap_or_else(|(code, msg)| {
        let status = if code == "InternalError" { 500 } else { 400 };
        Response::error(status, code, &msg, &resource, false)
    });
    (resp, fault)
}

/// A file found by a listing.
struct Listed {
    key: String,
    size: u64,
    mtime: SystemTime,
}

/// Collects the files under `base/rel` whose keys start with `prefix`, skipping folders that
/// cannot hold such keys and names that are not valid keys.
fn walk(base: &Path, rel: &str, prefix: &str, out: &mut Vec<Listed>) -> io::Result<()> {
    for entry in fs::read_dir(base.join(rel))? {
        let Ok(entry) = entry else { continue };
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.contains(['\\', '\0']) {
            continue;
        }
        let key = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            let folder = format!("{key}/");
            if folder.starts_with(prefix) || prefix.starts_with(&folder) {
                walk(base, &key, prefix, out)?;
            }
            continue;
        }
        // Regular files, and symlinks to them (never to folders: no loops).
        let Ok(meta) = fs::metadata(entry.path()) else {
            continue;
        };
        if meta.is_file() && key.starts_with(prefix) {
            out.push(Listed {
                key,
                size: meta.len(),
                mtime: meta.modified().unwrap_or(UNIX_EPOCH),
            });
        }
    }
    Ok(())
}

/// Where a listing page starts: after a key (`start-after`, or a page that ended on a key) or
/// after every key under a common prefix (a page that ended on one).
enum Marker {
    Key(String),
    Prefix(String),
}

impl Marker {
    fn token(&self) -> String {
        let (tag, s) = match self {
            Marker::Key(k) => ('k', k),
            Marker::Prefix(p) => ('p', p),
        };
        let mut out = String::with_capacity(1 + 2 * s.len());
        out.push(tag);
        for b in s.bytes() {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    fn from_token(token: &str) -> Option<Marker> {
        let mut chars = token.chars();
        let tag = chars.next()?;
        let hex = chars.as_str();
        if !hex.len().is_multiple_of(2) {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let s = String::from_utf8(bytes).ok()?;
        match tag {
            'k' => Some(Marker::Key(s)),
            'p' => Some(Marker::Prefix(s)),
            _ => None,
        }
    }

    fn passed(&self, key: &str) -> bool {
        match self {
            Marker::Key(k) => key <= k.as_str(),
            Marker::Prefix(p) => key <= p.as_str() || key.starts_with(p.as_str()),
        }
    }
}

/// ListObjectsV2, or `(code, message)` of a client error.
fn list_objects(
    shared: &Shared,
    req: &Request,
    bucket: &str,
) -> Result<Response, (&'static str, String)> {
    let prefix = req.query("prefix").unwrap_or_default();
    let delimiter = req.query("delimiter").filter(|d| !d.is_empty());
    let max_keys = match req.query("max-keys") {
        None => MAX_KEYS,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ("InvalidArgument", format!("max-keys {v:?} is not a number")))?
            .min(MAX_KEYS),
    };
    let url = match req.query("encoding-type") {
        None => false,
        Some("url") => true,
        Some(other) => {
            return Err((
                "InvalidArgument",
                format!("Invalid Encoding Method specified: {other:?}"),
            ));
        }
    };
    let token = req.query("continuation-token");
    let start_after = req.query("start-after");
    let marker = match (token, start_after) {
        (Some(t), _) => Some(Marker::from_token(t).ok_or((
            "InvalidArgument",
            "The continuation token provided is incorrect".to_owned(),
        ))?),
        (None, Some(s)) if !s.is_empty() => Some(Marker::Key(s.to_owned())),
        _ => None,
    };

    let mut objects = Vec::new();
    walk(&shared.root.join(bucket), "", prefix, &mut objects).map_err(|e| {
        (
            "InternalError",
            format!("cannot list the bucket's folder: {e}"),
        )
    })?;
    objects.sort_unstable_by(|a, b| a.key.cmp(&b.key));

    let mut contents: Vec<&Listed> = Vec::new();
    let mut prefixes: Vec<&str> = Vec::new();
    let mut last: Option<Marker> = None;
    let mut truncated = false;
    for obj in &objects {
        if marker.as_ref().is_some_and(|m| m.passed(&obj.key)) {
            continue;
        }
        let common = delimiter.and_then(|d| {
            let rest = &obj.key[prefix.len()..];
            rest.find(d).map(|i| &obj.key[..prefix.len() + i + d.len()])
        });
        if let Some(p) = common
            && prefixes.last() == Some(&p)
        {
            continue;
        }
        if contents.len() + prefixes.len() == max_keys {
            truncated = max_keys > 0;
            break;
        }
        match common {
            Some(p) => {
                prefixes.push(p);
                last = Some(Marker::Prefix(p.to_owned()));
            }
            None => {
                contents.push(obj);
                last = Some(Marker::Key(obj.key.clone()));
            }
        }
    }

    let enc = |s: &str| {
        if url {
            percent_encode(s)
        } else {
            xml_escape(s)
        }
    };
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
    );
    let _ = write!(
        xml,
        "<Name>{}</Name><Prefix>{}</Prefix>",
        xml_escape(bucket),
        enc(prefix)
    );
    if let Some(d) = delimiter {
        let _ = write!(xml, "<Delimiter>{}</Delimiter>", enc(d));
    }
    let _ = write!(xml, "<MaxKeys>{max_keys}</MaxKeys>");
    if url {
        xml.push_str("<EncodingType>url</EncodingType>");
    }
    let _ = write!(
        xml,
        "<KeyCount>{}</KeyCount>",
        contents.len() + prefixes.len()
    );
    if let Some(t) = token {
        let _ = write!(
            xml,
            "<ContinuationToken>{}</ContinuationToken>",
            xml_escape(t)
        );
    }
    if let Some(s) = start_after {
        let _ = write!(xml, "<StartAfter>{}</StartAfter>", enc(s));
    }
    let _ = write!(xml, "<IsTruncated>{truncated}</IsTruncated>");
    if truncated && let Some(m) = &last {
        let _ = write!(
            xml,
            "<NextContinuationToken>{}</NextContinuationToken>",
            m.token()
        );
    }
    let generations = lock(&shared.generations);
    for obj in contents {
        let generation = generations
            .get(&format!("{bucket}/{}", obj.key))
            .copied()
            .unwrap_or(0);
        let mtime = replaced_mtime(obj.mtime, generation);
        let etag = if shared.no_etags.load(Ordering::Relaxed) {
            String::new()
        } else {
            let mut tag = etag(obj.size, mtime, generation);
            if shared.unquoted_listing_etags.load(Ordering::Relaxed) {
                tag = tag.trim_matches('"').to_owned();
            }
            format!("<ETag>{}</ETag>", xml_escape(&tag))
        };
        let _ = write!(
            xml,
            "<Contents><Key>{}</Key><LastModified>{}</LastModified>{etag}<Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            enc(&obj.key),
            iso_date(mtime),
            obj.size
        );
    }
    drop(generations);
    for p in prefixes {
        let _ = write!(
            xml,
            "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
            enc(p)
        );
    }
    xml.push_str("</ListBucketResult>");
    Ok(Response::new(200, false).xml(xml))
}

/// ListBuckets: the subfolders of the root.
fn list_buckets(shared: &Shared, head: bool) -> Response {
    let mut buckets = Vec::new();
    if let Ok(entries) = fs::read_dir(&shared.root) {
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Ok(meta) = fs::metadata(entry.path()) else {
                continue;
            };
            if meta.is_dir() && valid_bucket(&name) {
                buckets.push((name, meta.modified().unwrap_or(UNIX_EPOCH)));
            }
        }
    }
    buckets.sort();
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListAllMyBucketsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Owner><ID>test</ID><DisplayName>test</DisplayName></Owner><Buckets>",
    );
    for (name, created) in buckets {
        let _ = write!(
            xml,
            "<Bucket><Name>{}</Name><CreationDate>{}</CreationDate></Bucket>",
            xml_escape(&name),
            iso_date(created)
        );
    }
    xml.push_str("</Buckets></ListAllMyBucketsResult>");
    Response::new(200, head).xml(xml)
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Whole seconds since the epoch (times before it count as the epoch).
fn epoch_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// RFC 1123 (IMF-fixdate) as HTTP wants it: `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = epoch_seconds(t);
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let s = secs % 86_400;
    format!(
        "{}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[month as usize - 1],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP
/// clients send; `None` for anything else.
fn parse_http_date(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_, rest) = s.trim().split_once(", ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    // Days from civil (Howard Hinnant), the inverse of `civil_from_days`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()
}

/// ISO 8601 as S3 listings write it: `2009-10-12T17:50:30.000Z`.
pub fn iso_date(t: SystemTime) -> String {
    let secs = epoch_seconds(t);
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// What a body fault does after the first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    None,
    Reset(u64),
    Stall(u64, Duration),
    Short(u64),
    Dribble(u64, Duration),
}

/// One client connection.
struct Conn {
    stream: TcpStream,
    /// Bytes read past the current request head.
    input: Vec<u8>,
    /// Object buffers, kept for the next request.
    buffers: Vec<Vec<u8>>,
    bucket: Option<TokenBucket>,
    /// The per-client bucket of the request being answered.
    client: Option<Arc<Mutex<TokenBucket>>>,
}

enum HeadError {
    Io,
    TooLarge,
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    shared.count(|s| s.connections += 1);
    let mut conn = Conn {
        stream,
        input: Vec::with_capacity(4096),
        buffers: Vec::new(),
        bucket: shared
            .conn_bandwidth
            .map(|r| TokenBucket::new(r, shared.slice)),
        client: None,
    };
    loop {
        let head = match conn.read_head().await {
            Ok(Some(head)) => head,
            Ok(None) | Err(HeadError::Io) => return,
            Err(HeadError::TooLarge) => {
                shared.count(|s| s.other += 1);
                let resp = Response::error(
                    400,
                    "BadRequest",
                    "the request head is too large",
                    "/",
                    false,
                );
                let _ = conn.send(&shared, resp, None, false).await;
                return;
            }
        };
        let req = match parse_request(&head) {
            Ok(req) => req,
            Err(msg) => {
                shared.count(|s| s.other += 1);
                let resp = Response::error(400, "BadRequest", msg, "/", false);
                let _ = conn.send(&shared, resp, None, false).await;
                return;
            }
        };
        let mut keep_alive = req.keep_alive;
        if req.header("transfer-encoding").is_some() {
            shared.count(|s| s.other += 1);
            let msg = "chunked request bodies are not supported";
            let resp = Response::error(501, "NotImplemented", msg, &req.path, req.method == "HEAD");
            let _ = conn.send(&shared, resp, None, false).await;
            return;
        }
        if req
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            // The body waits for a 100 Continue that never comes: answer and close instead.
            keep_alive = false;
        } else {
            let length = match req.header("content-length").map(str::parse::<u64>) {
                None => 0,
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    shared.count(|s| s.other += 1);
                    let resp = Response::error(
                        400,
                        "BadRequest",
                        "invalid Content-Length",
                        &req.path,
                        false,
                    );
                    let _ = conn.send(&shared, resp, None, false).await;
                    return;
                }
            };
            if conn.discard(length).await.is_err() {
                return;
            }
        }
        conn.client = shared.client_bucket(&req);
        let server = Arc::clone(&shared);
        let Ok((resp, fault)) = tokio::task::spawn_blocking(move || route(&server, &req)).await
        else {
            return;
        };
        match conn.send(&shared, resp, fault, keep_alive).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
    }
}

impl Conn {
    /// The next request head, `None` at a clean end of the connection.
    async fn read_head(&mut self) -> Result<Option<Vec<u8>>, HeadError> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.input[searched..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                let end = searched + i + 4;
                if end > MAX_HEAD {
                    return Err(HeadError::TooLarge);
                }
                let head = self.input[..end].to_vec();
                self.input.drain(..end);
                return Ok(Some(head));
            }
            searched = self.input.len().saturating_sub(3);
            if self.input.len() > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            self.input.reserve(4096);
            match self.stream.read_buf(&mut self.input).await {
                Ok(0) if self.input.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(HeadError::Io),
                Ok(_) => {}
            }
        }
    }

    /// Reads and drops a request body of `length` bytes.
    async fn discard(&mut self, mut length: u64) -> io::Result<()> {
        let buffered = (self.input.len() as u64).min(length);
        self.input.drain(..buffered as usize);
        length -= buffered;
        if length == 0 {
            return Ok(());
        }
        let mut scratch = vec![0; 64 * 1024];
        while length > 0 {
            let want = scratch.len().min(length as usize);
            let n = self.stream.read(&mut scratch[..want]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            length -= n as u64;
        }
        Ok(())
    }

    /// Sends one response, applying latency, shaping and a fault; `Ok(true)` if the connection
    /// stays open for the next request.
    async fn send(
        &mut self,
        shared: &Shared,
        resp: Response,
        fault: Option<Fault>,
        keep_alive: bool,
    ) -> io::Result<bool> {
        let mut delay = shared.latency;
        let cut = match fault {
            Some(Fault::Latency(d)) => {
                delay += d;
                Cut::None
            }
            Some(Fault::ResetAfter(n)) => Cut::Reset(n),
            Some(Fault::StallAfter { after, stall }) => Cut::Stall(after, stall),
            Some(Fault::ShortBody(n)) => Cut::Short(n),
            Some(Fault::Dribble { after, every }) => Cut::Dribble(after, every),
            _ => Cut::None,
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let limit = match cut {
            Cut::None => resp.body.len(),
            Cut::Reset(n) | Cut::Stall(n, _) | Cut::Short(n) | Cut::Dribble(n, _) => {
                n.min(resp.body.len())
            }
        };
        // A HEAD has no body to cut short: the fault hits before the headers.
        if !(resp.head && cut != Cut::None) {
            let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
            let id = shared.request_ids.fetch_add(1, Ordering::Relaxed);
            let _ = write!(
                head,
                "Server: s3-test-server\r\nx-amz-request-id: {id:016X}\r\nDate: {}\r\nContent-Length: {}\r\n",
                http_date(SystemTime::now()),
                resp.content_length
            );
            for (name, value) in &resp.headers {
                let _ = write!(head, "{name}: {value}\r\n");
            }
            if !keep_alive {
                head.push_str("Connection: close\r\n");
            }
            head.push_str("\r\n");
            match &resp.body {
                // Small bodies go out with the headers in one write.
                Body::Bytes(b)
                    if cut == Cut::None
                        && shared.total.is_none()
                        && self.bucket.is_none()
                        && self.client.is_none() =>
                {
                    let mut all = head.into_bytes();
                    all.extend_from_slice(b);
                    self.stream.write_all(&all).await?;
                }
                body => {
                    self.stream.write_all(head.as_bytes()).await?;
                    self.write_body(shared, body, limit).await?;
                    if let Cut::Dribble(_, every) = cut {
                        self.dribble(shared, body, limit, every).await?;
                    }
                }
            }
        }
        match cut {
            Cut::None | Cut::Dribble(..) if keep_alive => return Ok(true),
            Cut::None | Cut::Short(_) | Cut::Dribble(..) => {}
            Cut::Reset(_) => {
                tokio::time::sleep(RESET_GRACE).await;
                self.stream.set_zero_linger()?;
                return Ok(false);
            }
            Cut::Stall(_, stall) => tokio::time::sleep(stall).await,
        }
        self.stream.shutdown().await?;
        Ok(false)
    }

    async fn write_body(&mut self, shared: &Shared, body: &Body, limit: u64) -> io::Result<()> {
        let (file, start) = match body {
            Body::Empty => return Ok(()),
            Body::Bytes(b) => return self.write_shaped(shared, &b[..limit as usize]).await,
            Body::File { file, start, .. } => (file, *start),
        };
        let end = start + limit;
        let want = |off: u64| (end - off).min(CHUNK as u64) as usize;
        let mut off = start;
        if off == end {
            return Ok(());
        }
        let first = self.buffers.pop().unwrap_or_default();
        let mut spare = Some(self.buffers.pop().unwrap_or_default());
        let (mut current, n) = read_chunk(Arc::clone(file), first, off, want(off))
            .await
            .map_err(io::Error::other)?;
        let mut n = n?;
        loop {
            let next = off + n as u64;
            // Read the next chunk while this one is written.
            let pending = match spare.take() {
                Some(buf) if next < end => {
                    Some(read_chunk(Arc::clone(file), buf, next, want(next)))
                }
                buf => {
                    spare = buf;
                    None
                }
            };
            shared.count(|s| s.body_bytes += n as u64);
            self.write_shaped(shared, &current[..n]).await?;
            off = next;
            let Some(pending) = pending else { break };
            let (buf, result) = pending.await.map_err(io::Error::other)?;
            spare = Some(std::mem::replace(&mut current, buf));
            n = result?;
        }
        self.buffers.push(current);
        self.buffers.extend(spare);
        Ok(())
    }

    /// Sends the body from byte `from` on one byte at a time, `every` apart.
    async fn dribble(
        &mut self,
        shared: &Shared,
        body: &Body,
        from: u64,
        every: Duration,
    ) -> io::Result<()> {
        let rest = match body {
            Body::Empty => return Ok(()),
            Body::Bytes(b) => b[from as usize..].to_vec(),
            Body::File { file, start, len } => {
                let mut rest = vec![0; (len - from) as usize];
                file.read_exact_at(&mut rest, start + from)?;
                rest
            }
        };
        for byte in rest {
            tokio::time::sleep(every).await;
            shared.count(|s| s.body_bytes += 1);
            self.stream.write_all(&[byte]).await?;
        }
        Ok(())
    }

    /// Writes body bytes, in small slices paced by the token buckets if any.
    async fn write_shaped(&mut self, shared: &Shared, data: &[u8]) -> io::Result<()> {
        if self.bucket.is_none() && shared.total.is_none() && self.client.is_none() {
            return self.stream.write_all(data).await;
        }
        for slice in data.chunks(shared.slice) {
            let now = Instant::now();
            let mut wait = Duration::ZERO;
            if let Some(bucket) = &mut self.bucket {
                wait = wait.max(bucket.take(slice.len(), now));
            }
            if let Some(total) = &shared.total {
                wait = wait.max(lock(total).take(slice.len(), now));
            }
            if let Some(client) = &self.client {
                wait = wait.max(lock(client).take(slice.len(), now));
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            self.stream.write_all(slice).await?;
        }
        Ok(())
    }
}

/// Starts reading `len` bytes of `file` at `offset` into `buf` on a blocking thread; the buffer
/// comes back with the count read.
fn read_chunk(file: Arc<File>, mut buf: Vec<u8>, offset: u64, len: usize) -> ReadJob {
    tokio::task::spawn_blocking(move || {
        if buf.len() < CHUNK {
            buf.resize(CHUNK, 0);
        }
        let mut done = 0;
        while done < len {
            match file.read_at(&mut buf[done..len], offset + done as u64) {
                Ok(0) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the object shrank while being served",
                    );
                    return (buf, Err(e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (buf, Err(e)),
            }
        }
        (buf, Ok(len))
    })
}

/// A positional read under way: the buffer and the count read (or why not).
type ReadJob = tokio::task::JoinHandle<(Vec<u8>, io::Result<usize>)>;
