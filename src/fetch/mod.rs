//! The fetch engine: parts of the plan fetched concurrently, their bodies passed to a sink as they
//! arrive, as zero-copy pieces of items.
//!
//! A producer walks the parts in plan order and starts each as its own task once a concurrency
//! permit is free. A task hands every chunk of its body, as it arrives, to a bounded channel; a
//! consumer on a blocking thread cuts the chunks into item pieces (`Bytes::split_to`, no copy; gap
//! bytes are dropped) and gives them to the sink. An item is done when its last byte has been
//! given, whichever part brought it.
//!
//! A sink that places bytes by offset (a sparse folder) takes pieces in the order they arrive: the
//! engine then holds only the chunks in the channel, whatever the size of the parts. A sink that
//! needs plan order (a stream, a hash) gets the part at the head of the order as it arrives, and
//! the chunks of later parts wait in memory until their turn. A part before its turn takes memory
//! permits for each chunk as it arrives; when `max_memory` is taken it stops reading, so the rest
//! of its body waits in the connection (the sender is held back) and not in memory, until the
//! permits come back or its turn comes. The part at the head never waits for memory, so the order
//! always moves. From a store whose reads do not hold back ([`Source::holds_back`]: a local
//! folder, where a paused read would keep a thread and its buffers), a part instead starts only
//! once there is memory for all of it, and spends that as its chunks arrive.

mod progress;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

pub use progress::Progress;

use crate::plan::{FilePlan, Plan, PlanItem};
use crate::source::{BoxFuture, ObjectMeta, ObjectName, Receive, Source, SourceError, Stopped};

/// Most bytes of chunks on their way from the requests to the consumer: what a sink that places
/// bytes costs in memory (with one batch in hand per request).
const PASSAGE_BYTES: usize = 4 << 20;

/// A request passes its chunks on in batches of about this many bytes (and what is left when its
/// body ends): one wake-up of the consumer per batch, not per chunk of a few KiB.
const BATCH_BYTES: usize = 64 << 10;

/// How hard the engine pushes.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Most bytes of parts waiting for their turn, for a sink that needs plan order.
    pub max_memory: u64,
}

/// Where item bytes go. Calls come from one thread. A sink that is [`Sink::ordered`] gets, for every
/// item, its pieces in order and then `item_done`; items of one file by offset; files in plan order.
/// Any other sink gets every piece as it arrives: an item's pieces in any order (in order within
/// one part), interleaved with other items', every byte once, and `item_done` after its last.
pub trait Sink: Send {
    /// Whether the sink needs the bytes in plan order (a stream, a hash): the parts that arrive
    /// before their turn then wait in memory, under [`EngineOptions::max_memory`].
    fn ordered(&self) -> bool;
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
    /// The bytes are not what the checkpoint says they are (a corrupt or inconsistent item): a
    /// problem with the checkpoint, not with where they go.
    #[error("{0}")]
    Bad(String),
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
    #[error("the fetch stopped after {done} of {items} items")]
    Incomplete { done: u64, items: u64 },
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
    /// The most body bytes the engine held at once: chunks on their way to the sink, and chunks of
    /// parts waiting for their turn (for a sink that needs plan order).
    pub peak_memory: u64,
    pub elapsed: Duration,
}

/// What a request task tells the consumer.
enum Event {
    /// The next bytes of a part, in order, their place in the passage to the consumer, and for a
    /// part before its turn the memory they hold until they reach the sink.
    Chunks {
        part: PartId,
        data: Vec<Bytes>,
        _passage: OwnedSemaphorePermit,
        memory: Option<OwnedSemaphorePermit>,
    },
    /// Ctrl-C.
    Interrupted,
    /// A part's read is over: all its bytes were sent, or it failed.
    End {
        part: PartId,
        result: Result<(), SourceError>,
    },
}

/// A part: its file's index in the plan, and its index in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PartId {
    file: usize,
    part: usize,
}

/// Body bytes held by the engine, and the most held at once.
#[derive(Debug, Default)]
struct Held {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Held {
    fn add(&self, n: u64) {
        let now = self.now.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, n: u64) {
        self.now.fetch_sub(n, Ordering::Relaxed);
    }
}

/// For a sink that needs plan order: the plan-order number of the part whose turn it is, and a
/// signal when it moves.
#[derive(Debug, Default)]
struct Order {
    turn: AtomicU64,
    moved: tokio::sync::Notify,
}

impl Order {
    fn turn(&self) -> u64 {
        self.turn.load(Ordering::Acquire)
    }

    /// The next part's turn (called by the consumer).
    fn advance(&self) {
        self.turn.fetch_add(1, Ordering::Release);
        self.moved.notify_waiters();
    }
}

/// The memory a part before its turn may take for its chunks, and where it is in the order.
struct Waiting {
    order: Arc<Order>,
    /// This part's number in plan order.
    ordinal: u64,
    memory: Arc<Semaphore>,
    /// Bytes of the whole budget: no one chunk asks for more.
    budget: usize,
    /// The permits of the chunks held and not yet passed on, and of the bytes still to come that
    /// were paid for before the part started.
    held: Option<OwnedSemaphorePermit>,
    prepaid: usize,
}

impl Waiting {
    fn my_turn(&self) -> bool {
        self.order.turn() >= self.ordinal
    }

    /// Takes memory for `n` more bytes unless the part's turn comes first. Returns whether the
    /// turn has come; an error when the run is over.
    async fn reserve(&mut self, n: usize) -> Result<bool, Stopped> {
        if self.prepaid >= n {
            self.prepaid -= n;
            return Ok(false);
        }
        let want = permits((n - std::mem::take(&mut self.prepaid)) as u64, self.budget);
        loop {
            let moved = self.order.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.my_turn() {
                return Ok(true);
            }
            tokio::select! {
                permit = self.memory.clone().acquire_many_owned(want) => {
                    keep(&mut self.held, permit.map_err(|_| Stopped)?);
                    return Ok(false);
                }
                () = &mut moved => {}
            }
        }
    }
}

/// The memory permits for `bytes`: at least one, and no more than the whole budget (which could
/// never be granted) or one acquisition can take.
fn permits(bytes: u64, budget: usize) -> u32 {
    bytes.clamp(1, budget as u64).min(u32::MAX as u64) as u32
}

/// Adds `permit` to the permits held in `held`.
fn keep(held: &mut Option<OwnedSemaphorePermit>, permit: OwnedSemaphorePermit) {
    match held {
        Some(held) => held.merge(permit),
        None => *held = Some(permit),
    }
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
    let ordered = sink.ordered();
    let held = Arc::new(Held::default());
    let order = Arc::new(Order::default());
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let passage = Arc::new(Semaphore::new(PASSAGE_BYTES));

    progress.follow(source.stats().clone());
    let consumer = {
        let plan = plan.clone();
        let held = held.clone();
        let order = order.clone();
        tokio::task::spawn_blocking(move || {
            Consumer::new(&plan, sink, &held, &order, &progress).run(rx)
        })
    };
    let mut tasks = JoinSet::new();
    // Ctrl-C reaches the consumer as an event (a weak sender does not keep the channel open).
    let weak = tx.downgrade();
    let mut cancel = cancel;
    tasks.spawn(async move {
        cancel.cancelled().await;
        if let Some(tx) = weak.upgrade() {
            let _ = tx.send(Event::Interrupted);
        }
    });
    let produce = produce(
        source,
        &plan,
        objects,
        opts,
        ordered.then_some(&order),
        &held,
        &passage,
        tx,
        &mut tasks,
    );
    let mut consumer = std::pin::pin!(consumer);
    let finished = tokio::select! {
        done = &mut consumer => Some(done),
        () = produce => None,
    };
    let result = match finished {
        Some(done) => done,
        None => consumer.await,
    };
    // Whatever is still in flight (the run failed or was interrupted) is abandoned.
    tasks.abort_all();
    let mut report = result.expect("the consumer does not panic")?;
    report.elapsed = started.elapsed();
    report.peak_memory = held.peak.load(Ordering::Relaxed);
    Ok(report)
}

/// Starts a task for every part, in plan order, as concurrency allows; returns once every part has
/// started or the consumer has gone.
#[allow(clippy::too_many_arguments)]
async fn produce(
    source: &Source,
    plan: &Plan,
    objects: &HashMap<ObjectName, ObjectMeta>,
    opts: EngineOptions,
    order: Option<&Arc<Order>>,
    held: &Arc<Held>,
    passage: &Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Event>,
    tasks: &mut JoinSet<()>,
) {
    let budget = opts.max_memory.min(Semaphore::MAX_PERMITS as u64) as usize;
    let memory = Arc::new(Semaphore::new(budget));
    let in_flight = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    // From a store that does not hold back, a part before its turn would hold a reader and its
    // buffers instead: it starts only once there is memory for all of it.
    let prepay = order.is_some() && !source.holds_back();
    let mut ordinal = 0u64;
    for (fi, f) in plan.files.iter().enumerate() {
        let meta = &objects[&f.name];
        for (pi, p) in f.parts.iter().enumerate() {
            ordinal += 1;
            let prepaid = if prepay {
                let n = permits(p.range.end - p.range.start, budget);
                let Ok(permit) = memory.clone().acquire_many_owned(n).await else {
                    return;
                };
                Some((permit, n as usize))
            } else {
                None
            };
            let Ok(slot) = in_flight.clone().acquire_owned().await else {
                return;
            };
            if tx.is_closed() {
                return;
            }
            while tasks.try_join_next().is_some() {}
            let source = source.clone();
            let name = f.name.to_string();
            let range = p.range.clone();
            let meta = meta.clone();
            let part = PartId { file: fi, part: pi };
            let mut sender = PartSender {
                tx: tx.clone(),
                passage: passage.clone(),
                part,
                held: held.clone(),
                name: name.clone(),
                range: range.clone(),
                left: range.end - range.start,
                refused: None,
                batch: Vec::new(),
                batch_bytes: 0,
                waiting: order.map(|order| Waiting {
                    order: order.clone(),
                    ordinal: ordinal - 1,
                    memory: memory.clone(),
                    budget,
                    prepaid: prepaid.as_ref().map_or(0, |p| p.1),
                    held: prepaid.map(|p| p.0),
                }),
            };
            tasks.spawn(async move {
                let read = source
                    .stream_range(&name, range.clone(), &meta, &mut sender)
                    .await;
                drop(slot);
                if read.is_ok() && sender.refused.is_none() && sender.pass_on().await.is_err() {
                    return;
                }
                let result = match (read, sender.refused.take()) {
                    (_, Some(refused)) => Err(refused),
                    (Err(SourceError::Stopped { .. }), None) => return,
                    (Err(e), None) => Err(e),
                    (Ok(()), None) if sender.left > 0 => Err(SourceError::BadResponse {
                        name,
                        start: range.start,
                        end: range.end,
                        detail: format!(
                            "{} bytes arrived for a range of {}",
                            range.end - range.start - sender.left,
                            range.end - range.start
                        ),
                    }),
                    (Ok(()), None) => Ok(()),
                };
                let _ = sender.tx.send(Event::End { part, result });
            });
        }
    }
}

/// Passes a part's chunks to the consumer as they arrive, refusing any beyond the part's range.
struct PartSender {
    tx: mpsc::UnboundedSender<Event>,
    /// Bytes allowed on their way to the consumer.
    passage: Arc<Semaphore>,
    part: PartId,
    held: Arc<Held>,
    name: String,
    range: Range<u64>,
    /// Bytes of the part still to come.
    left: u64,
    /// Why the sender refused a chunk (a body longer than the range).
    refused: Option<SourceError>,
    /// Chunks not passed on yet.
    batch: Vec<Bytes>,
    batch_bytes: usize,
    /// For an ordered sink, the part's place in the order and the memory it holds: a part before
    /// its turn keeps its chunks until its turn or its end (one hand-over, not one per batch; they
    /// would only wait at the consumer).
    waiting: Option<Waiting>,
}

impl PartSender {
    /// Passes the batch on, once the passage has room for it.
    async fn pass_on(&mut self) -> Result<(), Stopped> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.batch_bytes);
        let data = std::mem::take(&mut self.batch);
        let permits = bytes.clamp(1, PASSAGE_BYTES) as u32;
        let memory = self.waiting.as_mut().and_then(|w| w.held.take());
        let sent = match self.passage.clone().acquire_many_owned(permits).await {
            Ok(passage) => self
                .tx
                .send(Event::Chunks {
                    part: self.part,
                    data,
                    _passage: passage,
                    memory,
                })
                .is_ok(),
            Err(_) => false,
        };
        if !sent {
            self.held.sub(bytes as u64);
            return Err(Stopped);
        }
        Ok(())
    }
}

impl Drop for PartSender {
    /// Chunks of a read that failed or was abandoned are no longer held.
    fn drop(&mut self) {
        self.held.sub(self.batch_bytes as u64);
    }
}

impl Receive for PartSender {
    fn receive(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), Stopped>> {
        Box::pin(async move {
            let n = data.len() as u64;
            if n > self.left {
                let want = self.range.end - self.range.start;
                self.refused = Some(SourceError::BadResponse {
                    name: self.name.clone(),
                    start: self.range.start,
                    end: self.range.end,
                    detail: format!(
                        "{} bytes arrived for a range of {want}",
                        want - self.left + n
                    ),
                });
                return Err(Stopped);
            }
            // Before its turn, a part holds its chunks in memory it must take first: while there
            // is none, the rest of the body waits in the connection.
            let my_turn = match &mut self.waiting {
                None => true,
                Some(w) if w.my_turn() => true,
                Some(w) => w.reserve(data.len()).await?,
            };
            self.left -= n;
            self.held.add(n);
            self.batch_bytes += data.len();
            self.batch.push(data);
            if my_turn && self.batch_bytes >= BATCH_BYTES {
                self.pass_on().await?;
            }
            Ok(())
        })
    }
}

/// Where the consumer is in a part: the next byte and the item it belongs to (or precedes), and,
/// for an ordered sink, the chunks that arrived before the part's turn.
struct PartState {
    pos: u64,
    item: usize,
    waiting: VecDeque<Bytes>,
    ended: bool,
    /// The memory the waiting chunks hold.
    memory: Option<OwnedSemaphorePermit>,
}

/// Cuts the chunks of the parts into item pieces for the sink, on a blocking thread.
struct Consumer<'r> {
    plan: &'r Plan,
    sink: Box<dyn Sink>,
    ordered: bool,
    held: &'r Held,
    progress: &'r Progress,
    parts: HashMap<PartId, PartState>,
    /// Items partly given to the sink: the bytes still to come.
    unfinished: HashMap<(usize, usize), u64>,
    /// For an ordered sink, the part whose turn it is, and its number in plan order (shared with
    /// the requests).
    head: Option<PartId>,
    order: &'r Order,
    report: EngineReport,
}

impl<'r> Consumer<'r> {
    fn new(
        plan: &'r Plan,
        sink: Box<dyn Sink>,
        held: &'r Held,
        order: &'r Order,
        progress: &'r Progress,
    ) -> Consumer<'r> {
        let ordered = sink.ordered();
        Consumer {
            plan,
            sink,
            ordered,
            held,
            progress,
            parts: HashMap::new(),
            unfinished: HashMap::new(),
            head: next_part(plan, None),
            order,
            report: EngineReport::default(),
        }
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<EngineReport, FetchError> {
        let result = (|| {
            loop {
                match rx.blocking_recv() {
                    Some(Event::Chunks {
                        part, data, memory, ..
                    }) => {
                        self.chunks(part, data, memory)?;
                    }
                    Some(Event::Interrupted) => return Err(FetchError::Interrupted),
                    Some(Event::End { part, result }) => {
                        result?;
                        self.end(part)?;
                    }
                    None => break,
                }
            }
            self.check_complete()?;
            self.sink.finish()?;
            Ok(())
        })();
        if result.is_err() {
            // Keep what is complete; closing the channel stops the producer and the requests.
            let _ = self.sink.interrupted();
            rx.close();
        }
        self.progress.finish();
        result.map(|()| self.report)
    }

    fn state(&mut self, id: PartId) -> &mut PartState {
        let file = &self.plan.files[id.file];
        self.parts.entry(id).or_insert_with(|| {
            let start = file.parts[id.part].range.start;
            PartState {
                pos: start,
                item: file.items.partition_point(|i| i.range.end <= start),
                waiting: VecDeque::new(),
                ended: false,
                memory: None,
            }
        })
    }

    /// A part's next chunks: cut for the sink if it is the part's turn, else kept (with the memory
    /// they hold) until it is.
    fn chunks(
        &mut self,
        id: PartId,
        data: Vec<Bytes>,
        memory: Option<OwnedSemaphorePermit>,
    ) -> Result<(), FetchError> {
        if self.ordered && self.head != Some(id) {
            let state = self.state(id);
            state.waiting.extend(data);
            if let Some(memory) = memory {
                keep(&mut state.memory, memory);
            }
            return Ok(());
        }
        for chunk in data {
            self.cut(id, chunk)?;
        }
        Ok(())
    }

    fn end(&mut self, id: PartId) -> Result<(), FetchError> {
        let part = &self.plan.files[id.file].parts[id.part];
        self.report.parts += 1;
        self.report.part_bytes += part.range.end - part.range.start;
        if !self.ordered {
            self.parts.remove(&id);
            return Ok(());
        }
        self.state(id).ended = true;
        // Give the parts whose turn has come what they hold, and their memory back.
        while let Some(head) = self.head {
            let Some(state) = self.parts.get_mut(&head) else {
                break;
            };
            let waiting = std::mem::take(&mut state.waiting);
            let memory = state.memory.take();
            let ended = state.ended;
            for data in waiting {
                self.cut(head, data)?;
            }
            drop(memory);
            if !ended {
                break;
            }
            self.parts.remove(&head);
            self.head = next_part(self.plan, Some(head));
            self.order.advance();
        }
        Ok(())
    }

    /// Gives the item bytes of a part's next chunk to the sink, and finishes the items it
    /// completes.
    fn cut(&mut self, id: PartId, mut data: Bytes) -> Result<(), FetchError> {
        let plan = self.plan;
        let file = &plan.files[id.file];
        let held = data.len() as u64;
        let state = self.state(id);
        let (mut pos, mut index) = (state.pos, state.item);
        while !data.is_empty() {
            let Some(item) = file.items.get(index) else {
                // Parts end on item bytes: nothing can follow the last item.
                break;
            };
            let len = data.len() as u64;
            if pos < item.range.start {
                let gap = (item.range.start - pos).min(len);
                let _ = data.split_to(gap as usize);
                pos += gap;
                continue;
            }
            let n = (item.range.end - pos).min(len);
            let piece = data.split_to(n as usize);
            self.sink.write(file, item, pos - item.range.start, piece)?;
            self.report.item_bytes += n;
            pos += n;
            let left = self
                .unfinished
                .entry((id.file, index))
                .or_insert_with(|| item.len());
            *left -= n;
            if *left == 0 {
                self.unfinished.remove(&(id.file, index));
                self.sink.item_done(file, item)?;
                self.report.items += 1;
                self.progress.item_done();
            }
            if pos == item.range.end {
                index += 1;
            }
        }
        let state = self.state(id);
        state.pos = pos;
        state.item = index;
        self.held.sub(held);
        Ok(())
    }

    /// Refuses to finish a run that did not give every item whole (the producer stopped early).
    fn check_complete(&self) -> Result<(), FetchError> {
        let items = self.plan.items() as u64;
        if self.report.items != items {
            return Err(FetchError::Incomplete {
                done: self.report.items,
                items,
            });
        }
        Ok(())
    }
}

/// The part after `after` in plan order (the first part when `None`).
fn next_part(plan: &Plan, after: Option<PartId>) -> Option<PartId> {
    let (mut file, mut part) = match after {
        None => (0, 0),
        Some(id) => (id.file, id.part + 1),
    };
    while let Some(f) = plan.files.get(file) {
        if part < f.parts.len() {
            return Some(PartId { file, part });
        }
        file += 1;
        part = 0;
    }
    None
}
