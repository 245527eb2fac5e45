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
    let objects = dcpfetch::source::stat_all(&source, &names, 8, &Default::default())
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
    /// For each `done`, how many writes had been made.
    writes_before_done: Vec<usize>,
    finished: u32,
    interrupted: u32,
    /// The store's calls when the first bytes reached the sink.
    calls_at_first_write: Option<Vec<Call>>,
}

struct Recorder {
    log: Arc<Mutex<Log>>,
    store: Arc<FaultStore>,
    ordered: bool,
}

impl Sink for Recorder {
    fn ordered(&self) -> bool {
        self.ordered
    }

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
        let n = log.writes.len();
        log.writes_before_done.push(n);
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

/// A run into a sink that needs plan order.
async fn run(s: &Setup, engine: EngineOptions) -> (Result<EngineReport, FetchError>, Log) {
    run_into(s, engine, true).await
}

async fn run_into(
    s: &Setup,
    engine: EngineOptions,
    ordered: bool,
) -> (Result<EngineReport, FetchError>, Log) {
    let log = Arc::new(Mutex::new(Log::default()));
    let sink = Recorder {
        log: log.clone(),
        store: s.store.clone(),
        ordered,
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
        Rule::new(Fault::fail(|call| {
            // Late, as a request that gives up after its retries is: the parts before it have
            // reached the sink by then (else a loaded machine could fail the run first).
            std::thread::sleep(Duration::from_millis(150));
            SourceError::Exhausted {
                what: call.to_string(),
                attempts: 10,
                last: "HTTP 503 (injected)".into(),
            }
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

/// A stream of 64 KiB parts through a budget of four, from a store that holds back or not, whose
/// first part comes 300 ms late: every part of the plan, the budget, the run's report and log
/// (the writes checked to be in plan order).
async fn slow_first_part(holds_back: bool) -> (Vec<Range<u64>>, EngineOptions, EngineReport, Log) {
    let part_size = 64 << 10;
    let s = setup(PlanOptions {
        max_gap: u64::MAX,
        part_size,
    })
    .await;
    s.store.set_holds_back(holds_back);
    assert_eq!(s.source.holds_back(), holds_back);
    let engine = EngineOptions {
        concurrency: 64,
        max_memory: 4 * part_size,
    };
    let parts: Vec<Range<u64>> = s
        .plan
        .files
        .iter()
        .flat_map(|f| f.parts.iter().map(|p| p.range.clone()))
        .collect();
    assert!(parts.len() > 6, "{} parts", parts.len());
    s.store.add(
        Rule::new(Fault::Delay(Duration::from_millis(300)))
            .on(Method::ReadRange)
            .at_offset(parts[0].start),
    );
    let (result, log) = run(&s, engine).await;
    let report = result.unwrap();
    assert_eq!(check_writes_in_plan_order(&s.plan, &log), s.plan.items());
    assert_eq!(report.items, s.plan.items() as u64);
    (parts, engine, report, log)
}

/// Parts before their turn start at once, take memory for their chunks as they arrive, and stop
/// reading when `max_memory` is taken: a slow first part holds the stream back, not the requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_waiting_for_a_slow_one_stay_within_max_memory() {
    let (parts, engine, report, log) = slow_first_part(true).await;
    // Every part had started while the first was on its way: the memory bound no longer holds
    // requests back...
    let started = log.calls_at_first_write.unwrap().len();
    assert_eq!(started, parts.len().min(64), "{started} reads had started");
    // ...but the bytes: what waited for the first part is at most the budget (the part at the
    // head holds at most its own bytes on top, on their way to the sink).
    let part_size = parts[0].end - parts[0].start;
    assert!(
        report.peak_memory <= engine.max_memory + part_size,
        "{report:?}"
    );
}

/// From a store whose reads do not hold back (a local folder), a part before its turn starts only
/// once there is memory for all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_a_local_store_parts_start_only_with_memory_for_all_of_them() {
    let (parts, engine, report, log) = slow_first_part(false).await;
    // Until the slow first part arrived nothing could be released: the parts started by then
    // were those the budget holds whole, and the next one would not have fitted.
    let held: Vec<Range<u64>> = log
        .calls_at_first_write
        .unwrap()
        .into_iter()
        .filter_map(|c| c.range)
        .collect();
    let bytes: u64 = held.iter().map(|r| r.end - r.start).sum();
    assert!(held.len() >= 2, "{held:?}");
    assert!(bytes <= engine.max_memory, "{bytes} bytes held: {held:?}");
    let next = &parts[held.len()];
    assert!(
        bytes + (next.end - next.start) > engine.max_memory,
        "{held:?} then {next:?}"
    );
    assert!(report.peak_memory <= engine.max_memory, "{report:?}");
}

/// A body of the wrong length on a part that holds several items: the run fails, and no byte
/// beyond what the part's range holds reaches the sink (what did arrive of it is at its place,
/// and only items that arrived whole are done).
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
    assert!(written_up_to(&log, file.name.as_str()) <= part.start + received.min(want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_body_is_an_error() {
    wrong_length(Fault::Short(1), -1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_body_is_an_error() {
    wrong_length(Fault::Long(3), 3).await;
}

/// Checks the log of a sink that places bytes: every item byte written exactly once, with the
/// file's own bytes, and every item done exactly once, after its last byte.
fn check_placed(plan: &Plan, log: &Log) {
    let mut disk: HashMap<String, Vec<u8>> = HashMap::new();
    // Per item: how many of its bytes were written, after each write.
    let mut filled: HashMap<(String, u64), u64> = HashMap::new();
    let mut seen: HashMap<(String, u64), Vec<bool>> = HashMap::new();
    let mut filled_after: Vec<((String, u64), u64)> = Vec::new();
    for (file, item, at, data) in &log.writes {
        let bytes = disk.entry(file.clone()).or_insert_with(|| file_bytes(file));
        let start = (item.start + at) as usize;
        assert!(
            data[..] == bytes[start..start + data.len()],
            "{file} {item:?} at {at}: wrong bytes"
        );
        let key = (file.clone(), item.start);
        let bits = seen
            .entry(key.clone())
            .or_insert_with(|| vec![false; (item.end - item.start) as usize]);
        for b in &mut bits[*at as usize..*at as usize + data.len()] {
            assert!(!*b, "{file} {item:?} at {at}: a byte written twice");
            *b = true;
        }
        let n = filled.entry(key.clone()).or_default();
        *n += data.len() as u64;
        filled_after.push((key, *n));
    }
    let mut done = std::collections::HashSet::new();
    for ((file, item), &writes) in log.done.iter().zip(&log.writes_before_done) {
        let key = (file.clone(), item.start);
        assert!(done.insert(key.clone()), "{file} {item:?} done twice");
        let before = filled_after[..writes]
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map_or(0, |(_, n)| *n);
        assert_eq!(before, item.end - item.start, "{file} {item:?} done early");
    }
    for f in &plan.files {
        for item in &f.items {
            let key = (f.name.to_string(), item.range.start);
            assert!(done.contains(&key), "{key:?}: never done");
        }
    }
    assert_eq!(log.done.len(), plan.items());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placing_sink_gets_bytes_as_they_arrive_each_once() {
    let s = setup(SMALL_PARTS).await;
    // The first part of every file is slow: the others are written meanwhile.
    for f in &s.plan.files {
        s.store.add(
            Rule::new(Fault::Delay(Duration::from_millis(300)))
                .on(Method::ReadRange)
                .on_name(f.name.as_str())
                .at_offset(f.parts[0].range.start),
        );
    }
    let (result, log) = run_into(&s, ROOMY, false).await;
    let report = result.unwrap();
    check_placed(&s.plan, &log);
    assert_eq!(report.items, s.plan.items() as u64);
    assert_eq!((log.finished, log.interrupted), (1, 0));
    let (first_file, first_item, at, _) = &log.writes[0];
    let slow = &s
        .plan
        .files
        .iter()
        .find(|f| f.name.as_str() == first_file)
        .unwrap()
        .parts[0]
        .range;
    assert!(
        first_item.start + at >= slow.end,
        "the first write ({first_file} {first_item:?} at {at}) waited for the slow part {slow:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placing_sink_makes_a_failed_run_stop_without_done_items_of_the_failed_part() {
    let s = setup(SMALL_PARTS).await;
    let file = &s.plan.files[0];
    let failed = file.parts[1].range.clone();
    s.store.add(
        Rule::new(Fault::Short(1))
            .on(Method::ReadRange)
            .on_name(file.name.as_str())
            .at_offset(failed.start),
    );
    let (result, log) = run_into(&s, ROOMY, false).await;
    let e = result.unwrap_err();
    assert!(
        matches!(e, FetchError::Source(SourceError::BadResponse { .. })),
        "{e:?}"
    );
    assert_eq!((log.finished, log.interrupted), (0, 1));
    // The item holding the part's last byte never arrived whole.
    let last = file
        .items
        .iter()
        .find(|i| i.range.start < failed.end && failed.end <= i.range.end)
        .unwrap();
    assert!(
        !log.done
            .iter()
            .any(|(f, r)| f == file.name.as_str() && *r == last.range),
        "{:?} is done though its last byte never came",
        last.range
    );
}

/// A sink that places bytes costs the engine only the chunks on their way, whatever the size of
/// the parts: 32 MiB in parts of 8 MiB, 8 in flight, into a sink that takes 20 ms per piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placing_sink_holds_chunks_not_parts() {
    const SIZE: u64 = 32 << 20;
    const PART: u64 = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("big"), &data).unwrap();
    let source = Source::new(Arc::new(LocalSource::new(
        dir.path().to_path_buf(),
        Arc::new(TransferStats::default()),
    )));
    let opts = PlanOptions {
        max_gap: u64::MAX,
        part_size: PART,
    };
    let name = ObjectName::new("big").unwrap();
    // Items of 1 MiB with 4 KiB gaps, so that parts hold several.
    let items = (0..SIZE / (1 << 20))
        .map(|i| PlanItem {
            range: i * (1 << 20)..(i + 1) * (1 << 20) - 4096,
            storage: vec![i as usize],
        })
        .collect();
    let file = FilePlan::new(name.clone(), items, opts, &|i| i.to_string()).unwrap();
    let plan = Arc::new(Plan {
        options: opts,
        files: vec![file],
    });
    let objects =
        dcpfetch::source::stat_all(&source, std::slice::from_ref(&name), 1, &Default::default())
            .await
            .unwrap();
    struct Slow {
        data: Vec<u8>,
        bytes: u64,
        done: u64,
    }
    impl Sink for Slow {
        fn ordered(&self) -> bool {
            false
        }
        fn write(
            &mut self,
            _: &FilePlan,
            item: &PlanItem,
            at: u64,
            d: Bytes,
        ) -> Result<(), SinkError> {
            let start = (item.range.start + at) as usize;
            assert_eq!(d[..], self.data[start..start + d.len()]);
            self.bytes += d.len() as u64;
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        fn item_done(&mut self, _: &FilePlan, _: &PlanItem) -> Result<(), SinkError> {
            self.done += 1;
            Ok(())
        }
        fn finish(&mut self) -> Result<(), SinkError> {
            assert_eq!(self.done, 32);
            Ok(())
        }
    }
    let engine = EngineOptions {
        concurrency: 8,
        max_memory: SIZE,
    };
    let report = fetch::run(
        &source,
        plan.clone(),
        &objects,
        engine,
        Box::new(Slow {
            data,
            bytes: 0,
            done: 0,
        }),
        Progress::new(plan.fetched(), plan.items() as u64, true),
        Cancel::never(),
    )
    .await
    .unwrap();
    assert_eq!(report.items, 32);
    assert_eq!(report.item_bytes, plan.needed());
    // At most the channel's chunks plus one chunk per request in flight (reads of 256 KiB).
    let bound = (32 + 8) * (256 << 10);
    assert!(
        report.peak_memory <= bound,
        "{} bytes held, more than {bound}",
        report.peak_memory
    );
}
