//! A checkpoint behind a plain HTTP(S) URL (a public mirror, a model hub, a CDN): HEADs and ranged
//! GETs, nothing else.
//!
//! Object `NAME` of a checkpoint at `https://host/path/ckpt` is `https://host/path/ckpt/NAME` (a
//! query string on the base, such as a container-wide access token, goes with every object). There
//! is no listing over HTTP: [`ObjectStore::list`] fails, and callers ask for each file by name.
//!
//! Like the S3 source: one loop retries requests that fail (5xx, 429, timeouts, broken
//! connections, stalls) with exponential backoff and full jitter, and resumes a body that breaks
//! mid-stream from the last byte received. Every ranged GET is pinned to the version seen first
//! (`If-Match` and `If-Range` on a strong ETag, else `If-Unmodified-Since` on the Last-Modified
//! date), and its `Content-Range` and ETag are checked, so the bytes of one file always come from
//! one version of it. Redirects are followed here, not by the client, so that the headers a person
//! gives (tokens) go only to the origin they named, never to another host.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode, Url};

use super::resume::{self, Attempts, Body, Failure, Received};
use super::{
    BoxFuture, ObjectMeta, ObjectName, ObjectStore, RetryPolicy, SourceError, TransferStats,
};

/// Redirects followed for one request before giving up.
const MAX_REDIRECTS: usize = 10;

/// The prefix of an [`ObjectMeta::version`] that holds a Last-Modified date, not an ETag.
const LAST_MODIFIED: &str = "Last-Modified ";

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

/// How to reach a checkpoint over HTTP.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Sent with every request to the checkpoint's origin (scheme, host and port), and dropped
    /// when a redirect leads to another.
    pub headers: Vec<HttpHeader>,
    /// Trust only the certificates of this PEM bundle (else the system's).
    pub ca_bundle: Option<PathBuf>,
    pub retry: RetryPolicy,
}

impl HttpOptions {
    /// Options from the command line and the environment (`env` looks a variable up):
    /// `DCPFETCH_HTTP_BEARER_TOKEN`, then `DCPFETCH_HTTP_HEADERS` (one header a line), then the
    /// `--header` flags; a later header replaces an earlier one of the same name. The CA bundle
    /// is `--ca-bundle`, else `SSL_CERT_FILE`.
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
        let ca_bundle = ca_bundle.or_else(|| {
            env("SSL_CERT_FILE")
                .filter(|f| !f.is_empty())
                .map(PathBuf::from)
        });
        Ok(HttpOptions {
            headers,
            ca_bundle,
            retry,
        })
    }
}

/// A checkpoint at an HTTP(S) URL.
#[derive(Debug, Clone)]
pub struct HttpSource {
    client: Client,
    base: HttpUrl,
    headers: Vec<HttpHeader>,
    retry: RetryPolicy,
    stats: Arc<TransferStats>,
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
        let mut builder = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .user_agent(concat!("dcpfetch/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &opts.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| SourceError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                SourceError::Config(format!(
                    "cannot read the CA bundle {}: {}",
                    path.display(),
                    error_chain(e)
                ))
            })?;
            if certs.is_empty() {
                return Err(SourceError::Config(format!(
                    "the CA bundle {} holds no PEM certificate",
                    path.display()
                )));
            }
            builder = builder.tls_certs_only(certs);
        }
        let client = builder.build().map_err(|e| {
            SourceError::Config(format!("cannot set up the HTTP client: {}", error_chain(e)))
        })?;
        Ok(HttpSource {
            client,
            base,
            headers: opts.headers.clone(),
            retry: opts.retry,
            stats,
        })
    }

    /// Sends one request for `name`, following redirects; the person's headers go only to the
    /// origin of the checkpoint's URL. Every hop counts as a request.
    async fn send(
        &self,
        method: Method,
        name: &ObjectName,
        what: &str,
        extra: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, Failure> {
        let stall = self.retry.stall_timeout;
        let mut url = self.base.object(name);
        for hop in 0..=MAX_REDIRECTS {
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
                    return Err(Failure::Retry(format!(
                        "{what}: no answer within {stall:?}"
                    )));
                }
                Ok(Err(e)) => return Err(self.send_failure(what, e)),
                Ok(Ok(r)) => r,
            };
            if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED
            {
                return Ok(response);
            }
            let status = response.status();
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

    /// A request that got no answer: worth retrying unless the certificate was refused or the
    /// request could not be built.
    fn send_failure(&self, what: &str, e: reqwest::Error) -> Failure {
        let retry =
            (e.is_timeout() || e.is_connect() || e.is_request() || e.is_body()) && !e.is_builder();
        let detail = error_chain(e);
        let lower = detail.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("unknownissuer") {
            return Failure::Fatal(SourceError::Request {
                name: what.to_owned(),
                detail: format!(
                    "{detail}\nhint: if the server's certificate comes from a private CA, pass \
                     --ca-bundle FILE (or set SSL_CERT_FILE)"
                ),
            });
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

    /// Sorts an answer that is not a success into "try again" or "stop", naming what failed.
    fn status_failure(
        &self,
        name: &ObjectName,
        range: Option<&Range<u64>>,
        status: StatusCode,
    ) -> Failure {
        let what = match range {
            Some(r) => format!("{name} bytes {}..{}", r.start, r.end),
            None => name.to_string(),
        };
        let detail = format!("HTTP {status}");
        match status.as_u16() {
            500..=599 | 429 | 408 => Failure::Retry(format!("{what}: {detail}")),
            404 | 410 => Failure::Fatal(SourceError::NotFound {
                location: self.describe(),
                name: name.to_string(),
            }),
            401 | 403 => {
                let hint = if self.headers.is_empty() {
                    "hint: pass --header 'Authorization: Bearer TOKEN' (or set \
                     DCPFETCH_HTTP_BEARER_TOKEN) if the server needs a token"
                } else {
                    "hint: the server refused the headers given; check the token"
                };
                Failure::Fatal(SourceError::AccessDenied {
                    location: self.describe(),
                    name: what,
                    detail: format!("{detail}\n{hint}"),
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

    /// One stat: a HEAD, or a one-byte ranged GET where HEAD is refused or gives no length.
    async fn stat_once(&self, name: &ObjectName, attempt: u32) -> Result<ObjectMeta, Failure> {
        let started = std::time::Instant::now();
        let head = self.send(Method::HEAD, name, name.as_str(), |r| r).await;
        let shown = head.as_ref().map_or_else(
            |_| "no answer".to_owned(),
            |h| h.status().as_u16().to_string(),
        );
        resume::trace("HEAD", name.as_str(), None, &shown, started, attempt);
        let head = head?;
        let status = head.status();
        if status.is_success() {
            if let Some(size) = header_u64(head.headers(), &header::CONTENT_LENGTH) {
                return Ok(ObjectMeta {
                    size,
                    version: version_of(head.headers()),
                });
            }
        } else if !matches!(status.as_u16(), 403 | 405 | 501) {
            return Err(self.status_failure(name, None, status));
        }
        drop(head);
        // A second request in the same attempt: the retry loop counted only the first.
        self.stats.add_request();
        let started = std::time::Instant::now();
        let get = self
            .send(Method::GET, name, name.as_str(), |r| {
                r.header(header::RANGE, http_range(&(0..1)))
            })
            .await;
        let shown = get.as_ref().map_or_else(
            |_| "no answer".to_owned(),
            |g| g.status().as_u16().to_string(),
        );
        resume::trace(
            "GET",
            name.as_str(),
            Some(&(0..1)),
            &shown,
            started,
            attempt,
        );
        let get = get?;
        let headers = get.headers();
        let total = match get.status().as_u16() {
            206 | 416 => headers
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range)
                .map(|(_, total)| total),
            200 => header_u64(headers, &header::CONTENT_LENGTH),
            _ => return Err(self.status_failure(name, None, get.status())),
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

    /// One GET of `range`, appending what arrives to `chunks` and advancing `pos`; `status` is
    /// the answer's, for the log.
    async fn get_part(
        &self,
        name: &ObjectName,
        range: Range<u64>,
        meta: &ObjectMeta,
        chunks: &mut Vec<Bytes>,
        pos: &mut u64,
        status: &mut String,
    ) -> Result<(), Failure> {
        let what = format!("{name} bytes {}..{}", range.start, range.end);
        let pinned = pin(meta.version.as_deref());
        let response = self
            .send(Method::GET, name, &what, |mut r| {
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
        *status = response.status().as_u16().to_string();
        let status = response.status();
        if !status.is_success() {
            return Err(self.status_failure(name, Some(&range), status));
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
        resume::receive(&mut body, name, range, stall, &self.stats, chunks, pos).await
    }
}

impl ObjectStore for HttpSource {
    fn describe(&self) -> String {
        self.base.to_string()
    }

    fn stats(&self) -> &Arc<TransferStats> {
        &self.stats
    }

    /// A HEAD (or a one-byte GET where HEAD is refused), with retries.
    fn stat<'a>(&'a self, name: &'a ObjectName) -> BoxFuture<'a, Result<ObjectMeta, SourceError>> {
        Box::pin(resume::retrying(
            &self.retry,
            &self.stats,
            name.as_str(),
            move |attempt| self.stat_once(name, attempt),
        ))
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

    /// One ranged GET, resumed from the last byte received when the body breaks or stalls.
    fn read_range<'a>(
        &'a self,
        name: &'a ObjectName,
        range: Range<u64>,
        meta: &'a ObjectMeta,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, SourceError>> {
        Box::pin(resume::read_resuming(self, name, range, meta))
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

    async fn attempt(
        &self,
        name: &ObjectName,
        range: Range<u64>,
        meta: &ObjectMeta,
        received: &mut Received,
    ) -> Result<(), Failure> {
        self.get_part(
            name,
            range,
            meta,
            &mut received.chunks,
            &mut received.pos,
            &mut received.status,
        )
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
    fn the_ca_bundle_falls_back_to_ssl_cert_file() {
        let env = |v: &str| (v == "SSL_CERT_FILE").then(|| "/etc/ca.pem".to_owned());
        let o = HttpOptions::resolve(&[], None, env, RetryPolicy::default()).unwrap();
        assert_eq!(
            o.ca_bundle.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        let o = HttpOptions::resolve(&[], Some("mine.pem".into()), env, RetryPolicy::default())
            .unwrap();
        assert_eq!(
            o.ca_bundle.as_deref(),
            Some(std::path::Path::new("mine.pem"))
        );
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
