//! Shared test support: the fixtures, their expected values, the `dcpfetch` binary, and the
//! storage backends every suite runs against (the local folder and a real S3-protocol server).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every fixture under `fixtures/` (written by real torch, see fixtures/README.md).
pub const FIXTURES: [&str; 9] = [
    "single",
    "model",
    "dtensor",
    "per_item",
    "zstd",
    "per_rank",
    "safetensors",
    "torch1_13",
    "torch2_5",
];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("fixtures").join(name)
}

/// The values torch recorded for a fixture.
pub fn expected(name: &str) -> Value {
    let path = repo()
        .join("fixtures/expected")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The bucket the S3 server holds the fixtures in, one prefix per fixture.
pub const BUCKET: &str = "fixtures";

/// Where a suite reads checkpoints from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    S3,
}

impl Backend {
    /// The location argument for a fixture.
    pub fn location(self, name: &str) -> String {
        match self {
            Backend::Local => fixture(name).display().to_string(),
            Backend::S3 => {
                moto();
                format!("s3://{BUCKET}/{name}")
            }
        }
    }

    /// Extra arguments the backend needs.
    pub fn args(self) -> Vec<String> {
        match self {
            Backend::Local => vec![],
            Backend::S3 => vec![
                "--endpoint-url".into(),
                moto().endpoint.clone(),
                "--path-style".into(),
            ],
        }
    }
}

/// The `dcpfetch` binary with a clean AWS environment (dummy credentials, no instance metadata).
/// Runs `fetch` (given its checkpoint and source options) to stdout, everything in order through a
/// budget of two 4 KiB parts with 16 requests allowed, so that parts before their turn stop
/// reading mid-body; checks that it succeeded (within a minute) and gives its stdout.
pub fn stream_through_two_small_parts(fetch: &mut assert_cmd::Command) -> Vec<u8> {
    stdout_of(
        fetch
            .args(["-o", "-", "-q", "--concurrency", "16"])
            .args(["--part-size", "4KiB", "--max-memory", "8KiB"])
            .timeout(Duration::from_secs(60)),
    )
}

/// Everything of fixture `name`, streamed in order from its folder.
pub fn local_stream(name: &str) -> Vec<u8> {
    stdout_of(
        dcpfetch()
            .arg("fetch")
            .arg(fixture(name))
            .args(["-o", "-", "-q"]),
    )
}

/// Runs a command that must succeed (its stderr shown if not) and gives its stdout.
pub fn stdout_of(c: &mut assert_cmd::Command) -> Vec<u8> {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn dcpfetch() -> assert_cmd::Command {
    assert_cmd::Command::from_std(clean_dcpfetch())
}

/// The `dcpfetch` binary in a clean environment: dummy AWS credentials, no instance metadata, no
/// AWS endpoint or profile of the machine's, no scheduler variables (`--shard auto`).
fn clean_dcpfetch() -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("dcpfetch"));
    for var in [
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "RANK",
        "WORLD_SIZE",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_PROCID",
        "JOB_COMPLETION_INDEX",
        "OMPI_COMM_WORLD_RANK",
    ] {
        c.env_remove(var);
    }
    c.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    c
}

/// Runs dcpfetch and parses its stdout as JSON, requiring success.
pub fn json(args: &[&str]) -> Value {
    let out = dcpfetch().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dcpfetch {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A moto server (PyPI `moto`, `moto_server`) holding every fixture, started once per test binary.
pub struct Moto {
    pub endpoint: String,
    // Closing this pipe (when the test process exits) stops the server.
    _keepalive: Mutex<ChildStdin>,
    _child: Mutex<Child>,
}

pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(start_moto)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_moto() -> Moto {
    let endpoint = std::env::var("DCPFETCH_TEST_S3_ENDPOINT").ok();
    let (endpoint, child, stdin) = match endpoint {
        Some(e) => {
            let mut child = Command::new("sh")
                .args(["-c", "cat >/dev/null"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            let stdin = child.stdin.take().unwrap();
            if !answers_http(&e, Duration::from_secs(60)) {
                panic!(
                    "the S3 server at {e} (DCPFETCH_TEST_S3_ENDPOINT) did not answer within 60 s"
                );
            }
            (e, child, stdin)
        }
        None => {
            if !on_path("moto_server") {
                panic!("{MOTO_MISSING}");
            }
            let port = free_port();
            // The shell stops moto when our end of its stdin closes, however the tests end.
            let script = format!(
                "moto_server -H 127.0.0.1 -p {port} >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid"
            );
            let mut child = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{MOTO_MISSING} ({e})"));
            let stdin = child.stdin.take().unwrap();
            let endpoint = format!("http://127.0.0.1:{port}");
            if !answers_http(&endpoint, MOTO_START) {
                panic!(
                    "{MOTO_MISSING} (it did not answer at {endpoint} within {} s)",
                    MOTO_START.as_secs()
                );
            }
            (endpoint, child, stdin)
        }
    };
    upload_fixtures(&endpoint);
    Moto {
        endpoint,
        _keepalive: Mutex::new(stdin),
        _child: Mutex::new(child),
    }
}

/// What a suite that needs moto says when it cannot start it.
const MOTO_MISSING: &str = "moto_server not found / did not start: install it with \
     `python3 -m venv .venv && .venv/bin/pip install 'moto[server]'` (or pipx install \
     'moto[server]') and put it on PATH";

/// How long moto may take to answer (it starts in about a second).
const MOTO_START: Duration = Duration::from_secs(15);

/// Whether an executable `name` is in a folder of PATH.
fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Whether `endpoint` answers an HTTP request within `wait`.
fn answers_http(endpoint: &str, wait: Duration) -> bool {
    let addr = endpoint.trim_start_matches("http://");
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = write!(
                s,
                "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            );
            let mut first = String::new();
            if BufReader::new(&mut s).read_line(&mut first).is_ok() && first.starts_with("HTTP/") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Puts every fixture file at `s3://fixtures/<name>/<file>`.
fn upload_fixtures(endpoint: &str) {
    block_on(async {
        let client = s3_client(endpoint).await;
        let _ = client.create_bucket().bucket(BUCKET).send().await;
        for name in FIXTURES {
            put_dir(&client, &fixture(name), name).await;
        }
    });
}

/// Puts every file of `dir` at `s3://fixtures/<prefix>/<file>` on the moto server; returns the
/// location.
pub fn upload(dir: &Path, prefix: &str) -> String {
    let endpoint = moto().endpoint.clone();
    block_on(async { put_dir(&s3_client(&endpoint).await, dir, prefix).await });
    format!("s3://{BUCKET}/{prefix}")
}

/// Puts the regular files of a folder under a prefix.
async fn put_dir(client: &aws_sdk_s3::Client, dir: &Path, prefix: &str) {
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap();
        if !f.file_type().unwrap().is_file() {
            continue;
        }
        let key = format!("{prefix}/{}", f.file_name().to_str().unwrap());
        let body = std::fs::read(f.path()).unwrap();
        client
            .put_object()
            .bucket(BUCKET)
            .key(&key)
            .body(body.into())
            .send()
            .await
            .unwrap_or_else(|e| panic!("uploading {key}: {e:?}"));
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Rewrites a checkpoint's `.metadata` through the unpickler's value graph.
pub fn edit_metadata(dir: &Path, edit: impl FnOnce(&mut dcpfetch::metadata::pickle::Pickle)) {
    let path = dir.join(".metadata");
    let mut p = dcpfetch::metadata::pickle::Pickle::parse(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut p);
    std::fs::write(&path, p.write().unwrap()).unwrap();
}

/// The state dict of the `Metadata` object.
pub fn metadata_state(p: &dcpfetch::metadata::pickle::Pickle) -> dcpfetch::metadata::pickle::Value {
    p.object(p.root).unwrap().state.unwrap()
}

/// Sets `dict[key] = value` in a dict node.
pub fn set_item(
    p: &mut dcpfetch::metadata::pickle::Pickle,
    dict: dcpfetch::metadata::pickle::Value,
    key: &str,
    value: dcpfetch::metadata::pickle::Value,
) {
    let i = p
        .pairs(dict)
        .unwrap()
        .iter()
        .position(|(k, _)| p.str(*k) == Some(key))
        .unwrap();
    match p.node_mut(dict).unwrap() {
        dcpfetch::metadata::pickle::Node::Dict(pairs) => pairs[i].1 = value,
        _ => unreachable!(),
    }
}

/// The `_StorageInfo` state dict of the storage entry of `fqn` (its first chunk).
pub fn storage_info(
    p: &dcpfetch::metadata::pickle::Pickle,
    fqn: &str,
) -> dcpfetch::metadata::pickle::Value {
    let sd = p.get(metadata_state(p), "storage_data").unwrap();
    let (_, info) = p
        .pairs(sd)
        .unwrap()
        .iter()
        .find(|(k, _)| {
            let idx = p.object(*k).unwrap().state.unwrap();
            p.str(p.get(idx, "fqn").unwrap()) == Some(fqn)
        })
        .unwrap();
    p.object(*info).unwrap().state.unwrap()
}

/// An SDK client for a test endpoint.
pub async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "tests");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(creds)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Reads a whole file.
pub fn read(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

/// Hex sha256.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Copies a fixture into a fresh temporary folder (for tests that damage it).
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    dir
}

/// A [`dcpfetch::source::Source`] on `s3://bucket/prefix` at a test endpoint: path-style,
/// unsigned (the test servers do not check signatures, and the process environment is left
/// alone), quick retries.
pub async fn s3_source(endpoint: &str, bucket: &str, prefix: &str) -> dcpfetch::source::Source {
    use dcpfetch::source::{RetryPolicy, S3Options, S3Source, Source, TransferStats};
    let opts = S3Options {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.to_owned()),
        path_style: true,
        no_sign_request: true,
        retry: RetryPolicy {
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
            ..RetryPolicy::default()
        },
        ..S3Options::default()
    };
    let stats = std::sync::Arc::new(TransferStats::default());
    let s3 = S3Source::connect(bucket.to_owned(), prefix.to_owned(), &opts, stats)
        .await
        .unwrap_or_else(|e| panic!("cannot reach {endpoint}: {e}"));
    Source::new(std::sync::Arc::new(s3))
}

/// Makes the objects under `s3://fixtures/<prefix>/` on the moto server readable without
/// credentials (public-read), for clients that send unsigned requests ([`s3_source`]).
pub fn make_public(prefix: &str) {
    let endpoint = moto().endpoint.clone();
    block_on(async {
        let client = s3_client(&endpoint).await;
        let listed = client
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(format!("{prefix}/"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("listing {prefix}: {e:?}"));
        for key in listed.contents().iter().filter_map(|o| o.key()) {
            client
                .put_object_acl()
                .bucket(BUCKET)
                .key(key)
                .acl(aws_sdk_s3::types::ObjectCannedAcl::PublicRead)
                .send()
                .await
                .unwrap_or_else(|e| panic!("making {key} public: {e:?}"));
        }
    });
}

/// Everything under `dir` (not following links): each path with its kind and content (a file's
/// sha256, a link's target), to check that a folder was left untouched.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("link {}", std::fs::read_link(&p).unwrap().display()),
                );
            } else if m.is_dir() {
                out.insert(rel, "folder".into());
                walk(base, &p, out);
            } else if m.is_file() {
                out.insert(rel, format!("file {}", sha256(&read(&p))));
            } else {
                out.insert(rel, format!("other {:?}", m.file_type()));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// An nginx (Debian package `nginx` or `nginx-light`) started by a test: one process, as the
/// current user, on a free port of 127.0.0.1 and 127.0.0.2, serving `root` with its ETags, Range
/// and If-Match handling. Every request is logged (see [`Nginx::log`]). Stopped when dropped.
pub struct Nginx {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
    /// `http` or `https`.
    scheme: &'static str,
}

/// A private CA and a certificate it signed for `127.0.0.1` and `localhost`, made with the
/// `openssl` command in a temporary folder: `ca.pem` (the CA's certificate, what a client is
/// told to trust), `server.pem` and `server.key` (for the server).
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    /// Fails the test at once when `openssl` is not installed.
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "openssl is needed for the HTTPS tests: install it with `apt-get install \
                         -y openssl` ({e})"
                    )
                });
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &[
                    "req",
                    "-x509",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=dcpfetch test CA",
                ][..],
                &key,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req", "-subj", "/CN=localhost"][..],
                &key,
                &["-keyout", "server.key", "-out", "server.csr"],
            ]
            .concat(),
        );
        std::fs::write(
            dir.path().join("server.ext"),
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        TestCa { dir }
    }

    /// The CA's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn server(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("server.pem"),
            self.dir.path().join("server.key"),
        )
    }
}

impl Nginx {
    /// Serves `root` at `/`; `extra` is more configuration inside the `server` block, with
    /// `{root}` and `{port}` replaced. Fails the test at once when nginx is not installed.
    pub fn start(root: &Path, extra: &str) -> Nginx {
        let installed = Command::new("nginx")
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(
            installed,
            "nginx is needed for the HTTP tests: install it with `apt-get install -y nginx` \
             (or nginx-light)"
        );
        let mut last = String::new();
        for _ in 0..5 {
            match Nginx::try_start(root, extra, None) {
                Ok(n) => return n,
                Err(e) => last = e,
            }
        }
        panic!("nginx did not start: {last}");
    }

    /// Serves `root` over HTTPS only, with the server certificate of `ca` (for 127.0.0.1 and
    /// localhost).
    pub fn start_tls(root: &Path, ca: &TestCa) -> Nginx {
        let mut last = String::new();
        for _ in 0..5 {
            match Nginx::try_start(root, "", Some(ca)) {
                Ok(n) => return n,
                Err(e) => last = e,
            }
        }
        panic!("nginx (TLS) did not start: {last}");
    }

    fn try_start(root: &Path, extra: &str, tls: Option<&TestCa>) -> Result<Nginx, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let tmp = dir.path().display().to_string();
        let root = root.display().to_string();
        let mut extra = extra
            .replace("{root}", &root)
            .replace("{port}", &port.to_string());
        let (ssl, scheme) = match tls {
            Some(ca) => {
                let (cert, key) = ca.server();
                extra.push_str(&format!(
                    "\n        ssl_certificate {};\n        ssl_certificate_key {};",
                    cert.display(),
                    key.display()
                ));
                (" ssl", "https")
            }
            None => ("", "http"),
        };
        let conf = format!(
            r#"master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format dcp '$server_addr $status "$request" range="$http_range" if_match="$http_if_match" auth="$http_authorization" sent=$body_bytes_sent';
    access_log {tmp}/access.log dcp;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port}{ssl};
        listen 127.0.0.2:{port}{ssl};
        root {root};
        {extra}
    }}
}}
"#
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run nginx: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited ({status}): {log}"));
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Nginx {
                    port,
                    dir,
                    child,
                    scheme,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        Err("nginx did not listen within 20 s".into())
    }

    /// `http://127.0.0.1:PORT/path` (`https://` when started with TLS).
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}://127.0.0.1:{}/{}",
            self.scheme,
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// The access log, a line per request: `ADDR STATUS "REQUEST" range=".." if_match=".."
    /// auth=".." sent=N`.
    pub fn log(&self) -> Vec<String> {
        // nginx writes a request's line after its answer has gone out, so a client can be done
        // before the last line is there: wait until the log stops growing (50 ms, at most 2 s).
        let path = self.dir.path().join("access.log");
        let size = || std::fs::metadata(&path).map_or(0, |m| m.len());
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = size();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = size();
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// nginx's error log.
    pub fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A [`dcpfetch::source::Source`] on an HTTP(S) URL with quick retries.
pub fn http_source(url: &str, opts: dcpfetch::source::HttpOptions) -> dcpfetch::source::Source {
    use dcpfetch::source::{HttpSource, HttpUrl, Source, TransferStats};
    let base = HttpUrl::parse(url).unwrap();
    let stats = std::sync::Arc::new(TransferStats::default());
    Source::new(std::sync::Arc::new(
        HttpSource::new(base, &opts, stats).unwrap(),
    ))
}

/// HTTP options with quick retries and no extra headers.
pub fn quick_http() -> dcpfetch::source::HttpOptions {
    dcpfetch::source::HttpOptions {
        retry: dcpfetch::source::RetryPolicy {
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
            ..dcpfetch::source::RetryPolicy::default()
        },
        ..Default::default()
    }
}

/// The `dcpfetch` binary as a process to spawn (several at once, or one to kill), with the clean
/// AWS environment of [`dcpfetch`].
pub fn dcpfetch_process() -> Command {
    let mut c = clean_dcpfetch();
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// [`snapshot`] of a fetched folder without dcpfetch's own state (`.dcpfetch/`).
pub fn fetched_tree(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut tree = snapshot(dir);
    tree.retain(|path, _| !path.starts_with(".dcpfetch"));
    tree
}

/// Export flags for `fixtures/large`: small memory and concurrency, so that its items are located
/// first and placed as they arrive (items above 256 KiB), not read whole; small parts, so that
/// one item comes in several.
pub const PLACED: [&str; 6] = [
    "--max-memory",
    "4MiB",
    "--concurrency",
    "16",
    "--part-size",
    "128KiB",
];
