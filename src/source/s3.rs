//! A checkpoint under an S3 prefix: HEAD, LIST and ranged GETs with our own retries.
//!
//! The SDK's retries are off: one loop here retries requests that fail (5xx, throttling, broken
//! connections, stalls) with exponential backoff and full jitter, and resumes a body that breaks
//! mid-stream from the last byte received. Every ranged GET carries `If-Match` with the ETag seen
//! first, and its `Content-Range`, `Content-Length` and `ETag` are checked, so the bytes of one
//! object always come from one version of it. A server that sends no ETags is pinned by
//! Last-Modified and size instead (`If-Unmodified-Since`, and both compared on every answer), with
//! one warning that a change within the same second of the same size cannot be seen.
//!
//! Requests go through [`Transport`], the SDK's hyper client with each connection's read buffer
//! bounded.
//!
//! Every request attempt emits a `tracing` debug event with target `dcpfetch::requests`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::environment::EnvironmentVariableRegionProvider;
use aws_config::imds::region::ImdsRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::{
    RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_types::DateTime;
use bytes::Bytes;

use super::Receive;
use super::resume::{self, Attempts, Body, Failure, Received};
use super::s3_transport::{Transport, causes};
use super::{
    BoxFuture, Listing, ObjectMeta, ObjectName, ObjectStore, RetryPolicy, SourceError,
    TransferStats,
};

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach S3: everything not given here comes from aws-config's default chain (environment,
/// profiles, SSO, web identity, instance metadata).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub region: Option<String>,
    pub profile: Option<String>,
    /// A custom endpoint (MinIO, a test server); `AWS_ENDPOINT_URL(_S3)` also works.
    pub endpoint_url: Option<String>,
    /// Path-style addressing (`http://host/bucket/key`), which most non-AWS servers need.
    pub path_style: bool,
    /// Virtual-hosted addressing (`http://bucket.host/key`) even with a custom endpoint, which
    /// otherwise gets path style (as aws-cli does).
    pub virtual_hosted: bool,
    /// Send unsigned requests (public buckets).
    pub no_sign_request: bool,
    /// Trust only the CA certificates of this PEM file (`--ca-bundle`); else the system's.
    pub ca_bundle: Option<PathBuf>,
    pub retry: RetryPolicy,
}

/// An S3 prefix holding a checkpoint.
#[derive(Debug, Clone)]
pub struct S3Source {
    /// Shared by clones; replaced once when S3 says the bucket is in another region.
    client: Arc<std::sync::RwLock<Regional>>,
    bucket: String,
    prefix: String,
    retry: RetryPolicy,
    stats: Arc<TransferStats>,
    /// `host:port` of the endpoint, for messages (`None`: AWS's own).
    endpoint: Option<String>,
    /// The profile asked for (`--profile` or `AWS_PROFILE`), for messages.
    profile: Option<String>,
    /// Whether any answer has come back yet: a refused connection before that means nothing
    /// listens there (not retried); after it, a server restarting (retried).
    reached: Arc<AtomicBool>,
    /// For objects without an ETag: the Last-Modified (seconds) seen first, by object name.
    modified: Arc<Mutex<HashMap<String, i64>>>,
    /// Whether the "no ETags" warning has been printed.
    warned: Arc<AtomicBool>,
}

/// The client requests are sent with, and whether it was moved to the bucket's region.
#[derive(Debug)]
struct Regional {
    client: Client,
    moved: bool,
}

/// An ETag as an HTTP header carries it, quoted: some stores (NetApp ONTAP) list ETags without
/// their quotes, and `If-Match` needs them.
fn quoted(etag: &str) -> String {
    if etag.starts_with('"') || etag.starts_with("W/\"") {
        etag.to_owned()
    } else {
        format!("\"{etag}\"")
    }
}

/// An ETag without its quotes, to compare a listed version with an answer's.
fn unquoted(etag: &str) -> &str {
    etag.strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or(etag)
}

/// The inclusive HTTP form of a half-open range: the only place it is built.
fn http_range(range: &Range<u64>) -> String {
    format!("bytes={}-{}", range.start, range.end - 1)
}

impl S3Source {
    pub async fn connect(
        bucket: String,
        prefix: String,
        opts: &S3Options,
        stats: Arc<TransferStats>,
    ) -> Result<Self, SourceError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        // The region: the flag, else the environment, else the profile, else (for AWS's own
        // endpoints) the EC2 instance's, else us-east-1: S3 answers any region's endpoint with a
        // redirect naming the right one. Off EC2 the metadata service's address often drops
        // packets and asking it costs 3 s of timeouts, so a custom endpoint (MinIO, Garage, Ceph:
        // an instance's region means nothing there) never waits for it. The loader always gets
        // a region: without one, the credential and token chains would ask again.
        loader = match &opts.region {
            Some(r) => loader.region(Region::new(r.clone())),
            None => {
                let mut profile = ProfileFileRegionProvider::builder();
                if let Some(p) = &opts.profile {
                    profile = profile.profile_name(p);
                }
                let mut chain =
                    RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
                        .or_else(profile.build());
                if !custom_endpoint(opts) {
                    chain = chain.or_else(ImdsRegionProvider::builder().build());
                }
                loader.region(chain.or_else(Region::from_static("us-east-1")))
            }
        };
        if let Some(p) = &opts.profile {
            loader = loader.profile_name(p);
        }
        if let Some(e) = &opts.endpoint_url {
            loader = loader.endpoint_url(e);
        }
        if opts.no_sign_request {
            loader = loader.no_credentials();
        }
        let sdk = loader.load().await;
        // As aws-cli: a custom endpoint (flag or AWS_ENDPOINT_URL) gets path style unless
        // virtual-hosted is asked for; AWS's own endpoints get virtual-hosted style.
        let endpoint = sdk.endpoint_url().map(str::to_owned);
        let path_style = opts.path_style || (endpoint.is_some() && !opts.virtual_hosted);
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .http_client(Transport::new(CONNECT_TIMEOUT, opts.ca_bundle.as_deref())?)
            .force_path_style(path_style)
            .retry_config(RetryConfig::disabled())
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        Ok(S3Source {
            client: Arc::new(std::sync::RwLock::new(Regional {
                client: Client::from_conf(conf.build()),
                moved: false,
            })),
            bucket,
            prefix,
            retry: opts.retry,
            stats,
            endpoint: endpoint.as_deref().map(authority),
            profile: opts
                .profile
                .clone()
                .or_else(|| std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty())),
            reached: Arc::default(),
            modified: Arc::default(),
            warned: Arc::default(),
        })
    }

    /// The client requests are sent with now.
    fn client(&self) -> Client {
        self.client
            .read()
            .expect("no panics while holding the lock")
            .client
            .clone()
    }

    /// Moves the client to `region`, the bucket's as S3 names it in a redirect (once, with a
    /// note): whether a request redirected there is worth sending again.
    fn move_to_region(&self, region: &str) -> bool {
        let valid = !region.is_empty()
            && region.len() <= 64
            && region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return false;
        }
        let mut state = self
            .client
            .write()
            .expect("no panics while holding the lock");
        let current = state.client.config().region().map(|r| r.to_string());
        if current.as_deref() == Some(region) {
            // Sent before another request moved the client here, or a redirect to where it
            // already is (which sending again cannot mend).
            return state.moved;
        }
        if state.moved {
            return false;
        }
        crate::report::warn(&format!(
            "{} is in region {region}, not {}: asking there (pass --region {region} to skip the \
             redirect)",
            self.describe(),
            current.as_deref().unwrap_or("the one configured")
        ));
        let conf = state
            .client
            .config()
            .to_builder()
            .region(Region::new(region.to_owned()))
            .build();
        *state = Regional {
            client: Client::from_conf(conf),
            moved: true,
        };
        true
    }

    /// The endpoint as a person would name it.
    fn host(&self) -> &str {
        self.endpoint.as_deref().unwrap_or("the S3 endpoint")
    }

    /// The status of an attempt's outcome for [`resume::trace`], noting that the endpoint
    /// answered.
    fn status_of<T, E>(
        &self,
        result: &Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
        ok: u16,
    ) -> String {
        match result {
            Ok(_) => {
                self.reached.store(true, Ordering::Relaxed);
                ok.to_string()
            }
            Err(e) => match e.raw_response() {
                Some(r) => {
                    self.reached.store(true, Ordering::Relaxed);
                    r.status().as_u16().to_string()
                }
                None => "no answer".into(),
            },
        }
    }

    /// The objects directly under the prefix, from at most `pages` ListObjectsV2 requests (1,000
    /// objects each) of at most `attempts` each, and whether that is all of them.
    async fn list_pages(
        &self,
        mut pages: usize,
        attempts: u32,
    ) -> Result<(Listing, bool), SourceError> {
        let retry = RetryPolicy {
            max_attempts: attempts.min(self.retry.max_attempts),
            ..self.retry
        };
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = resume::retrying(&retry, &self.stats, &self.describe(), |attempt| {
                let (prefix, token) = (&prefix, token.clone());
                async move {
                    let started = Instant::now();
                    let out = self
                        .client()
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(prefix)
                        .delimiter("/")
                        .set_continuation_token(token)
                        .send()
                        .await;
                    let status = self.status_of(&out, 200);
                    resume::trace("LIST", prefix, None, &status, started, attempt);
                    out.map_err(|e| self.classify(&self.describe(), None, e))
                }
            })
            .await?;
            names.extend(page.contents().iter().filter_map(|o| {
                let name = o.key()?.strip_prefix(&prefix)?.to_owned();
                self.pin_modified(&name, o.e_tag(), o.last_modified());
                let meta = ObjectMeta {
                    size: u64::try_from(o.size()?).ok()?,
                    version: o.e_tag().map(quoted),
                };
                Some((name, meta))
            }));
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok((names, true)),
            }
            pages -= 1;
            if pages == 0 {
                return Ok((names, false));
            }
        }
    }

    /// Notes the version of an object seen without an ETag: its Last-Modified is pinned (the
    /// first one seen), and the one-time warning is printed.
    fn pin_modified(&self, name: &str, etag: Option<&str>, modified: Option<&DateTime>) {
        if etag.is_some() {
            return;
        }
        if !self.warned.swap(true, Ordering::Relaxed) {
            crate::report::warn(&format!(
                "{} sends no ETags: reads are pinned by Last-Modified and size, so an object \
                 replaced within the same second by one of the same size cannot be detected",
                self.describe()
            ));
        }
        if let Some(m) = modified {
            let mut pins = self
                .modified
                .lock()
                .expect("no panics while holding the lock");
            pins.entry(name.to_owned()).or_insert(m.secs());
        }
    }

    /// The Last-Modified pinned for an object without an ETag.
    fn pinned_modified(&self, name: &str) -> Option<i64> {
        let pins = self
            .modified
            .lock()
            .expect("no panics while holding the lock");
        pins.get(name).copied()
    }

    fn key(&self, name: &ObjectName) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{}", self.prefix, name)
        }
    }

    /// Sorts an SDK error into "try again" or "stop", with a message naming what failed.
    fn classify<E>(
        &self,
        name: &str,
        range: Option<&Range<u64>>,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let what = match range {
            Some(r) => format!("{name} bytes {}..{}", r.start, r.end),
            None => name.to_owned(),
        };
        if let SdkError::DispatchFailure(_) = &e
            && let Some(f) = self.unreachable(&what, &e)
        {
            return f;
        }
        match &e {
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = se.err().code().unwrap_or("");
                let message = se.err().message().unwrap_or("");
                let detail = match (code, message) {
                    ("", "") => format!("HTTP {status}"),
                    (c, "") => format!("{c} (HTTP {status})"),
                    (c, m) => format!("{c}: {m} (HTTP {status})"),
                };
                let after = se
                    .raw()
                    .headers()
                    .get("retry-after")
                    .and_then(resume::retry_after);
                let retry = |msg: String| match after {
                    Some(after) => {
                        Failure::RetryAfter(format!("{msg}, Retry-After {after:?}"), after)
                    }
                    None => Failure::Retry(msg),
                };
                match status {
                    500..=599 | 429 => retry(format!("{what}: {detail}")),
                    _ if code == "SlowDown" || code == "Throttling" || code == "RequestTimeout" => {
                        retry(format!("{what}: {detail}"))
                    }
                    404 if code == "NoSuchBucket" => Failure::Fatal(SourceError::Request {
                        name: self.describe(),
                        detail: format!("bucket {} does not exist", self.bucket),
                    }),
                    404 => Failure::Fatal(SourceError::NotFound {
                        location: self.describe(),
                        name: what,
                    }),
                    403 => Failure::Fatal(SourceError::AccessDenied {
                        location: self.describe(),
                        name: what,
                        detail,
                        hint: None,
                    }),
                    412 => Failure::Fatal(SourceError::Changed {
                        name: what,
                        expected: "the version seen first".into(),
                        found: "another version (If-Match or If-Unmodified-Since failed)".into(),
                    }),
                    416 => Failure::Fatal(SourceError::BadResponse {
                        name: name.to_owned(),
                        start: range.map_or(0, |r| r.start),
                        end: range.map_or(0, |r| r.end),
                        detail: "the object is shorter than the range (HTTP 416)".into(),
                    }),
                    // A bucket in another region: S3 names it (`x-amz-bucket-region`) in a 301,
                    // or in a 400 when the request reached the region's endpoint signed for
                    // another.
                    301 | 400 if status == 301 || code == "AuthorizationHeaderMalformed" => {
                        let region = se
                            .raw()
                            .headers()
                            .get("x-amz-bucket-region")
                            .map(str::to_owned);
                        match region {
                            Some(r) if self.move_to_region(&r) => {
                                Failure::Retry(format!("{what}: the bucket is in region {r}"))
                            }
                            Some(r) => Failure::Fatal(SourceError::Request {
                                name: what,
                                detail: format!(
                                    "{detail}: the bucket is in {r}; pass --region {r}"
                                ),
                            }),
                            None if status == 301 => Failure::Fatal(SourceError::Request {
                                name: what,
                                detail: format!(
                                    "{detail}: the bucket is in another region; pass --region"
                                ),
                            }),
                            None => Failure::Fatal(SourceError::Request { name: what, detail }),
                        }
                    }
                    _ => Failure::Fatal(SourceError::Request { name: what, detail }),
                }
            }
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
                Failure::Retry(format!("{what}: {}", DisplayErrorContext(&e)))
            }

            // A connection closed before the answer's headers is a transient "other" error; the
            // other "other" errors (no credentials, bad configuration) are not worth retrying.
            SdkError::DispatchFailure(d)
                if d.is_io()
                    || d.is_timeout()
                    || d.as_other() == Some(aws_smithy_types::retry::ErrorKind::TransientError) =>
            {
                Failure::Retry(format!("{what}: {}", DisplayErrorContext(&e)))
            }
            _ => Failure::Fatal(SourceError::Request {
                name: what,
                detail: DisplayErrorContext(&e).to_string(),
            }),
        }
    }

    /// The failure of a request that never reached a server: its host does not resolve, nothing
    /// listens on its port (before any answer came back), its certificate is not trusted, or
    /// there are no credentials to sign it with. `None` for other dispatch failures.
    fn unreachable<E>(
        &self,
        what: &str,
        e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> Option<Failure>
    where
        E: std::error::Error + 'static,
    {
        for c in causes(e) {
            if let Some(creds) =
                c.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            {
                return Some(Failure::Fatal(SourceError::Credentials(
                    self.credentials_message(creds),
                )));
            }
            let text = c.to_string();
            if text.starts_with("dns error") || text.contains("failed to lookup address") {
                let host = self.host();
                let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
                return Some(Failure::Fatal(SourceError::Unreachable {
                    name: what.to_owned(),
                    detail: format!("cannot resolve {host}"),
                }));
            }
            if let Some(rustls::Error::InvalidCertificate(why)) = c.downcast_ref() {
                return Some(Failure::Fatal(super::http::untrusted(
                    what,
                    self.host(),
                    &format!("{why:?}"),
                )));
            }
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::ConnectionRefused
            {
                let detail = format!("connection refused by {}", self.host());
                return Some(if self.reached.load(Ordering::Relaxed) {
                    Failure::Retry(format!("{what}: {detail}"))
                } else {
                    Failure::Fatal(SourceError::Unreachable {
                        name: what.to_owned(),
                        detail,
                    })
                });
            }
        }
        None
    }

    /// Why no credentials were found, in words.
    fn credentials_message(
        &self,
        e: &aws_credential_types::provider::error::CredentialsError,
    ) -> String {
        use aws_credential_types::provider::error::CredentialsError;
        match (e, &self.profile) {
            (CredentialsError::CredentialsNotLoaded(_), Some(profile)) => {
                match profile_defined(profile) {
                    Err(files) => format!("AWS profile {profile} not found in {files}"),
                    Ok(()) => format!("AWS profile {profile} gives no credentials"),
                }
            }
            (CredentialsError::CredentialsNotLoaded(_), None) => "no AWS credentials found: set \
                AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or pass --no-sign-request"
                .into(),
            (e, _) => format!("cannot load AWS credentials: {}", DisplayErrorContext(e)),
        }
    }

    /// One GET of `range`, handing what arrives to `into` and advancing `pos`; `status`
    /// is set to the answer's status for the request's trace event.
    #[allow(clippy::too_many_arguments)]
    async fn get_part(
        &self,
        name: &ObjectName,
        key: &str,
        range: Range<u64>,
        meta: &ObjectMeta,
        into: &mut dyn Receive,
        pos: &mut u64,
        status: &mut String,
    ) -> Result<(), Failure> {
        let stall = self.retry.stall_timeout;
        let what = format!("{name} bytes {}..{}", range.start, range.end);
        let pinned_modified = match meta.version {
            Some(_) => None,
            None => self.pinned_modified(name.as_str()),
        };
        let request = self
            .client()
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(http_range(&range))
            .set_if_match(meta.version.clone())
            .set_if_unmodified_since(pinned_modified.map(DateTime::from_secs))
            .send();
        let out = match tokio::time::timeout(stall, request).await {
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "{what}: no response within {stall:?}"
                )));
            }
            Ok(result) => {
                *status = self.status_of(&result, 206);
                match result {
                    Err(e) => return Err(self.classify(name.as_str(), Some(&range), e)),
                    Ok(out) => out,
                }
            }
        };
        if out.content_range().is_none() {
            *status = "200".into();
        }
        let bad = |detail: String| {
            Failure::Fatal(SourceError::BadResponse {
                name: name.to_string(),
                start: range.start,
                end: range.end,
                detail,
            })
        };
        let len = range.end - range.start;
        let want = format!("bytes {}-{}/{}", range.start, range.end - 1, meta.size);
        // Every check below is made on the headers: a refused answer's body is dropped unread
        // (the connection is closed, not drained).
        match out.content_range() {
            Some(got) if got == want => {}
            Some(got) => {
                if got.rsplit('/').next() != Some(&meta.size.to_string()) {
                    return Err(Failure::Fatal(SourceError::Changed {
                        name: what,
                        expected: format!("{} bytes", meta.size),
                        found: format!("Content-Range {got}"),
                    }));
                }
                return Err(bad(format!("asked for {want}, got Content-Range {got}")));
            }
            None if range.start == 0 && range.end == meta.size => {}
            None => {
                return Err(bad(format!(
                    "the server answered {} with the whole object (HTTP 200, no Content-Range); \
                     refused without reading its body",
                    http_range(&range)
                )));
            }
        }
        if let Some(n) = out.content_length()
            && u64::try_from(n).ok() != Some(len)
        {
            return Err(bad(format!(
                "the answer announces {n} bytes (Content-Length) for a range of {len}"
            )));
        }
        if let (Some(seen), Some(now)) = (&meta.version, out.e_tag())
            && unquoted(seen) != unquoted(now)
        {
            return Err(Failure::Fatal(SourceError::Changed {
                name: what,
                expected: format!("ETag {seen}"),
                found: format!("ETag {now}"),
            }));
        }
        if meta.version.is_none() && out.e_tag().is_none() {
            match (pinned_modified, out.last_modified()) {
                (Some(pinned), Some(now)) if pinned != now.secs() => {
                    return Err(Failure::Fatal(SourceError::Changed {
                        name: what,
                        expected: format!("Last-Modified {}", http_date(pinned)),
                        found: format!("Last-Modified {}", http_date(now.secs())),
                    }));
                }
                (None, now) => self.pin_modified(name.as_str(), None, now),
                _ => {}
            }
        }
        let mut body = out.body;
        let stall = self.retry.stall_timeout;
        resume::receive(&mut body, name, range, stall, &self.stats, into, pos).await
    }
}

impl ObjectStore for S3Source {
    fn holds_back(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn stats(&self) -> &Arc<TransferStats> {
        &self.stats
    }

    /// One HEAD.
    fn stat<'a>(&'a self, name: &'a ObjectName) -> BoxFuture<'a, Result<ObjectMeta, SourceError>> {
        Box::pin(async move {
            let key = &self.key(name);
            resume::retrying(
                &self.retry,
                &self.stats,
                name.as_str(),
                |attempt| async move {
                    let started = Instant::now();
                    let out = self
                        .client()
                        .head_object()
                        .bucket(&self.bucket)
                        .key(key)
                        .send()
                        .await;
                    let status = self.status_of(&out, 200);
                    resume::trace("HEAD", key, None, &status, started, attempt);
                    let out = out.map_err(|e| self.classify(name.as_str(), None, e))?;
                    self.pin_modified(name.as_str(), out.e_tag(), out.last_modified());
                    let size = out.content_length().unwrap_or(0);
                    Ok(ObjectMeta {
                        size: u64::try_from(size).unwrap_or(0),
                        version: out.e_tag().map(str::to_owned),
                    })
                },
            )
            .await
        })
    }

    /// One ListObjectsV2 request per 1,000 objects.
    fn list(&self) -> BoxFuture<'_, Result<Listing, SourceError>> {
        Box::pin(async move { Ok(self.list_pages(usize::MAX, u32::MAX).await?.0) })
    }

    /// One attempt: the stats that would wait for a retried listing ask for themselves instead.
    fn list_first_page(&self) -> Option<BoxFuture<'_, Result<(Listing, bool), SourceError>>> {
        Some(Box::pin(self.list_pages(1, 1)))
    }

    /// A whole object of at most `limit` bytes in one GET, with the size and ETag of its answer
    /// (no HEAD first: the metadata is read this way). A body that breaks or stalls is resumed
    /// from the last byte received, pinned to that ETag.
    fn read_object<'a>(
        &'a self,
        name: &'a ObjectName,
        limit: u64,
    ) -> BoxFuture<'a, Result<(ObjectMeta, Vec<Bytes>), SourceError>> {
        Box::pin(async move {
            let key = &self.key(name);
            let out = resume::retrying(
                &self.retry,
                &self.stats,
                name.as_str(),
                |attempt| async move {
                    let started = Instant::now();
                    let out = self
                        .client()
                        .get_object()
                        .bucket(&self.bucket)
                        .key(key)
                        .send()
                        .await;
                    let status = self.status_of(&out, 200);
                    resume::trace("GET", key, None, &status, started, attempt);
                    out.map_err(|e| self.classify(name.as_str(), None, e))
                },
            )
            .await?;
            if out.e_tag().is_none()
                && let (Some(pinned), Some(now)) =
                    (self.pinned_modified(name.as_str()), out.last_modified())
                && pinned != now.secs()
            {
                return Err(SourceError::Changed {
                    name: name.to_string(),
                    expected: format!("Last-Modified {}", http_date(pinned)),
                    found: format!("Last-Modified {}", http_date(now.secs())),
                });
            }
            self.pin_modified(name.as_str(), out.e_tag(), out.last_modified());
            let meta = ObjectMeta {
                size: out
                    .content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
                version: out.e_tag().map(str::to_owned),
            };
            super::fits(name, meta.size, limit)?;
            let mut body = out.body;
            let (chunks, _) = resume::receive_whole(self, &mut body, name, &meta).await?;
            Ok((meta, chunks))
        })
    }

    /// One ranged read, resumed from the last byte received when the body breaks.
    fn read_range<'a>(
        &'a self,
        name: &'a ObjectName,
        range: Range<u64>,
        meta: &'a ObjectMeta,
        into: &'a mut dyn Receive,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(resume::read_resuming(self, name, range, meta, into))
    }
}

impl Attempts for S3Source {
    fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    fn counters(&self) -> &TransferStats {
        &self.stats
    }

    fn log_key(&self, name: &ObjectName) -> String {
        self.key(name)
    }

    /// One ranged GET, logged once its body has arrived (or broken).
    async fn attempt(
        &self,
        name: &ObjectName,
        range: Range<u64>,
        meta: &ObjectMeta,
        attempt: u32,
        received: &mut Received<'_>,
    ) -> Result<(), Failure> {
        let key = self.key(name);
        let started = Instant::now();
        let got = self
            .get_part(
                name,
                &key,
                range.clone(),
                meta,
                received.into,
                &mut received.pos,
                &mut received.status,
            )
            .await;
        resume::trace(
            "GET",
            &key,
            Some(&range),
            &received.status,
            started,
            attempt,
        );
        got
    }
}

impl Body for aws_sdk_s3::primitives::ByteStream {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
        self.next()
            .await
            .map(|r| r.map_err(|e| DisplayErrorContext(&e).to_string()))
    }
}

/// `host:port` of an endpoint URL (the port from the scheme when it names none).
fn authority(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    // `[::1]` has colons but no port; `[::1]:9000` and `localhost:9000` have one.
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if has_port {
        host.to_owned()
    } else if scheme.eq_ignore_ascii_case("http") {
        format!("{host}:80")
    } else {
        format!("{host}:443")
    }
}

/// A Last-Modified in seconds as an HTTP date, for messages.
fn http_date(secs: i64) -> String {
    DateTime::from_secs(secs)
        .fmt(aws_smithy_types::date_time::Format::HttpDate)
        .unwrap_or_else(|_| secs.to_string())
}

/// Whether the S3 endpoint is not AWS's: `--endpoint-url`, or `AWS_ENDPOINT_URL_S3` or
/// `AWS_ENDPOINT_URL` unless `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS` is true (as the SDK reads them;
/// an endpoint set in a profile is not looked at here).
fn custom_endpoint(opts: &S3Options) -> bool {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let ignored = var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    opts.endpoint_url.is_some()
        || (!ignored && (var("AWS_ENDPOINT_URL_S3").is_some() || var("AWS_ENDPOINT_URL").is_some()))
}

/// Whether the AWS config or credentials file defines `profile`; else the files looked in.
fn profile_defined(profile: &str) -> Result<(), String> {
    let home = std::env::var("HOME").unwrap_or_default();
    let file = |var: &str, default: &str| {
        std::env::var(var)
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("{home}/.aws/{default}"))
    };
    let config = file("AWS_CONFIG_FILE", "config");
    let credentials = file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let defines = |path: &str, sections: &[String]| {
        std::fs::read_to_string(path).is_ok_and(|text| {
            text.lines().any(|line| {
                let line = line.trim();
                line.strip_prefix('[')
                    .and_then(|l| l.strip_suffix(']'))
                    .is_some_and(|name| {
                        let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
                        sections.contains(&name)
                    })
            })
        })
    };
    let in_config = [format!("profile {profile}"), profile.to_owned()];
    if defines(&config, &in_config) || defines(&credentials, &[profile.to_owned()]) {
        Ok(())
    } else {
        Err(format!("{config} or {credentials}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_named_by_host_and_port() {
        assert_eq!(authority("http://localhost:9000"), "localhost:9000");
        assert_eq!(authority("http://127.0.0.1:9000/"), "127.0.0.1:9000");
        assert_eq!(
            authority("https://minio.example.com"),
            "minio.example.com:443"
        );
        assert_eq!(
            authority("http://minio.example.com/path"),
            "minio.example.com:80"
        );
        assert_eq!(authority("http://[::1]:9000"), "[::1]:9000");
    }

    #[test]
    fn http_ranges_are_inclusive() {
        assert_eq!(http_range(&(0..10)), "bytes=0-9");
        assert_eq!(http_range(&(5..6)), "bytes=5-5");
    }
}
