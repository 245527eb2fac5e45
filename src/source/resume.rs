//! The one loop that reads a byte range from a network store (S3, HTTP): attempts resumed from the
//! last byte received, retried with backoff and full jitter, each bounded by the request timeout
//! and each logged as a `dcpfetch::requests` event.

use std::future::Future;
use std::ops::Range;
use std::time::{Duration, Instant};

/// The longest `Retry-After` honoured: a server asking for more gets this (and the attempts
/// still run out as usual).
pub(crate) const RETRY_AFTER_CAP: Duration = Duration::from_secs(60);

use bytes::Bytes;

use super::{
    ObjectMeta, ObjectName, ObjectStore, Receive, RetryPolicy, SourceError, TransferStats,
};

/// How one attempt ended, when it did not end well.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another attempt (5xx, throttling, a broken or stalled body): what happened.
    Retry(String),
    /// Worth another attempt after the wait the server asked for (`Retry-After` on a 429 or 503).
    RetryAfter(String, Duration),
    /// Not worth another attempt (403, 404, a changed object, an evil answer).
    Fatal(SourceError),
}

/// What the attempts at one range have received so far.
pub(crate) struct Received<'r> {
    /// Where the bytes go, in order, from the range's start.
    pub into: &'r mut dyn Receive,
    /// The next byte wanted.
    pub pos: u64,
    /// The current attempt's answer, for a store's log line: an HTTP status, or what went wrong
    /// before one.
    pub status: String,
}

/// A store whose ranged reads can be resumed.
pub(crate) trait Attempts: Send + Sync {
    fn retry_policy(&self) -> &RetryPolicy;
    fn counters(&self) -> &TransferStats;
    /// The object's key or URL path, as the log names it.
    fn log_key(&self, name: &ObjectName) -> String;
    /// Request number `attempt` (from 1) for `range` (from the next byte wanted to the end),
    /// handing what arrives to `received.into` and advancing `received.pos` as it arrives, so
    /// that a cut attempt keeps its bytes. The store logs its own request ([`trace`]); the loop
    /// logs only an attempt it cut for taking too long.
    fn attempt<'s>(
        &'s self,
        name: &'s ObjectName,
        range: Range<u64>,
        meta: &'s ObjectMeta,
        attempt: u32,
        received: &'s mut Received<'_>,
    ) -> impl Future<Output = Result<(), Failure>> + Send + 's;
}

/// Reads `range` of `name` with as many attempts as it takes: a broken, short or stalled body is
/// resumed from the last byte received; `max_attempts` consecutive attempts without progress, or
/// four times as many in all, give up naming the file, the range and the last cause. An attempt
/// slower than the request timeout counts as failed even if bytes came, so a server that drips
/// cannot hold a read for more than `max_attempts` timeouts.
pub(crate) async fn read_resuming<S: Attempts>(
    store: &S,
    name: &ObjectName,
    range: Range<u64>,
    meta: &ObjectMeta,
    into: &mut dyn Receive,
) -> Result<(), SourceError> {
    let policy = *store.retry_policy();
    let key = store.log_key(name);
    let mut received = Received {
        into,
        pos: range.start,
        status: String::new(),
    };
    let mut failures = 0u32;
    let mut attempts = 0u32;
    let mut last = String::new();
    let mut asked: Option<Duration> = None;
    let max_total = policy.max_attempts.saturating_mul(4);
    while received.pos < range.end {
        if failures >= policy.max_attempts || attempts >= max_total {
            return Err(SourceError::Exhausted {
                what: format!("{name} bytes {}..{}", range.start, range.end),
                attempts,
                last,
            });
        }
        if attempts > 0 {
            store.counters().add_retry();
            tokio::time::sleep(wait(&policy, failures.max(1), asked.take())).await;
        }
        attempts += 1;
        store.counters().add_request();
        let before = received.pos;
        let started = Instant::now();
        received.status = "no answer".into();
        let outcome = tokio::time::timeout(
            policy.request_timeout,
            store.attempt(name, before..range.end, meta, attempts, &mut received),
        )
        .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(Failure::Fatal(e))) => return Err(e),
            Ok(Err(failure @ (Failure::Retry(_) | Failure::RetryAfter(..)))) => {
                if let Failure::RetryAfter(_, after) = failure {
                    asked = Some(after);
                }
                last = match failure {
                    Failure::Retry(msg) | Failure::RetryAfter(msg, _) => msg,
                    Failure::Fatal(_) => unreachable!("matched above"),
                };
                if received.pos == before {
                    failures += 1;
                } else {
                    failures = 0;
                }
            }
            Err(_) => {
                trace(
                    "GET",
                    &key,
                    Some(&(before..range.end)),
                    "timeout",
                    started,
                    attempts,
                );
                last = format!(
                    "{name} bytes {before}..{}: no complete answer within {:?} \
                     (--request-timeout); {} bytes arrived",
                    range.end,
                    policy.request_timeout,
                    received.pos - before
                );
                failures += 1;
            }
        }
    }
    Ok(())
}

/// Emits the `dcpfetch::requests` event of one request attempt (shown with `-v`).
pub(crate) fn trace(
    method: &str,
    key: &str,
    range: Option<&Range<u64>>,
    status: &str,
    started: Instant,
    attempt: u32,
) {
    tracing::debug!(
        target: "dcpfetch::requests",
        method,
        key,
        range = %range.map_or_else(|| "-".to_owned(), |r| format!("{}..{}", r.start, r.end)),
        status,
        ms = started.elapsed().as_millis() as u64,
        attempt,
    );
}

/// A response body that yields chunks as they arrive.
pub(crate) trait Body: Send {
    /// The next chunk, `None` at the end, or what broke.
    fn next_chunk(&mut self) -> impl Future<Output = Option<Result<Bytes, String>>> + Send + '_;
}

/// Reads a body for the bytes `range` (the body starts at `*pos`), handing what arrives to `into`
/// and advancing `*pos`. A body that stalls (nothing for `stall`), breaks or ends short is a
/// [`Failure::Retry`] (the caller resumes from `*pos`); one longer than the range is fatal, and
/// so is a receiver that refuses the bytes. The stall clock runs only while waiting for the
/// network, not while the receiver takes a chunk.
pub(crate) async fn receive(
    body: &mut impl Body,
    name: &ObjectName,
    range: Range<u64>,
    stall: std::time::Duration,
    stats: &TransferStats,
    into: &mut dyn Receive,
    pos: &mut u64,
) -> Result<(), Failure> {
    let what = || format!("{name} bytes {}..{}", range.start, range.end);
    loop {
        let next = match tokio::time::timeout(stall, body.next_chunk()).await {
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "{}: body stalled for {stall:?} at byte {}",
                    what(),
                    *pos
                )));
            }
            Ok(next) => next,
        };
        match next {
            None => break,
            Some(Ok(chunk)) => {
                if chunk.len() as u64 > range.end - *pos {
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
                stats.add_bytes(chunk.len() as u64);
                let n = chunk.len() as u64;
                if n > 0 && into.receive(chunk).await.is_err() {
                    return Err(Failure::Fatal(SourceError::Stopped {
                        name: name.to_string(),
                    }));
                }
                *pos += n;
            }
            Some(Err(e)) => {
                return Err(Failure::Retry(format!(
                    "{}: body broke at byte {}: {e}",
                    what(),
                    *pos
                )));
            }
        }
    }
    if *pos < range.end {
        return Err(Failure::Retry(format!(
            "{}: body ended at byte {}",
            what(),
            *pos
        )));
    }
    Ok(())
}

/// Reads the body of a plain GET of a whole object (`meta` from its headers) under the request
/// timeout; what broke, stalled, ended short or took too long is read on with the store's resumed
/// ranged reads, pinned to that answer's version. Says whether it had to read on.
pub(crate) async fn receive_whole<S: Attempts + ObjectStore>(
    store: &S,
    body: &mut impl Body,
    name: &ObjectName,
    meta: &ObjectMeta,
) -> Result<(Vec<Bytes>, bool), SourceError> {
    let policy = store.retry_policy();
    let mut chunks = Vec::new();
    let mut pos = 0u64;
    let whole = receive(
        body,
        name,
        0..meta.size,
        policy.stall_timeout,
        store.counters(),
        &mut chunks,
        &mut pos,
    );
    match tokio::time::timeout(policy.request_timeout, whole).await {
        Ok(Ok(())) => Ok((chunks, false)),
        Ok(Err(Failure::Fatal(e))) => Err(e),
        Ok(Err(Failure::Retry(_) | Failure::RetryAfter(..))) | Err(_) => {
            store
                .read_range(name, pos..meta.size, meta, &mut chunks)
                .await?;
            Ok((chunks, true))
        }
    }
}

/// Runs a request that is not resumed (HEAD, LIST, a whole GET's headers) until it succeeds,
/// fails for good, or runs out of attempts; `attempt` is given its number, from 1. Each attempt is
/// bounded by the stall and request timeouts.
pub(crate) async fn retrying<T, F, Fut>(
    policy: &RetryPolicy,
    stats: &TransferStats,
    what: &str,
    mut attempt: F,
) -> Result<T, SourceError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut last = String::new();
    let mut asked: Option<Duration> = None;
    let limit = policy.stall_timeout.min(policy.request_timeout);
    for n in 0..policy.max_attempts {
        if n > 0 {
            stats.add_retry();
            tokio::time::sleep(wait(policy, n, asked.take())).await;
        }
        stats.add_request();
        let started = Instant::now();
        match tokio::time::timeout(limit, attempt(n + 1)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(Failure::Fatal(e))) => return Err(e),
            Ok(Err(Failure::Retry(msg))) => last = msg,
            Ok(Err(Failure::RetryAfter(msg, after))) => {
                last = msg;
                asked = Some(after);
            }
            Err(_) => {
                trace("-", what, None, "timeout", started, n + 1);
                last = format!("{what}: no answer within {limit:?}");
            }
        }
    }
    Err(SourceError::Exhausted {
        what: what.to_owned(),
        attempts: policy.max_attempts,
        last,
    })
}

/// The pause before retry number `attempt`: the backoff, or what the server asked for if that is
/// longer (up to [`RETRY_AFTER_CAP`]).
fn wait(policy: &RetryPolicy, attempt: u32, asked: Option<Duration>) -> Duration {
    let backoff = policy.backoff(attempt);
    asked.map_or(backoff, |a| a.min(RETRY_AFTER_CAP).max(backoff))
}
/// How long an answer asks to wait before the next attempt, from its `Retry-After` value
/// (seconds, or an HTTP date), if it says.
pub fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when =
        aws_smithy_types::DateTime::from_str(value, aws_smithy_types::date_time::Format::HttpDate)
            .ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some(Duration::from_secs(
        when.secs().saturating_sub(now).max(0) as u64
    ))
}
