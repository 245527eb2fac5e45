//! Checkpoints over plain HTTP: the binary end to end against a real nginx started by the tests
//! (`apt-get install -y nginx`), and the HTTP source against the project's S3 test server, whose
//! path-style URLs answer plain ranged GETs, for the faults nginx cannot inject.

mod common;
#[path = "support/s3_server.rs"]
mod s3_server;

use std::path::Path;
use std::time::Duration;

use common::{Nginx, fixture, http_source, quick_http};
use dcpfetch::source::{ObjectMeta, RetryPolicy, Source, SourceError};
use s3_server::{Fault, FaultRule, ServerConfig, TestServer};
use serde_json::Value;

const SHARD: &str = "__0_1.distcp";
const LAYER: &str = "model.layers.0.*";

/// The binary with no proxy or HTTP settings from the environment running the tests.
fn cmd() -> assert_cmd::Command {
    let mut c = common::dcpfetch();
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "DCPFETCH_HTTP_HEADERS",
        "DCPFETCH_HTTP_BEARER_TOKEN",
        "SSL_CERT_FILE",
    ] {
        c.env_remove(var);
    }
    c
}

fn run(c: &mut assert_cmd::Command) -> (Option<i32>, String, String) {
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(args: &[&str]) -> Value {
    let (code, out, err) = run(cmd().args(args));
    assert_eq!(code, Some(0), "dcpfetch {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every file of `dir` has the bytes of the same file in the fixture.
fn assert_same_files(name: &str, dir: &Path) {
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap();
        let got = std::fs::read(dir.join(f.file_name())).unwrap();
        assert!(
            got == std::fs::read(f.path()).unwrap(),
            "{:?}",
            f.file_name()
        );
    }
}

#[test]
fn ls_plan_fetch_and_verify_over_http() {
    let nginx = Nginx::start(&common::repo().join("fixtures"), "");
    for (name, select) in [("model", LAYER), ("dtensor", "dt.shard*")] {
        let url = nginx.url(name);
        let local = fixture(name).display().to_string();
        // The same answers as from the folder.
        let (http, disk) = (
            json_of(&["ls", &url, "--json"]),
            json_of(&["ls", &local, "--json"]),
        );
        assert_eq!(http["entries"], disk["entries"], "{name}");
        assert_eq!(http["checkpoint"], url.as_str());
        let plan = |loc: &str| json_of(&["plan", loc, "--json", "-s", select]);
        let (http, disk) = (plan(&url), plan(&local));
        assert_eq!(http["files"], disk["files"], "{name}");
        assert_eq!(http["totals"], disk["totals"], "{name}");
        // A folder copy of everything is the checkpoint, byte for byte.
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("copy");
        let (code, _, err) = run(cmd().args(["fetch", &url, "-o"]).arg(&dir).arg("-q"));
        assert_eq!(code, Some(0), "{err}");
        assert_same_files(name, &dir);
        // A selection to stdout: the bytes fetched from the folder.
        let stdout = |loc: &str| {
            common::stdout_of(cmd().args(["fetch", loc, "-o", "-", "-q", "-s", select]))
        };
        let got = stdout(&url);
        assert!(!got.is_empty());
        assert!(got == stdout(&local), "{name}: other bytes on stdout");
        // Everything in order through a budget of two parts: parts before their turn stop reading
        // mid-body and keep their connections, and the stream still moves.
        let small = common::stream_through_two_small_parts(cmd().args(["fetch", &url]));
        assert!(
            small == common::local_stream(name),
            "{name}: other bytes on stdout"
        );
        let report = json_of(&["verify", &url, "--json", "-q"]);
        assert_eq!(report["ok"], true, "{report:#}");
    }
    // Every ranged GET was pinned to the ETag seen first.
    let log = nginx.log();
    let ranged: Vec<&String> = log.iter().filter(|l| !l.contains("range=\"-\"")).collect();
    assert!(ranged.len() > 10, "{log:?}");
    // `.metadata` is read with one plain GET each time, no HEAD before it.
    let metadata: Vec<&String> = log.iter().filter(|l| l.contains(".metadata ")).collect();
    assert!(!metadata.is_empty(), "{log:?}");
    for l in metadata {
        assert!(
            l.contains(" 200 \"GET ") && l.contains("range=\"-\""),
            "{l}"
        );
    }
    for l in &ranged {
        assert!(!l.contains("if_match=\"-\""), "not pinned: {l}");
        assert!(l.contains(" 206 "), "not a partial answer: {l}");
    }
}

#[test]
fn a_missing_shard_is_named() {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    for f in std::fs::read_dir(fixture("model")).unwrap() {
        let f = f.unwrap();
        if f.file_name() != SHARD {
            std::fs::copy(f.path(), ckpt.join(f.file_name())).unwrap();
        }
    }
    let nginx = Nginx::start(root.path(), "");
    let out = tempfile::tempdir().unwrap();
    let (code, _, err) = run(cmd()
        .args(["fetch", &nginx.url("ckpt"), "-q", "-o"])
        .arg(out.path().join("x")));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot find the shard file {SHARD}")),
        "{err}"
    );
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = run(cmd().args(["verify", &nginx.url("ckpt"), "--quick", "-q"]));
    assert_eq!(code, Some(1), "{err}");
    // No .metadata at all: the message says why it cannot look for per-rank files.
    let (code, _, err) = run(cmd().args(["ls", &nginx.url("nothing-here")]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no listing"), "{err}");
}

/// `/signed/` serves the fixtures only to a URL that carries the signature in its query (as a
/// presigned URL does); the checkpoint's own URL, under `/nowhere/`, serves nothing.
const SIGNED: &str = r#"
    location /signed/ {
        if ($arg_sig != "s3cret") { return 403; }
        alias {root}/;
    }
    location /nowhere/ { return 404; }
"#;

#[test]
fn a_url_list_gives_each_file_its_own_url() {
    let nginx = Nginx::start(&common::repo().join("fixtures"), SIGNED);
    let ckpt = nginx.url("nowhere/model");
    let lists = tempfile::tempdir().unwrap();
    let list = |name: &str, skip: &str, extra: &str| {
        let mut text = String::from("# presigned URLs of the files of model\n\n");
        for f in std::fs::read_dir(fixture("model")).unwrap() {
            let f = f.unwrap().file_name().into_string().unwrap();
            if f != skip {
                text.push_str(&format!(
                    "  {}?sig=s3cret&X-Expires=60\n",
                    nginx.url(&format!("signed/model/{f}"))
                ));
            }
        }
        text.push_str(extra);
        let path = lists.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let all = list("all.txt", "", "");

    // Every file through its own URL: the copy is the checkpoint, byte for byte.
    let copies = tempfile::tempdir().unwrap();
    let dir = copies.path().join("copy");
    let (code, _, err) = run(cmd()
        .args(["fetch", &ckpt, "--url-list", &all, "-v", "-o"])
        .arg(&dir));
    assert_eq!(code, Some(0), "{err}");
    assert_same_files("model", &dir);
    assert!(!err.contains("s3cret"), "a signature printed: {err}");
    let (code, out, err) = run(cmd().args(["ls", &ckpt, "--url-list", &all, "--json"]));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !out.contains("s3cret") && !err.contains("s3cret"),
        "{out}{err}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["checkpoint"],
        ckpt.as_str()
    );
    // Without the list, the checkpoint's own URL has nothing.
    let (code, _, err) = run(cmd().args(["ls", &ckpt]));
    assert_ne!(code, Some(0), "{err}");
    // Listed files are asked for their size with a one-byte GET: a presigned URL refuses a HEAD.
    let log = nginx.log();
    assert!(
        log.iter().any(|l| l.contains(" 206 \"GET /signed/model/")),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("\"HEAD /signed/")),
        "{log:#?}"
    );

    // A file the list lacks is asked for at the checkpoint's URL, and named when it is not there.
    let partial = list("partial.txt", SHARD, "");
    let (code, _, err) = run(cmd()
        .args(["fetch", &ckpt, "--url-list", &partial, "-q", "-o"])
        .arg(copies.path().join("partial")));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(SHARD), "{err}");
    assert!(!err.contains("s3cret"), "{err}");

    // A signature the server refuses (an expired presigned URL): exit 2, with the hint for it.
    let expired = lists.path().join("expired.txt");
    std::fs::write(
        &expired,
        format!("{}?sig=0ld\n", nginx.url("signed/model/.metadata")),
    )
    .unwrap();
    let (code, _, err) = run(cmd().args(["ls", &ckpt, "--url-list", expired.to_str().unwrap()]));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("HTTP 403")
            && err.contains("may have expired")
            && !err.contains("AWS_PROFILE"),
        "{err}"
    );
    assert!(!err.contains("0ld"), "{err}");

    // A list that is not one: usage errors (exit 2) that name the line and print no signature.
    let twice = list(
        "twice.txt",
        "",
        &format!("{}?sig=s3cret\n", nginx.url("signed/other/.metadata")),
    );
    let ftp = list("ftp.txt", "", "ftp://127.0.0.1/model/x?sig=s3cret\n");
    let empty = lists.path().join("empty.txt");
    std::fs::write(&empty, "# nothing\n").unwrap();
    let local = fixture("model").display().to_string();
    for (args, want) in [
        (
            vec!["ls", &ckpt, "--url-list", &twice],
            "a second URL for \".metadata\"",
        ),
        (
            vec!["ls", &ckpt, "--url-list", &ftp],
            "only http:// and https:// URLs",
        ),
        (
            vec!["ls", &ckpt, "--url-list", empty.to_str().unwrap()],
            "holds no URL",
        ),
        (
            vec!["ls", &ckpt, "--url-list", "/nonexistent/list.txt"],
            "list.txt",
        ),
        (
            vec!["ls", &local, "--url-list", &all],
            "for http:// and https:// checkpoints",
        ),
    ] {
        let (code, out, err) = run(cmd().args(&args));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--url-list") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(
            !out.contains("s3cret") && !err.contains("s3cret"),
            "{out}{err}"
        );
    }
    let (_, _, err) = run(cmd().args(["ls", &ckpt, "--url-list", &ftp]));
    assert!(
        err.contains(&format!(
            "line {}",
            std::fs::read_dir(fixture("model")).unwrap().count() + 3
        )),
        "{err}"
    );
}

/// Nothing listens at the address: the first request fails at once (no backoff) naming host and
/// port, as it does for S3; so does a host that does not resolve.
#[test]
fn an_address_where_nothing_listens_fails_at_once() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let started = std::time::Instant::now();
    let (code, _, err) = run(cmd().args(["ls", &format!("http://127.0.0.1:{port}/ckpt")]));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("connection refused by 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.contains("gave up"), "{err}");
    // The full backoff of 10 attempts takes several seconds.
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
    let (code, _, err) = run(cmd().args(["ls", "http://no-such-host.invalid/ckpt"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot resolve no-such-host.invalid"), "{err}");
}

/// A 503 with `Retry-After: 1` is retried after the second asked for, not after the backoff of a
/// few milliseconds; the last error names the wait.
#[test]
fn retry_after_is_honoured() {
    let root = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(
        root.path(),
        "location /busy/ { add_header Retry-After 1 always; return 503; }",
    );
    let started = std::time::Instant::now();
    let (code, _, err) = run(cmd().args(["ls", &nginx.url("busy/ckpt"), "--max-attempts", "2"]));
    let took = started.elapsed();
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("HTTP 503") && err.contains("Retry-After 1s"),
        "{err}"
    );
    assert!(took >= Duration::from_secs(1), "retried after {took:?}");
}

/// `/hub/` wants a bearer token and redirects to `/cdn/` on another host (127.0.0.2), which
/// refuses requests that carry one (as S3 and CDNs refuse an Authorization they did not sign);
/// `/same/` redirects to `/hub/` on the same host.
const HUB: &str = r#"
    location /hub/ {
        if ($http_authorization != "Bearer s3cret") { return 401; }
        rewrite ^/hub/(.*)$ http://127.0.0.2:{port}/cdn/$1 redirect;
    }
    location /same/ {
        rewrite ^/same/(.*)$ http://127.0.0.1:{port}/hub/$1 redirect;
    }
    location /cdn/ {
        if ($http_authorization) { return 400; }
        alias {root}/;
    }
"#;

#[test]
fn the_token_goes_to_the_origin_and_not_after_a_cross_host_redirect() {
    let nginx = Nginx::start(&common::repo().join("fixtures"), HUB);
    let url = nginx.url("same/model");
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("copy");
    let (code, _, err) = run(cmd()
        .args([
            "fetch",
            &url,
            "-q",
            "-H",
            "Authorization: Bearer s3cret",
            "-o",
        ])
        .arg(&dir));
    assert_eq!(code, Some(0), "{err}\n{:#?}", nginx.log());
    assert_same_files("model", &dir);
    let log = nginx.log();
    let origin: Vec<&String> = log.iter().filter(|l| l.starts_with("127.0.0.1 ")).collect();
    let cdn: Vec<&String> = log.iter().filter(|l| l.starts_with("127.0.0.2 ")).collect();
    // Each file is resolved at the origin once (two redirects); its later requests (the HEAD,
    // then its parts) go to where it led.
    let files = |lines: &[&String]| -> std::collections::BTreeSet<String> {
        lines
            .iter()
            .map(|l| {
                l.split(' ')
                    .nth(3)
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(files(&origin), files(&cdn), "{log:#?}");
    assert_eq!(origin.len(), 2 * files(&origin).len(), "{log:#?}");
    assert!(cdn.len() > files(&cdn).len(), "{log:#?}");
    for l in &origin {
        assert!(
            l.contains("auth=\"Bearer s3cret\"") && l.contains(" 302 "),
            "{l}"
        );
    }
    for l in &cdn {
        assert!(
            l.contains("auth=\"-\""),
            "the token reached another host: {l}"
        );
    }

    // The token from the environment works the same.
    let (code, _, err) = run(cmd()
        .env("DCPFETCH_HTTP_BEARER_TOKEN", "s3cret")
        .args(["ls", &url, "--json"]));
    assert_eq!(code, Some(0), "{err}");

    // Without the token, or with a wrong one: access denied, and no token printed.
    let (code, _, err) = run(cmd().args(["ls", &url]));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("HTTP 401") && err.contains("--header"),
        "{err}"
    );
    for args in [
        &[
            "ls",
            &url,
            "--json",
            "-H",
            "Authorization: Bearer WRONGSECRET",
        ][..],
        &[
            "fetch",
            &url,
            "-o",
            "-",
            "--json",
            "-H",
            "Authorization: Bearer WRONGSECRET",
        ],
        &["ls", &url, "-H", "Authorization Bearer WRONGSECRET"],
        &["ls", &url, "-H", "X-Key: WRONGSECRET\u{7f}"],
    ] {
        let (code, out, err) = run(cmd().args(args));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            !out.contains("WRONGSECRET") && !err.contains("WRONGSECRET"),
            "{out}{err}"
        );
    }
    let (_, out, err) = run(cmd()
        .env("DCPFETCH_HTTP_HEADERS", "Authorization: Bearer WRONGSECRET")
        .args(["fetch", &url, "-o", "-", "--json"]));
    assert!(
        !out.contains("WRONGSECRET") && !err.contains("WRONGSECRET"),
        "{out}{err}"
    );
}

/// `err` says the certificate of the server at 127.0.0.1:`port` is not trusted, with the hint to
/// pass the CA (`--ca-bundle` or `SSL_CERT_FILE`).
fn assert_untrusted(err: &str, port: u16) {
    let untrusted = format!("the certificate of 127.0.0.1:{port} is not trusted");
    assert!(err.contains(&untrusted), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("hint: ")
            && l.contains("--ca-bundle")
            && l.contains("SSL_CERT_FILE")),
        "{err}"
    );
}

/// HTTPS with a certificate from a private CA: trusted with `--ca-bundle` or `SSL_CERT_FILE`, and
/// refused in words (naming the host, with a hint) without them.
#[test]
fn https_with_a_private_ca_needs_its_bundle() {
    let ca = common::TestCa::new();
    let nginx = Nginx::start_tls(&common::repo().join("fixtures"), &ca);
    let url = nginx.url("model");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let bundle = ca.ca().display().to_string();
    let local = fixture("model").display().to_string();

    let http = json_of(&["ls", &url, "--json", "--ca-bundle", &bundle]);
    let disk = json_of(&["ls", &local, "--json"]);
    assert_eq!(http["entries"], disk["entries"]);
    // A folder copy of everything and a selection to stdout: the checkpoint's bytes.
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("copy");
    let (code, _, err) = run(cmd()
        .args(["fetch", &url, "-q", "--ca-bundle", &bundle, "-o"])
        .arg(&dir));
    assert_eq!(code, Some(0), "{err}");
    assert_same_files("model", &dir);
    let stdout = |c: &mut assert_cmd::Command| {
        let out = c.args(["-o", "-", "-q", "-s", LAYER]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let got = stdout(cmd().args(["fetch", &url, "--ca-bundle", &bundle]));
    assert!(!got.is_empty());
    assert!(got == stdout(cmd().args(["fetch", &local])), "other bytes");

    // SSL_CERT_FILE names the bundle too.
    let (code, _, err) = run(cmd().env("SSL_CERT_FILE", &bundle).args(["ls", &url]));
    assert_eq!(code, Some(0), "{err}");

    // Without it, the system's roots do not know this CA: a clear error, not retried.
    let started = std::time::Instant::now();
    for args in [&["ls", &url][..], &["fetch", &url, "-o", "-", "-s", LAYER]] {
        let (code, out, err) = run(cmd().args(args));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert_untrusted(&err, nginx.port);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "retried a certificate error"
    );

    // A bundle of another CA is no better: --ca-bundle trusts only what it holds.
    let other = common::TestCa::new();
    let (code, _, err) = run(cmd().args(["ls", &url, "--ca-bundle"]).arg(other.ca()));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is not trusted") && err.contains("hint: "),
        "{err}"
    );
    // And a bundle that is no PEM file is named.
    let (code, _, err) = run(cmd().args(["ls", &url, "--ca-bundle", &local]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&local), "{err}");
}

/// The system's roots are read for an https:// store only: a system without any CA certificate (a
/// slim container image) still reaches http:// stores, and an https:// store is refused in words.
/// `SSL_CERT_DIR` is one of the system's places for roots.
#[test]
fn a_system_without_roots_reaches_plain_http() {
    let fixtures = common::repo().join("fixtures");
    let empty = tempfile::tempdir().unwrap();
    let no_roots = |args: &[&str]| run(cmd().env("SSL_CERT_DIR", empty.path()).args(args));

    let plain = Nginx::start(&fixtures, "");
    let (code, _, err) = no_roots(&["ls", &plain.url("model")]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = no_roots(&["fetch", &plain.url("model"), "-o", "-", "-s", LAYER]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.is_empty());

    let ca = common::TestCa::new();
    let tls = Nginx::start_tls(&fixtures, &ca);
    let (code, out, err) = no_roots(&["ls", &tls.url("model")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty(), "{out}");
    assert_untrusted(&err, tls.port);

    // The CA in a folder named by SSL_CERT_DIR is trusted.
    let roots = tempfile::tempdir().unwrap();
    std::fs::copy(ca.ca(), roots.path().join("private-ca.pem")).unwrap();
    let (code, _, err) = run(cmd()
        .env("SSL_CERT_DIR", roots.path())
        .args(["ls", &tls.url("model")]));
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_server_that_ignores_range_is_refused_unread() {
    // A file big enough that reading it whole would show.
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("model");
    std::fs::create_dir(&ckpt).unwrap();
    for f in std::fs::read_dir(fixture("model")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), ckpt.join(f.file_name())).unwrap();
    }
    let big: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(ckpt.join("big"), &big).unwrap();
    let nginx = Nginx::start(
        root.path(),
        "location /norange/ { max_ranges 0; alias {root}/; }",
    );
    let rt = runtime();
    let source = http_source(&nginx.url("norange/model"), quick_http());
    let meta = rt.block_on(source.stat("big")).unwrap();
    assert_eq!(meta.size, big.len() as u64);
    let e = rt
        .block_on(source.read_range("big", 1000..2000, &meta))
        .unwrap_err();
    assert!(
        e.to_string().contains("the server ignores Range requests"),
        "{e}"
    );
    assert!(matches!(e, SourceError::Request { .. }), "{e:?}");
    let (bytes, requests, retries) = source.stats().snapshot();
    assert_eq!((bytes, retries), (0, 0), "body bytes read or retried");
    assert_eq!(requests, 2);
    // A whole file is fine (ls reads the .metadata whole); a layer is not, with a clear message.
    let url = nginx.url("norange/model");
    let (code, _, err) = run(cmd().args(["ls", &url]));
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = run(cmd().args(["fetch", &url, "-o", "-", "-s", LAYER]));
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty());
    assert!(err.contains("the server ignores Range requests"), "{err}");
}

#[test]
fn a_file_changed_between_stat_and_read_is_caught() {
    let dir = common::copy_fixture("model");
    let nginx = Nginx::start(dir.path(), "");
    let rt = runtime();
    let source = http_source(&nginx.url(""), quick_http());
    let meta = rt.block_on(source.stat(SHARD)).unwrap();
    // Another file of the same size replaces it.
    let path = dir.path().join(SHARD);
    let mut data = std::fs::read(&path).unwrap();
    data.reverse();
    std::fs::write(&path, &data).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let e = rt
        .block_on(source.read_range(SHARD, 100..5000, &meta))
        .unwrap_err();
    assert!(matches!(e, SourceError::Changed { .. }), "{e:?}");
    assert!(e.to_string().contains(SHARD), "{e}");
    // nginx writes its log line after the answer has gone out: give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !nginx.log().iter().any(|l| l.contains(" 412 ")) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        nginx.log().iter().any(|l| l.contains(" 412 ")),
        "{:?}",
        nginx.log()
    );
    // Stat again: the new version reads.
    let meta = rt.block_on(source.stat(SHARD)).unwrap();
    let got = rt
        .block_on(source.read_all_range(SHARD, 100..5000, &meta))
        .unwrap();
    assert!(got == data[100..5000]);
}

#[test]
fn proxies_from_the_environment_are_used() {
    let nginx = Nginx::start(&common::repo().join("fixtures"), "");
    let proxy = format!("http://127.0.0.1:{}", nginx.port);
    // A host that does not resolve: only the proxy can answer.
    let url = "http://ckpt.invalid/model";
    let (code, _, err) = run(cmd().env("HTTP_PROXY", &proxy).args(["ls", url]));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        nginx
            .log()
            .iter()
            .any(|l| l.contains("GET http://ckpt.invalid/model/.metadata")),
        "{:?}",
        nginx.log()
    );
    let (code, _, err) = run(cmd()
        .env("HTTP_PROXY", &proxy)
        .env("NO_PROXY", "ckpt.invalid")
        .args(["ls", url, "--max-attempts", "1"]));
    assert_eq!(code, Some(2), "{err}");
}

/// A hub that redirects every file to a signed URL on a CDN (here the S3 test server): the
/// first request of a file goes through the hub, the rest straight to the CDN; when the CDN
/// refuses the URL it gave before (an expired signature: 403), the hub is asked again and the
/// fetch goes on.
#[test]
fn a_file_redirected_once_is_read_from_where_it_led_until_that_refuses() {
    let (_root, cdn) = test_server();
    let hub = Nginx::start(
        &common::repo().join("fixtures"),
        &format!(
            "location /hub/ {{ rewrite ^/hub/(.*)$ {}/ckpt/$1 redirect; }}",
            cdn.endpoint()
        ),
    );
    cdn.add_fault(
        FaultRule::new(Fault::Status {
            status: 403,
            code: "AccessDenied",
        })
        .on_method("GET")
        .on_key(SHARD),
    );
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("copy");
    let (code, _, err) = run(cmd()
        .args([
            "fetch",
            &hub.url("hub/model"),
            "-q",
            "--part-size",
            "16KiB",
            "-o",
        ])
        .arg(&dir));
    assert_eq!(code, Some(0), "{err}");
    assert_same_files("model", &dir);
    let redirects: Vec<String> = hub
        .log()
        .into_iter()
        .filter(|l| l.contains(" 302 "))
        .collect();
    let count = |key: &str| redirects.iter().filter(|l| l.contains(key)).count();
    // `.metadata` and the other shard once each; the refused shard again after the 403 (by the
    // refused request, and by any of its parts that started before the new answer was known).
    assert_eq!(
        (count(".metadata"), count("__0_0")),
        (1, 1),
        "{redirects:#?}"
    );
    assert!((2..=4).contains(&count(SHARD)), "{redirects:#?}");
    // Every other request went straight to the CDN: more than 20 parts of 16 KiB.
    let stats = cdn.stats();
    assert!(stats.gets > 20 && stats.heads == 2, "{stats:?}");
}

/// The `model` fixture served by the S3 test server at `/ckpt/model`.
fn test_server() -> (tempfile::TempDir, TestServer) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt").join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(fixture("model")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let server = TestServer::start(ServerConfig::new(root.path())).unwrap();
    (root, server)
}

fn faulty(server: &TestServer, stall: Duration) -> Source {
    let mut opts = quick_http();
    opts.retry = RetryPolicy {
        stall_timeout: stall,
        ..opts.retry
    };
    http_source(&format!("{}/ckpt/model", server.endpoint()), opts)
}

#[test]
fn faults_are_retried_and_bodies_resumed() {
    let (_root, server) = test_server();
    let rt = runtime();
    let source = faulty(&server, Duration::from_millis(300));
    let want = std::fs::read(fixture("model").join(SHARD)).unwrap();
    let size = want.len() as u64;
    let read = |meta: &ObjectMeta| {
        let got = rt
            .block_on(source.read_all_range(SHARD, 0..size, meta))
            .unwrap();
        assert!(got == want, "other bytes");
    };

    // 503s on a HEAD and on GETs.
    server.add_fault(
        FaultRule::new(Fault::Status {
            status: 503,
            code: "SlowDown",
        })
        .times(3),
    );
    let meta = rt.block_on(source.stat(SHARD)).unwrap();
    read(&meta);
    assert!(server.faults().iter().all(|r| r.times == 0));
    assert_eq!(source.stats().snapshot().2, 3, "retries");

    // A reset and a stall mid-body: resumed from the last byte received, not from the start.
    for fault in [
        Fault::ResetAfter(1000),
        Fault::StallAfter {
            after: 1000,
            stall: Duration::from_secs(3),
        },
    ] {
        server.clear_faults();
        server.reset_stats();
        server.add_fault(FaultRule::new(fault.clone()).on_method("GET").times(2));
        read(&meta);
        let starts: Vec<u64> = server
            .stats()
            .get_log
            .iter()
            .map(|g| g.range.map_or(0, |(a, _)| a))
            .collect();
        assert_eq!(starts, [0, 1000, 2000], "{fault:?}");
    }

    // A whole object (`.metadata`) is one plain GET, resumed the same way with a ranged GET
    // pinned to the version its headers gave; one over the limit is refused before its body.
    let whole = std::fs::read(fixture("model").join(".metadata")).unwrap();
    server.clear_faults();
    server.reset_stats();
    server.add_fault(
        FaultRule::new(Fault::ResetAfter(1000))
            .on_method("GET")
            .times(1),
    );
    let (meta_md, got) = rt
        .block_on(source.read_object(".metadata", 1 << 30))
        .unwrap();
    assert!(got == whole, "other bytes");
    assert_eq!(meta_md.size, whole.len() as u64);
    let log = server.stats().get_log;
    let ranges: Vec<Option<(u64, u64)>> = log.iter().map(|g| g.range).collect();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], None);
    assert_eq!(ranges[1].map(|(a, _)| a), Some(1000));
    let e = rt
        .block_on(source.read_object(".metadata", 100))
        .unwrap_err();
    assert!(matches!(e, SourceError::TooLarge { .. }), "{e:?}");

    // Another version of the file: Changed, not retried.
    server.clear_faults();
    server.add_fault(FaultRule::new(Fault::Replace).on_method("GET").times(1));
    let e = rt
        .block_on(source.read_range(SHARD, 0..100, &meta))
        .unwrap_err();
    assert!(matches!(e, SourceError::Changed { .. }), "{e:?}");

    // A server that keeps failing: gives up after --max-attempts, saying why.
    server.clear_faults();
    server.add_fault(
        FaultRule::new(Fault::Status {
            status: 503,
            code: "SlowDown",
        })
        .always(),
    );
    let e = rt
        .block_on(source.read_range(SHARD, 0..100, &meta))
        .unwrap_err();
    assert!(
        matches!(e, SourceError::Exhausted { attempts: 10, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("HTTP 503"), "{e}");
}

#[test]
fn a_dribbling_body_is_cut_by_the_request_timeout() {
    let (_root, server) = test_server();
    let rt = runtime();
    let mut opts = quick_http();
    opts.retry = RetryPolicy {
        stall_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_millis(500),
        max_attempts: 2,
        ..opts.retry
    };
    let source = http_source(&format!("{}/ckpt/model", server.endpoint()), opts);
    let meta = rt.block_on(source.stat(SHARD)).unwrap();
    // One byte every 100 ms: never a stall, never done in time.
    server.add_fault(
        FaultRule::new(Fault::Dribble {
            after: 100,
            every: Duration::from_millis(100),
        })
        .on_method("GET")
        .always(),
    );
    let started = std::time::Instant::now();
    let read = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(8),
            source.read_range(SHARD, 0..meta.size, &meta),
        )
        .await
    });
    let e = read
        .expect("the drip was not cut by the request timeout")
        .unwrap_err();
    let took = started.elapsed();
    let text = e.to_string();
    assert!(
        matches!(e, SourceError::Exhausted { attempts: 2, .. }),
        "{e:?}"
    );
    assert!(text.contains("--request-timeout"), "{text}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn the_cli_fetches_through_faults() {
    let (_root, server) = test_server();
    server.add_fault(
        FaultRule::new(Fault::ResetAfter(5000))
            .on_method("GET")
            .times(4),
    );
    server.add_fault(
        FaultRule::new(Fault::Status {
            status: 500,
            code: "InternalError",
        })
        .times(4),
    );
    let url = format!("{}/ckpt/model", server.endpoint());
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("copy");
    let (code, _, err) = run(cmd().args(["fetch", &url, "-q", "-o"]).arg(&dir));
    assert_eq!(code, Some(0), "{err}");
    assert_same_files("model", &dir);
    assert!(
        server.faults().iter().all(|r| r.times == 0),
        "{:?}",
        server.faults()
    );
    // A stream through a budget of two 4 KiB parts, with resets mid-body: reads before their
    // turn stop mid-body, reads are resumed, and the bytes still come out whole and in order.
    server.add_fault(
        FaultRule::new(Fault::ResetAfter(1000))
            .on_method("GET")
            .times(6),
    );
    let small = common::stream_through_two_small_parts(cmd().args(["fetch", &url]));
    assert!(
        small == common::local_stream("model"),
        "other bytes on stdout"
    );
    assert!(
        server.faults().iter().all(|r| r.times == 0),
        "{:?}",
        server.faults()
    );
}

/// The S3 source's own transport over HTTPS: nginx serves the repository, so a path-style GET of
/// `s3://fixtures/model/NAME` is the file; it answers the listing with no bucket listing, and
/// dcpfetch asks for each shard instead. The private CA is trusted through `SSL_CERT_FILE` (the
/// system's roots, as the SDK's client reads them) or `--ca-bundle`, and refused without them.
#[test]
fn s3_over_https_trusts_ssl_cert_file_and_the_ca_bundle() {
    let ca = common::TestCa::new();
    let nginx = Nginx::start_tls(&common::repo(), &ca);
    let endpoint = nginx.url("");
    let endpoint = endpoint.trim_end_matches('/');
    let bundle = ca.ca().display().to_string();
    let s3 = |c: &mut assert_cmd::Command| {
        c.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .args(["--endpoint-url", endpoint]);
    };
    let local = fixture("model").display().to_string();
    let mut ls = cmd();
    ls.env("SSL_CERT_FILE", &bundle)
        .args(["ls", "s3://fixtures/model", "--json"]);
    s3(&mut ls);
    let (code, out, err) = run(&mut ls);
    assert_eq!(code, Some(0), "{err}");
    let over_s3: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        over_s3["entries"],
        json_of(&["ls", &local, "--json"])["entries"]
    );

    let mut fetch = cmd();
    fetch.args([
        "fetch",
        "s3://fixtures/model",
        "-o",
        "-",
        "-q",
        "-s",
        LAYER,
        "--ca-bundle",
        &bundle,
    ]);
    s3(&mut fetch);
    let got = fetch.output().unwrap();
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let want = cmd()
        .args(["fetch", &local, "-o", "-", "-q", "-s", LAYER])
        .output()
        .unwrap();
    assert!(!got.stdout.is_empty());
    assert!(got.stdout == want.stdout, "other bytes");

    // Without the bundle the certificate is not trusted: said at once (not retried), with the
    // hint the HTTP source gives.
    let started = std::time::Instant::now();
    let mut ls = cmd();
    ls.args(["ls", "s3://fixtures/model"]);
    s3(&mut ls);
    let (code, _, err) = run(&mut ls);
    assert_eq!(code, Some(2), "{err}");
    assert_untrusted(&err, nginx.port);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "retried a certificate error"
    );
    // --ca-bundle trusts only what it holds, and a file with no certificate is named.
    let other = common::TestCa::new();
    let other = other.ca().display().to_string();
    let not_pem = fixture("model").join(".metadata").display().to_string();
    for (bundle, says) in [
        (&other, "is not trusted"),
        (&not_pem, "holds no PEM certificate"),
    ] {
        let mut ls = cmd();
        ls.args(["ls", "s3://fixtures/model", "--ca-bundle", bundle]);
        s3(&mut ls);
        let (code, _, err) = run(&mut ls);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
}
