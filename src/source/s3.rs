//! A checkpoint under an S3 prefix: HEAD, LIST and ranged GETs with our own retries.
//!
//! The SDK's retries are off: one loop here retries requests that fail (5xx, throttling, broken
//! connections, stalls) with exponential backoff and full jitter, and resumes a body that breaks
//! mid-stream from the last byte received. Every ranged GET carries `If-Match` with the ETag seen
//! first, and its `Content-Range` is checked, so the bytes of one object always come from one
//! version of it.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use bytes::Bytes;

use super::{
    BoxFuture, ObjectMeta, ObjectName, ObjectStore, RetryPolicy, SourceError, TransferStats,
};

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
    /// Send unsigned requests (public buckets).
    pub no_sign_request: bool,
    pub retry: RetryPolicy,
}

/// An S3 prefix holding a checkpoint.
#[derive(Debug, Clone)]
pub struct S3Source {
    client: Client,
    bucket: String,
    prefix: String,
    retry: RetryPolicy,
    stats: Arc<TransferStats>,
}

/// What one failed attempt means.
enum Failure {
    Retry(String),
    Fatal(SourceError),
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
        if let Some(r) = &opts.region {
            loader = loader.region(Region::new(r.clone()));
        }
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
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(opts.path_style)
            .retry_config(RetryConfig::disabled())
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .build(),
            );
        if sdk.region().is_none() {
            // S3 answers any region's endpoint with a redirect naming the right one.
            conf = conf.region(Region::from_static("us-east-1"));
        }
        Ok(S3Source {
            client: Client::from_conf(conf.build()),
            bucket,
            prefix,
            retry: opts.retry,
            stats,
        })
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
                match status {
                    500..=599 | 429 => Failure::Retry(format!("{what}: {detail}")),
                    _ if code == "SlowDown" || code == "Throttling" || code == "RequestTimeout" => {
                        Failure::Retry(format!("{what}: {detail}"))
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
                    }),
                    412 => Failure::Fatal(SourceError::Changed {
                        name: name.to_owned(),
                        expected: "the ETag seen first".into(),
                        found: "another version (If-Match failed)".into(),
                    }),
                    416 => Failure::Fatal(SourceError::BadResponse {
                        name: name.to_owned(),
                        start: range.map_or(0, |r| r.start),
                        end: range.map_or(0, |r| r.end),
                        detail: "the object is shorter than the range (HTTP 416)".into(),
                    }),
                    301 => Failure::Fatal(SourceError::Request {
                        name: what,
                        detail: format!("{detail}: the bucket is in another region; pass --region"),
                    }),
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

    /// Runs `attempt` until it succeeds, fails for good, or runs out of attempts.
    async fn retrying<T, F, Fut>(&self, name: &str, mut attempt: F) -> Result<T, SourceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut last = String::new();
        for n in 0..self.retry.max_attempts {
            if n > 0 {
                self.stats.add_retry();
                tokio::time::sleep(self.retry.backoff(n)).await;
            }
            self.stats.add_request();
            match tokio::time::timeout(self.retry.stall_timeout, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(Failure::Fatal(e))) => return Err(e),
                Ok(Err(Failure::Retry(msg))) => last = msg,
                Err(_) => last = format!("no answer within {:?}", self.retry.stall_timeout),
            }
        }
        Err(SourceError::Exhausted {
            what: name.to_owned(),
            attempts: self.retry.max_attempts,
            last,
        })
    }

    /// One GET of `range`, appending what arrives to `chunks` and advancing `pos`.
    async fn get_part(
        &self,
        name: &ObjectName,
        key: &str,
        range: Range<u64>,
        meta: &ObjectMeta,
        chunks: &mut Vec<Bytes>,
        pos: &mut u64,
    ) -> Result<(), Failure> {
        let stall = self.retry.stall_timeout;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(http_range(&range))
            .set_if_match(meta.version.clone())
            .send();
        let out = match tokio::time::timeout(stall, request).await {
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "{name}: no response within {stall:?}"
                )));
            }
            Ok(Err(e)) => return Err(self.classify(name.as_str(), Some(&range), e)),
            Ok(Ok(out)) => out,
        };
        let bad = |detail: String| {
            Failure::Fatal(SourceError::BadResponse {
                name: name.to_string(),
                start: range.start,
                end: range.end,
                detail,
            })
        };
        let want = format!("bytes {}-{}/{}", range.start, range.end - 1, meta.size);
        match out.content_range() {
            Some(got) if got == want => {}
            Some(got) => {
                if got.rsplit('/').next() != Some(&meta.size.to_string()) {
                    return Err(Failure::Fatal(SourceError::Changed {
                        name: name.to_string(),
                        expected: format!("{} bytes", meta.size),
                        found: format!("Content-Range {got}"),
                    }));
                }
                return Err(bad(format!("asked for {want}, got Content-Range {got}")));
            }
            None if range.start == 0 && range.end == meta.size => {}
            None => {
                return Err(bad(format!(
                    "no Content-Range in the answer to {}",
                    http_range(&range)
                )));
            }
        }
        if let (Some(seen), Some(now)) = (&meta.version, out.e_tag())
            && seen != now
        {
            return Err(Failure::Fatal(SourceError::Changed {
                name: name.to_string(),
                expected: seen.clone(),
                found: now.to_owned(),
            }));
        }
        self.receive(name, out.body, range, chunks, pos).await
    }

    /// Reads a GET's body for the bytes `range` (the body starts at `*pos`), appending what
    /// arrives to `chunks` and advancing `*pos`. A body that stalls, breaks or ends short is a
    /// [`Failure::Retry`] (the caller resumes from `*pos`); one longer than the range is fatal.
    async fn receive(
        &self,
        name: &ObjectName,
        mut body: aws_sdk_s3::primitives::ByteStream,
        range: Range<u64>,
        chunks: &mut Vec<Bytes>,
        pos: &mut u64,
    ) -> Result<(), Failure> {
        let stall = self.retry.stall_timeout;
        loop {
            let next = match tokio::time::timeout(stall, body.next()).await {
                Err(_) => {
                    return Err(Failure::Retry(format!(
                        "{name} bytes {}..{}: body stalled for {stall:?} at byte {pos}",
                        range.start, range.end
                    )));
                }
                Ok(next) => next,
            };
            match next {
                None => break,
                Some(Ok(chunk)) => {
                    let room = range.end - *pos;
                    if chunk.len() as u64 > room {
                        return Err(Failure::Fatal(SourceError::BadResponse {
                            name: name.to_string(),
                            start: range.start,
                            end: range.end,
                            detail: format!(
                                "the body is longer than {} bytes",
                                range.end - range.start
                            ),
                        }));
                    }
                    self.stats.add_bytes(chunk.len() as u64);
                    *pos += chunk.len() as u64;
                    if !chunk.is_empty() {
                        chunks.push(chunk);
                    }
                }
                Some(Err(e)) => {
                    return Err(Failure::Retry(format!(
                        "{name} bytes {}..{}: body broke at byte {pos}: {}",
                        range.start,
                        range.end,
                        DisplayErrorContext(&e)
                    )));
                }
            }
        }
        if *pos < range.end {
            return Err(Failure::Retry(format!(
                "{name} bytes {}..{}: body ended at byte {pos}",
                range.start, range.end
            )));
        }
        Ok(())
    }
}

impl ObjectStore for S3Source {
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
            let key = self.key(name);
            self.retrying(name.as_str(), || async {
                let out = self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .send()
                    .await
                    .map_err(|e| self.classify(name.as_str(), None, e))?;
                let size = out.content_length().unwrap_or(0);
                Ok(ObjectMeta {
                    size: u64::try_from(size).unwrap_or(0),
                    version: out.e_tag().map(str::to_owned),
                })
            })
            .await
        })
    }

    /// One ListObjectsV2 request per 1,000 objects.
    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, ObjectMeta)>, SourceError>> {
        Box::pin(async move {
            let prefix = if self.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", self.prefix)
            };
            let mut names = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .retrying(&self.describe(), || async {
                        self.client
                            .list_objects_v2()
                            .bucket(&self.bucket)
                            .prefix(&prefix)
                            .delimiter("/")
                            .set_continuation_token(token.clone())
                            .send()
                            .await
                            .map_err(|e| self.classify(&self.describe(), None, e))
                    })
                    .await?;
                names.extend(page.contents().iter().filter_map(|o| {
                    let name = o.key()?.strip_prefix(&prefix)?.to_owned();
                    let meta = ObjectMeta {
                        size: u64::try_from(o.size()?).ok()?,
                        version: o.e_tag().map(str::to_owned),
                    };
                    Some((name, meta))
                }));
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                    _ => break,
                }
            }
            Ok(names)
        })
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
            let key = self.key(name);
            let out = self
                .retrying(name.as_str(), || async {
                    self.client
                        .get_object()
                        .bucket(&self.bucket)
                        .key(&key)
                        .send()
                        .await
                        .map_err(|e| self.classify(name.as_str(), None, e))
                })
                .await?;
            let meta = ObjectMeta {
                size: out
                    .content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
                version: out.e_tag().map(str::to_owned),
            };
            super::fits(name, meta.size, limit)?;
            let mut chunks = Vec::new();
            let mut pos = 0u64;
            match self
                .receive(name, out.body, 0..meta.size, &mut chunks, &mut pos)
                .await
            {
                Ok(()) => {}
                Err(Failure::Fatal(e)) => return Err(e),
                // Broke, stalled or ended short: the rest, pinned to this answer's ETag.
                Err(Failure::Retry(_)) => {
                    chunks.extend(self.read_range(name, pos..meta.size, &meta).await?);
                }
            }
            Ok((meta, chunks))
        })
    }

    /// One ranged read, resumed from the last byte received when the body breaks.
    fn read_range<'a>(
        &'a self,
        name: &'a ObjectName,
        range: Range<u64>,
        meta: &'a ObjectMeta,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, SourceError>> {
        Box::pin(async move {
            let key = self.key(name);
            let mut chunks: Vec<Bytes> = Vec::new();
            let mut pos = range.start;
            let mut failures = 0u32;
            let mut attempts = 0u32;
            let mut last = String::new();
            let max_total = self.retry.max_attempts.saturating_mul(4);
            while pos < range.end {
                if failures >= self.retry.max_attempts || attempts >= max_total {
                    return Err(SourceError::Exhausted {
                        what: format!("{name} bytes {}..{}", range.start, range.end),
                        attempts,
                        last,
                    });
                }
                if attempts > 0 {
                    self.stats.add_retry();
                    tokio::time::sleep(self.retry.backoff(failures.max(1))).await;
                }
                attempts += 1;
                self.stats.add_request();
                let before = pos;
                match self
                    .get_part(name, &key, pos..range.end, meta, &mut chunks, &mut pos)
                    .await
                {
                    Ok(()) => {}
                    Err(Failure::Fatal(e)) => return Err(e),
                    Err(Failure::Retry(msg)) => {
                        last = msg;
                        if pos == before {
                            failures += 1;
                        } else {
                            failures = 0;
                        }
                    }
                }
            }
            Ok(chunks)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_ranges_are_inclusive() {
        assert_eq!(http_range(&(0..10)), "bytes=0-9");
        assert_eq!(http_range(&(5..6)), "bytes=5-5");
    }
}
