//! A checkpoint behind a plain HTTP(S) URL (a public mirror, a model hub, a CDN): HEADs and ranged
//! GETs, nothing else.
//!
//! Object `NAME` of a checkpoint at `https://host/path/ckpt` is `https://host/path/ckpt/NAME` (a
//! query string on the base, such as a container-wide access token, goes with every object), or
//! the URL a [`UrlList`] gives for it (presigned URLs, one per file). There is no listing over
//! HTTP: [`ObjectStore::list`] fails, and callers ask for each file by name.
//!
//! Like the S3 source: one loop retries requests that fail (5xx, 429, timeouts, broken
//! connections, stalls) with exponential backoff and full jitter, and resumes a body that breaks
//! mid-stream from the last byte received. Every ranged GET is pinned to the version seen first
//! (`If-Match` and `If-Range` on a strong ETag, else `If-Unmodified-Since` on the Last-Modified
//! date), and its `Content-Range` and ETag are checked, so the bytes of one file always come from
//! one version of it. Redirects are followed here, not by the client, so that the headers a person
//! gives (tokens) go only to the origin they named, never to another host.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode, Url};

use super::Receive;
use super::resume::{self, Attempts, Body, Failure, Received};
use super::{
    BoxFuture, ObjectMeta, ObjectName, ObjectStore, RetryPolicy, SourceError, TransferStats, fits,
};

/// Redirects followed for one request before giving up.
const MAX_REDIRECTS: usize = 10;

/// Whether a redirect's target that answered before refuses now, as a signed URL does once it
/// has expired (S3 and CloudFront 403, GCS 400, others 401, 404 or 410).
fn refused_target(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 401 | 403 | 404 | 410)
}

/// The prefix of an [`ObjectMeta::version`] that holds a Last-Modified date, not an ETag.
const LAST_MODIFIED: &str = "Last-Modified ";

/// What a refused server certificate is said to be, in a [`SourceError::Request`]'s detail: see
/// [`is_untrusted_certificate`].
const UNTRUSTED: &str = "is not trusted";

/// Whether a [`SourceError`] is a server certificate that TLS refused (for the hint to pass
/// `--ca-bundle`).
pub fn is_untrusted_certificate(e: &SourceError) -> bool {
    matches!(e, SourceError::Request { detail, .. }
        if detail.starts_with("the certificate of ") && detail.contains(UNTRUSTED))
}

/// The error of a server certificate that TLS refused, at `host` (`HOST:PORT`).
pub(super) fn untrusted(name: &str, host: &str, detail: &str) -> SourceError {
    SourceError::Request {
        name: name.to_owned(),
        detail: format!("the certificate of {host} {UNTRUSTED} ({detail})"),
    }
}

/// The environment variable of extra headers, one `Name: value` a line.
pub const HEADERS_ENV: &str = "DCPFETCH_HTTP_HEADERS";
/// The environment variable of a bearer token (sent as `Authorization: Bearer TOKEN`).
pub const BEARER_ENV: &str = "DCPFETCH_HTTP_BEARER_TOKEN";

/// The base URL of a checkpoint over HTTP(S). It prints without its password or query string
/// (which often carry a token): in messages, `--json` output and `Debug` alike.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl(Url);

impl HttpUrl {
    /// An `http://` or `https://` URL with a host and no fragment; a trailing `/` is dropped.
    pub fn parse(s: &str) -> Result<HttpUrl, String> {
        let mut url =
            Url::parse(s).map_err(|e| format!("{:?} is not a valid URL: {e}", redact(s)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{:?}: only http:// and https:// URLs", redact(s)));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{:?} names no host", redact(s)));
        }
        if url.fragment().is_some() {
            return Err(format!(
                "{:?}: a checkpoint URL has no #fragment",
                redact(s)
            ));
        }
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
        }
        Ok(HttpUrl(url))
    }

    /// The URL of one object of the checkpoint (name components percent-encoded as needed).
    pub fn object(&self, name: &ObjectName) -> Url {
        let mut url = self.0.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(name.as_str().split('/'));
        }
        url
    }

    /// The URL itself, secrets included: for requests only.
    pub fn url(&self) -> &Url {
        &self.0
    }
}

/// A URL as printed: no password, no query string.
fn redact(s: &str) -> String {
    match Url::parse(s) {
        Ok(u) => HttpUrl(u).to_string(),
        Err(_) => match s.split_once('?') {
            Some((before, _)) => format!("{before}?<redacted>"),
            None => s.to_owned(),
        },
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("redacted"));
        }
        let query = shown.query().is_some();
        shown.set_query(None);
        let s = shown.as_str();
        // The root of a host prints as `https://host`, like any other base without its `/`.
        let s = if shown.path() == "/" {
            s.trim_end_matches('/')
        } else {
            s
        };
        write!(f, "{s}")?;
        if query {
            write!(f, "?<redacted>")?;
        }
        Ok(())
    }
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HttpUrl({:?})", self.to_string())
    }
}

/// One extra request header (`--header`, the environment). Its value is a secret: it is never
/// printed, in messages or in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpHeader {
    name: HeaderName,
    value: HeaderValue,
}

impl HttpHeader {
    /// `Name: value`. The error never quotes the value (nor the line, which may be all value).
    pub fn parse(line: &str) -> Result<HttpHeader, String> {
        let Some((name, value)) = line.split_once(':') else {
            return Err("a header must be written 'Name: value' (the line is not printed)".into());
        };
        let name = name.trim();
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            if name.len() <= 64 && name.bytes().all(|b| b.is_ascii_graphic()) {
                format!("{name:?} is not a valid header name")
            } else {
                "a header name is not valid (it is not printed)".to_owned()
            }
        })?;
        let mut value = HeaderValue::from_str(value.trim()).map_err(|_| {
            format!("the value of header {name} is not a valid header value (it is not printed)")
        })?;
        value.set_sensitive(true);
        Ok(HttpHeader { name, value })
    }

    /// `Authorization: Bearer TOKEN`.
    pub fn bearer(token: &str) -> Result<HttpHeader, String> {
        HttpHeader::parse(&format!("Authorization: Bearer {}", token.trim()))
            .map_err(|_| format!("{BEARER_ENV} is not a valid token (it is not printed)"))
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }
}

impl fmt::Debug for HttpHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: <redacted>", self.name)
    }
}

/// The URL of each file of a checkpoint, where each has its own (`--url-list`: presigned URLs,
/// signed CDN URLs), by file name: the last segment of the URL's path. Like [`HttpUrl`], it never
/// prints a URL's query string.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UrlList {
    /// Each file's line in the list, and its URL.
    by_name: HashMap<String, (usize, Url)>,
}

impl UrlList {
    /// Most bytes of a list file: about 40,000 presigned URLs of 1.5 KiB.
    pub const MAX_BYTES: u64 = 64 << 20;

    /// One `http://` or `https://` URL a line; blank lines and lines that start with `#` are
    /// skipped. Every error names its line and prints no query string.
    pub fn parse(text: &str) -> Result<UrlList, String> {
        let mut by_name: HashMap<String, (usize, Url)> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let (n, line) = (i + 1, line.trim());
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let url = HttpUrl::parse(line).map_err(|e| format!("line {n}: {e}"))?;
            let name = url
                .url()
                .path_segments()
                .and_then(|mut s| s.next_back())
                .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("line {n}: {url} names no file"))?
                .into_owned();
            if let Some((first, _)) = by_name.get(&name) {
                return Err(format!(
                    "line {n}: a second URL for {name:?} (the first is on line {first})"
                ));
            }
            by_name.insert(name, (n, url.0));
        }
        if by_name.is_empty() {
            return Err("it holds no URL".into());
        }
        Ok(UrlList { by_name })
    }

    /// Reads and parses a list file.
    pub fn read(path: &std::path::Path) -> Result<UrlList, String> {
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(file, Self::MAX_BYTES + 1),
            &mut text,
        )
        .map_err(|e| format!("{shown}: {e}"))?;
        if text.len() as u64 > Self::MAX_BYTES {
            return Err(format!("{shown}: more than {} MiB", Self::MAX_BYTES >> 20));
        }
        Self::parse(&text).map_err(|e| format!("{shown}: {e}"))
    }

    /// The URL the list gives for the object `name`.
    fn get(&self, name: &ObjectName) -> Option<&Url> {
        self.by_name.get(name.as_str()).map(|(_, url)| url)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl fmt::Debug for UrlList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UrlList({} files)", self.by_name.len())
    }
}

/// How to reach a checkpoint over HTTP.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Sent with every request to the checkpoint's origin (scheme, host and port), and dropped
    /// when a redirect leads to another.
    pub headers: Vec<HttpHeader>,
    /// Trust only the certificates of this PEM bundle (else the system's).
    pub ca_bundle: Option<PathBuf>,
    pub retry: RetryPolicy,
    /// Open every GET `--concurrency` allows from the start, without the ramp: a `bench` sweep
    /// measures the concurrency it names.
    pub no_ramp: bool,
    /// Where files have URLs of their own (`--url-list`); the others are `base/NAME`.
    pub urls: Option<Arc<UrlList>>,
}

impl HttpOptions {
    /// Options from the command line and the environment (`env` looks a variable up):
    /// `DCPFETCH_HTTP_BEARER_TOKEN`, then `DCPFETCH_HTTP_HEADERS` (one header a line), then the
    /// `--header` flags; a later header replaces an earlier one of the same name. Without
    /// `--ca-bundle` the system's roots are trusted, `SSL_CERT_FILE` and `SSL_CERT_DIR` included
    /// (`source::tls`).
    pub fn resolve(
        flags: &[String],
        ca_bundle: Option<PathBuf>,
        env: impl Fn(&str) -> Option<String>,
        retry: RetryPolicy,
    ) -> Result<HttpOptions, String> {
        let mut headers: Vec<HttpHeader> = Vec::new();
        let mut add = |h: HttpHeader| {
            headers.retain(|old| old.name != h.name);
            headers.push(h);
        };
        if let Some(token) = env(BEARER_ENV).filter(|t| !t.trim().is_empty()) {
            add(HttpHeader::bearer(&token)?);
        }
        if let Some(lines) = env(HEADERS_ENV) {
            for line in lines.lines().filter(|l| !l.trim().is_empty()) {
                add(HttpHeader::parse(line).map_err(|e| format!("{HEADERS_ENV}: {e}"))?);
            }
        }
        for line in flags {
            add(HttpHeader::parse(line).map_err(|e| format!("--header: {e}"))?);
        }
        Ok(HttpOptions {
            headers,
            ca_bundle,
            retry,
            no_ramp: false,
            urls: None,
        })
    }
}

/// A checkpoint at an HTTP(S) URL.
#[derive(Debug, Clone)]
pub struct HttpSource {
    client: Client,
    base: HttpUrl,
    urls: Option<Arc<UrlList>>,
    headers: Vec<HttpHeader>,
    retry: RetryPolicy,
    stats: Arc<TransferStats>,
    ramp: Arc<Ramp>,
    /// Whether any request got an answer: a refused connection after that is a server
    /// restarting (retried), before it a wrong address (not retried).
    reached: Arc<AtomicBool>,
    /// Where each file's requests were redirected to (a hub's `resolve` URL to a signed CDN URL):
    /// later requests for the file go there at once, instead of paying the origin a round trip
    /// (and its time to sign) for every part.
    resolved: Arc<std::sync::Mutex<HashMap<ObjectName, Url>>>,
}

/// Ranged GETs a source starts with at once (the engine's `--concurrency` bounds them too). The
/// first decision of the ramp doubles it whatever the rate, so a near server is measured at 2 and 4.
const FIRST_CONNECTIONS: usize = 2;
/// The most ranged GETs at once the ramp opens to (the engine's limit is lower).
const MAX_CONNECTIONS: usize = 1024;
/// Doubling the GETs in flight paid off when the bytes per second grew by this factor.
const PAYS_OFF: f64 = 1.25;
/// A link whose answers take this long to start is far away: connections pay at once.
const FAR: Duration = Duration::from_millis(5);
/// A link where one connection moves less than this (bytes per second) is the bottleneck
/// (per-connection caps, latency): connections pay at once.
const SLOW_CONNECTION: f64 = 100e6;
/// The shortest measuring window (a rate over less is noise).
const MIN_WINDOW: Duration = Duration::from_millis(20);

/// How many ranged GETs run at once: [`FIRST_CONNECTIONS`] at first, then all the engine allows
/// when the link is far or slow per connection (a CDN, S3 behind a URL), else doubled while
/// the bytes per second grow by a quarter with it. Where the server shares the machine (loopback, a cache on
/// the node), more connections only cost CPU: with 32 on 2 cores dcpfetch was 0.6x curl, with 4
/// at or above it, and a stream holds the bytes of every GET but the first until their turn: 2
/// moved them as fast as 4 with two thirds of the memory (docs/performance.md).
///
/// Slots follow the order the engine consumes parts (files in natural order, then offsets): waiting
/// reads get them in that order, not in the order their tasks happened to run, and a read keeps its
/// slot over all its attempts, which comes back only when that read and every read before it are
/// done. So no read starts more than `limit` reads after the oldest one still arriving. Where one
/// connection falls behind (on loopback the kernel grows the buffers of the connections read
/// fastest, and two of them took nearly all the bytes while others got a trickle for a quarter of
/// a second), the later reads stop there instead of running on and holding their bytes in memory
/// until the late one arrives, and the late one gets the machine to itself. A read before every
/// read holding a slot gets one, over the limit if need be, when it asks or as soon as the reads
/// before it leave (even after the limit fell): a stream's reads before their turn stop reading
/// (and keep their slots) when its memory is taken, and only the first one in line can move the
/// stream on.
#[derive(Debug)]
struct Ramp {
    stats: Arc<TransferStats>,
    state: std::sync::Mutex<RampState>,
}

/// A read's place in line: its file in natural order, its offset, then first come.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Turn {
    name: String,
    offset: u64,
    seq: u64,
}

impl Ord for Turn {
    fn cmp(&self, other: &Turn) -> std::cmp::Ordering {
        crate::units::natural_cmp(&self.name, &other.name)
            .then(self.offset.cmp(&other.offset))
            .then(self.seq.cmp(&other.seq))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Turn) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One read's right to run, its place in the window; the read is done when this is dropped.
#[derive(Debug)]
struct Slot {
    ramp: Option<Arc<Ramp>>,
    turn: Turn,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ramp) = self.ramp.take() {
            ramp.done(&self.turn);
        }
    }
}

#[derive(Debug)]
struct RampState {
    limit: usize,
    /// The reads given a slot, in line, each with whether it is done; the first ones that are
    /// done leave. A slot is free while fewer than `limit` are here.
    open: std::collections::BTreeMap<Turn, bool>,
    /// Reads waiting for a slot, first in line first.
    waiting: std::collections::BTreeMap<Turn, tokio::sync::oneshot::Sender<Slot>>,
    seq: u64,
    settled: bool,
    /// The limit before the last doubling and its rate.
    last: Option<(usize, f64)>,
    /// The window at this limit: since when (from the first GET), the bytes received before
    /// it, the GETs finished in it.
    started: Option<Instant>,
    bytes_before: u64,
    parts: usize,
    /// The quickest answer to any request yet (`.metadata`, the HEADs, GETs): a link's latency.
    quickest: Duration,
}

/// What to do after a window at `limit` moved `rate` bytes per second, its quickest answer's
/// headers after `quickest`: the next limit, and whether it is final.
fn next_limit(
    last: Option<(usize, f64)>,
    limit: usize,
    rate: f64,
    quickest: Duration,
) -> (usize, bool) {
    match last {
        None if quickest >= FAR || rate / (limit as f64) < SLOW_CONNECTION => {
            (MAX_CONNECTIONS, true)
        }
        Some((before, was)) if rate < was * PAYS_OFF => (before, true),
        _ if limit * 2 > MAX_CONNECTIONS => (limit, true),
        _ => (limit * 2, false),
    }
}

impl Ramp {
    fn new(stats: Arc<TransferStats>) -> Ramp {
        Ramp {
            stats,
            state: std::sync::Mutex::new(RampState {
                limit: FIRST_CONNECTIONS,
                open: std::collections::BTreeMap::new(),
                waiting: std::collections::BTreeMap::new(),
                seq: 0,
                settled: false,
                last: None,
                started: None,
                bytes_before: 0,
                parts: 0,
                quickest: Duration::MAX,
            }),
        }
    }

    /// A ramp open to [`MAX_CONNECTIONS`] from the start, that never moves.
    fn open(stats: Arc<TransferStats>) -> Ramp {
        let ramp = Ramp::new(stats);
        {
            let mut st = ramp.state();
            st.limit = MAX_CONNECTIONS;
            st.settled = true;
        }
        ramp
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RampState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn received(&self) -> u64 {
        self.stats.snapshot().0
    }

    /// Waits for a slot for one read of `name` from `offset`.
    async fn slot(self: &Arc<Self>, name: &str, offset: u64) -> Slot {
        let waiting = {
            let mut st = self.state();
            if st.started.is_none() {
                st.started = Some(Instant::now());
                st.bytes_before = self.received();
                // `.metadata` and the HEADs have told how far the server is.
                if !st.settled && st.quickest >= FAR && st.quickest != Duration::MAX {
                    st.settled = true;
                    self.set(&mut st, MAX_CONNECTIONS);
                }
            }
            st.seq += 1;
            let turn = Turn {
                name: name.to_owned(),
                offset,
                seq: st.seq,
            };
            // The first read in line is never kept waiting: a read before its turn may hold its
            // slot until its turn (the engine's memory bound), so the reads before it must run.
            if (st.open.len() < st.limit && st.waiting.is_empty()) || before_every_open(&st, &turn)
            {
                st.open.insert(turn.clone(), false);
                return Slot {
                    ramp: Some(self.clone()),
                    turn,
                };
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            st.waiting.insert(turn, tx);
            rx
        };
        // A sender is only ever dropped by sending (`hand_out`), and the ramp outlives it.
        waiting.await.expect("a waiting read always gets its slot")
    }

    /// A read is done: the first reads that are done leave, and the slots they free go to the
    /// reads in line.
    fn done(self: &Arc<Self>, turn: &Turn) {
        let mut st = self.state();
        leave(&mut st, turn);
        self.hand_out(&mut st);
    }

    /// Gives the free slots to the first reads in line that still wait.
    fn hand_out(self: &Arc<Self>, st: &mut RampState) {
        loop {
            let Some((first, _)) = st.waiting.first_key_value() else {
                return;
            };
            if st.open.len() >= st.limit && !before_every_open(st, first) {
                return;
            }
            let Some((turn, tx)) = st.waiting.pop_first() else {
                return;
            };
            st.open.insert(turn.clone(), false);
            if let Err(mut slot) = tx.send(Slot {
                ramp: Some(self.clone()),
                turn,
            }) {
                // That read was abandoned: it leaves here (not through `Drop`, which would take
                // the lock held here), and the slot goes to the next.
                slot.ramp = None;
                leave(st, &slot.turn);
            }
        }
    }

    /// Sets a new limit and starts a new window. A lower limit takes effect as reads leave.
    fn set(self: &Arc<Self>, st: &mut RampState, limit: usize) {
        st.limit = limit;
        self.hand_out(st);
        st.started = Some(Instant::now());
        st.bytes_before = self.received();
        st.parts = 0;
    }

    /// An answer's headers (to any request) came `waited` after it was sent.
    fn answered(&self, waited: Duration) {
        let mut st = self.state();
        st.quickest = st.quickest.min(waited);
    }

    /// A GET finished: once `limit` have, over a long enough window, decide.
    fn finished(self: &Arc<Self>) {
        let mut st = self.state();
        if st.settled {
            return;
        }
        st.parts += 1;
        let Some(started) = st.started else { return };
        let elapsed = started.elapsed();
        if st.parts < 2 * st.limit || elapsed < MIN_WINDOW {
            return;
        }
        let rate = self.received().saturating_sub(st.bytes_before) as f64 / elapsed.as_secs_f64();
        let (limit, settled) = next_limit(st.last, st.limit, rate, st.quickest);
        if limit > st.limit {
            st.last = Some((st.limit, rate));
        }
        st.settled = settled;
        self.set(&mut st, limit);
    }
}

/// Whether a read comes before every read holding a slot: then it gets one whatever the limit.
fn before_every_open(st: &RampState, turn: &Turn) -> bool {
    st.open.first_key_value().is_none_or(|(t, _)| turn < t)
}

/// Marks a read done, and lets the first reads that are done leave.
fn leave(st: &mut RampState, turn: &Turn) {
    if let Some(done) = st.open.get_mut(turn) {
        *done = true;
    }
    while let Some(entry) = st.open.first_entry() {
        if !*entry.get() {
            break;
        }
        entry.remove();
    }
}

/// The inclusive HTTP form of a half-open range: the only place it is built for HTTP sources.
fn http_range(range: &Range<u64>) -> String {
    format!("bytes={}-{}", range.start, range.end - 1)
}

/// `bytes a-b/total` as (a..b+1, total); `bytes */total` as (None, total).
fn content_range(value: &str) -> Option<(Option<Range<u64>>, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let total = total.trim().parse().ok()?;
    if span.trim() == "*" {
        return Some((None, total));
    }
    let (a, b) = span.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    Some((Some(a..b.checked_add(1)?), total))
}

/// How reads are pinned to the version a stat saw.
#[derive(Debug, PartialEq, Eq)]
enum Pinned<'a> {
    /// A strong ETag: `If-Match` and `If-Range`.
    Strong(&'a str),
    /// A weak ETag (which `If-Match` never matches): the answer's ETag is compared instead.
    Weak(&'a str),
    /// No ETag, a Last-Modified date: `If-Unmodified-Since`.
    Date(&'a str),
    None,
}

fn pin(version: Option<&str>) -> Pinned<'_> {
    match version {
        None => Pinned::None,
        Some(v) if v.starts_with("W/") => Pinned::Weak(v),
        Some(v) => match v.strip_prefix(LAST_MODIFIED) {
            Some(date) => Pinned::Date(date),
            None => Pinned::Strong(v),
        },
    }
}

/// An ETag without its weak marker, for comparing two of them.
fn etag_core(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The version an answer describes: its ETag, or its Last-Modified date.
fn version_of(headers: &HeaderMap) -> Option<String> {
    let get = |h: &HeaderName| headers.get(h).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(tag) = get(&header::ETAG).filter(|t| !t.is_empty()) {
        return Some(tag.to_owned());
    }
    get(&header::LAST_MODIFIED)
        .filter(|d| !d.is_empty())
        .map(|d| format!("{LAST_MODIFIED}{d}"))
}

fn header_u64(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Whether two URLs are of one origin (scheme, host and port).
fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A client error with its causes, without the URL (whose query may carry a token).
/// How long an answer asks to wait before the next attempt (`Retry-After`), if it says.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    resume::retry_after(headers.get(header::RETRY_AFTER)?.to_str().ok()?)
}

fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

impl HttpSource {
    pub fn new(
        base: HttpUrl,
        opts: &HttpOptions,
        stats: Arc<TransferStats>,
    ) -> Result<HttpSource, SourceError> {
        // HTTP/1.1 over TLS, the one version the client speaks.
        let tls = super::tls::client_config(opts.ca_bundle.as_deref(), &["http/1.1"])?;
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .user_agent(concat!("dcpfetch/", env!("CARGO_PKG_VERSION")))
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| {
                SourceError::Config(format!("cannot set up the HTTP client: {}", error_chain(e)))
            })?;
        Ok(HttpSource {
            client,
            base,
            urls: opts.urls.clone(),
            headers: opts.headers.clone(),
            retry: opts.retry,
            ramp: Arc::new(if opts.no_ramp {
                Ramp::open(stats.clone())
            } else {
                Ramp::new(stats.clone())
            }),
            stats,
            reached: Arc::default(),
            resolved: Arc::default(),
        })
    }

    /// The URL each file's requests were last redirected to.
    fn resolved_urls(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectName, Url>> {
        self.resolved
            .lock()
            .expect("no panics while holding the lock")
    }

    /// The URL `--url-list` gives for `name`, if it gives one.
    fn listed(&self, name: &ObjectName) -> Option<&Url> {
        self.urls.as_ref().and_then(|u| u.get(name))
    }

    /// Sends one request for `name` (`range` only names it in the log), following redirects;
    /// the person's headers go only to the origin of the checkpoint's URL. Every hop counts as a
    /// request, and is logged (`-v`) with the milliseconds until its headers arrived.
    async fn send(
        &self,
        method: Method,
        name: &ObjectName,
        range: Option<&Range<u64>>,
        attempt: u32,
        extra: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, Failure> {
        let what = match range {
            Some(r) => format!("{name} bytes {}..{}", r.start, r.end),
            None => name.to_string(),
        };
        let what = what.as_str();
        let stall = self.retry.stall_timeout;
        let origin = match self.listed(name) {
            Some(url) => url.clone(),
            None => self.base.object(name),
        };
        let mut resolved = self.resolved_urls().get(name).cloned();
        let mut url = resolved.clone().unwrap_or_else(|| origin.clone());
        for hop in 0..=MAX_REDIRECTS {
            let started = Instant::now();
            let trace = |status: &str| {
                resume::trace(
                    method.as_str(),
                    name.as_str(),
                    range,
                    status,
                    started,
                    attempt,
                );
            };
            let mut request = self.client.request(method.clone(), url.clone());
            if same_origin(&url, self.base.url()) {
                for h in &self.headers {
                    request = request.header(h.name.clone(), h.value.clone());
                }
            }
            if hop > 0 {
                // The attempt itself is counted by the retry loop; each redirect hop adds one.
                self.stats.add_request();
            }
            let response = match tokio::time::timeout(stall, extra(request).send()).await {
                Err(_) => {
                    trace("no answer");
                    return Err(Failure::Retry(format!(
                        "{what}: no answer within {stall:?}"
                    )));
                }
                Ok(Err(e)) => {
                    trace("no answer");
                    return Err(self.send_failure(what, &url, e));
                }
                Ok(Ok(r)) => r,
            };
            self.reached.store(true, Ordering::Relaxed);
            trace(response.status().as_str());
            self.ramp.answered(started.elapsed());
            let status = response.status();
            // A redirect target that now refuses (a signed URL that expired): ask the origin
            // where to go again.
            if resolved.take().is_some() && refused_target(status) {
                self.resolved_urls().remove(name);
                url = origin.clone();
                continue;
            }
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                if status.is_success() && url != origin {
                    self.resolved_urls().insert(name.clone(), url);
                }
                return Ok(response);
            }
            let next = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .filter(|u| matches!(u.scheme(), "http" | "https"));
            match next {
                Some(next) => url = next,
                None => {
                    return Err(Failure::Fatal(SourceError::Request {
                        name: what.to_owned(),
                        detail: format!("HTTP {status} without a usable Location to follow"),
                    }));
                }
            }
        }
        Err(Failure::Fatal(SourceError::Request {
            name: what.to_owned(),
            detail: format!("more than {MAX_REDIRECTS} redirects"),
        }))
    }

    /// A request to `url` that got no answer: worth retrying unless the certificate was refused
    /// or the request could not be built.
    fn send_failure(&self, what: &str, url: &Url, e: reqwest::Error) -> Failure {
        let retry =
            (e.is_timeout() || e.is_connect() || e.is_request() || e.is_body()) && !e.is_builder();
        if let Some(unreachable) = self.unreachable(what, url, &e) {
            return unreachable;
        }
        let detail = error_chain(e);
        // rustls says "invalid peer certificate: UnknownIssuer" (or NotValidForName, Expired...).
        if detail.to_ascii_lowercase().contains("certificate") {
            let host = url.host_str().unwrap_or_default();
            let port = url.port_or_known_default().unwrap_or_default();
            return Failure::Fatal(untrusted(what, &format!("{host}:{port}"), &detail));
        }
        if retry {
            Failure::Retry(format!("{what}: {detail}"))
        } else {
            Failure::Fatal(SourceError::Request {
                name: what.to_owned(),
                detail,
            })
        }
    }

    /// A request that reached no server because its host does not resolve, or (before any
    /// request was answered) nothing listens on its port: not worth a backoff.
    fn unreachable(&self, what: &str, url: &Url, e: &reqwest::Error) -> Option<Failure> {
        let host = url.host_str().unwrap_or_default();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            let text = c.to_string();
            if text.starts_with("dns error") || text.contains("failed to lookup address") {
                return Some(Failure::Fatal(SourceError::Unreachable {
                    name: what.to_owned(),
                    detail: format!("cannot resolve {host}"),
                }));
            }
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::ConnectionRefused
                && !self.reached.load(Ordering::Relaxed)
            {
                let port = url.port_or_known_default().unwrap_or_default();
                return Some(Failure::Fatal(SourceError::Unreachable {
                    name: what.to_owned(),
                    detail: format!("connection refused by {host}:{port}"),
                }));
            }
            cause = c.source();
        }
        None
    }

    /// Sorts an answer that is not a success into "try again" or "stop", naming what failed.
    fn status_failure(
        &self,
        name: &ObjectName,
        range: Option<&Range<u64>>,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Failure {
        let what = match range {
            Some(r) => format!("{name} bytes {}..{}", r.start, r.end),
            None => name.to_string(),
        };
        let detail = format!("HTTP {status}");
        match status.as_u16() {
            500..=599 | 429 | 408 => match retry_after(headers) {
                Some(after) => {
                    Failure::RetryAfter(format!("{what}: {detail}, Retry-After {after:?}"), after)
                }
                None => Failure::Retry(format!("{what}: {detail}")),
            },
            404 | 410 => Failure::Fatal(SourceError::NotFound {
                location: self.describe(),
                name: name.to_string(),
            }),
            401 | 403 => {
                let hint = if self.listed(name).is_some() {
                    "the server refused the file's URL in --url-list; a presigned URL may have \
                     expired (make the list again)"
                } else if self.headers.is_empty() {
                    "pass --header 'Authorization: Bearer TOKEN' (or set \
                     DCPFETCH_HTTP_BEARER_TOKEN) if the server needs a token, or --url-list FILE \
                     if each file has a presigned URL of its own"
                } else {
                    "the server refused the headers given; check the token"
                };
                Failure::Fatal(SourceError::AccessDenied {
                    location: self.describe(),
                    name: what,
                    detail,
                    hint: Some(hint),
                })
            }
            412 => Failure::Fatal(SourceError::Changed {
                name: name.to_string(),
                expected: "the version seen first".into(),
                found: "another version (HTTP 412, the precondition failed)".into(),
            }),
            416 => Failure::Fatal(SourceError::BadResponse {
                name: name.to_string(),
                start: range.map_or(0, |r| r.start),
                end: range.map_or(0, |r| r.end),
                detail: "the file is shorter than the range (HTTP 416)".into(),
            }),
            _ => Failure::Fatal(SourceError::Request { name: what, detail }),
        }
    }

    /// One stat: a HEAD, or a one-byte ranged GET where HEAD is refused or gives no length. A file
    /// with a URL of its own (`--url-list`) gets the GET at once: a presigned URL is signed for
    /// one method, GET, so a HEAD would only be refused.
    async fn stat_once(&self, name: &ObjectName, attempt: u32) -> Result<ObjectMeta, Failure> {
        if self.listed(name).is_none() {
            let head = self.send(Method::HEAD, name, None, attempt, |r| r).await?;
            let status = head.status();
            if status.is_success() {
                if let Some(size) = header_u64(head.headers(), &header::CONTENT_LENGTH) {
                    return Ok(ObjectMeta {
                        size,
                        version: version_of(head.headers()),
                    });
                }
            } else if !matches!(status.as_u16(), 403 | 405 | 501) {
                return Err(self.status_failure(name, None, status, head.headers()));
            }
            drop(head);
            // A second request in the same attempt: the retry loop counted only the first.
            self.stats.add_request();
        }
        let get = self
            .send(Method::GET, name, Some(&(0..1)), attempt, |r| {
                r.header(header::RANGE, http_range(&(0..1)))
            })
            .await?;
        let headers = get.headers();
        let total = match get.status().as_u16() {
            206 | 416 => headers
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range)
                .map(|(_, total)| total),
            200 => header_u64(headers, &header::CONTENT_LENGTH),
            _ => return Err(self.status_failure(name, None, get.status(), get.headers())),
        };
        match total {
            // The body (one byte, or a whole file from a server that ignores Range) is dropped
            // unread with the connection.
            Some(size) => Ok(ObjectMeta {
                size,
                version: version_of(headers),
            }),
            None => Err(Failure::Fatal(SourceError::Request {
                name: name.to_string(),
                detail: format!(
                    "the server gives no size (HTTP {}, no Content-Range or Content-Length)",
                    get.status()
                ),
            })),
        }
    }

    /// The answer to one plain GET of a whole object, once its headers arrived: retried like any
    /// request until then. Its body is read by the caller.
    async fn get_whole(&self, name: &ObjectName, attempt: u32) -> Result<Response, Failure> {
        let response = self.send(Method::GET, name, None, attempt, |r| r).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.status_failure(name, None, status, response.headers()));
        }
        Ok(response)
    }

    /// One GET of `range`, handing what arrives to `into` and advancing `pos`.
    async fn get_part(
        &self,
        name: &ObjectName,
        range: Range<u64>,
        meta: &ObjectMeta,
        attempt: u32,
        into: &mut dyn Receive,
        pos: &mut u64,
    ) -> Result<(), Failure> {
        let what = format!("{name} bytes {}..{}", range.start, range.end);
        let pinned = pin(meta.version.as_deref());
        let response = self
            .send(Method::GET, name, Some(&range), attempt, |mut r| {
                r = r.header(header::RANGE, http_range(&range));
                match pinned {
                    Pinned::Strong(tag) => r
                        .header(header::IF_MATCH, tag)
                        .header(header::IF_RANGE, tag),
                    Pinned::Date(date) => r.header(header::IF_UNMODIFIED_SINCE, date),
                    Pinned::Weak(_) | Pinned::None => r,
                }
            })
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.status_failure(name, Some(&range), status, response.headers()));
        }
        let changed = |found: String| {
            Failure::Fatal(SourceError::Changed {
                name: name.to_string(),
                expected: meta
                    .version
                    .clone()
                    .unwrap_or_else(|| format!("{} bytes", meta.size)),
                found,
            })
        };
        // The answer's version must be the one pinned (a server may ignore If-Match).
        let now = version_of(response.headers());
        match (&pinned, pin(now.as_deref())) {
            (Pinned::Strong(a) | Pinned::Weak(a), Pinned::Strong(b) | Pinned::Weak(b))
                if etag_core(a) != etag_core(b) =>
            {
                return Err(changed(b.to_owned()));
            }
            (Pinned::Date(a), Pinned::Date(b)) if *a != b => {
                return Err(changed(format!("{LAST_MODIFIED}{b}")));
            }
            _ => {}
        }
        let bad = |detail: String| {
            Failure::Fatal(SourceError::BadResponse {
                name: name.to_string(),
                start: range.start,
                end: range.end,
                detail,
            })
        };
        if status == StatusCode::PARTIAL_CONTENT {
            let got = response
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            match content_range(got) {
                Some((_, total)) if total != meta.size => {
                    return Err(changed(format!("{total} bytes (Content-Range {got})")));
                }
                Some((Some(span), _)) if span == range => {}
                _ => {
                    return Err(bad(format!(
                        "asked for {}, got Content-Range {got:?}",
                        http_range(&range)
                    )));
                }
            }
        } else {
            // 200: the whole file. Good when it was asked for; otherwise the server ignores
            // Range (or If-Range found another version), and the body is dropped unread.
            let length = header_u64(response.headers(), &header::CONTENT_LENGTH);
            let whole = range.start == 0 && range.end == meta.size;
            if let Some(length) = length
                && length != meta.size
            {
                return Err(changed(format!("{length} bytes (HTTP {status})")));
            }
            if !whole {
                return Err(Failure::Fatal(SourceError::Request {
                    name: what,
                    detail: format!(
                        "the server ignores Range requests: asked for {}, it answered HTTP \
                         {status} with the whole file{}; dcpfetch reads only the bytes it needs \
                         and needs a server that honours Range (nginx, Apache, S3, most CDNs)",
                        http_range(&range),
                        length.map_or(String::new(), |n| format!(" ({n} bytes)")),
                    ),
                }));
            }
        }
        let mut body = response;
        let stall = self.retry.stall_timeout;
        resume::receive(&mut body, name, range, stall, &self.stats, into, pos).await
    }
}

impl ObjectStore for HttpSource {
    fn holds_back(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.base.to_string()
    }

    fn stats(&self) -> &Arc<TransferStats> {
        &self.stats
    }

    /// A HEAD (or a one-byte GET where HEAD is refused), with retries.
    fn stat<'a>(&'a self, name: &'a ObjectName) -> BoxFuture<'a, Result<ObjectMeta, SourceError>> {
        Box::pin(async move {
            resume::retrying(&self.retry, &self.stats, name.as_str(), |n| {
                self.stat_once(name, n)
            })
            .await
        })
    }

    /// One plain GET (not the default's stat and ranged GET: a round trip less before the
    /// first byte), resumed from the last byte received with ranged GETs pinned to the version
    /// its headers gave.
    fn read_object<'a>(
        &'a self,
        name: &'a ObjectName,
        limit: u64,
    ) -> BoxFuture<'a, Result<(ObjectMeta, Vec<Bytes>), SourceError>> {
        Box::pin(async move {
            let response = resume::retrying(&self.retry, &self.stats, name.as_str(), |n| {
                self.get_whole(name, n)
            })
            .await?;
            let length = header_u64(response.headers(), &header::CONTENT_LENGTH);
            let (StatusCode::OK, Some(size)) = (response.status(), length) else {
                // No length to check against the limit before the body: stat, then a range.
                drop(response);
                return super::read_object_by_range(self, name, limit).await;
            };
            fits(name, size, limit)?;
            let meta = ObjectMeta {
                size,
                version: version_of(response.headers()),
            };
            let mut body = response;
            let (chunks, resumed) = resume::receive_whole(self, &mut body, name, &meta).await?;
            if resumed {
                self.stats.add_retry();
            }
            Ok((meta, chunks))
        })
    }

    /// HTTP has no listing: this always fails, and callers stat each file by name instead.
    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, ObjectMeta)>, SourceError>> {
        Box::pin(async move {
            Err(SourceError::Request {
                name: self.describe(),
                detail: "an HTTP server offers no listing of files (dcpfetch asks for each file \
                         by name: a checkpoint over HTTP needs its .metadata)"
                    .into(),
            })
        })
    }

    /// One ranged GET once the ramp gives the read a slot, resumed from the last byte received
    /// when the body breaks or stalls (the slot is kept between attempts).
    fn read_range<'a>(
        &'a self,
        name: &'a ObjectName,
        range: Range<u64>,
        meta: &'a ObjectMeta,
        into: &'a mut dyn Receive,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let slot = self.ramp.slot(name.as_str(), range.start).await;
            let read = resume::read_resuming(self, name, range, meta, into).await;
            if read.is_ok() {
                self.ramp.finished();
            }
            drop(slot);
            read
        })
    }
}

impl Attempts for HttpSource {
    fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    fn counters(&self) -> &TransferStats {
        &self.stats
    }

    fn log_key(&self, name: &ObjectName) -> String {
        name.to_string()
    }

    /// One ranged GET (it logs itself, hop by hop); the read holds its slot.
    async fn attempt(
        &self,
        name: &ObjectName,
        range: Range<u64>,
        meta: &ObjectMeta,
        attempt: u32,
        received: &mut Received<'_>,
    ) -> Result<(), Failure> {
        self.get_part(name, range, meta, attempt, received.into, &mut received.pos)
            .await
    }
}

impl Body for Response {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
        match self.chunk().await {
            Ok(Some(chunk)) => Some(Ok(chunk)),
            Ok(None) => None,
            Err(e) => Some(Err(error_chain(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_names_each_url_by_its_last_segment() {
        let list = UrlList::parse(
            "# files\n\n https://b.s3.amazonaws.com/c/.metadata?X-Amz-Signature=a \n\
             https://cdn.example/x/%5F%5F0_0.distcp?sig=b\n",
        )
        .unwrap();
        assert_eq!(list.len(), 2);
        let url = |n: &str| {
            list.get(&ObjectName::new(n).unwrap())
                .map(|u| u.as_str().to_owned())
        };
        assert_eq!(
            url(".metadata").as_deref(),
            Some("https://b.s3.amazonaws.com/c/.metadata?X-Amz-Signature=a")
        );
        assert_eq!(
            url("__0_0.distcp").as_deref(),
            Some("https://cdn.example/x/%5F%5F0_0.distcp?sig=b")
        );
        assert_eq!(url("__1_0.distcp"), None);
        assert!(!format!("{list:?}").contains("sig"));
        for (text, want) in [
            (
                "https://h/a/x?s=SECRET\nhttps://g/b/x?s=SECRET",
                "line 2: a second URL for \"x\" (the first is on line 1)",
            ),
            (
                "\n\nftp://h/x?s=SECRET",
                "line 3: \"ftp://h/x?<redacted>\": only http:// and https:// URLs",
            ),
            (
                "https://h?s=SECRET",
                "line 1: https://h?<redacted> names no file",
            ),
            ("# none", "it holds no URL"),
        ] {
            assert_eq!(UrlList::parse(text).unwrap_err(), want);
        }
    }

    #[test]
    fn urls_join_names_and_keep_the_query() {
        let table = [
            (
                "https://h/a/ckpt",
                "__0_0.distcp",
                "https://h/a/ckpt/__0_0.distcp",
            ),
            (
                "https://h/a/ckpt/",
                ".metadata",
                "https://h/a/ckpt/.metadata",
            ),
            ("http://h:8080", "x/y", "http://h:8080/x/y"),
            (
                "https://h/c?sig=abc&se=1",
                "f",
                "https://h/c/f?sig=abc&se=1",
            ),
            ("https://h/c", "a b#?", "https://h/c/a%20b%23%3F"),
        ];
        for (base, name, want) in table {
            let url = HttpUrl::parse(base).unwrap();
            assert_eq!(url.object(&ObjectName::new(name).unwrap()).as_str(), want);
        }
        for bad in ["https://", "ftp://h/x", "https://h/x#frag", "http//h"] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_print_without_secrets() {
        let url = HttpUrl::parse("https://me:pw@h/c/?sig=SECRET").unwrap();
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(
                !shown.contains("SECRET") && !shown.contains("pw"),
                "{shown}"
            );
            assert!(
                shown.contains("https://me:redacted@h/c?<redacted>"),
                "{shown}"
            );
        }
        assert_eq!(
            HttpUrl::parse("https://h/").unwrap().to_string(),
            "https://h"
        );
        let e = HttpUrl::parse("https://h/x?sig=SECRET#f").unwrap_err();
        assert!(!e.contains("SECRET"), "{e}");
    }

    #[test]
    fn headers_never_print_their_values() {
        let h = HttpHeader::parse("Authorization: Bearer SECRET").unwrap();
        assert_eq!(h.name(), "authorization");
        assert_eq!(format!("{h:?}"), "authorization: <redacted>");
        for bad in ["Bearer SECRET", "Auth orization: SECRET", "X: SECRET\u{7f}"] {
            let e = HttpHeader::parse(bad).unwrap_err();
            assert!(!e.contains("SECRET"), "{bad:?}: {e}");
        }
        let opts = HttpOptions::resolve(
            &["X-Api-Key: FLAGSECRET".into()],
            None,
            |v| match v {
                BEARER_ENV => Some("ENVSECRET".into()),
                HEADERS_ENV => Some("X-Api-Key: OLD\n\nX-Other: OTHERSECRET\n".into()),
                _ => None,
            },
            RetryPolicy::default(),
        )
        .unwrap();
        let shown = format!("{opts:?}");
        assert!(
            !shown.contains("SECRET") && !shown.contains("OLD"),
            "{shown}"
        );
        let names: Vec<&str> = opts.headers.iter().map(HttpHeader::name).collect();
        assert_eq!(names, ["authorization", "x-other", "x-api-key"]);
        assert_eq!(opts.headers[2].value, "FLAGSECRET");
        assert_eq!(opts.headers[0].value, "Bearer ENVSECRET");
    }

    #[test]
    fn content_ranges_parse() {
        assert_eq!(content_range("bytes 0-9/100"), Some((Some(0..10), 100)));
        assert_eq!(content_range("bytes */7"), Some((None, 7)));
        for bad in [
            "",
            "bytes 0-9",
            "items 0-9/10",
            "bytes a-9/10",
            "bytes 0-18446744073709551615/1",
        ] {
            assert_eq!(content_range(bad), None, "{bad}");
        }
        assert_eq!(http_range(&(5..6)), "bytes=5-5");
    }

    #[test]
    fn versions_pin_reads() {
        assert_eq!(pin(Some("\"abc\"")), Pinned::Strong("\"abc\""));
        assert_eq!(pin(Some("W/\"abc\"")), Pinned::Weak("W/\"abc\""));
        let date = format!("{LAST_MODIFIED}Tue, 01 Dec 2025 22:15:00 GMT");
        assert_eq!(
            pin(Some(&date)),
            Pinned::Date("Tue, 01 Dec 2025 22:15:00 GMT")
        );
        assert_eq!(pin(None), Pinned::None);
        let mut h = HeaderMap::new();
        h.insert(header::LAST_MODIFIED, HeaderValue::from_static("D"));
        assert_eq!(version_of(&h).as_deref(), Some("Last-Modified D"));
        h.insert(header::ETAG, HeaderValue::from_static("\"e\""));
        assert_eq!(version_of(&h).as_deref(), Some("\"e\""));
    }

    #[test]
    fn untrusted_certificates_are_told_apart() {
        let e = |detail: &str| SourceError::Request {
            name: ".metadata".into(),
            detail: detail.into(),
        };
        assert!(is_untrusted_certificate(&e(
            "the certificate of h:443 is not trusted (invalid peer certificate: UnknownIssuer)"
        )));
        assert!(!is_untrusted_certificate(&e("HTTP 400 Bad Request")));
        assert!(!is_untrusted_certificate(&SourceError::Config(
            "the certificate of h:443 is not trusted".into()
        )));
    }

    #[test]
    fn the_ramp_opens_on_far_or_slow_links_and_climbs_while_it_pays() {
        let ms = Duration::from_millis;
        let near = Duration::from_micros(200);
        // The first window: far (30 ms to an answer) or slow per connection (4 x 90 MB/s):
        // everything at once.
        assert_eq!(next_limit(None, 4, 2e9, ms(30)), (MAX_CONNECTIONS, true));
        assert_eq!(next_limit(None, 4, 360e6, near), (MAX_CONNECTIONS, true));
        // Near and fast: double, and keep doubling while the rate grows by 25%.
        assert_eq!(next_limit(None, 4, 1.5e9, near), (8, false));
        assert_eq!(next_limit(Some((4, 1.5e9)), 8, 1.9e9, near), (16, false));
        // Doubling did not pay: back to the limit before, for good.
        assert_eq!(next_limit(Some((4, 1.5e9)), 8, 1.8e9, near), (4, true));
        assert_eq!(next_limit(Some((8, 1.8e9)), 16, 1.2e9, near), (8, true));
        // Never past the cap.
        assert_eq!(
            next_limit(Some((512, 1e9)), MAX_CONNECTIONS, 1e12, near),
            (MAX_CONNECTIONS, true)
        );
    }

    /// A ramp whose server answered in 100 us (near: it climbs step by step).
    fn near_ramp() -> Arc<Ramp> {
        let ramp = Arc::new(Ramp::new(Arc::new(TransferStats::default())));
        ramp.answered(Duration::from_micros(100));
        ramp
    }

    /// A read of `name` from `offset` that asks for a slot, checked to be still waiting for it.
    async fn still_waiting(
        ramp: &Arc<Ramp>,
        name: &'static str,
        offset: u64,
    ) -> tokio::task::JoinHandle<Slot> {
        let read = {
            let ramp = ramp.clone();
            tokio::spawn(async move { ramp.slot(name, offset).await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!read.is_finished(), "{name}@{offset} got a slot");
        read
    }

    fn free(ramp: &Arc<Ramp>) -> usize {
        let st = ramp.state();
        st.limit.saturating_sub(st.open.len())
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&h)
        };
        assert_eq!(with("3"), Some(Duration::from_secs(3)));
        assert_eq!(with(" 0 "), Some(Duration::ZERO));
        assert_eq!(with("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        let later = aws_smithy_types::DateTime::from_secs(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
                + 100,
        )
        .fmt(aws_smithy_types::date_time::Format::HttpDate)
        .unwrap();
        let d = with(&later).unwrap();
        assert!(
            d > Duration::from_secs(90) && d <= Duration::from_secs(100),
            "{d:?}"
        );
        assert_eq!(with("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn an_open_ramp_gives_every_slot_at_once_and_never_moves() {
        let ramp = Arc::new(Ramp::open(Arc::new(TransferStats::default())));
        ramp.answered(Duration::from_micros(100));
        let mut held = Vec::new();
        for i in 0..64 {
            held.push(ramp.slot("f", i).await);
        }
        assert_eq!(free(&ramp), MAX_CONNECTIONS - 64);
        drop(held);
        for _ in 0..200 {
            ramp.finished();
        }
        assert_eq!(ramp.state().limit, MAX_CONNECTIONS);
    }

    #[tokio::test]
    async fn the_ramp_steps_back_as_reads_leave() {
        let ramp = near_ramp();
        let mut held = Vec::new();
        for i in 0..FIRST_CONNECTIONS {
            held.push(ramp.slot("f", i as u64).await);
        }
        assert_eq!(free(&ramp), 0);
        {
            let mut st = ramp.state();
            ramp.set(&mut st, 16);
        }
        assert_eq!(free(&ramp), 16 - FIRST_CONNECTIONS);
        {
            let mut st = ramp.state();
            ramp.set(&mut st, 2);
        }
        // The 12 free slots are gone at once, and no read starts until 2 of the 4 have left.
        assert_eq!(free(&ramp), 0);
        held.truncate(2);
        assert_eq!(free(&ramp), 0);
        held.clear();
        assert_eq!(free(&ramp), 2);
    }

    #[tokio::test]
    async fn no_read_starts_more_than_the_limit_after_the_oldest_one_arriving() {
        let ramp = near_ramp();
        let mut held = std::collections::VecDeque::new();
        for i in 0..FIRST_CONNECTIONS {
            held.push_back(ramp.slot("f", i as u64).await);
        }
        let next = {
            let ramp = ramp.clone();
            tokio::spawn(async move { ramp.slot("f", 100).await })
        };
        // Every read but the first is done: the next one still waits for the first.
        let first = held.pop_front().unwrap();
        held.clear();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!next.is_finished());
        assert_eq!(ramp.state().open.len(), FIRST_CONNECTIONS);
        // The first is done: the done ones leave with it and the next one starts.
        drop(first);
        let next = next.await.unwrap();
        assert_eq!(ramp.state().open.len(), 1);
        drop(next);
        assert_eq!(free(&ramp), FIRST_CONNECTIONS);
    }

    #[tokio::test]
    async fn the_first_read_in_line_never_waits_for_later_ones() {
        let ramp = near_ramp();
        // Later reads ran first and took every slot (a stream's reads before their turn keep
        // them while its memory is taken).
        let mut held = Vec::new();
        for i in 0..FIRST_CONNECTIONS {
            held.push(ramp.slot("__1_0", 10 + i as u64).await);
        }
        assert_eq!(free(&ramp), 0);
        // A read before all of them starts at once, over the limit...
        let first = tokio::time::timeout(Duration::from_secs(5), ramp.slot("__0_0", 0))
            .await
            .expect("the first read in line got a slot");
        assert_eq!(ramp.state().open.len(), FIRST_CONNECTIONS + 1);
        // ...and one after them still waits its turn.
        let later = still_waiting(&ramp, "__1_0", 50).await;
        drop(first);
        drop(held);
        drop(later.await.unwrap());
        assert_eq!(free(&ramp), FIRST_CONNECTIONS);
    }

    #[tokio::test]
    async fn the_first_read_in_line_gets_a_slot_when_the_reads_before_it_leave_whatever_the_limit()
    {
        let ramp = near_ramp();
        let head = ramp.slot("__0_0", 0).await;
        let paused = ramp.slot("__0_0", 20).await;
        // The limit falls to 1 (doubling did not pay) while two reads hold slots.
        {
            let mut st = ramp.state();
            ramp.set(&mut st, 1);
        }
        // The next read in line comes after the head, so it waits...
        let next = still_waiting(&ramp, "__0_0", 10).await;
        // ...until the head is done: then it is before every read holding a slot (the paused one
        // waits for it), and gets one over the limit.
        drop(head);
        let next = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the first read in line got a slot")
            .unwrap();
        assert_eq!(ramp.state().open.len(), 2);
        drop(next);
        drop(paused);
        assert_eq!(free(&ramp), 1);
    }

    #[tokio::test]
    async fn waiting_gets_run_in_the_engines_order_and_abandoned_ones_pass_their_turn() {
        let ramp = near_ramp();
        let mut held = Vec::new();
        held.push(ramp.slot("__0_0", 0).await);
        held.push(ramp.slot("__99_0", 0).await);
        assert_eq!(free(&ramp), 0);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Queued in another order than the engine reads them, all after the reads running.
        for (name, offset) in [("__10_0", 0), ("__2_0", 8), ("__2_0", 0), ("__9_0", 4)] {
            let (ramp, order) = (ramp.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = ramp.slot(name, offset).await;
                order.lock().unwrap().push(format!("{name}@{offset}"));
                drop(slot);
            }));
        }
        // One more that is abandoned while it waits (its task aborted).
        let abandoned = {
            let ramp = ramp.clone();
            tokio::spawn(async move { ramp.slot("__0_0", 5).await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(ramp.state().waiting.len(), 5);
        abandoned.abort();
        let _ = abandoned.await;
        // The first read is done: the waiting ones, all before the others in line, run one
        // after another, in order.
        held.remove(0);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["__2_0@0", "__2_0@8", "__9_0@4", "__10_0@0"]
        );
        drop(held);
        assert_eq!(free(&ramp), FIRST_CONNECTIONS);
    }

    #[tokio::test]
    async fn a_far_server_opens_every_slot_at_the_first_get() {
        let ramp = Arc::new(Ramp::new(Arc::new(TransferStats::default())));
        ramp.answered(Duration::from_millis(40));
        let _slot = ramp.slot("f", 0).await;
        assert!(ramp.state().settled);
        assert_eq!(free(&ramp), MAX_CONNECTIONS - 1);
        // A near one starts with the first few.
        let ramp = Arc::new(Ramp::new(Arc::new(TransferStats::default())));
        ramp.answered(Duration::from_micros(300));
        let _slot = ramp.slot("f", 0).await;
        assert!(!ramp.state().settled);
        assert_eq!(free(&ramp), FIRST_CONNECTIONS - 1);
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(same_origin(&u("https://h/a"), &u("https://h:443/b?x")));
        assert!(!same_origin(&u("https://h/a"), &u("http://h/a")));
        assert!(!same_origin(
            &u("http://127.0.0.1:8/a"),
            &u("http://127.0.0.2:8/a")
        ));
        assert!(!same_origin(&u("http://h:8/a"), &u("http://h:9/a")));
    }
}
