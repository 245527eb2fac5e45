//! One fetch split among worker processes (`--shard I/N`), as a job array runs it: the workers
//! write one output folder together, which is complete (its metadata published) only once every
//! share is in; a killed worker is rerun with `--resume`; a worker of another plan is refused;
//! streams and verification split the same way. Against the S3 test server (whose request log
//! shows every byte range fetched once), moto and local folders.

mod common;
#[path = "support/s3_server.rs"]
mod s3_server;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::{dcpfetch, dcpfetch_process, fetched_tree, fixture, moto, read, snapshot, upload};
use s3_server::{Fault, FaultRule, ServerConfig, TestServer};
use serde_json::Value;

/// Small parts, so that every share has many requests and items span shares.
const PLAN: [&str; 4] = ["--part-size", "2KiB", "--max-gap-size", "0"];

/// A fixture served by the S3 test server as `s3://ckpt/NAME`.
struct Served {
    _root: tempfile::TempDir,

    server: TestServer,
    name: &'static str,
}

fn serve(name: &'static str) -> Served {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let server = TestServer::start(ServerConfig::new(tmp.path())).unwrap();
    Served {
        _root: tmp,

        server,
        name,
    }
}

impl Served {
    /// `fetch` of worker `shard` (`I/N`) into `out`, with a JSON summary on stdout.
    fn fetch(&self, out: &Path, shard: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "fetch",
            &format!("s3://ckpt/{}", self.name),
            "--endpoint-url",
            &self.server.endpoint(),
            "--path-style",
            "-o",
            &out.display().to_string(),
            "--shard",
            shard,
            "--concurrency",
            "2",
            "--json",
            "--no-progress",
        ]
        .map(String::from)
        .to_vec();
        args.extend(PLAN.map(String::from));
        args
    }

    /// Every object GET's byte range, by key.
    fn ranges(&self) -> BTreeMap<String, Vec<(u64, u64)>> {
        let mut by_key: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for g in self.server.stats().get_log {
            if g.key.ends_with(".distcp") {
                by_key
                    .entry(g.key)
                    .or_default()
                    .push(g.range.expect("ranged"));
            }
        }
        by_key
    }
}

fn spawn(args: &[String]) -> Child {
    dcpfetch_process().args(args).spawn().unwrap()
}

/// The JSON summary of a worker that succeeded.
fn summary(out: Output) -> Value {
    assert!(
        out.status.success(),
        "worker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn refused(out: &Output, words: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    for w in words {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
}

/// A whole (unsplit) fetch of the local fixture: what every split fetch must equal.
fn whole_copy(name: &str) -> (tempfile::TempDir, BTreeMap<String, String>) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("whole");
    dcpfetch()
        .arg("fetch")
        .arg(fixture(name))
        .arg("-o")
        .arg(&out)
        .args(["--quiet"])
        .args(PLAN)
        .assert()
        .success();
    let tree = fetched_tree(&out);
    (tmp, tree)
}

/// The plan's bytes fetched (`plan --json`), with the test's options.
fn planned_bytes(name: &str) -> u64 {
    let out = dcpfetch()
        .arg("plan")
        .arg(fixture(name))
        .args(PLAN)
        .arg("--json")
        .output()
        .unwrap();
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["totals"]["bytes_fetched"].as_u64().unwrap()
}

#[test]
fn three_workers_fetch_every_byte_once_into_one_folder() {
    let s = serve("model");
    let (_w, whole) = whole_copy("model");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    s.server.reset_stats();
    let workers: Vec<Child> = (0..3)
        .map(|i| spawn(&s.fetch(&out, &format!("{i}/3"))))
        .collect();
    let summaries: Vec<Value> = workers
        .into_iter()
        .map(|w| summary(w.wait_with_output().unwrap()))
        .collect();

    assert_eq!(
        fetched_tree(&out),
        whole,
        "the folder differs from a whole fetch"
    );
    // Whoever finished last published; nobody published before every share was in.
    let complete = summaries
        .iter()
        .filter(|s| s["shard"]["shares_missing"] == serde_json::json!([]))
        .count();
    assert!(complete >= 1, "{summaries:?}");
    for (i, sum) in summaries.iter().enumerate() {
        assert_eq!(sum["shard"]["index"], i);
        assert_eq!(sum["shard"]["count"], 3);
    }
    // The server's log: no byte range asked for twice, and every planned byte asked for.
    let mut total = 0;
    for (key, mut ranges) in s.ranges() {
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "{key}: {:?} and {:?} overlap", w[0], w[1]);
        }
        total += ranges.iter().map(|r| r.1 - r.0).sum::<u64>();
    }
    assert_eq!(total, planned_bytes("model"));
    // Each share got about a third.
    let third = total / 3;
    for sum in &summaries {
        let fetched = sum["bytes_transferred"].as_u64().unwrap();
        assert!(fetched.abs_diff(third) <= 2048, "{fetched} vs {third}");
    }
}

#[test]
fn workers_finishing_together_publish_once() {
    // Per-rank metadata: publishing places a blocker, renames the rank files, removes it.
    let src = fixture("per_rank");
    let (_w, whole) = whole_copy("per_rank");
    for round in 0..4 {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let workers: Vec<Child> = (0..4)
            .map(|i| {
                let mut c = dcpfetch_process();
                c.arg("fetch")
                    .arg(&src)
                    .arg("-o")
                    .arg(&out)
                    .args(["--shard", &format!("{i}/4"), "--json", "--no-progress"])
                    .args(PLAN);
                c.spawn().unwrap()
            })
            .collect();
        let summaries: Vec<Value> = workers
            .into_iter()
            .map(|w| summary(w.wait_with_output().unwrap()))
            .collect();
        assert_eq!(fetched_tree(&out), whole, "round {round}");
        assert!(!out.join(".metadata").exists(), "a blocker was left behind");
        assert!(
            summaries
                .iter()
                .any(|s| s["shard"]["shares_missing"] == serde_json::json!([])),
            "{summaries:?}"
        );
        let leftovers: Vec<String> = snapshot(&out.join(".dcpfetch"))
            .into_keys()
            .filter(|k| k.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

/// Waits until `path` has at least `lines` lines.
fn wait_for_lines(path: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
        if n >= lines {
            return;
        }
        assert!(Instant::now() < deadline, "{} stayed short", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_worker_is_rerun_with_resume_and_fetches_only_what_is_missing() {
    let s = serve("model");
    let (_w, whole) = whole_copy("model");
    s.server.add_fault(
        FaultRule::new(Fault::Latency(Duration::from_millis(250)))
            .on_key(".distcp")
            .on_method("GET")
            .always(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let worker0 = spawn(&s.fetch(&out, "0/2"));
    let mut worker1 = spawn(&s.fetch(&out, "1/2"));
    // Worker 1 has recorded items (the journal is synced every 5 s): a second worker for the
    // same share is refused, then worker 1 dies.
    wait_for_lines(&out.join(".dcpfetch/journal.1-of-2.jsonl"), 2);
    let twin = dcpfetch()
        .args(s.fetch(&out, "1/2"))
        .arg("--resume")
        .output()
        .unwrap();
    refused(
        &twin,
        &[
            "share 1/2 of",
            "is being fetched by another dcpfetch",
            &format!("(pid {})", worker1.id()),
        ],
    );
    worker1.kill().unwrap();
    worker1.wait().unwrap();

    // Worker 0 finishes, but its folder is not complete: no metadata.
    let sum0 = summary(worker0.wait_with_output().unwrap());
    assert_eq!(sum0["shard"]["shares_missing"], serde_json::json!([1]));
    assert!(!out.join(".metadata").exists());

    // Rerun with --resume: only the missing bytes, then the folder is complete.
    s.server.clear_faults();
    s.server.reset_stats();
    let rerun = dcpfetch()
        .args(s.fetch(&out, "1/2"))
        .arg("--resume")
        .output()
        .unwrap();
    let sum1 = summary(rerun);
    assert!(
        sum1["items_already_present"].as_u64().unwrap() > 0,
        "{sum1}"
    );
    assert_eq!(sum1["shard"]["shares_missing"], serde_json::json!([]));
    assert_eq!(fetched_tree(&out), whole);
    let refetched: u64 = s.ranges().values().flatten().map(|r| r.1 - r.0).sum();
    let share: u64 = planned_bytes("model") - sum0["bytes_transferred"].as_u64().unwrap();
    assert!(
        refetched < share,
        "the rerun fetched {refetched} of {share} bytes"
    );
}

/// A worker whose plan differs from the other workers' is refused, saying what differs, and
/// the folder stays incomplete; the right worker then completes it.
#[test]
fn a_worker_of_another_plan_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ckpt");
    std::fs::create_dir(&src).unwrap();
    for f in std::fs::read_dir(fixture("model")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), src.join(f.file_name())).unwrap();
    }
    let out = tmp.path().join("out");
    // `extra`, and PLAN's settings unless `extra` has its own.
    let fetch = |extra: &[&str]| {
        let mut plan: Vec<&str> = Vec::new();
        for pair in PLAN.chunks(2) {
            if !extra.contains(&pair[0]) {
                plan.extend(pair);
            }
        }
        dcpfetch()
            .arg("fetch")
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .args(["--quiet", "--resume"])
            .args(plan)
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(fetch(&["--shard", "0/2"]).status.success());
    assert!(!out.join(".metadata").exists());
    let cases: &[(&[&str], &str)] = &[
        (&["--shard", "1/3"], "split into 2 shares, this one into 3"),
        (
            &["--shard", "1/2", "--exclude", "optim.*"],
            "selects other items",
        ),
        (&["--shard", "1/2", "--part-size", "4KiB"], "--part-size"),
        (
            &["--shard", "1/2", "--max-gap-size", "1KiB"],
            "--max-gap-size",
        ),
        (&[], "split among 2 workers"),
    ];
    for (extra, words) in cases {
        let before = snapshot(&out);
        refused(
            &fetch(extra),
            &["holds another fetch of this checkpoint", words],
        );
        assert_eq!(snapshot(&out), before, "{extra:?} touched the folder");
    }
    // The checkpoint changed since worker 0 ran.
    let shard = src.join("__0_1.distcp");
    let mut bytes = read(&shard);
    bytes.push(0);
    std::fs::write(&shard, &bytes).unwrap();
    refused(
        &fetch(&["--shard", "1/2"]),
        &["another version of this checkpoint", "__0_1.distcp"],
    );
    bytes.pop();
    std::fs::write(&shard, &bytes).unwrap();
    // Same size, another modification time: another version too; --force starts over.
    refused(&fetch(&["--shard", "1/2"]), &["another version"]);
    assert!(fetch(&["--shard", "1/2", "--force"]).status.success());
    assert!(!out.join(".metadata").exists(), "share 0 is not in yet");
    assert!(fetch(&["--shard", "0/2"]).status.success());
    let (_w, whole) = whole_copy("model");
    assert_eq!(fetched_tree(&out), whole);
}

#[test]
fn workers_take_their_share_from_the_environment_against_moto() {
    moto();
    let prefix = upload(&fixture("model"), "shard-auto");
    let (_w, whole) = whole_copy("model");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let workers: Vec<Child> = (0..2)
        .map(|rank| {
            let mut c = dcpfetch_process();
            c.args([
                "fetch",
                &prefix,
                "--endpoint-url",
                &moto().endpoint,
                "--path-style",
            ])
            .arg("-o")
            .arg(&out)
            .args(["--shard", "auto", "--no-progress"])
            .args(PLAN)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2");
            c.spawn().unwrap()
        })
        .collect();
    for (rank, w) in workers.into_iter().enumerate() {
        let res = w.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(res.status.success(), "{err}");
        assert!(
            err.contains(&format!(
                "note: share {rank}/2 from torchrun (RANK={rank}, WORLD_SIZE=2)"
            )),
            "{err}"
        );
    }
    assert_eq!(fetched_tree(&out), whole);
}

#[test]
fn shard_usage_errors_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // (flags, environment, words of the error)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--shard", "auto"], &[], "found no scheduler"),
        (
            &["--shard", "auto"],
            &[("RANK", "3"), ("WORLD_SIZE", "2")],
            "outside 0 .. 1",
        ),
        (
            &["--shard", "auto"],
            &[
                ("RANK", "1"),
                ("WORLD_SIZE", "4"),
                ("SLURM_PROCID", "2"),
                ("SLURM_NTASKS", "4"),
            ],
            "disagrees",
        ),
        (
            &["--shard", "auto/3"],
            &[("JOB_COMPLETION_INDEX", "7")],
            "outside 0 .. 2",
        ),
        (&["--shard", "2/2"], &[], "does not exist"),
    ];
    for (args, env, words) in cases {
        let res = dcpfetch_process()
            .arg("fetch")
            .arg(fixture("model"))
            .arg("-o")
            .arg(&out)
            .args(*args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(res.status.code(), Some(2), "{args:?} {env:?}");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains(words), "{words:?} not in {err}");
        assert!(!out.exists(), "{args:?} created the output folder");
    }
}

/// `plan --shards N` adds up to the plan, and `plan --shard I/N` is share I of it.
#[test]
fn plan_shows_the_shares() {
    let plan = |extra: &[&str]| -> Value {
        let out = dcpfetch()
            .arg("plan")
            .arg(fixture("model"))
            .args(PLAN)
            .args(["--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let all = plan(&["--shards", "3"]);
    let shares = all["shares"].as_array().unwrap();
    assert_eq!(shares.len(), 3);
    let sum: u64 = shares
        .iter()
        .map(|s| s["bytes_fetched"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, all["totals"]["bytes_fetched"].as_u64().unwrap());
    for (i, s) in shares.iter().enumerate() {
        let one = plan(&["--shard", &format!("{i}/3")]);
        assert_eq!(one["shard"], serde_json::json!({"index": i, "count": 3}));
        assert_eq!(one["totals"]["bytes_fetched"], s["bytes_fetched"]);
        assert_eq!(one["totals"]["requests"], s["requests"]);
    }
}

/// `-o -` with `--shard`: each stream carries whole items, its manifest lists them, and the
/// shares' manifests together list every item of the whole stream once.
#[test]
fn streams_of_shares_hold_every_item_once() {
    let tmp = tempfile::tempdir().unwrap();
    type Key = (String, String, u64, u64);
    let stream = |shard: Option<&str>, manifest: &Path| -> BTreeSet<Key> {
        let mut c = dcpfetch();
        c.arg("fetch")
            .arg(fixture("model"))
            .args(["-o", "-", "--format", "tar", "--manifest"])
            .arg(manifest)
            .args(PLAN);
        if let Some(s) = shard {
            c.args(["--shard", s]);
        }
        let out = c.output().unwrap();
        assert!(out.status.success());
        let m: Value = serde_json::from_slice(&read(manifest)).unwrap();
        assert_eq!(m["total_bytes"].as_u64().unwrap(), out.stdout.len() as u64);
        let mut keys = BTreeSet::new();
        for item in m["items"].as_array().unwrap() {
            let (file, offset, length, at) = (
                item["file"].as_str().unwrap(),
                item["offset"].as_u64().unwrap(),
                item["length"].as_u64().unwrap(),
                item["stream_offset"].as_u64().unwrap() as usize,
            );
            let src = read(&fixture("model").join(file));
            assert!(
                out.stdout[at..at + length as usize]
                    == src[offset as usize..(offset + length) as usize],
                "{item}"
            );
            let key = (
                item["fqn"].as_str().unwrap().to_owned(),
                file.to_owned(),
                offset,
                length,
            );
            assert!(keys.insert(key), "{item} twice");
        }
        keys
    };
    let whole = stream(None, &tmp.path().join("whole.json"));
    let mut union = BTreeSet::new();
    for i in 0..3 {
        let keys = stream(
            Some(&format!("{i}/3")),
            &tmp.path().join(format!("{i}.json")),
        );
        assert!(!keys.is_empty());
        for k in keys {
            assert!(union.insert(k.clone()), "{k:?} in two shares");
        }
    }
    assert_eq!(union, whole);
}

/// `verify --shard I/N --json` of every share, combined, gives the verdict and the exit code of
/// one whole run; a missing or repeated share cannot be combined.
#[test]
fn verify_shares_combine_into_one_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in std::fs::read_dir(fixture("model")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), bad.join(f.file_name())).unwrap();
    }
    // One flipped byte in the last item of the last file.
    let file = bad.join("__0_1.distcp");
    let mut bytes = read(&file);
    let at = bytes.len() - 3000;
    bytes[at] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    for (ckpt, code) in [(fixture("model"), 0), (bad, 1)] {
        let whole = dcpfetch()
            .arg("verify")
            .arg(&ckpt)
            .arg("--json")
            .args(PLAN)
            .output()
            .unwrap();
        assert_eq!(whole.status.code(), Some(code));
        let whole: Value = serde_json::from_slice(&whole.stdout).unwrap();
        let mut reports = Vec::new();
        for i in 0..3 {
            let path = tmp.path().join(format!("{code}-{i}.json"));
            let res = dcpfetch()
                .arg("verify")
                .arg(&ckpt)
                .args(["--json", "--shard", &format!("{i}/3")])
                .args(PLAN)
                .output()
                .unwrap();
            assert!(matches!(res.status.code(), Some(0 | 1)));
            std::fs::write(&path, &res.stdout).unwrap();
            reports.push(path);
        }
        let combined = dcpfetch()
            .args(["verify", "--json", "--combine"])
            .args(&reports)
            .output()
            .unwrap();
        assert_eq!(
            combined.status.code(),
            Some(code),
            "{}",
            String::from_utf8_lossy(&combined.stderr)
        );
        let combined: Value = serde_json::from_slice(&combined.stdout).unwrap();
        assert_eq!(combined["ok"], whole["ok"]);
        for (c, w) in combined["checks"]
            .as_array()
            .unwrap()
            .iter()
            .zip(whole["checks"].as_array().unwrap())
        {
            assert_eq!(c["name"], w["name"]);
            assert_eq!(c["status"], w["status"], "{}", c["name"]);
            assert_eq!(c["checked"], w["checked"], "{}", c["name"]);
            assert_eq!(c["problems"], w["problems"], "{}", c["name"]);
        }
        // Two of three, or one twice: no verdict (exit 2).
        for partial in [
            &reports[..2],
            &[reports[0].clone(), reports[0].clone(), reports[1].clone()][..],
        ] {
            let res = dcpfetch()
                .args(["verify", "--combine"])
                .args(partial)
                .output()
                .unwrap();
            assert_eq!(res.status.code(), Some(2));
            let err = String::from_utf8_lossy(&res.stderr);
            assert!(
                err.contains("missing") || err.contains("both the report of share"),
                "{err}"
            );
        }
    }
}
