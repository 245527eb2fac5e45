//! Fetching through a server that injects faults (tests/support/s3_server.rs): every fetch either
//! ends complete and byte-exact, or fails with a message naming the file and range and leaves no
//! output folder that looks complete.

mod common;
#[path = "support/s3_server.rs"]
mod s3_server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{dcpfetch, expected, fixture, sha256};
use s3_server::{Fault, FaultRule, ServerConfig, TestServer};
use serde_json::Value;

/// Sends Ctrl-C (SIGINT, through `kill`: the tests forbid `unsafe`) to a running dcpfetch, waits
/// for it, and checks that it exited 130, the status of an interrupted run.
fn interrupt(child: std::process::Child) -> std::process::Output {
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let res = child.wait_with_output().unwrap();
    assert_eq!(
        res.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    res
}

/// The `model` fixture served at `s3://ckpt/model`.
struct Served {
    root: tempfile::TempDir,
    server: TestServer,
}

fn serve(name: &str) -> Served {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let server = TestServer::start(ServerConfig::new(root.path())).unwrap();
    Served { root, server }
}

/// A rule answering with an HTTP status and S3 error code.
fn status(status: u16, code: &'static str) -> FaultRule {
    FaultRule::new(Fault::Status { status, code })
}

/// Small parts, so that one fetch makes many requests.
const SMALL_PARTS: [&str; 4] = ["--part-size", "16KiB", "--max-gap-size", "0"];

fn fetch(s: &Served, out: &Path, extra: &[&str]) -> std::process::Output {
    dcpfetch()
        .args([
            "fetch",
            "s3://ckpt/model",
            "--endpoint-url",
            &s.server.endpoint(),
            "--path-style",
            "-o",
        ])
        .arg(out)
        .args(["--json", "--quiet"])
        .args(SMALL_PARTS)
        .args(extra)
        .output()
        .unwrap()
}

/// The output is the whole fixture, byte for byte.
fn assert_complete(out: &Path) {
    for (file, info) in expected("model")["files"].as_object().unwrap() {
        assert_eq!(
            &sha256(&common::read(&out.join(file))),
            info["sha256"].as_str().unwrap(),
            "{file}"
        );
    }
    assert_eq!(
        common::read(&out.join(".metadata")),
        common::read(&fixture("model").join(".metadata"))
    );
}

fn summary(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn out_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("copy");
    (d, p)
}

#[test]
fn slow_down_is_retried() {
    let s = serve("model");
    s.server.add_fault(
        status(503, "SlowDown")
            .on_key(".distcp")
            .on_method("GET")
            .times(3),
    );
    s.server.add_fault(
        status(500, "InternalError")
            .on_key(".distcp")
            .on_method("GET")
            .times(2),
    );
    let (_d, out) = out_dir();
    let r = summary(&fetch(&s, &out, &[]));
    assert_eq!(r["retries"], 5);
    assert_complete(&out);
    assert_eq!(s.server.stats().faults, 5);
}

/// The GETs after a fault: the one that failed and the one that resumed it.
fn resumed_from(s: &Served, failed_at: u64) -> bool {
    let log = s.server.stats().get_log;
    let first = log.iter().position(|g| g.key.ends_with(".distcp")).unwrap();
    let (start, _) = log[first].range.unwrap();
    log.iter()
        .skip(first + 1)
        .any(|g| g.range.is_some_and(|(a, _)| a == start + failed_at))
}

#[test]
fn a_reset_mid_body_resumes_from_the_last_byte() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::ResetAfter(5000))
            .on_key(".distcp")
            .on_method("GET"),
    );
    let (_d, out) = out_dir();
    let r = summary(&fetch(&s, &out, &["--concurrency", "1"]));
    assert_eq!(r["retries"], 1);
    assert_complete(&out);
    assert!(resumed_from(&s, 5000), "{:?}", s.server.stats().get_log);
}

/// A stream through a budget of two 4 KiB parts, with resets mid-body: reads before their turn
/// stop mid-body (their bytes wait in the connection), reads are resumed, and the stream is the
/// fixture's, byte for byte and in order.
#[test]
fn a_stream_through_a_small_budget_survives_resets() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::ResetAfter(1000))
            .on_key(".distcp")
            .on_method("GET")
            .times(6),
    );
    let stream = common::stream_through_two_small_parts(dcpfetch().args([
        "fetch",
        "s3://ckpt/model",
        "--endpoint-url",
        &s.server.endpoint(),
        "--path-style",
    ]));
    assert!(
        stream == common::local_stream("model"),
        "other bytes on stdout"
    );
    assert!(
        s.server.faults().iter().all(|r| r.times == 0),
        "{:?}",
        s.server.faults()
    );
}

#[test]
fn a_short_body_resumes_from_the_last_byte() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::ShortBody(7000))
            .on_key(".distcp")
            .on_method("GET"),
    );
    let (_d, out) = out_dir();
    let r = summary(&fetch(&s, &out, &["--concurrency", "1"]));
    assert_eq!(r["retries"], 1);
    assert_complete(&out);
    assert!(resumed_from(&s, 7000));
}

#[test]
fn a_stalled_body_is_abandoned_and_resumed() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::StallAfter {
            after: 3000,
            stall: Duration::from_secs(20),
        })
        .on_key(".distcp")
        .on_method("GET"),
    );
    let (_d, out) = out_dir();
    let started = Instant::now();
    let r = summary(&fetch(
        &s,
        &out,
        &["--concurrency", "1", "--stall-timeout", "0.5"],
    ));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stall was waited out"
    );
    assert_eq!(r["retries"], 1);
    assert_complete(&out);
    assert!(resumed_from(&s, 3000));
}

#[test]
fn slow_first_bytes_are_waited_for_not_retried() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::Latency(Duration::from_millis(300)))
            .on_key(".distcp")
            .times(4),
    );
    let (_d, out) = out_dir();
    let r = summary(&fetch(&s, &out, &["--stall-timeout", "2"]));
    assert_eq!(r["retries"], 0);
    assert_complete(&out);
}

/// A failed fetch: exit code, the message names the file and range, no metadata in the folder.
fn assert_failed(out: &std::process::Output, dir: &Path, code: i32, needles: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
    assert!(
        !dir.join(".metadata").exists(),
        "a failed fetch must not look complete"
    );
}

#[test]
fn a_wrong_content_range_is_refused() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::WrongContentRange)
            .on_key("__0_1")
            .on_method("GET"),
    );
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert_failed(&res, &out, 1, &["__0_1.distcp bytes", "Content-Range"]);
}

#[test]
fn an_object_replaced_mid_fetch_is_refused() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::Replace)
            .on_key("__0_0")
            .on_method("GET"),
    );
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert_failed(
        &res,
        &out,
        1,
        &["__0_0.distcp", "changed while it was read"],
    );
}

#[test]
fn access_denied_fails_with_a_hint() {
    let s = serve("model");
    s.server.add_fault(
        status(403, "AccessDenied")
            .on_key("__0_1")
            .on_method("GET")
            .always(),
    );
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert_failed(
        &res,
        &out,
        2,
        &["access denied", "__0_1.distcp bytes", "hint: "],
    );
}

#[test]
fn an_object_deleted_mid_fetch_is_a_problem() {
    let s = serve("model");
    s.server.add_fault(
        status(404, "NoSuchKey")
            .on_key("__0_0")
            .on_method("GET")
            .always(),
    );
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert_failed(&res, &out, 1, &["__0_0.distcp bytes", "not found"]);
}

#[test]
fn a_failing_endpoint_gives_up_after_the_attempts() {
    let s = serve("model");
    s.server.add_fault(
        status(503, "SlowDown")
            .on_key("__0_1")
            .on_method("GET")
            .always(),
    );
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &["--max-attempts", "3"]);
    assert_failed(
        &res,
        &out,
        2,
        &["__0_1.distcp bytes", "gave up after 3 attempts", "SlowDown"],
    );
}

#[test]
fn an_interrupted_fetch_resumes_to_a_complete_copy() {
    let s = serve("model");
    s.server.add_fault(
        status(403, "AccessDenied")
            .on_key("__0_1")
            .on_method("GET")
            .always(),
    );
    let (_d, out) = out_dir();
    // One request at a time: every part of __0_0 is written before __0_1's first GET fails
    // (with more in flight, the failure stops the parts of __0_0 still on their way).
    let res = fetch(&s, &out, &["--concurrency", "1"]);
    assert_failed(&res, &out, 2, &["__0_1.distcp"]);
    s.server.clear_faults();
    s.server.reset_stats();
    let r = summary(&fetch(&s, &out, &["--resume"]));
    assert!(r["items_already_present"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(
        r["items_already_present"].as_u64().unwrap() + r["items"].as_u64().unwrap(),
        expected("model")["storage_count"].as_u64().unwrap()
    );
    assert_complete(&out);
    // Only what was missing was fetched again: nothing of __0_0 (fully written before).
    let refetched: Vec<_> = s
        .server
        .stats()
        .get_log
        .into_iter()
        .filter(|g| g.key.ends_with("__0_0.distcp"))
        .collect();
    assert!(refetched.is_empty(), "{refetched:?}");
}

#[test]
fn metadata_reads_are_retried_too() {
    let s = serve("model");
    s.server
        .add_fault(status(503, "SlowDown").on_key(".metadata").times(2));
    s.server.add_fault(
        FaultRule::new(Fault::ResetAfter(100))
            .on_key(".metadata")
            .on_method("GET"),
    );
    let (_d, out) = out_dir();
    summary(&fetch(&s, &out, &[]));
    assert_complete(&out);
    // `.metadata` is read with plain GETs (no HEAD): two refused, one cut after 100 bytes, and
    // the rest asked for from byte 100 on.
    let stats = s.server.stats();
    let metadata: Vec<_> = stats
        .get_log
        .iter()
        .filter(|g| g.key.ends_with(".metadata"))
        .map(|g| (g.range, g.status))
        .collect();
    let size = common::read(&fixture("model").join(".metadata")).len() as u64;
    assert_eq!(
        metadata,
        vec![
            (None, 503),
            (None, 503),
            (None, 200),
            (Some((100, size)), 206)
        ]
    );
    // The two shard files' sizes come from the listing sent beside the first GET.
    assert_eq!((stats.lists, stats.heads), (1, 0), "{stats:?}");
}

#[test]
fn ctrl_c_keeps_what_was_written_and_resume_finishes() {
    let s = serve("model");
    // Slow enough that the interrupt lands mid-fetch.
    s.server.add_fault(
        FaultRule::new(Fault::Latency(Duration::from_millis(100)))
            .on_key(".distcp")
            .always(),
    );
    let (_d, out) = out_dir();
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("dcpfetch"))
        .args([
            "fetch",
            "s3://ckpt/model",
            "--endpoint-url",
            &s.server.endpoint(),
            "--path-style",
            "-o",
        ])
        .arg(&out)
        .args([
            "--quiet",
            "--concurrency",
            "1",
            "--part-size",
            "4KiB",
            "--max-gap-size",
            "0",
        ])
        .envs([
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let res = interrupt(child);
    assert!(String::from_utf8_lossy(&res.stderr).contains("--resume"));
    assert!(!out.join(".metadata").exists());
    s.server.clear_faults();
    let r = summary(&fetch(&s, &out, &["--resume"]));
    assert!(r["items_already_present"].as_u64().unwrap() > 0, "{r:#}");
    assert_complete(&out);
}

/// A mount that is undone when dropped; `None` where this user may not mount (the tests that
/// need it then say so and pass: they cover what the machine allows).
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], at: &Path) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(args)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "skipped: cannot run `mount {}` here (needs root)",
                args.join(" ")
            );
        }
        ok.then(|| Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_naming_the_file_and_leaves_no_complete_folder() {
    let d = tempfile::tempdir().unwrap();
    let at = d.path().join("small");
    let Some(_m) = Mount::new(&["-t", "tmpfs", "-o", "size=96k", "tmpfs"], &at) else {
        return;
    };
    let out = at.join("copy");
    let res = dcpfetch()
        .args(["fetch"])
        .arg(fixture("model"))
        .arg("-o")
        .arg(&out)
        .args(["--quiet"])
        .output()
        .unwrap();
    assert_eq!(
        res.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("No space left on device") && err.contains(".distcp"),
        "{err}"
    );
    assert!(!out.join(".metadata").exists());
}

#[test]
fn a_read_only_output_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("empty");
    std::fs::create_dir_all(&src).unwrap();
    let at = d.path().join("ro");
    let Some(_m) = Mount::new(&["--bind", "-o", "ro", src.to_str().unwrap()], &at) else {
        return;
    };
    let res = dcpfetch()
        .args(["fetch"])
        .arg(fixture("model"))
        .arg("-o")
        .arg(&at)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("Read-only file system"), "{err}");
}

#[test]
fn a_full_stdout_is_an_error() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let res = std::process::Command::new(assert_cmd::cargo::cargo_bin("dcpfetch"))
        .args(["fetch"])
        .arg(fixture("model"))
        .args(["-o", "-"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("No space left on device"));
}

/// Fetches all of `s3://ckpt/{name}` into `out` with default settings.
fn fetch_all(s: &Served, name: &str, out: &Path) -> std::process::Output {
    dcpfetch()
        .args(["fetch", &format!("s3://ckpt/{name}")])
        .args(["--endpoint-url", &s.server.endpoint(), "--path-style", "-o"])
        .arg(out)
        .args(["--json", "--quiet"])
        .output()
        .unwrap()
}

/// Every shard file of `name` in `out` is the original, byte for byte.
fn assert_files_as_torch_wrote(name: &str, out: &Path) {
    for (file, info) in expected(name)["files"].as_object().unwrap() {
        assert_eq!(
            &sha256(&common::read(&out.join(file))),
            info["sha256"].as_str().unwrap(),
            "{name}: {file}"
        );
    }
}

/// torch 1.13 writes a file per item (46 here): more than dcpfetch asks for one by one, so one
/// listing gives every size and ETag (the `.metadata` GET gives its own).
#[test]
fn many_shard_files_are_listed_not_asked_for_one_by_one() {
    let files = expected("torch1_13")["files"].as_object().unwrap().len();
    assert!(files > 32, "{files}");
    let s = serve("torch1_13");
    let (_d, out) = out_dir();
    summary(&fetch_all(&s, "torch1_13", &out));
    assert_files_as_torch_wrote("torch1_13", &out);
    let stats = s.server.stats();
    assert_eq!(stats.lists, 1, "{stats:?}");
    assert_eq!(stats.heads, 0, "{stats:?}");
}

/// Without permission to list (a policy with s3:GetObject only), every file gets its own HEAD.
#[test]
fn without_list_permission_each_file_is_asked_for() {
    let files = expected("torch1_13")["files"].as_object().unwrap().len() as u64;
    let s = serve("torch1_13");
    s.server
        .add_fault(status(403, "AccessDenied").on_method("LIST").always());
    let (_d, out) = out_dir();
    summary(&fetch_all(&s, "torch1_13", &out));
    assert_files_as_torch_wrote("torch1_13", &out);
    let stats = s.server.stats();
    assert_eq!(stats.lists, 1, "{stats:?}");
    assert_eq!(stats.heads, files, "{stats:?}");
}

/// A command that needs the shard files' sizes lists the checkpoint beside the `.metadata` GET
/// (one round trip for both) instead of sending a HEAD per file after it; `ls`, which needs no
/// sizes, does not list.
#[test]
fn shard_sizes_come_from_a_listing_sent_beside_the_metadata_get() {
    let (_d, out) = out_dir();
    let commands: [Vec<String>; 5] = [
        vec!["ls".into()],
        vec!["plan".into()],
        vec!["verify".into(), "--quick".into()],
        vec!["fetch".into(), "-o".into(), "-".into()],
        vec!["fetch".into(), "-o".into(), out.to_str().unwrap().into()],
    ];
    for (i, command) in commands.iter().enumerate() {
        let s = serve("model");
        let run = dcpfetch()
            .args(command)
            .args(["s3://ckpt/model", "--endpoint-url", &s.server.endpoint()])
            .arg("--path-style")
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let stats = s.server.stats();
        let listed = u64::from(i > 0);
        assert_eq!(
            (stats.lists, stats.heads),
            (listed, 0),
            "{command:?}: {stats:?}"
        );
    }
    assert_complete(&out);
}

/// The listing beside the `.metadata` GET is tried once: refused (503), the files are asked for
/// one by one, and the fetch is complete.
#[test]
fn a_failed_listing_ahead_falls_back_to_a_head_per_file() {
    let s = serve("model");
    s.server
        .add_fault(status(503, "SlowDown").on_method("LIST"));
    let (lists, heads, files) = fetch_model_counting(&s);
    assert_eq!((lists, heads), (1, files));
}

/// Fetches `model` from `s` into a fresh folder and checks it; the LISTs and HEADs the server
/// got, and the number of shard files.
fn fetch_model_counting(s: &Served) -> (u64, u64, u64) {
    let (_d, out) = out_dir();
    summary(&fetch(s, &out, &[]));
    assert_complete(&out);
    let stats = s.server.stats();
    let files = expected("model")["files"].as_object().unwrap().len() as u64;
    (stats.lists, stats.heads, files)
}

/// A listing ahead that has not answered a second after the stats need it (here it takes 30 s)
/// is given up: the files are asked for one by one and the fetch does not wait for it.
#[test]
fn a_slow_listing_ahead_is_not_waited_for() {
    let s = serve("model");
    s.server
        .add_fault(FaultRule::new(Fault::Latency(Duration::from_secs(30))).on_method("LIST"));
    let started = Instant::now();
    let (_, heads, files) = fetch_model_counting(&s);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(heads, files);
}

/// A store whose listings give ETags without their quotes (NetApp ONTAP) while its answers'
/// headers quote them: the listed ETag is the same version, and is sent quoted in `If-Match`.
#[test]
fn a_listing_with_unquoted_etags_pins_the_same_versions() {
    for name in ["model", "torch1_13"] {
        let s = serve(name);
        s.server.unquoted_listing_etags();
        let (_d, out) = out_dir();
        summary(&fetch_all(&s, name, &out));
        assert_files_as_torch_wrote(name, &out);
        let stats = s.server.stats();
        assert_eq!((stats.lists, stats.heads), (1, 0), "{name}: {stats:?}");
    }
}

/// A prefix of more than 1,000 objects: the listing ahead is one page, the shard files that it
/// does not reach are asked for one by one (no walk through every page of a crowded prefix).
#[test]
fn a_crowded_prefix_is_listed_one_page_ahead() {
    let s = serve("model");
    let dir = s.root.path().join("ckpt").join("model");
    // Names that sort before `__0_0.distcp`, filling the first page.
    for i in 0..1100 {
        std::fs::write(dir.join(format!("{i:04}.txt")), b"x").unwrap();
    }
    let (lists, heads, files) = fetch_model_counting(&s);
    assert_eq!((lists, heads), (1, files));
}

/// A bucket in another region than the one configured: S3 answers 301 naming the bucket's
/// region, and dcpfetch moves there (once, with a note) instead of failing.
#[test]
fn a_bucket_in_another_region_is_followed_there() {
    let s = serve("model");
    s.server.set_bucket_region("eu-west-3");
    let (_d, out) = out_dir();
    let run = fetch(&s, &out, &["--region", "us-east-1"]);
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    summary(&run);
    assert_complete(&out);
    assert!(
        err.contains("region eu-west-3, not us-east-1") && err.contains("--region eu-west-3"),
        "{err}"
    );
    assert_eq!(err.matches("eu-west-3, not").count(), 1, "{err}");
    let redirected = s.server.stats().other;
    assert!((1..=4).contains(&redirected), "{:?}", s.server.stats());

    // Signed for the bucket's region from the start: no redirect.
    let s = serve("model");
    s.server.set_bucket_region("eu-west-3");
    let (_d, out) = out_dir();
    summary(&fetch(&s, &out, &["--region", "eu-west-3"]));
    assert_eq!(s.server.stats().other, 0);
}

/// A `.metadata` larger than dcpfetch parses (2 GiB) is refused from the size its GET announces,
/// without reading the body; from a folder, from its size.
#[test]
fn oversized_metadata_is_refused_before_it_is_read() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt").join("huge");
    std::fs::create_dir_all(&dir).unwrap();
    let f = std::fs::File::create(dir.join(".metadata")).unwrap();
    f.set_len((2 << 30) + 1).unwrap(); // sparse: no disk used
    let server = TestServer::start(ServerConfig::new(root.path())).unwrap();
    let endpoint = server.endpoint();
    for location in [
        vec![
            "s3://ckpt/huge",
            "--endpoint-url",
            &endpoint,
            "--path-style",
        ],
        vec![dir.to_str().unwrap()],
    ] {
        let out = dcpfetch().arg("ls").args(&location).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(".metadata is 2147483649 bytes, more than the 2147483648 bytes"),
            "{err}"
        );
    }
    assert!(
        server.stats().body_bytes < 64 << 20,
        "{:?}",
        server.stats().body_bytes
    );
}

/// `export` through the same faults: 503s, resets and a short body on the reads that locate items
/// and on those that carry their values; the tensors come out whole and exact, or the export
/// fails and leaves nothing.
#[test]
fn an_export_through_faults_is_exact_or_leaves_nothing() {
    let s = serve("large");
    s.server.add_fault(
        status(503, "SlowDown")
            .on_key(".distcp")
            .on_method("GET")
            .times(3),
    );
    s.server.add_fault(
        FaultRule::new(Fault::ResetAfter(40_000))
            .on_key(".distcp")
            .on_method("GET")
            .times(2),
    );
    s.server.add_fault(
        FaultRule::new(Fault::ShortBody(3000))
            .on_key(".distcp")
            .on_method("GET"),
    );
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("large.safetensors");
    let export = |file: &Path| {
        dcpfetch()
            .args([
                "export",
                "s3://ckpt/large",
                "--endpoint-url",
                &s.server.endpoint(),
                "--path-style",
            ])
            .args(common::PLACED)
            .args(["--json", "-q", "-o"])
            .arg(file)
            .output()
            .unwrap()
    };
    let r = export(&file);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let summary: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(summary["retries"], 6, "{summary}");
    assert_eq!(summary["items_located"], 2);
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let full: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("fixtures/expected/full_tensors.json"))
            .unwrap(),
    )
    .unwrap();
    for (fqn, want) in full["large"].as_object().unwrap() {
        let offsets = &header[fqn]["data_offsets"];
        let (a, b) = (
            8 + n + offsets[0].as_u64().unwrap() as usize,
            8 + n + offsets[1].as_u64().unwrap() as usize,
        );
        assert_eq!(
            sha256(&bytes[a..b]),
            want["sha256"].as_str().unwrap(),
            "{fqn}"
        );
    }

    // The file replaced while it is read: refused, and nothing under the output's name.
    s.server.add_fault(
        FaultRule::new(Fault::Replace)
            .on_key("__0_0")
            .on_method("GET"),
    );
    let again = out.path().join("again.safetensors");
    let r = export(&again);
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("changed while it was read"), "{err}");
    let names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["large.safetensors".to_owned()]);
}

/// Ctrl-C in the middle of an export: exit 130, and neither the output nor its temporary left.
#[test]
fn an_interrupted_export_leaves_nothing() {
    let s = serve("large");
    s.server.add_fault(
        FaultRule::new(Fault::StallAfter {
            after: 1000,
            stall: Duration::from_secs(30),
        })
        .on_key(".distcp")
        .on_method("GET")
        .always(),
    );
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("large.safetensors");
    let child = common::dcpfetch_process()
        .args([
            "export",
            "s3://ckpt/large",
            "--endpoint-url",
            &s.server.endpoint(),
            "--path-style",
            "--part-size",
            "128KiB",
            "-q",
            "-o",
        ])
        .arg(&file)
        .spawn()
        .unwrap();
    // Once the temporary exists, the fetch is under way.
    let temporary = out.path().join(".large.safetensors.dcpfetch-partial");
    let started = Instant::now();
    while !temporary.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the export never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    interrupt(child);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

/// A 503 SlowDown that says `Retry-After: 1` is retried after that second, not after the usual
/// backoff of a few milliseconds.
#[test]
fn retry_after_from_s3_is_honoured() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::SlowDownFor(1))
            .on_key("__0_0")
            .on_method("GET")
            .times(2),
    );
    let (_d, out) = out_dir();
    let started = Instant::now();
    let r = summary(&fetch(&s, &out, &["--concurrency", "1"]));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r["retries"], 2);
    assert_complete(&out);
}
