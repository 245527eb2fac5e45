//! The fetch engine in process, over the `model` fixture read through a [`FaultStore`]: failures,
//! parts completing out of order, the memory bound, and bodies of the wrong length.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dcpfetch::fetch::{
    self, Cancel, EngineOptions, EngineReport, FetchError, Progress, Sink, SinkError,
};
use dcpfetch::metadata::Checkpoint;
use dcpfetch::plan::{FilePlan, Plan, PlanItem, PlanOptions};
use dcpfetch::selection::Spec;
use dcpfetch::source::fault::{Call, Fault, Method, Rule};
use dcpfetch::source::{
    FaultStore, LocalSource, ObjectMeta, ObjectName, Source, SourceError, TransferStats,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/model")
}

/// The `model` fixture behind a fault store, planned whole.
struct Setup {
    store: Arc<FaultStore>,
    source: Source,
    plan: Arc<Plan>,
    objects: HashMap<ObjectName, ObjectMeta>,
}

async fn setup(opts: PlanOptions) -> Setup {
    let local = LocalSource::new(fixture(), Arc::new(TransferStats::default()));
    let store = Arc::new(FaultStore::new(Arc::new(local)));
    let source = Source::new(store.clone());
    let ck = Checkpoint::load(&source).await.unwrap();
    let (selected, _) = Spec::default().resolve(&ck).unwrap();
    let plan = Plan::build(&ck, &selected, opts).unwrap();
    let names: Vec<ObjectName> = plan.files.iter().map(|f| f.name.clone()).collect();
    let objects = dcpfetch::source::stat_all(&source, &names, 8)
        .await
        .unwrap();
    assert!(plan.files.len() >= 2, "the fixture has two shard files");
    store.clear_calls();
    Setup {
        store,
        source,
        plan: Arc::new(plan),
        objects,
    }
}

/// What the sink was given.
#[derive(Debug, Default)]
struct Log {
    /// (file, item range, offset in the item, bytes), in the order written.
    writes: Vec<(String, Range<u64>, u64, Bytes)>,
    done: Vec<(String, Range<u64>)>,
    finished: u32,
    interrupted: u32,
    /// The store's calls when the first bytes reached the sink.
    calls_at_first_write: Option<Vec<Call>>,
}

struct Recorder {
    log: Arc<Mutex<Log>>,
    store: Arc<FaultStore>,
}

impl Sink for Recorder {
    fn write(
        &mut self,
        file: &FilePlan,
        item: &PlanItem,
        at: u64,
        data: Bytes,
    ) -> Result<(), SinkError> {
        let mut log = self.log.lock().unwrap();
        if log.calls_at_first_write.is_none() {
            log.calls_at_first_write = Some(self.store.calls());
        }
        log.writes
            .push((file.name.to_string(), item.range.clone(), at, data));
        Ok(())
    }

    fn item_done(&mut self, file: &FilePlan, item: &PlanItem) -> Result<(), SinkError> {
        let mut log = self.log.lock().unwrap();
        log.done.push((file.name.to_string(), item.range.clone()));
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.log.lock().unwrap().finished += 1;
        Ok(())
    }

    fn interrupted(&mut self) -> Result<(), SinkError> {
        self.log.lock().unwrap().interrupted += 1;
        Ok(())
    }
}

async fn run(s: &Setup, engine: EngineOptions) -> (Result<EngineReport, FetchError>, Log) {
    let log = Arc::new(Mutex::new(Log::default()));
    let sink = Recorder {
        log: log.clone(),
        store: s.store.clone(),
    };
    let progress = Progress::new(s.plan.fetched(), s.plan.items() as u64, true);
    let result = fetch::run(
        &s.source,
        s.plan.clone(),
        &s.objects,
        engine,
        Box::new(sink),
        progress,
        Cancel::never(),
    )
    .await;
    let log = std::mem::take(&mut *log.lock().unwrap());
    (result, log)
}

fn file_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture().join(name)).unwrap()
}

/// Every write carries the file's own bytes at its place, and the writes of each item are
/// contiguous from its start, in plan order: files in order, items of a file by offset. Returns
/// how many items were written whole.
fn check_writes_in_plan_order(plan: &Plan, log: &Log) -> usize {
    let order: Vec<(&str, &Range<u64>)> = plan
        .files
        .iter()
        .flat_map(|f| f.items.iter().map(move |i| (f.name.as_str(), &i.range)))
        .collect();
    let mut disk: HashMap<String, Vec<u8>> = HashMap::new();
    let mut at_item = 0usize;
    let mut filled = 0u64;
    for (file, item, at, data) in &log.writes {
        if filled == order[at_item].1.end - order[at_item].1.start {
            at_item += 1;
            filled = 0;
        }
        let (want_file, want_item) = order[at_item];
        assert_eq!(
            (file.as_str(), item),
            (want_file, want_item),
            "out of plan order"
        );
        assert_eq!(*at, filled, "{file} {item:?}: a piece out of order");
        let bytes = disk.entry(file.clone()).or_insert_with(|| file_bytes(file));
        let start = (item.start + at) as usize;
        assert!(
            data[..] == bytes[start..start + data.len()],
            "{file} {item:?} at {at}: wrong bytes"
        );
        filled += data.len() as u64;
    }
    let whole = match order.get(at_item) {
        Some((_, r)) if filled == r.end - r.start => at_item + 1,
        _ => at_item,
    };
    assert_eq!(
        log.done,
        order[..whole]
            .iter()
            .map(|(f, r)| (f.to_string(), (*r).clone()))
            .collect::<Vec<_>>(),
        "item_done for exactly the items written whole, in order"
    );
    whole
}

/// The highest byte of `file` any write reached (0 if none).
fn written_up_to(log: &Log, file: &str) -> u64 {
    log.writes
        .iter()
        .filter(|(f, ..)| f == file)
        .map(|(_, item, at, data)| item.start + at + data.len() as u64)
        .max()
        .unwrap_or(0)
}

const SMALL_PARTS: PlanOptions = PlanOptions {
    max_gap: 0,
    part_size: 16 << 10,
};

const ROOMY: EngineOptions = EngineOptions {
    concurrency: 8,
    max_memory: 64 << 20,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_faults_every_item_arrives_whole_and_in_order() {
    let s = setup(SMALL_PARTS).await;
    let (result, log) = run(&s, ROOMY).await;
    let report = result.unwrap();
    assert_eq!(check_writes_in_plan_order(&s.plan, &log), s.plan.items());
    assert_eq!(report.items, s.plan.items() as u64);
    assert_eq!((log.finished, log.interrupted), (1, 0));
    let reads = s
        .store
        .calls()
        .iter()
        .filter(|c| c.method == Method::ReadRange)
        .count();
    assert_eq!(reads, s.plan.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_fails_the_run_naming_the_file_and_range() {
    let s = setup(SMALL_PARTS).await;
    let file = &s.plan.files[1];
    assert!(file.parts.len() >= 3, "{:?}", file.parts);
    let failed = file.parts[file.parts.len() / 2].range.clone();
    s.store.add(
        Rule::new(Fault::fail(|call| SourceError::Exhausted {
            what: call.to_string(),
            attempts: 10,
            last: "HTTP 503 (injected)".into(),
        }))
        .on(Method::ReadRange)
        .on_name(file.name.as_str())
        .at_offset(failed.start),
    );
    let (result, log) = run(&s, ROOMY).await;
    let e = result.unwrap_err();
    assert!(
        matches!(e, FetchError::Source(SourceError::Exhausted { .. })),
        "{e:?}"
    );
    let message = e.to_string();
    let range = format!("{}..{}", failed.start, failed.end);
    assert!(
        message.contains(file.name.as_str()) && message.contains(&range),
        "{message}"
    );
    assert_eq!((log.finished, log.interrupted), (0, 1));
    assert_eq!(s.store.hits(), 1);
    // What did arrive is right and in order, and stops before the failed part.
    check_writes_in_plan_order(&s.plan, &log);
    assert!(written_up_to(&log, file.name.as_str()) <= failed.start);
    assert!(written_up_to(&log, s.plan.files[0].name.as_str()) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_completing_out_of_order_reach_the_sink_in_plan_order() {
    let s = setup(SMALL_PARTS).await;
    // The first two parts of every file finish last.
    for f in &s.plan.files {
        for (i, delay) in [(0, 300), (1, 150)] {
            s.store.add(
                Rule::new(Fault::Delay(Duration::from_millis(delay)))
                    .on(Method::ReadRange)
                    .on_name(f.name.as_str())
                    .at_offset(f.parts[i].range.start),
            );
        }
    }
    let (result, log) = run(&s, ROOMY).await;
    result.unwrap();
    assert_eq!(s.store.hits(), 2 * s.plan.files.len() as u64);
    assert_eq!(check_writes_in_plan_order(&s.plan, &log), s.plan.items());
    assert_eq!((log.finished, log.interrupted), (1, 0));
    // The delayed first part was not waited for before starting the others.
    let started = log.calls_at_first_write.unwrap().len();
    assert!(started > 2, "only {started} reads had started");
    assert!(s.store.max_concurrent(Method::ReadRange) > 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_waiting_for_a_slow_one_stay_within_max_memory() {
    let part_size = 64 << 10;
    let s = setup(PlanOptions {
        max_gap: u64::MAX,
        part_size,
    })
    .await;
    let engine = EngineOptions {
        concurrency: 64,
        max_memory: 4 * part_size,
    };
    let first = &s.plan.files[0];
    s.store.add(
        Rule::new(Fault::Delay(Duration::from_millis(300)))
            .on(Method::ReadRange)
            .at_offset(first.parts[0].range.start),
    );
    let (result, log) = run(&s, engine).await;
    let report = result.unwrap();
    assert_eq!(check_writes_in_plan_order(&s.plan, &log), s.plan.items());
    // Until the slow first part arrived nothing could be released: every part started by then
    // was held at once.
    let held: Vec<Range<u64>> = log
        .calls_at_first_write
        .unwrap()
        .into_iter()
        .filter_map(|c| c.range)
        .collect();
    let bytes: u64 = held.iter().map(|r| r.end - r.start).sum();
    assert!(held.len() >= 2, "{held:?}");
    assert!(bytes <= engine.max_memory, "{bytes} bytes held: {held:?}");
    // And the bound was what stopped the engine: the next part would not have fitted.
    let parts: Vec<Range<u64>> = s
        .plan
        .files
        .iter()
        .flat_map(|f| f.parts.iter().map(|p| p.range.clone()))
        .collect();
    let next = &parts[held.len()];
    assert!(
        bytes + (next.end - next.start) > engine.max_memory,
        "{held:?} then {next:?}"
    );
    assert!(report.peak_memory <= engine.max_memory, "{report:?}");
}

/// A body of the wrong length on a part that holds several items: the run fails, and none of
/// that part's bytes reach the sink.
async fn wrong_length(fault: Fault, extra: i64) {
    let s = setup(PlanOptions {
        max_gap: u64::MAX,
        part_size: 64 << 10,
    })
    .await;
    let file = &s.plan.files[0];
    let part = file.parts[1].range.clone();
    let inside = file
        .items
        .iter()
        .filter(|i| i.range.start >= part.start && i.range.end <= part.end)
        .count();
    assert!(inside >= 2, "the part holds several items");
    s.store.add(
        Rule::new(fault)
            .on_name(file.name.as_str())
            .at_offset(part.start),
    );
    let (result, log) = run(&s, ROOMY).await;
    let e = result.unwrap_err();
    assert!(
        matches!(e, FetchError::Source(SourceError::BadResponse { .. })),
        "{e:?}"
    );
    let want = part.end - part.start;
    let received = want.checked_add_signed(extra).unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{} bytes {}..{}: {received} bytes arrived for a range of {want}",
            file.name, part.start, part.end
        )
    );
    assert_eq!((log.finished, log.interrupted), (0, 1));
    check_writes_in_plan_order(&s.plan, &log);
    assert!(written_up_to(&log, file.name.as_str()) <= part.start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_body_is_an_error() {
    wrong_length(Fault::Short(1), -1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_body_is_an_error() {
    wrong_length(Fault::Long(3), 3).await;
}
