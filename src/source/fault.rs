//! Test tooling: an [`ObjectStore`] that wraps another and injects failures, in process.
//!
//! Used by the crate's unit tests and by `tests/` to drive the engine and the stat functions
//! through failures that a real store gives only by chance: an error on one part, parts that
//! complete out of order, a body shorter or longer than asked, an object that changed. It is
//! deterministic (no randomness): a rule hits the calls it matches, in the order they arrive.
//! Not used by the `dcpfetch` binary.
//!
//! ```
//! use std::sync::Arc;
//! use dcpfetch::source::fault::{Fault, Method, Rule};
//! use dcpfetch::source::{FaultStore, LocalSource, Source, SourceError, TransferStats};
//!
//! let local = LocalSource::new("fixtures/model".into(), Arc::new(TransferStats::default()));
//! let store = Arc::new(FaultStore::new(Arc::new(local)));
//! // The second ranged read of __0_1.distcp fails.
//! store.add(
//!     Rule::new(Fault::fail(|call| SourceError::Request {
//!         name: call.to_string(),
//!         detail: "injected".into(),
//!     }))
//!     .on(Method::ReadRange)
//!     .on_name("__0_1.distcp")
//!     .nth(2),
//! );
//! let source = Source::new(store.clone());
//! # let _ = source;
//! ```

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use super::{BoxFuture, ObjectMeta, ObjectName, ObjectStore, Receive, SourceError, TransferStats};

/// Which method of [`ObjectStore`] a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Stat,
    List,
    ReadObject,
    ReadRange,
}

impl Method {
    const ALL: [Method; 4] = [
        Method::Stat,
        Method::List,
        Method::ReadObject,
        Method::ReadRange,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// One call made to a [`FaultStore`], as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: Method,
    /// The object (`None` for a listing).
    pub name: Option<String>,
    /// The bytes asked for (ranged reads only).
    pub range: Option<Range<u64>>,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.name, &self.range) {
            (Some(n), Some(r)) => write!(f, "{n} bytes {}..{}", r.start, r.end),
            (Some(n), None) => write!(f, "{n}"),
            (None, _) => write!(f, "the listing"),
        }
    }
}

/// Makes the error a failing call returns (a [`SourceError`] cannot be cloned).
pub type ErrorFn = Arc<dyn Fn(&Call) -> SourceError + Send + Sync>;

/// What a rule does to a call it hits.
#[derive(Clone)]
pub enum Fault {
    /// Fail with the error this makes of the call; the wrapped store is not called.
    Fail(ErrorFn),
    /// Wait this long, then pass the call through (to reorder completions).
    Delay(Duration),
    /// Pass a read through, then drop this many bytes from the end of its body.
    Short(u64),
    /// Pass a read through, then add this many bytes (`0xEE`) after its body.
    Long(u64),
    /// Pass a stat, listing or whole-object read through, then report this version instead of
    /// the object's (as if it had changed since). A listing reports it for every object.
    Version(String),
}

impl Fault {
    /// [`Fault::Fail`] from a closure.
    pub fn fail(make: impl Fn(&Call) -> SourceError + Send + Sync + 'static) -> Fault {
        Fault::Fail(Arc::new(make))
    }

    fn applies_to(&self, method: Method) -> bool {
        match self {
            Fault::Fail(_) | Fault::Delay(_) => true,
            Fault::Short(_) | Fault::Long(_) => {
                matches!(method, Method::ReadRange | Method::ReadObject)
            }
            Fault::Version(_) => method != Method::ReadRange,
        }
    }
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Fail(_) => f.write_str("Fail(..)"),
            Fault::Delay(d) => f.debug_tuple("Delay").field(d).finish(),
            Fault::Short(n) => f.debug_tuple("Short").field(n).finish(),
            Fault::Long(n) => f.debug_tuple("Long").field(n).finish(),
            Fault::Version(v) => f.debug_tuple("Version").field(v).finish(),
        }
    }
}

/// A fault and the calls it hits: every condition set must hold.
///
/// Rules are checked in the order they were added; a call takes one use of the first rule that
/// matches it. A rule with no uses left no longer matches.
#[derive(Debug, Clone)]
pub struct Rule {
    pub fault: Fault,
    /// Only this method.
    pub method: Option<Method>,
    /// Only this object (never a listing).
    pub name: Option<String>,
    /// Only ranged reads whose range holds this byte offset.
    pub offset: Option<u64>,
    /// Only the `n`th call (1 = the first) meeting the conditions above, counted whether or not
    /// an earlier rule took it.
    pub nth: Option<u64>,
    /// Calls it may still hit; `u32::MAX` means every one.
    pub times: u32,
    seen: u64,
}

impl Rule {
    /// A rule hitting the next call of any kind (that its fault applies to), once.
    pub fn new(fault: Fault) -> Rule {
        Rule {
            fault,
            method: None,
            name: None,
            offset: None,
            nth: None,
            times: 1,
            seen: 0,
        }
    }

    /// Hits only calls of `method`.
    pub fn on(mut self, method: Method) -> Rule {
        self.method = Some(method);
        self
    }

    /// Hits only calls for the object `name`.
    pub fn on_name(mut self, name: &str) -> Rule {
        self.name = Some(name.to_owned());
        self
    }

    /// Hits only ranged reads whose range holds byte `offset`.
    pub fn at_offset(mut self, offset: u64) -> Rule {
        self.offset = Some(offset);
        self
    }

    /// Hits only the `n`th matching call (1 = the first).
    pub fn nth(mut self, n: u64) -> Rule {
        self.nth = Some(n);
        self
    }

    /// Hits `n` matching calls.
    pub fn times(mut self, n: u32) -> Rule {
        self.times = n;
        self
    }

    /// Hits every matching call.
    pub fn always(self) -> Rule {
        self.times(u32::MAX)
    }

    /// Whether `call` meets the conditions other than `nth` and `times`.
    fn fits(&self, call: &Call) -> bool {
        self.fault.applies_to(call.method)
            && self.method.is_none_or(|m| m == call.method)
            && self
                .name
                .as_deref()
                .is_none_or(|n| call.name.as_deref() == Some(n))
            && self
                .offset
                .is_none_or(|o| call.range.as_ref().is_some_and(|r| r.contains(&o)))
    }
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    calls: Vec<Call>,
    hits: u64,
    running: [u64; 4],
    max_running: [u64; 4],
}

/// An [`ObjectStore`] that passes calls to another store, except where a [`Rule`] says
/// otherwise, and records every call (see the module documentation).
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    state: Mutex<State>,
    /// Whether to act as a store that holds back ([`ObjectStore::holds_back`]), whatever
    /// `inner` is.
    holds_back: std::sync::atomic::AtomicBool,
}

/// Ends a call's count of calls running, however the call ends.
struct Running<'a> {
    store: &'a FaultStore,
    method: Method,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.store.state().running[self.method.index()] -= 1;
    }
}

impl FaultStore {
    /// Wraps `inner`, with no rules: every call passes through.
    pub fn new(inner: Arc<dyn ObjectStore>) -> FaultStore {
        FaultStore {
            holds_back: inner.holds_back().into(),
            inner,
            state: Mutex::new(State::default()),
        }
    }

    /// Acts as a store whose reads hold back (a network store) or not.
    pub fn set_holds_back(&self, yes: bool) {
        self.holds_back
            .store(yes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Adds a rule after the existing ones.
    pub fn add(&self, rule: Rule) {
        self.state().rules.push(rule);
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.state().rules.clear();
    }

    /// Every call so far, in the order they arrived.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// Forgets the calls recorded so far.
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// How many calls a rule has hit.
    pub fn hits(&self) -> u64 {
        self.state().hits
    }

    /// The most calls of `method` that were running at once.
    pub fn max_concurrent(&self, method: Method) -> u64 {
        self.state().max_running[method.index()]
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the calls from the others.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the call and takes the fault of the first rule that hits it.
    fn begin(&self, call: Call) -> (Option<Fault>, Running<'_>) {
        let mut state = self.state();
        let State {
            rules,
            calls,
            hits,
            running,
            max_running,
        } = &mut *state;
        let i = call.method.index();
        running[i] += 1;
        max_running[i] = max_running[i].max(running[i]);
        let mut fault = None;
        for rule in rules.iter_mut() {
            if !rule.fits(&call) {
                continue;
            }
            rule.seen += 1;
            if fault.is_none() && rule.times > 0 && rule.nth.is_none_or(|n| n == rule.seen) {
                if rule.times != u32::MAX {
                    rule.times -= 1;
                }
                *hits += 1;
                fault = Some(rule.fault.clone());
            }
        }
        calls.push(call);
        let running = Running {
            store: self,
            method: Method::ALL[i],
        };
        (fault, running)
    }
}

/// Applies a body fault to the chunks a read returned.
fn reshape(mut chunks: Vec<Bytes>, fault: &Option<Fault>) -> Vec<Bytes> {
    match fault {
        Some(Fault::Short(n)) => {
            let mut drop = *n;
            while drop > 0 {
                let Some(last) = chunks.pop() else { break };
                let len = last.len() as u64;
                if len > drop {
                    chunks.push(last.slice(..(len - drop) as usize));
                    drop = 0;
                } else {
                    drop -= len;
                }
            }
            chunks
        }
        Some(Fault::Long(n)) => {
            chunks.push(Bytes::from(vec![0xEE; *n as usize]));
            chunks
        }
        _ => chunks,
    }
}

/// Reports the fault's version in place of the object's.
fn reversion(meta: &mut ObjectMeta, fault: &Option<Fault>) {
    if let Some(Fault::Version(v)) = fault {
        meta.version = Some(v.clone());
    }
}

/// Fails or waits, as the fault asks, before the call goes through.
async fn before(fault: &Option<Fault>, call: &Call) -> Result<(), SourceError> {
    match fault {
        Some(Fault::Fail(make)) => Err(make(call)),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(*d).await;
            Ok(())
        }
        _ => Ok(()),
    }
}

impl ObjectStore for FaultStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn stats(&self) -> &Arc<TransferStats> {
        self.inner.stats()
    }

    fn holds_back(&self) -> bool {
        self.holds_back.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn stat<'a>(&'a self, name: &'a ObjectName) -> BoxFuture<'a, Result<ObjectMeta, SourceError>> {
        Box::pin(async move {
            let call = Call {
                method: Method::Stat,
                name: Some(name.to_string()),
                range: None,
            };
            let (fault, _running) = self.begin(call.clone());
            before(&fault, &call).await?;
            let mut meta = self.inner.stat(name).await?;
            reversion(&mut meta, &fault);
            Ok(meta)
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, ObjectMeta)>, SourceError>> {
        Box::pin(async move {
            let call = Call {
                method: Method::List,
                name: None,
                range: None,
            };
            let (fault, _running) = self.begin(call.clone());
            before(&fault, &call).await?;
            let mut listed = self.inner.list().await?;
            for (_, meta) in &mut listed {
                reversion(meta, &fault);
            }
            Ok(listed)
        })
    }

    fn read_object<'a>(
        &'a self,
        name: &'a ObjectName,
        limit: u64,
    ) -> BoxFuture<'a, Result<(ObjectMeta, Vec<Bytes>), SourceError>> {
        Box::pin(async move {
            let call = Call {
                method: Method::ReadObject,
                name: Some(name.to_string()),
                range: None,
            };
            let (fault, _running) = self.begin(call.clone());
            before(&fault, &call).await?;
            let (mut meta, chunks) = self.inner.read_object(name, limit).await?;
            reversion(&mut meta, &fault);
            Ok((meta, reshape(chunks, &fault)))
        })
    }

    fn read_range<'a>(
        &'a self,
        name: &'a ObjectName,
        range: Range<u64>,
        meta: &'a ObjectMeta,
        into: &'a mut dyn Receive,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let call = Call {
                method: Method::ReadRange,
                name: Some(name.to_string()),
                range: Some(range.clone()),
            };
            let (fault, _running) = self.begin(call.clone());
            before(&fault, &call).await?;
            let mut chunks = Vec::new();
            self.inner
                .read_range(name, range, meta, &mut chunks)
                .await?;
            for chunk in reshape(chunks, &fault) {
                if into.receive(chunk).await.is_err() {
                    return Err(SourceError::Stopped {
                        name: name.to_string(),
                    });
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{LocalSource, Source};

    fn store(dir: &tempfile::TempDir) -> (Arc<FaultStore>, Source) {
        let local = LocalSource::new(dir.path().to_owned(), Arc::new(TransferStats::default()));
        let store = Arc::new(FaultStore::new(Arc::new(local)));
        (store.clone(), Source::new(store))
    }

    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), (0u8..100).collect::<Vec<_>>()).unwrap();
        std::fs::write(dir.path().join("b"), [1u8; 10]).unwrap();
        dir
    }

    fn boom(call: &Call) -> SourceError {
        SourceError::Request {
            name: call.to_string(),
            detail: "injected".into(),
        }
    }

    #[tokio::test]
    async fn without_rules_calls_pass_through_and_are_recorded() {
        let dir = folder();
        let (store, source) = store(&dir);
        let meta = source.stat("a").await.unwrap();
        let bytes = source.read_all_range("a", 10..20, &meta).await.unwrap();
        assert_eq!(bytes, (10u8..20).collect::<Vec<_>>());
        assert_eq!(source.list().await.unwrap().len(), 2);
        let (whole_meta, whole) = source.read_object("b", 100).await.unwrap();
        assert_eq!((whole_meta.size, whole), (10, vec![1u8; 10]));
        let calls = store.calls();
        assert_eq!(calls.len(), 4);
        assert_eq!(calls[0].method, Method::Stat);
        assert_eq!(calls[1].range, Some(10..20));
        assert_eq!(calls[2].method, Method::List);
        assert_eq!(calls[3].method, Method::ReadObject);
        assert_eq!(calls[3].name.as_deref(), Some("b"));
        assert_eq!(store.hits(), 0);
    }

    #[tokio::test]
    async fn rules_match_by_method_name_offset_and_count() {
        let dir = folder();
        let (store, source) = store(&dir);
        let meta = source.stat("a").await.unwrap();
        store.add(
            Rule::new(Fault::fail(boom))
                .on(Method::ReadRange)
                .on_name("a")
                .at_offset(50)
                .nth(2),
        );
        // Does not hold byte 50, or is the first that does: passes.
        source.read_range("a", 0..50, &meta).await.unwrap();
        source.read_range("a", 40..60, &meta).await.unwrap();
        // The second read holding byte 50 fails, naming the call.
        let e = source.read_range("a", 50..51, &meta).await.unwrap_err();
        assert_eq!(e.to_string(), "a bytes 50..51: injected");
        // Its one use is spent.
        source.read_range("a", 50..51, &meta).await.unwrap();
        assert_eq!(store.hits(), 1);
    }

    #[tokio::test]
    async fn always_hits_every_matching_call_and_no_other() {
        let dir = folder();
        let (store, source) = store(&dir);
        store.add(Rule::new(Fault::fail(boom)).on_name("b").always());
        for _ in 0..3 {
            assert!(source.stat("b").await.is_err());
        }
        source.stat("a").await.unwrap();
        assert!(source.list().await.is_ok(), "a listing has no name");
        assert_eq!(store.hits(), 3);
        store.clear_rules();
        source.stat("b").await.unwrap();
    }

    #[tokio::test]
    async fn short_and_long_bodies_change_the_length() {
        let dir = folder();
        let (store, source) = store(&dir);
        let meta = source.stat("a").await.unwrap();
        store.add(Rule::new(Fault::Short(3)).on(Method::ReadRange));
        store.add(Rule::new(Fault::Long(2)).on(Method::ReadRange));
        let mut short = Vec::new();
        source
            .stream_range("a", 0..10, &meta, &mut short)
            .await
            .unwrap();
        assert_eq!(short.concat(), (0u8..7).collect::<Vec<_>>());
        let mut long = Vec::new();
        source
            .stream_range("a", 0..10, &meta, &mut long)
            .await
            .unwrap();
        let long = long.concat();
        assert_eq!(long.len(), 12);
        assert_eq!(&long[..10], &(0u8..10).collect::<Vec<_>>()[..]);
        // The reads that return the bytes refuse both.
        store.add(Rule::new(Fault::Short(1)).on(Method::ReadRange));
        let e = source.read_all_range("a", 0..10, &meta).await.unwrap_err();
        assert!(
            e.to_string().contains("9 bytes arrived for a range of 10"),
            "{e}"
        );
        store.add(Rule::new(Fault::Long(1)).on(Method::ReadObject));
        let e = source.read_object("b", 100).await.unwrap_err();
        assert!(
            e.to_string().contains("11 bytes arrived for a range of 10"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn another_version_makes_the_next_read_fail_as_changed() {
        let dir = folder();
        let (store, source) = store(&dir);
        store.add(Rule::new(Fault::Version("v2".into())).on(Method::Stat));
        let meta = source.stat("a").await.unwrap();
        assert_eq!(meta.version.as_deref(), Some("v2"));
        let e = source.read_range("a", 0..1, &meta).await.unwrap_err();
        assert!(matches!(e, SourceError::Changed { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_delay_reorders_completions() {
        let dir = folder();
        let (store, source) = store(&dir);
        let meta = source.stat("a").await.unwrap();
        store.add(Rule::new(Fault::Delay(Duration::from_millis(200))).at_offset(0));
        let done = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for range in [0..10u64, 10..20] {
            let (source, meta, done) = (source.clone(), meta.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                source.read_range("a", range.clone(), &meta).await.unwrap();
                done.lock().unwrap().push(range.start);
            }));
            // The first call must arrive first.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*done.lock().unwrap(), vec![10, 0]);
        assert_eq!(store.max_concurrent(Method::ReadRange), 2);
    }
}
