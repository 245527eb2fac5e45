//! The fetch engine: parts of the plan fetched concurrently under a memory bound, delivered to a
//! sink in plan order as zero-copy pieces of items.
//!
//! A producer walks the parts in plan order. Before starting a part it takes memory permits for
//! the part's size and a concurrency permit; the request then runs as its own task. The join
//! handles go, in order, to a consumer on a blocking thread, which waits for each part in turn and
//! cuts its received chunks into item pieces (`Bytes::slice`, no copy; gap bytes are dropped) for
//! the sink. A part's memory permits are released once the sink has taken its pieces, so parts that
//! finish early wait in memory for the one before them, and no more than `max_memory` is ever held.

mod progress;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

pub use progress::Progress;

use crate::plan::{FilePlan, Plan, PlanItem};
use crate::source::{ObjectMeta, ObjectName, Source, SourceError};

/// Memory is counted in units of this many bytes.
const UNIT: u64 = 64 << 10;

/// How hard the engine pushes.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Most bytes held at once: requests in flight plus parts waiting for the sink.
    pub max_memory: u64,
}

/// Where item bytes go. Calls come from one thread, in plan order: for every item, its pieces in
/// order and then `item_done`; items of one file by offset; files in plan order.
pub trait Sink: Send {
    /// Bytes `at .. at + data.len()` of item `item` of file `file` (offsets relative to the item).
    fn write(
        &mut self,
        file: &FilePlan,
        item: &PlanItem,
        at: u64,
        data: Bytes,
    ) -> Result<(), SinkError>;
    /// The item's last byte has been written.
    fn item_done(&mut self, file: &FilePlan, item: &PlanItem) -> Result<(), SinkError>;
    /// Every item has been delivered.
    fn finish(&mut self) -> Result<(), SinkError>;
    /// The run stopped early (an error, or Ctrl-C): make what is complete durable.
    fn interrupted(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Lets a run be stopped from outside (Ctrl-C): the engine stops, the sink records what it
/// finished, and the run returns [`FetchError::Interrupted`].
#[derive(Debug, Clone)]
pub struct Cancel(watch::Receiver<bool>);

impl Cancel {
    /// A run that only ends by itself.
    pub fn never() -> Cancel {
        Cancel(watch::channel(false).1)
    }

    /// A run that Ctrl-C stops (call inside the runtime).
    pub fn on_ctrl_c() -> Cancel {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(true);
                // Keep the sender alive so that the receivers see the value.
                std::future::pending::<()>().await;
            }
        });
        Cancel(rx)
    }

    /// Resolves when the run is cancelled (never, for [`Cancel::never`]).
    pub async fn cancelled(&mut self) {
        if self.0.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Why a sink could not take the bytes.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

impl SinkError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SinkError {
        let what = what.into();
        move |source| SinkError::Io { what, source }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    // Not `transparent`: the inner error must stay in the cause chain, where the exit code and
    // the hint are chosen.
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{0}")]
    Sink(#[from] SinkError),
    #[error("no size known for {0}")]
    UnknownFile(String),
    #[error("interrupted")]
    Interrupted,
    #[error("--part-size ({part}) must not exceed --max-memory ({memory})")]
    PartTooLarge { part: u64, memory: u64 },
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineReport {
    pub items: u64,
    pub parts: u64,
    /// Bytes delivered to the sink (item bytes).
    pub item_bytes: u64,
    /// Bytes of the parts (item bytes plus gaps inside parts).
    pub part_bytes: u64,
    /// The most bytes the engine held at once (parts in flight or waiting for the sink), rounded
    /// up to its 64 KiB accounting unit.
    pub peak_memory: u64,
    pub elapsed: Duration,
}

/// A part whose bytes have arrived.
struct Fetched {
    file: usize,
    part: usize,
    chunks: Vec<Bytes>,
    _memory: OwnedSemaphorePermit,
}

fn units(bytes: u64) -> u32 {
    bytes.div_ceil(UNIT).clamp(1, u32::MAX as u64) as u32
}

/// Fetches every part of `plan` from `source` and hands the item bytes to `sink`.
///
/// `objects` holds the size and version of every file of the plan, as seen when planning; every
/// read must find the same version.
pub async fn run(
    source: &Source,
    plan: Arc<Plan>,
    objects: &HashMap<ObjectName, ObjectMeta>,
    opts: EngineOptions,
    sink: Box<dyn Sink>,
    progress: Progress,
    cancel: Cancel,
) -> Result<EngineReport, FetchError> {
    let started = Instant::now();
    let total_units = units(opts.max_memory);
    if plan.options.part_size > opts.max_memory {
        return Err(FetchError::PartTooLarge {
            part: plan.options.part_size,
            memory: opts.max_memory,
        });
    }
    for f in &plan.files {
        if !objects.contains_key(&f.name) {
            return Err(FetchError::UnknownFile(f.name.to_string()));
        }
    }
    let memory = Arc::new(Semaphore::new(total_units as usize));
    let in_flight = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let (tx, rx) = mpsc::unbounded_channel::<JoinHandle<Result<Fetched, SourceError>>>();

    progress.follow(source.stats().clone());
    let consumer = {
        let plan = plan.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || consume(rx, &plan, sink, &progress, &runtime, cancel))
    };

    let mut peak_units = 0u64;
    'files: for (fi, f) in plan.files.iter().enumerate() {
        let meta = &objects[&f.name];
        for (pi, p) in f.parts.iter().enumerate() {
            let len = p.range.end - p.range.start;
            let Ok(mem) = memory.clone().acquire_many_owned(units(len)).await else {
                break 'files;
            };
            peak_units = peak_units.max(total_units as u64 - memory.available_permits() as u64);
            let Ok(slot) = in_flight.clone().acquire_owned().await else {
                break 'files;
            };
            if tx.is_closed() {
                break 'files;
            }
            let source = source.clone();
            let name = f.name.to_string();
            let range = p.range.clone();
            let meta = meta.clone();
            let task = tokio::spawn(async move {
                let chunks = source
                    .read_range(&name, range.clone(), &meta)
                    .await
                    .and_then(|chunks| whole(&name, &range, chunks));
                drop(slot);
                chunks.map(|chunks| Fetched {
                    file: fi,
                    part: pi,
                    chunks,
                    _memory: mem,
                })
            });
            if tx.send(task).is_err() {
                break 'files;
            }
        }
    }
    drop(tx);
    let mut report = consumer.await.expect("the consumer does not panic")?;
    report.elapsed = started.elapsed();
    report.peak_memory = peak_units * UNIT;
    Ok(report)
}

/// A part's chunks, if they hold exactly its range's bytes: a store that sent fewer or more must
/// not have any of them reach the sink.
fn whole(name: &str, range: &Range<u64>, chunks: Vec<Bytes>) -> Result<Vec<Bytes>, SourceError> {
    let received: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let want = range.end - range.start;
    if received != want {
        return Err(SourceError::BadResponse {
            name: name.to_owned(),
            start: range.start,
            end: range.end,
            detail: format!("{received} bytes arrived for a range of {want}"),
        });
    }
    Ok(chunks)
}

/// Waits for the parts in order and cuts them into item pieces for the sink.
fn consume(
    mut rx: mpsc::UnboundedReceiver<JoinHandle<Result<Fetched, SourceError>>>,
    plan: &Plan,
    mut sink: Box<dyn Sink>,
    progress: &Progress,
    runtime: &tokio::runtime::Handle,
    mut cancel: Cancel,
) -> Result<EngineReport, FetchError> {
    let mut report = EngineReport::default();
    // The next item to deliver: (file, item).
    let mut cursor = (0usize, 0usize);
    let result = (|| {
        while let Some(mut task) = rx.blocking_recv() {
            let fetched = runtime.block_on(async {
                tokio::select! {
                    done = &mut task => Some(done),
                    () = cancel.cancelled() => None,
                }
            });
            let Some(fetched) = fetched else {
                task.abort();
                return Err(FetchError::Interrupted);
            };
            let fetched = fetched.expect("fetch tasks do not panic")?;
            deliver(
                plan,
                &mut cursor,
                &fetched,
                sink.as_mut(),
                &mut report,
                progress,
            )?;
        }
        sink.finish()?;
        Ok(())
    })();
    if result.is_err() {
        // Keep what is complete, stop the producer and abandon the requests in flight.
        let _ = sink.interrupted();
        rx.close();
        while let Ok(task) = rx.try_recv() {
            task.abort();
        }
    }
    progress.finish();
    result.map(|()| report)
}

/// Hands the items (or parts of items) a part covers to the sink.
fn deliver(
    plan: &Plan,
    cursor: &mut (usize, usize),
    fetched: &Fetched,
    sink: &mut dyn Sink,
    report: &mut EngineReport,
    progress: &Progress,
) -> Result<(), FetchError> {
    let file = &plan.files[fetched.file];
    let part = &file.parts[fetched.part];
    if cursor.0 != fetched.file {
        *cursor = (fetched.file, 0);
    }
    let mut chunk_index = 0usize;
    let mut chunk_start = part.range.start;
    while let Some(item) = file.items.get(cursor.1) {
        if item.range.start >= part.range.end {
            break;
        }
        let from = item.range.start.max(part.range.start);
        let to = item.range.end.min(part.range.end);
        // Walk the chunks that overlap [from, to), slicing without copying.
        let mut pos = from;
        while pos < to {
            let Some(chunk) = fetched.chunks.get(chunk_index) else {
                return Err(SourceError::BadResponse {
                    name: file.name.to_string(),
                    start: part.range.start,
                    end: part.range.end,
                    detail: "fewer bytes arrived than the range holds".into(),
                }
                .into());
            };
            let chunk_end = chunk_start + chunk.len() as u64;
            if pos >= chunk_end {
                chunk_start = chunk_end;
                chunk_index += 1;
                continue;
            }
            let a = (pos - chunk_start) as usize;
            let b = (to.min(chunk_end) - chunk_start) as usize;
            sink.write(file, item, pos - item.range.start, chunk.slice(a..b))?;
            report.item_bytes += (b - a) as u64;
            pos = chunk_start + b as u64;
        }
        if item.range.end <= part.range.end {
            sink.item_done(file, item)?;
            report.items += 1;
            progress.item_done();
            cursor.1 += 1;
        } else {
            break;
        }
    }
    let len = part.range.end - part.range.start;
    report.parts += 1;
    report.part_bytes += len;
    Ok(())
}
