//! Servers that lie or break, sources that change under a read, endpoints that cannot be reached:
//! each is refused or reported in words (naming the file and range), in bounded time, and never
//! mixed into the output. The S3 cases run through the project's fault-injecting server
//! (tests/support/s3_server.rs); the local cases run in process on `LocalSource`.

mod common;
#[path = "support/s3_server.rs"]
mod s3_server;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{dcpfetch, expected, fixture, sha256};
use dcpfetch::source::{LocalSource, Source, SourceError, TransferStats};
use s3_server::{Fault, FaultRule, ServerConfig, TestServer};

/// A fixture served at `s3://ckpt/<name>`.
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

fn out_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("copy");
    (d, p)
}

/// `dcpfetch fetch s3://ckpt/model` from `endpoint` in 16 KiB parts (many requests).
fn fetch_from(endpoint: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    dcpfetch()
        .args(["fetch", "s3://ckpt/model", "--endpoint-url", endpoint, "-o"])
        .arg(out)
        .args([
            "--json",
            "--quiet",
            "--part-size",
            "16KiB",
            "--max-gap-size",
            "0",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn fetch(s: &Served, out: &Path, extra: &[&str]) -> std::process::Output {
    fetch_from(&s.server.endpoint(), out, extra)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A failed run: its exit code, every needle in its message, no SDK `Debug` dump, and (for a
/// fetch) no metadata in the output folder.
fn assert_failed(out: &std::process::Output, dir: Option<&Path>, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    for dump in [
        "DispatchFailure",
        "ConnectorError",
        "CredentialsNotLoaded",
        "Os {",
    ] {
        assert!(!err.contains(dump), "a Debug dump ({dump}): {err}");
    }
    if let Some(dir) = dir {
        assert!(
            !dir.join(".metadata").exists(),
            "a failed fetch left metadata"
        );
    }
}

/// The output is the `model` fixture, byte for byte.
fn assert_complete(out: &Path) {
    for (file, info) in expected("model")["files"].as_object().unwrap() {
        assert_eq!(
            &sha256(&common::read(&out.join(file))),
            info["sha256"].as_str().unwrap(),
            "{file}"
        );
    }
}

fn on_shards(fault: Fault) -> FaultRule {
    FaultRule::new(fault).on_key(".distcp").on_method("GET")
}

// Evil servers.

#[test]
fn a_200_with_the_whole_object_is_refused_naming_file_and_range() {
    let s = serve("model");
    s.server
        .add_fault(on_shards(Fault::IgnoreRange).on_key("__0_1"));
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert_failed(
        &res,
        Some(&out),
        1,
        &["__0_1.distcp bytes ", "with the whole object (HTTP 200"],
    );
}

#[test]
fn a_200_with_the_whole_object_is_not_read() {
    // A 256 MiB object (sparse): a client that read the whole answer would take it all.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("big/ckpt")).unwrap();
    let f = std::fs::File::create(root.path().join("big/ckpt/huge.distcp")).unwrap();
    f.set_len(256 << 20).unwrap();
    let server = TestServer::start(ServerConfig::new(root.path())).unwrap();
    server.add_fault(on_shards(Fault::IgnoreRange));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    let e = rt.block_on(async {
        let source = common::s3_source(&server.endpoint(), "big", "ckpt").await;
        let meta = source.stat("huge.distcp").await.unwrap();
        source
            .read_range("huge.distcp", 1000..2000, &meta)
            .await
            .unwrap_err()
    });
    let took = started.elapsed();
    assert!(matches!(e, SourceError::BadResponse { .. }), "{e:?}");
    assert!(
        e.to_string().contains("huge.distcp bytes 1000..2000"),
        "{e}"
    );
    // Give a client that drains the body time to show it: loopback moves 256 MiB in well under
    // a second.
    std::thread::sleep(Duration::from_millis(500));
    let sent = server.stats().body_bytes;
    assert!(
        sent < 64 << 20,
        "{sent} body bytes were sent: the answer was read"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_content_range_of_another_total_is_refused() {
    let s = serve("model");
    s.server
        .add_fault(on_shards(Fault::WrongTotal).on_key("__0_0"));
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert_failed(
        &res,
        Some(&out),
        1,
        &["__0_0.distcp bytes ", "Content-Range bytes", "/235296"],
    );
}

#[test]
fn a_body_longer_than_asked_is_refused() {
    let s = serve("model");
    s.server
        .add_fault(on_shards(Fault::LongBody(100)).on_key("__0_1"));
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert_failed(
        &res,
        Some(&out),
        1,
        &["__0_1.distcp bytes ", "Content-Length", "for a range of"],
    );
}

#[test]
fn an_etag_other_than_the_pinned_one_is_refused() {
    let s = serve("model");
    s.server
        .add_fault(on_shards(Fault::WrongEtag).on_key("__0_0"));
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert_failed(
        &res,
        Some(&out),
        1,
        &["__0_0.distcp bytes ", "changed while it was read", "ETag"],
    );
}

#[test]
fn a_dribbling_body_is_cut_by_the_request_timeout_in_bounded_time() {
    let s = serve("model");
    // One byte every 200 ms: never a stall (the stall timeout is 5 s), never done in time.
    s.server.add_fault(
        on_shards(Fault::Dribble {
            after: 100,
            every: Duration::from_millis(200),
        })
        .always(),
    );
    let (_d, out) = out_dir();
    let started = Instant::now();
    let res = fetch(
        &s,
        &out,
        &[
            "--stall-timeout",
            "5",
            "--request-timeout",
            "1",
            "--max-attempts",
            "2",
        ],
    );
    let took = started.elapsed();
    assert_failed(
        &res,
        Some(&out),
        2,
        &[
            ".distcp bytes ",
            "gave up after 2 attempts",
            "--request-timeout",
        ],
    );
    // Two attempts of 1 s each, their backoff, and the start-up: far below one stall timeout per
    // byte.
    assert!(took < Duration::from_secs(8), "took {took:?}");
}

#[test]
fn a_request_timeout_that_is_not_positive_is_a_usage_error() {
    let res = dcpfetch()
        .args(["ls", "s3://b/p", "--request-timeout", "0"])
        .output()
        .unwrap();
    assert_failed(&res, None, 2, &["--request-timeout must be a positive"]);
}

// A server without ETags.

/// Fetches from a server without ETags whose shard is replaced (same size, Last-Modified one
/// second newer) after three GETs of it.
fn fetch_replaced_without_etags(
    honours_if_unmodified_since: bool,
) -> (Served, std::process::Output) {
    let s = serve("model");
    s.server.without_etags();
    if !honours_if_unmodified_since {
        s.server.ignore_if_unmodified_since();
    }
    s.server.add_fault(
        on_shards(Fault::Latency(Duration::ZERO))
            .on_key("__0_0")
            .times(3),
    );
    s.server
        .add_fault(on_shards(Fault::Replace).on_key("__0_0"));
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &["--concurrency", "1"]);
    assert_failed(
        &res,
        Some(&out),
        1,
        &["__0_0.distcp bytes ", "changed while it was read"],
    );
    (s, res)
}

#[test]
fn without_etags_a_fetch_is_pinned_by_last_modified_and_warns_once() {
    let s = serve("model");
    s.server.without_etags();
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &[]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_complete(&out);
    assert_eq!(
        stderr(&res).matches("sends no ETags").count(),
        1,
        "{}",
        stderr(&res)
    );
}

#[test]
fn without_etags_a_replaced_object_is_refused_by_if_unmodified_since() {
    let (s, res) = fetch_replaced_without_etags(true);
    assert_eq!(stderr(&res).matches("sends no ETags").count(), 1);
    // The server refused the read (412), so the client sent If-Unmodified-Since.
    let log = s.server.stats().get_log;
    assert!(log.iter().any(|g| g.status == 412), "{log:?}");
}

#[test]
fn without_etags_a_replaced_object_is_refused_by_its_last_modified() {
    let (s, res) = fetch_replaced_without_etags(false);
    assert!(stderr(&res).contains("Last-Modified"), "{}", stderr(&res));
    let log = s.server.stats().get_log;
    assert!(log.iter().all(|g| g.status != 412), "{log:?}");
}

// A local source that changes under a read.

const SHARD: &str = "__0_0.distcp";

fn local(dir: &Path) -> Source {
    Source::new(Arc::new(LocalSource::new(
        dir.to_owned(),
        Arc::new(TransferStats::default()),
    )))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

fn assert_changed(e: &SourceError, range: &str) {
    assert!(matches!(e, SourceError::Changed { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(&format!("{SHARD} bytes {range}")), "{text}");
}

#[test]
fn a_local_shard_rewritten_between_stat_and_read_is_changed() {
    let dir = common::copy_fixture("model");
    let path = dir.path().join(SHARD);
    block_on(async {
        let source = local(dir.path());
        let meta = source.stat(SHARD).await.unwrap();
        assert!(source.read_all_range(SHARD, 0..100, &meta).await.is_ok());
        // Rewritten in place: same size, same inode, other bytes.
        std::thread::sleep(Duration::from_millis(20));
        let mut data = std::fs::read(&path).unwrap();
        data.iter_mut().for_each(|b| *b = !*b);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &data))
            .unwrap();
        let e = source
            .read_all_range(SHARD, 100..200, &meta)
            .await
            .unwrap_err();
        assert_changed(&e, "100..200");
    });
}

#[test]
fn a_local_shard_truncated_while_open_is_changed() {
    let dir = common::copy_fixture("model");
    let path = dir.path().join(SHARD);
    block_on(async {
        let source = local(dir.path());
        let meta = source.stat(SHARD).await.unwrap();
        // The file is open (kept across reads) when it is cut.
        assert!(source.read_all_range(SHARD, 0..100, &meta).await.is_ok());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(meta.size / 2)
            .unwrap();
        let e = source
            .read_range(SHARD, 1000..meta.size, &meta)
            .await
            .unwrap_err();
        assert_changed(&e, &format!("1000..{}", meta.size));
    });
}

#[test]
fn a_local_shard_replaced_by_another_file_of_the_same_size_and_mtime_is_changed() {
    let dir = common::copy_fixture("model");
    let path = dir.path().join(SHARD);
    block_on(async {
        let source = local(dir.path());
        let meta = source.stat(SHARD).await.unwrap();
        // Another file with the same size and modification time, renamed over it before it was
        // opened: only the inode tells them apart.
        let old = std::fs::metadata(&path).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, vec![0u8; old.len() as usize]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(old.modified().unwrap())
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        let e = source
            .read_all_range(SHARD, 0..100, &meta)
            .await
            .unwrap_err();
        assert_changed(&e, "0..100");
    });
}

// Custom endpoints.

#[test]
fn a_localhost_endpoint_works_without_path_style() {
    let s = serve("model");
    let endpoint = format!("http://localhost:{}", s.server.addr().port());
    let (_d, out) = out_dir();
    let res = fetch_from(&endpoint, &out, &[]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_complete(&out);
    // Every request went to /ckpt/... (path style): a virtual-hosted one would have asked for
    // ckpt.localhost.
    assert!(s.server.stats().gets > 0);
}

#[test]
fn path_style_is_still_accepted() {
    let s = serve("model");
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &["--path-style"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_complete(&out);
}

#[test]
fn an_endpoint_without_a_scheme_is_a_usage_error_before_any_request() {
    let s = serve("model");
    let endpoint = format!("localhost:{}", s.server.addr().port());
    let (_d, out) = out_dir();
    let res = fetch_from(&endpoint, &out, &[]);
    assert_failed(
        &res,
        Some(&out),
        2,
        &[
            &format!("--endpoint-url http://{endpoint}"),
            "needs a scheme",
        ],
    );
    assert_eq!(s.server.stats().connections, 0);
    assert!(!out.exists());
}

#[test]
fn a_host_that_does_not_resolve_fails_after_one_attempt() {
    let (_d, out) = out_dir();
    let started = Instant::now();
    let res = fetch_from("http://no-such-host.invalid:9000", &out, &[]);
    let took = started.elapsed();
    assert_failed(
        &res,
        Some(&out),
        2,
        &[
            "cannot resolve no-such-host.invalid",
            "hint: check --endpoint-url",
        ],
    );
    assert!(!stderr(&res).contains("gave up"), "{}", stderr(&res));
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

// Errors in words.

#[test]
fn connection_refused_fails_at_once_naming_host_and_port() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (_d, out) = out_dir();
    let started = Instant::now();
    let res = fetch_from(&format!("http://127.0.0.1:{port}"), &out, &[]);
    let took = started.elapsed();
    assert_failed(
        &res,
        Some(&out),
        2,
        &[&format!("connection refused by 127.0.0.1:{port}")],
    );
    assert!(!stderr(&res).contains("gave up"), "{}", stderr(&res));
    // The full backoff of 10 attempts takes several seconds.
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// `dcpfetch ls` with no credentials anywhere: no AWS_* keys, empty config files, no IMDS.
fn without_credentials(s: &Served, extra: &[&str]) -> std::process::Output {
    let config = s.root.path().join("aws-config");
    let credentials = s.root.path().join("aws-credentials");
    std::fs::write(&config, "").unwrap();
    std::fs::write(&credentials, "").unwrap();
    dcpfetch()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE")
        .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args([
            "ls",
            "s3://ckpt/model",
            "--endpoint-url",
            &s.server.endpoint(),
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn no_credentials_are_reported_in_words() {
    let s = serve("model");
    let res = without_credentials(&s, &[]);
    assert_failed(
        &res,
        None,
        2,
        &[
            "no AWS credentials found: set AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
             or pass --no-sign-request",
            "hint: ",
        ],
    );
    assert_eq!(
        s.server.stats().connections,
        0,
        "a request was sent unsigned"
    );
    // The same without credentials but with --no-sign-request works.
    let res = without_credentials(&s, &["--no-sign-request"]);
    assert!(res.status.success(), "{}", stderr(&res));
}

#[test]
fn an_unknown_profile_is_named() {
    let s = serve("model");
    let res = without_credentials(&s, &["--profile", "no-such-profile"]);
    assert_failed(
        &res,
        None,
        2,
        &["AWS profile no-such-profile not found in "],
    );
}

#[test]
fn one_attempt_is_counted_in_the_singular() {
    let s = serve("model");
    s.server.add_fault(
        FaultRule::new(Fault::Status {
            status: 503,
            code: "SlowDown",
        })
        .on_key("__0_1")
        .on_method("GET")
        .always(),
    );
    let (_d, out) = out_dir();
    let res = fetch(&s, &out, &["--max-attempts", "1"]);
    assert_failed(
        &res,
        Some(&out),
        2,
        &[
            "__0_1.distcp bytes ",
            "gave up after 1 attempt;",
            "SlowDown",
        ],
    );
}

// One trace event per request attempt.

/// A `tracing` subscriber that keeps the fields of every `dcpfetch::requests` event.
#[derive(Debug, Default)]
struct Requests(Mutex<Vec<Vec<(String, String)>>>);

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl tracing::Subscriber for Requests {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        m.target() == "dcpfetch::requests"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut fields = Vec::new();
        e.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(fields);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl Requests {
    fn events(&self) -> Vec<Vec<(String, String)>> {
        self.0.lock().unwrap().clone()
    }
}

fn field<'a>(event: &'a [(String, String)], name: &str) -> &'a str {
    event
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

#[test]
fn every_request_attempt_is_a_trace_event() {
    let requests: &'static Requests = Box::leak(Box::default());
    tracing::subscriber::set_global_default(RequestsRef(requests)).unwrap();
    let s = serve("model");
    // The first GET of the shard fails (503) and is retried.
    s.server.add_fault(
        FaultRule::new(Fault::Status {
            status: 503,
            code: "SlowDown",
        })
        .on_key("__0_0")
        .on_method("GET"),
    );
    let dir = common::copy_fixture("model");
    block_on(async {
        let source = common::s3_source(&s.server.endpoint(), "ckpt", "model").await;
        let meta = source.stat(SHARD).await.unwrap();
        source.read_all_range(SHARD, 10..20, &meta).await.unwrap();
        let source = local(dir.path());
        let meta = source.stat(SHARD).await.unwrap();
        source.read_all_range(SHARD, 31..41, &meta).await.unwrap();
    });
    // Other tests of this binary read too (in parallel): keep this test's requests.
    let events: Vec<_> = requests
        .events()
        .into_iter()
        .filter(|e| {
            field(e, "key") == "model/__0_0.distcp"
                || field(e, "key") == SHARD && field(e, "range") == "31..41"
        })
        .collect();
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            (
                field(e, "method"),
                field(e, "key"),
                field(e, "range"),
                field(e, "status"),
                field(e, "attempt"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("HEAD", "model/__0_0.distcp", "-", "200", "1"),
            ("GET", "model/__0_0.distcp", "10..20", "503", "1"),
            ("GET", "model/__0_0.distcp", "10..20", "206", "2"),
            ("read", SHARD, "31..41", "local", "1"),
        ]
    );
    assert!(
        events.iter().all(|e| field(e, "ms").parse::<u64>().is_ok()),
        "{events:?}"
    );
}

/// [`Requests`] by reference, so that the test can read what the global subscriber kept.
struct RequestsRef(&'static Requests);

impl tracing::Subscriber for RequestsRef {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        self.0.enabled(m)
    }
    fn new_span(&self, a: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0.new_span(a)
    }
    fn record(&self, s: &tracing::span::Id, r: &tracing::span::Record<'_>) {
        self.0.record(s, r)
    }
    fn record_follows_from(&self, a: &tracing::span::Id, b: &tracing::span::Id) {
        self.0.record_follows_from(a, b)
    }
    fn event(&self, e: &tracing::Event<'_>) {
        self.0.event(e)
    }
    fn enter(&self, s: &tracing::span::Id) {
        self.0.enter(s)
    }
    fn exit(&self, s: &tracing::span::Id) {
        self.0.exit(s)
    }
}

#[test]
fn the_evil_fault_kinds_have_a_text_form() {
    for (text, fault) in [
        ("ignore-range", Fault::IgnoreRange),
        ("wrong-total", Fault::WrongTotal),
        ("long:after=7", Fault::LongBody(7)),
        ("wrong-etag", Fault::WrongEtag),
        (
            "dribble:after=3:ms=250",
            Fault::Dribble {
                after: 3,
                every: Duration::from_millis(250),
            },
        ),
    ] {
        let rule: FaultRule = text.parse().unwrap();
        assert_eq!(rule.fault, fault, "{text}");
        assert_eq!(
            rule.to_string().parse::<FaultRule>().unwrap(),
            rule,
            "{text}"
        );
    }
}
