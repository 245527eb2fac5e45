//! Tests of the S3 test server itself (`tests/support/s3_server.rs`): through the real
//! aws-sdk-s3 client where it can see the behaviour, over raw TCP where the SDK hides it.

#[path = "support/s3_server.rs"]
mod s3_server;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use tempfile::TempDir;

use s3_server::{Fault, FaultRule, GetRecord, ServerConfig, Stats, TestServer};

const BUCKET: &str = "bkt";
/// Larger than one 1 MiB read of the server, and not a multiple of it.
const DATA_LEN: usize = (1 << 20) + 12_345;
/// Every file's modification time.
const MTIME: u64 = 1_700_000_000;
const ODD_KEY: &str = "sp ace+plus/ünï.txt";

/// Bytes where every shift by one is visible.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

fn data() -> Vec<u8> {
    pattern(DATA_LEN)
}

/// A served folder: bucket `bkt` with a few objects, and an empty bucket `empty-bucket`.
struct Fixture {
    _dir: TempDir,
    server: TestServer,
}

fn write(root: &Path, key: &str, bytes: &[u8]) {
    let path = root.join(BUCKET).join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(UNIX_EPOCH + Duration::from_secs(MTIME))
        .unwrap();
}

/// The keys of bucket `bkt`, sorted.
const KEYS: [&str; 8] = [
    "data.bin",
    "dir/a",
    "dir/b",
    "dir/sub/c",
    "empty",
    "other/x",
    "small.txt",
    ODD_KEY,
];

fn fixture_with(config: impl FnOnce(ServerConfig) -> ServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for key in KEYS {
        let bytes: Vec<u8> = match key {
            "data.bin" => data(),
            "small.txt" => b"hello world".to_vec(),
            "empty" => Vec::new(),
            k => k.as_bytes().to_vec(),
        };
        write(root, key, &bytes);
    }
    std::fs::create_dir(root.join("empty-bucket")).unwrap();
    // A file at the root is not a bucket.
    std::fs::write(root.join("not-a-bucket"), b"x").unwrap();
    let server = TestServer::start(config(ServerConfig::new(root))).unwrap();
    Fixture { _dir: dir, server }
}

fn fixture() -> Fixture {
    fixture_with(|c| c)
}

fn client(server: &TestServer) -> Client {
    client_with(server, StalledStreamProtectionConfig::disabled())
}

fn client_with(server: &TestServer, stalls: StalledStreamProtectionConfig) -> Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(server.endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .retry_config(RetryConfig::disabled())
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .stalled_stream_protection(stalls)
        .build();
    Client::from_conf(conf)
}

/// The HTTP status of a failed SDK call.
fn status<E, R: HasStatus>(e: &SdkError<E, R>) -> Option<u16> {
    e.raw_response().map(HasStatus::status)
}

trait HasStatus {
    fn status(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

async fn get(
    client: &Client,
    key: &str,
    range: Option<&str>,
) -> Result<
    aws_sdk_s3::operation::get_object::GetObjectOutput,
    SdkError<
        aws_sdk_s3::operation::get_object::GetObjectError,
        aws_sdk_s3::config::http::HttpResponse,
    >,
> {
    client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .set_range(range.map(str::to_owned))
        .send()
        .await
}

async fn get_bytes(client: &Client, key: &str, range: Option<&str>) -> Vec<u8> {
    let out = get(client, key, range).await.unwrap();
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

/// The kind of the first `io::Error` in an error's source chain.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        next = e.source();
    }
    None
}

/// Reads a body to its end or first error: the bytes received and the error.
async fn body_error(
    body: &mut aws_sdk_s3::primitives::ByteStream,
) -> (usize, aws_sdk_s3::primitives::ByteStreamError) {
    let mut received = 0;
    loop {
        match body.next().await {
            Some(Ok(bytes)) => received += bytes.len(),
            Some(Err(e)) => return (received, e),
            None => panic!("the body ended without an error after {received} bytes"),
        }
    }
}

/// One raw HTTP response.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw keep-alive connection.
struct RawConn {
    reader: BufReader<TcpStream>,
}

impl RawConn {
    fn open(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawConn {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, request: &str) {
        self.reader.get_mut().write_all(request.as_bytes()).unwrap();
    }

    /// The status line and headers of the next response.
    fn head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.is_empty() {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.to_owned(), v.trim().to_owned()));
        }
        Ok((status, headers))
    }

    /// The next response; a HEAD's has no body.
    fn response(&mut self, head: bool) -> Raw {
        let (status, headers) = self.head().unwrap();
        let mut raw = Raw {
            status,
            headers,
            body: Vec::new(),
        };
        if !head {
            let len: usize = raw.header("content-length").unwrap().parse().unwrap();
            raw.body = vec![0; len];
            self.reader.read_exact(&mut raw.body).unwrap();
        }
        raw
    }

    /// Reads until the connection ends: the bytes read and how it ended.
    fn drain(&mut self) -> (usize, std::io::Result<()>) {
        let mut total = 0;
        let mut buf = vec![0; 64 * 1024];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return (total, Ok(())),
                Ok(n) => total += n,
                Err(e) => return (total, Err(e)),
            }
        }
    }

    fn request(&mut self, method: &str, path: &str, extra: &str) -> Raw {
        self.send(&format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n"
        ));
        self.response(method == "HEAD")
    }
}

/// One request on a fresh connection.
fn raw(addr: SocketAddr, method: &str, path: &str, extra: &str) -> Raw {
    RawConn::open(addr).request(method, path, extra)
}

fn rec(key: &str, range: Option<(u64, u64)>, status: u16) -> GetRecord {
    GetRecord {
        bucket: BUCKET.into(),
        key: key.into(),
        range,
        status,
    }
}

#[tokio::test]
async fn get_whole_and_ranged_objects() {
    let f = fixture();
    let c = client(&f.server);
    let data = data();
    let size = DATA_LEN as u64;

    let whole = get(&c, "data.bin", None).await.unwrap();
    assert_eq!(whole.content_length(), Some(DATA_LEN as i64));
    assert_eq!(whole.accept_ranges(), Some("bytes"));
    assert_eq!(whole.content_range(), None);
    let etag = whole.e_tag().unwrap().to_owned();
    assert!(
        etag.len() == 34 && etag.starts_with('"') && etag.ends_with('"'),
        "{etag}"
    );
    assert!(etag[1..33].bytes().all(|b| b.is_ascii_hexdigit()), "{etag}");
    assert_eq!(whole.last_modified().unwrap().secs(), MTIME as i64);
    assert_eq!(whole.body.collect().await.unwrap().into_bytes(), data);

    // (header, served range, Content-Range)
    let cases: [(&str, (usize, usize), String); 6] = [
        ("bytes=0-99", (0, 100), format!("bytes 0-99/{size}")),
        // Across the server's 1 MiB reads.
        (
            "bytes=1048000-1049999",
            (1_048_000, 1_050_000),
            format!("bytes 1048000-1049999/{size}"),
        ),
        (
            "bytes=1000000-",
            (1_000_000, DATA_LEN),
            format!("bytes 1000000-{}/{size}", size - 1),
        ),
        (
            "bytes=-10",
            (DATA_LEN - 10, DATA_LEN),
            format!("bytes {}-{}/{size}", size - 10, size - 1),
        ),
        // Past the end: clipped.
        (
            "bytes=1048576-99999999",
            (1_048_576, DATA_LEN),
            format!("bytes 1048576-{}/{size}", size - 1),
        ),
        // A suffix longer than the object: all of it.
        (
            "bytes=-99999999",
            (0, DATA_LEN),
            format!("bytes 0-{}/{size}", size - 1),
        ),
    ];
    for (header, (a, b), content_range) in &cases {
        let out = get(&c, "data.bin", Some(header)).await.unwrap();
        assert_eq!(
            out.content_range(),
            Some(content_range.as_str()),
            "{header}"
        );
        assert_eq!(out.content_length(), Some((b - a) as i64), "{header}");
        assert_eq!(out.e_tag(), Some(etag.as_str()));
        let bytes = out.body.collect().await.unwrap().into_bytes();
        assert!(bytes == data[*a..*b], "{header}: wrong bytes");
    }

    let stats = f.server.stats();
    assert_eq!(stats.gets, 7);
    assert_eq!((stats.heads, stats.lists, stats.faults), (0, 0, 0));
    let served: usize = DATA_LEN + cases.iter().map(|(_, (a, b), _)| b - a).sum::<usize>();
    assert_eq!(stats.body_bytes, served as u64);
    let expected_log = vec![
        rec("data.bin", None, 200),
        rec("data.bin", Some((0, 100)), 206),
        rec("data.bin", Some((1_048_000, 1_050_000)), 206),
        rec("data.bin", Some((1_000_000, size)), 206),
        rec("data.bin", Some((size - 10, size)), 206),
        // As asked, not clipped.
        rec("data.bin", Some((1_048_576, 100_000_000)), 206),
        rec("data.bin", Some((0, size)), 206),
    ];
    assert_eq!(stats.get_log, expected_log);
}

#[tokio::test]
async fn head_object_matches_get() {
    let f = fixture();
    let c = client(&f.server);
    let head = c
        .head_object()
        .bucket(BUCKET)
        .key("data.bin")
        .send()
        .await
        .unwrap();
    let get = get(&c, "data.bin", None).await.unwrap();
    assert_eq!(head.content_length(), Some(DATA_LEN as i64));
    assert_eq!(head.e_tag(), get.e_tag());
    assert_eq!(head.last_modified(), get.last_modified());
    // Read to the end, so the SDK can reuse the connection.
    get.body.collect().await.unwrap();
    assert_eq!(head.accept_ranges(), Some("bytes"));

    let missing = c
        .head_object()
        .bucket(BUCKET)
        .key("missing")
        .send()
        .await
        .unwrap_err();
    assert!(
        missing.as_service_error().unwrap().is_not_found(),
        "{missing:?}"
    );
    assert_eq!(status(&missing), Some(404));

    // A HEAD error has no body but names its code; the connection stays usable.
    let mut conn = RawConn::open(f.server.addr());
    let r = conn.request("HEAD", "/bkt/missing", "");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-amz-error-code"), Some("NoSuchKey"));
    let r = conn.request("HEAD", "/nobucket/x", "");
    assert_eq!(
        (r.status, r.header("x-amz-error-code")),
        (404, Some("NoSuchBucket"))
    );
    // HEAD with a Range answers as the GET would, without the body.
    let r = conn.request("HEAD", "/bkt/small.txt", "Range: bytes=2-4\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-length"), Some("3"));
    assert_eq!(r.header("content-range"), Some("bytes 2-4/11"));
    let r = conn.request("GET", "/bkt/small.txt", "");
    assert_eq!(r.body, b"hello world");

    let stats = f.server.stats();
    assert_eq!((stats.heads, stats.gets, stats.connections), (5, 2, 2));
    // HEADs are not in the GET log.
    assert_eq!(
        stats.get_log,
        vec![rec("data.bin", None, 200), rec("small.txt", None, 200)]
    );
}

#[tokio::test]
async fn errors_carry_s3_codes() {
    let f = fixture();
    let c = client(&f.server);

    let e = get(&c, "missing", None).await.unwrap_err();
    assert!(e.as_service_error().unwrap().is_no_such_key(), "{e:?}");
    assert_eq!(status(&e), Some(404));

    let e = c
        .get_object()
        .bucket("nobucket")
        .key("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!((e.code(), status(&e)), (Some("NoSuchBucket"), Some(404)));

    let e = get(&c, "small.txt", Some("bytes=11-20")).await.unwrap_err();
    assert_eq!((e.code(), status(&e)), (Some("InvalidRange"), Some(416)));
    assert!(e.message().is_some());

    // A folder is not an object.
    let e = get(&c, "dir", None).await.unwrap_err();
    assert!(e.as_service_error().unwrap().is_no_such_key(), "{e:?}");

    let addr = f.server.addr();
    for (path, range) in [
        ("/bkt/small.txt", "bytes=11-"),
        ("/bkt/small.txt", "bytes=-0"),
        ("/bkt/empty", "bytes=0-0"),
        ("/bkt/empty", "bytes=-5"),
    ] {
        let r = raw(addr, "GET", path, &format!("Range: {range}\r\n"));
        assert_eq!(r.status, 416, "{path} {range}");
        let size = if path.ends_with("empty") { 0 } else { 11 };
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes */{size}").as_str())
        );
        assert!(
            r.text().contains("<Code>InvalidRange</Code>"),
            "{}",
            r.text()
        );
        assert_eq!(r.header("content-type"), Some("application/xml"));
    }
    // Ranges that are not one well-formed byte range are ignored, as S3 does.
    for range in [
        "bytes=0-1,3-4",
        "bytes=5-3",
        "items=0-1",
        "bytes=x-",
        "bytes=-",
    ] {
        let r = raw(
            addr,
            "GET",
            "/bkt/small.txt",
            &format!("Range: {range}\r\n"),
        );
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"hello world"[..]),
            "{range}"
        );
    }
    let r = raw(addr, "GET", "/bkt/empty", "");
    assert_eq!((r.status, r.body.len()), (200, 0));

    let r = raw(addr, "GET", "/bkt/missing", "");
    let text = r.text();
    assert!(
        text.contains("<Error><Code>NoSuchKey</Code><Message>"),
        "{text}"
    );
}

#[test]
fn invalid_keys_are_rejected() {
    let f = fixture();
    let addr = f.server.addr();
    for path in [
        "/bkt/dir/../small.txt",
        "/bkt/%2e%2e/bkt/small.txt",
        "/bkt/./small.txt",
        "/bkt/dir//a",
        "/bkt/dir/a/",
        "/bkt/dir%2F%2Fa",
        "/bkt/a%5Cb",
        "/bkt/a%00b",
        "/bkt/..",
    ] {
        let r = raw(addr, "GET", path, "");
        assert_eq!(r.status, 400, "{path}");
        assert!(
            r.text().contains("<Code>InvalidArgument</Code>"),
            "{path}: {}",
            r.text()
        );
        let r = raw(addr, "HEAD", path, "");
        assert_eq!(
            (r.status, r.header("x-amz-error-code")),
            (400, Some("InvalidArgument")),
            "{path}"
        );
    }
    for path in ["/../bkt/small.txt", "/%2E%2E/x", "/a%5Cb/x"] {
        let r = raw(addr, "GET", path, "");
        assert_eq!(r.status, 400, "{path}");
        assert!(
            r.text().contains("<Code>InvalidBucketName</Code>"),
            "{path}: {}",
            r.text()
        );
    }
    // Not percent-encoded UTF-8.
    for path in ["/bkt/%zz", "/bkt/%ff", "/bkt/%4"] {
        let r = raw(addr, "GET", path, "");
        assert_eq!(r.status, 400, "{path}");
    }
    // A file at the root is not a bucket.
    assert_eq!(raw(addr, "GET", "/not-a-bucket/x", "").status, 404);
    let stats = f.server.stats();
    assert_eq!(stats.get_log.len(), 10);
    assert!(
        stats
            .get_log
            .iter()
            .all(|r| r.status == 400 || r.key == "x")
    );
}

#[tokio::test]
async fn percent_encoded_paths_and_queries() {
    let f = fixture();
    let c = client(&f.server);
    assert_eq!(get_bytes(&c, ODD_KEY, None).await, ODD_KEY.as_bytes());

    let r = raw(
        f.server.addr(),
        "GET",
        "/bkt/sp%20ace%2Bplus/%C3%BCn%C3%AF.txt",
        "",
    );
    assert_eq!(r.body, ODD_KEY.as_bytes());
    // In a query, `+` is a space.
    let r = raw(
        f.server.addr(),
        "GET",
        "/bkt?list-type=2&prefix=sp+ace%2B",
        "",
    );
    assert!(
        r.text().contains("<Key>sp ace+plus/ünï.txt</Key>"),
        "{}",
        r.text()
    );
    // The absolute form of a request target.
    let r = raw(f.server.addr(), "GET", "http://127.0.0.1/bkt/small.txt", "");
    assert_eq!(r.body, b"hello world");

    let listed = c
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("sp ace+")
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, [ODD_KEY]);
}

async fn list_keys(
    c: &Client,
    prefix: Option<&str>,
    delimiter: Option<&str>,
    page: Option<i32>,
) -> (Vec<String>, Vec<String>, usize) {
    let mut pages = c
        .list_objects_v2()
        .bucket(BUCKET)
        .set_prefix(prefix.map(str::to_owned))
        .set_delimiter(delimiter.map(str::to_owned))
        .set_max_keys(page)
        .into_paginator()
        .send();
    let (mut keys, mut prefixes, mut count) = (Vec::new(), Vec::new(), 0);
    while let Some(p) = pages.next().await {
        let p = p.unwrap();
        count += 1;
        let n = p.contents().len() + p.common_prefixes().len();
        assert_eq!(p.key_count(), Some(n as i32));
        if let Some(m) = page {
            assert!(n <= m as usize);
            assert_eq!(p.max_keys(), Some(m));
        }
        keys.extend(p.contents().iter().map(|o| o.key().unwrap().to_owned()));
        prefixes.extend(
            p.common_prefixes()
                .iter()
                .map(|o| o.prefix().unwrap().to_owned()),
        );
    }
    (keys, prefixes, count)
}

#[tokio::test]
async fn list_objects_v2() {
    let f = fixture();
    let c = client(&f.server);

    let all = c.list_objects_v2().bucket(BUCKET).send().await.unwrap();
    assert_eq!(all.name(), Some(BUCKET));
    assert_eq!(all.is_truncated(), Some(false));
    assert_eq!(all.key_count(), Some(KEYS.len() as i32));
    assert_eq!(all.max_keys(), Some(1000));
    assert_eq!(all.next_continuation_token(), None);
    let keys: Vec<_> = all.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(keys, KEYS);
    let data = &all.contents()[0];
    assert_eq!(data.size(), Some(DATA_LEN as i64));
    assert_eq!(data.last_modified().unwrap().secs(), MTIME as i64);
    assert_eq!(data.storage_class().map(|s| s.as_str()), Some("STANDARD"));
    let head = c
        .head_object()
        .bucket(BUCKET)
        .key("data.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(data.e_tag(), head.e_tag());

    let (keys, prefixes, _) = list_keys(&c, Some("dir/"), None, None).await;
    assert_eq!(
        (keys, prefixes),
        (
            vec!["dir/a".into(), "dir/b".into(), "dir/sub/c".into()],
            vec![]
        )
    );
    let (keys, prefixes, _) = list_keys(&c, None, Some("/"), None).await;
    assert_eq!(keys, ["data.bin", "empty", "small.txt"]);
    assert_eq!(prefixes, ["dir/", "other/", "sp ace+plus/"]);
    let (keys, prefixes, _) = list_keys(&c, Some("dir/"), Some("/"), None).await;
    assert_eq!(
        (keys, prefixes),
        (
            vec!["dir/a".into(), "dir/b".into()],
            vec!["dir/sub/".into()]
        )
    );
    // A prefix that is not a folder boundary.
    let (keys, _, _) = list_keys(&c, Some("d"), None, None).await;
    assert_eq!(keys, ["data.bin", "dir/a", "dir/b", "dir/sub/c"]);
    let (keys, _, _) = list_keys(&c, Some("nothing"), None, None).await;
    assert!(keys.is_empty());

    // Pages: every key once, in order, whatever the page size; common prefixes count as entries.
    for page in 1..=4 {
        let (keys, prefixes, pages) = list_keys(&c, None, None, Some(page)).await;
        assert_eq!(keys, KEYS, "max-keys {page}");
        assert!(prefixes.is_empty());
        assert_eq!(pages, KEYS.len().div_ceil(page as usize), "max-keys {page}");
        let (keys, prefixes, pages) = list_keys(&c, None, Some("/"), Some(page)).await;
        assert_eq!(keys, ["data.bin", "empty", "small.txt"], "max-keys {page}");
        assert_eq!(
            prefixes,
            ["dir/", "other/", "sp ace+plus/"],
            "max-keys {page}"
        );
        assert_eq!(pages, 6_usize.div_ceil(page as usize), "max-keys {page}");
    }
    let page = c
        .list_objects_v2()
        .bucket(BUCKET)
        .max_keys(3)
        .send()
        .await
        .unwrap();
    assert_eq!(page.is_truncated(), Some(true));
    assert!(page.next_continuation_token().is_some());

    let after = c
        .list_objects_v2()
        .bucket(BUCKET)
        .start_after("dir/b")
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = after.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(keys, &KEYS[3..]);

    let empty = c
        .list_objects_v2()
        .bucket("empty-bucket")
        .send()
        .await
        .unwrap();
    assert_eq!((empty.key_count(), empty.contents().len()), (Some(0), 0));

    let e = c
        .list_objects_v2()
        .bucket("nobucket")
        .send()
        .await
        .unwrap_err();
    assert_eq!((e.code(), status(&e)), (Some("NoSuchBucket"), Some(404)));

    let addr = f.server.addr();
    let r = raw(addr, "GET", "/bkt?list-type=2&max-keys=lots", "");
    assert_eq!(r.status, 400);
    let r = raw(addr, "GET", "/bkt?list-type=2&continuation-token=bogus", "");
    assert_eq!(r.status, 400);
    let r = raw(
        addr,
        "GET",
        "/bkt/?list-type=2&prefix=sp&encoding-type=url",
        "",
    );
    let text = r.text();
    assert!(
        text.contains("<Key>sp%20ace%2Bplus/%C3%BCn%C3%AF.txt</Key>"),
        "{text}"
    );
    assert!(text.contains("<EncodingType>url</EncodingType>"), "{text}");
    // ETags are quoted, and the quotes escaped.
    assert!(text.contains("<ETag>&quot;"), "{text}");
}

#[tokio::test]
async fn bucket_requests() {
    let f = fixture();
    let c = client(&f.server);
    c.head_bucket().bucket(BUCKET).send().await.unwrap();
    let e = c.head_bucket().bucket("nobucket").send().await.unwrap_err();
    assert!(e.as_service_error().unwrap().is_not_found(), "{e:?}");
    let location = c.get_bucket_location().bucket(BUCKET).send().await.unwrap();
    // An empty constraint, meaning us-east-1.
    assert_eq!(location.location_constraint().map(|l| l.as_str()), Some(""));
    let buckets = c.list_buckets().send().await.unwrap();
    let names: Vec<_> = buckets.buckets().iter().filter_map(|b| b.name()).collect();
    assert_eq!(names, [BUCKET, "empty-bucket"]);
    let stats = f.server.stats();
    assert_eq!(
        (stats.other, stats.gets, stats.heads, stats.lists),
        (4, 0, 0, 0)
    );
}

#[tokio::test]
async fn conditional_requests() {
    let f = fixture();
    let c = client(&f.server);
    let etag = get(&c, "small.txt", None)
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_owned();

    let ok = c
        .get_object()
        .bucket(BUCKET)
        .key("small.txt")
        .if_match(&etag)
        .range("bytes=0-4")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.body.collect().await.unwrap().into_bytes(), &b"hello"[..]);
    let e = c
        .get_object()
        .bucket(BUCKET)
        .key("small.txt")
        .if_match("\"0123\"")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), status(&e)),
        (Some("PreconditionFailed"), Some(412))
    );
    let e = c
        .head_object()
        .bucket(BUCKET)
        .key("small.txt")
        .if_match("\"0123\"")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), Some(412));
    // A failed precondition wins over an unsatisfiable range.
    let e = c
        .get_object()
        .bucket(BUCKET)
        .key("small.txt")
        .if_match("\"0123\"")
        .range("bytes=100-")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), Some(412));
    let e = c
        .get_object()
        .bucket(BUCKET)
        .key("small.txt")
        .if_none_match(&etag)
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&e), Some(304));
    let other = c
        .get_object()
        .bucket(BUCKET)
        .key("small.txt")
        .if_none_match("\"0123\"")
        .send()
        .await
        .unwrap();
    assert_eq!(other.content_length(), Some(11));

    let addr = f.server.addr();
    let bare = etag.trim_matches('"');
    for header in [
        "*".to_owned(),
        bare.to_owned(),
        format!("\"x\", {etag}"),
        format!("W/{etag}"),
    ] {
        let r = raw(
            addr,
            "GET",
            "/bkt/small.txt",
            &format!("If-Match: {header}\r\n"),
        );
        assert_eq!(r.status, 200, "If-Match: {header}");
    }
    let r = raw(
        addr,
        "GET",
        "/bkt/small.txt",
        &format!("If-None-Match: {etag}\r\n"),
    );
    assert_eq!((r.status, r.header("etag")), (304, Some(etag.as_str())));
    assert!(r.body.is_empty());
    let r = raw(addr, "GET", "/bkt/small.txt", "If-Match: \"nope\"\r\n");
    assert!(r.text().contains("<Code>PreconditionFailed</Code>"));
}

#[test]
fn keep_alive_request_bodies_and_close() {
    let f = fixture();
    let addr = f.server.addr();
    let mut conn = RawConn::open(addr);
    for _ in 0..3 {
        assert_eq!(
            conn.request("GET", "/bkt/small.txt", "").body,
            b"hello world"
        );
    }
    // A request body is read and dropped.
    conn.send("GET /bkt/small.txt HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(conn.response(false).status, 200);
    // Two requests in one write (pipelined).
    conn.send("HEAD /bkt/small.txt HTTP/1.1\r\n\r\nGET /bkt/dir/a HTTP/1.1\r\n\r\n");
    assert_eq!(conn.response(true).header("content-length"), Some("11"));
    assert_eq!(conn.response(false).body, b"dir/a");
    // `Connection: close`: the response says so and the server closes after it.
    let r = conn.request("GET", "/bkt/small.txt", "Connection: close\r\n");
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert_eq!(conn.drain().0, 0);
    assert_eq!(f.server.stats().connections, 1);

    // HTTP/1.0 closes unless asked not to.
    let mut conn = RawConn::open(addr);
    conn.send("GET /bkt/small.txt HTTP/1.0\r\n\r\n");
    assert_eq!(conn.response(false).body, b"hello world");
    let (n, end) = conn.drain();
    assert_eq!(n, 0);
    end.unwrap();
    let mut conn = RawConn::open(addr);
    conn.send("GET /bkt/small.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(conn.response(false).body, b"hello world");
    assert_eq!(conn.request("GET", "/bkt/dir/a", "").body, b"dir/a");
}

#[test]
fn malformed_and_unsupported_requests() {
    let f = fixture();
    let addr = f.server.addr();
    let cases = [
        ("garbage\r\n\r\n", 400),
        ("GET /bkt/small.txt HTTP/2.0\r\n\r\n", 400),
        ("GET bkt/small.txt HTTP/1.1\r\n\r\n", 400),
        ("GET /bkt/small.txt HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (
            "GET /bkt/small.txt HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            400,
        ),
        (
            "GET /bkt/small.txt HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
        ),
        ("PUT /bkt/new HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        ("DELETE /bkt/small.txt HTTP/1.1\r\n\r\n", 405),
    ];
    for (request, expected) in cases {
        let mut conn = RawConn::open(addr);
        conn.send(request);
        let r = conn.response(false);
        assert_eq!(r.status, expected, "{request:?}");
        assert!(r.text().contains("<Error><Code>"), "{request:?}");
    }
    // PUT with `Expect: 100-continue`: answered and closed without waiting for the body.
    let mut conn = RawConn::open(addr);
    conn.send("PUT /bkt/new HTTP/1.1\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n");
    let r = conn.response(false);
    assert_eq!((r.status, r.header("connection")), (405, Some("close")));
    // A request head larger than 64 KiB.
    let mut conn = RawConn::open(addr);
    conn.send(&format!(
        "GET /bkt/small.txt HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    ));
    assert_eq!(conn.response(false).status, 400);
    assert!(!f.server.endpoint().is_empty());
    // Nothing above is an object request.
    let stats = f.server.stats();
    assert_eq!((stats.gets, stats.heads, stats.other), (0, 0, 10));
}

#[tokio::test]
async fn sdk_reuses_one_connection() {
    let f = fixture();
    let c = client(&f.server);
    for _ in 0..5 {
        assert_eq!(
            get_bytes(&c, "small.txt", Some("bytes=0-4")).await,
            b"hello"
        );
        c.head_object()
            .bucket(BUCKET)
            .key("small.txt")
            .send()
            .await
            .unwrap();
    }
    let stats = f.server.stats();
    assert_eq!((stats.gets, stats.heads, stats.connections), (5, 5, 1));
}

#[tokio::test]
async fn status_faults() {
    let f = fixture();
    let c = client(&f.server);
    f.server.add_fault(
        FaultRule::new(Fault::Status {
            status: 503,
            code: "SlowDown",
        })
        .times(2)
        .on_key("small"),
    );
    for _ in 0..2 {
        let e = get(&c, "small.txt", Some("bytes=0-4")).await.unwrap_err();
        assert_eq!((e.code(), status(&e)), (Some("SlowDown"), Some(503)));
        assert!(e.message().is_some());
    }
    assert_eq!(
        get_bytes(&c, "small.txt", Some("bytes=0-4")).await,
        b"hello"
    );
    let stats = f.server.stats();
    assert_eq!((stats.gets, stats.faults), (3, 2));
    assert_eq!(
        stats.get_log,
        vec![
            rec("small.txt", Some((0, 5)), 503),
            rec("small.txt", Some((0, 5)), 503),
            rec("small.txt", Some((0, 5)), 206),
        ]
    );
    assert_eq!(f.server.faults()[0].times, 0);

    for (status_code, code) in [
        (500, "InternalError"),
        (403, "AccessDenied"),
        (404, "NoSuchKey"),
    ] {
        f.server.add_fault(FaultRule::new(Fault::Status {
            status: status_code,
            code,
        }));
        let e = get(&c, "data.bin", None).await.unwrap_err();
        assert_eq!((e.code(), status(&e)), (Some(code), Some(status_code)));
    }
    // A fault hits even a key that does not exist.
    f.server.add_fault(FaultRule::new(Fault::Status {
        status: 500,
        code: "InternalError",
    }));
    let e = get(&c, "missing", None).await.unwrap_err();
    assert_eq!(status(&e), Some(500));

    // HEAD: the status and an `x-amz-error-code` header.
    f.server.add_fault(
        FaultRule::new(Fault::Status {
            status: 500,
            code: "InternalError",
        })
        .on_method("HEAD"),
    );
    let r = raw(f.server.addr(), "HEAD", "/bkt/small.txt", "");
    assert_eq!(
        (r.status, r.header("x-amz-error-code")),
        (500, Some("InternalError"))
    );

    // LIST
    f.server.add_fault(
        FaultRule::new(Fault::Status {
            status: 503,
            code: "SlowDown",
        })
        .on_method("LIST"),
    );
    let e = c.list_objects_v2().bucket(BUCKET).send().await.unwrap_err();
    assert_eq!((e.code(), status(&e)), (Some("SlowDown"), Some(503)));
    c.list_objects_v2().bucket(BUCKET).send().await.unwrap();
    assert_eq!(f.server.stats().faults, 8);
}

#[tokio::test]
async fn fault_rules_match_in_order() {
    let f = fixture();
    let c = client(&f.server);
    let status_fault = |status| Fault::Status {
        status,
        code: "InternalError",
    };
    f.server.add_fault(
        FaultRule::new(status_fault(501))
            .on_key("dir/")
            .on_method("GET"),
    );
    f.server
        .add_fault(FaultRule::new(status_fault(502)).on_method("HEAD").always());
    f.server
        .add_fault(FaultRule::new(status_fault(503)).on_key("dir/").times(2));

    // No rule for a GET of small.txt.
    assert_eq!(get_bytes(&c, "small.txt", None).await, b"hello world");
    // The first matching rule takes the hit, then the next one.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(match get(&c, "dir/a", None).await {
            Ok(_) => 200,
            Err(e) => status(&e).unwrap(),
        });
    }
    // ... with the last one succeeding because all rules for it are used up.
    assert_eq!(seen, [501, 503, 503, 200]);
    for _ in 0..3 {
        let e = c
            .head_object()
            .bucket(BUCKET)
            .key("small.txt")
            .send()
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(502));
    }
    let rules = f.server.faults();
    assert_eq!(
        rules.iter().map(|r| r.times).collect::<Vec<_>>(),
        [0, u32::MAX, 0]
    );
    assert_eq!(f.server.stats().faults, 6);
    f.server.clear_faults();
    assert!(f.server.faults().is_empty());
    c.head_object()
        .bucket(BUCKET)
        .key("small.txt")
        .send()
        .await
        .unwrap();
}

#[test]
#[should_panic(expected = "not GET, HEAD or LIST")]
fn fault_rule_method_is_checked() {
    let f = fixture();
    f.server
        .add_fault(FaultRule::new(Fault::Replace).on_method("PUT"));
}

#[tokio::test]
async fn reset_after_bytes() {
    let f = fixture();
    let addr = f.server.addr();
    f.server
        .add_fault(FaultRule::new(Fault::ResetAfter(100_000)));
    let mut conn = RawConn::open(addr);
    conn.send("GET /bkt/data.bin HTTP/1.1\r\n\r\n");
    let (status, headers) = conn.head().unwrap();
    assert_eq!(status, 200);
    assert!(headers.contains(&("Content-Length".into(), DATA_LEN.to_string())));
    let (n, end) = conn.drain();
    assert_eq!(n, 100_000);
    assert_eq!(end.unwrap_err().kind(), ErrorKind::ConnectionReset);

    // A reset after 0 bytes, and a HEAD reset before its headers.
    f.server
        .add_fault(FaultRule::new(Fault::ResetAfter(0)).on_key("small"));
    let mut conn = RawConn::open(addr);
    conn.send("GET /bkt/small.txt HTTP/1.1\r\nRange: bytes=1-3\r\n\r\n");
    assert_eq!(conn.head().unwrap().0, 206);
    assert_eq!(
        conn.drain().1.unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
    f.server
        .add_fault(FaultRule::new(Fault::ResetAfter(0)).on_method("HEAD"));
    let mut conn = RawConn::open(addr);
    conn.send("HEAD /bkt/small.txt HTTP/1.1\r\n\r\n");
    assert_eq!(conn.drain().0, 0);

    // Through the SDK: the headers arrive, the error comes from the body stream.
    let c = client(&f.server);
    f.server
        .add_fault(FaultRule::new(Fault::ResetAfter(300_000)));
    let mut out = get(&c, "data.bin", None).await.unwrap();
    let (received, err) = body_error(&mut out.body).await;
    assert_eq!(received, 300_000);
    // "streaming error: error reading a body from connection: Connection reset by peer"
    assert_eq!(
        io_kind(&err),
        Some(ErrorKind::ConnectionReset),
        "{}",
        DisplayErrorContext(&err)
    );

    // A reset HEAD is a dispatch or response error, not a service error.
    f.server
        .add_fault(FaultRule::new(Fault::ResetAfter(0)).on_method("HEAD"));
    let e = c
        .head_object()
        .bucket(BUCKET)
        .key("small.txt")
        .send()
        .await
        .unwrap_err();
    // "dispatch failure: io error: ... connection error: Connection reset by peer"
    let SdkError::DispatchFailure(d) = &e else {
        panic!("{e:?}")
    };
    assert!(d.is_io(), "{e:?}");

    // A LIST reset part way through its XML.
    f.server
        .add_fault(FaultRule::new(Fault::ResetAfter(50)).on_method("LIST"));
    let mut conn = RawConn::open(addr);
    conn.send("GET /bkt?list-type=2 HTTP/1.1\r\n\r\n");
    assert_eq!(conn.head().unwrap().0, 200);
    let (n, end) = conn.drain();
    assert_eq!(
        (n, end.unwrap_err().kind()),
        (50, ErrorKind::ConnectionReset)
    );

    let stats = f.server.stats();
    assert_eq!(stats.faults, 6);
    // Object bytes only, not the listing's.
    assert_eq!(stats.body_bytes, 100_000 + 300_000);
}

#[tokio::test]
async fn short_body() {
    let f = fixture();
    let addr = f.server.addr();
    f.server.add_fault(FaultRule::new(Fault::ShortBody(1000)));
    let mut conn = RawConn::open(addr);
    conn.send("GET /bkt/data.bin HTTP/1.1\r\nRange: bytes=10-5009\r\n\r\n");
    let (status, headers) = conn.head().unwrap();
    assert_eq!(status, 206);
    assert!(headers.contains(&("Content-Length".into(), "5000".into())));
    // Exactly the bytes promised, then a clean end of stream.
    let (n, end) = conn.drain();
    assert_eq!(n, 1000);
    end.unwrap();

    let c = client(&f.server);
    f.server
        .add_fault(FaultRule::new(Fault::ShortBody(200_000)));
    let mut out = get(&c, "data.bin", None).await.unwrap();
    let (received, err) = body_error(&mut out.body).await;
    assert_eq!(received, 200_000);
    // "streaming error: error reading a body from connection: end of file before message length
    // reached"
    assert_eq!(
        io_kind(&err),
        Some(ErrorKind::UnexpectedEof),
        "{}",
        DisplayErrorContext(&err)
    );

    // A HEAD closed before its headers.
    f.server
        .add_fault(FaultRule::new(Fault::ShortBody(0)).on_method("HEAD"));
    let e = c
        .head_object()
        .bucket(BUCKET)
        .key("small.txt")
        .send()
        .await
        .unwrap_err();
    // "dispatch failure: other: ... connection closed before message completed": not an io
    // error but `is_other()` with `TransientError`.
    let SdkError::DispatchFailure(d) = &e else {
        panic!("{e:?}")
    };
    assert!(d.is_other() && !d.is_io(), "{e:?}");
    assert!(format!("{e:?}").contains("TransientError"), "{e:?}");
}

#[tokio::test]
async fn stall_after_bytes() {
    let f = fixture();
    let addr = f.server.addr();
    let stall = Duration::from_millis(600);
    f.server
        .add_fault(FaultRule::new(Fault::StallAfter { after: 1000, stall }));
    let started = Instant::now();
    let mut conn = RawConn::open(addr);
    conn.send("GET /bkt/data.bin HTTP/1.1\r\n\r\n");
    assert_eq!(conn.head().unwrap().0, 200);
    let mut first = vec![0; 1000];
    conn.reader.read_exact(&mut first).unwrap();
    assert_eq!(first, data()[..1000]);
    // Silence...
    conn.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0];
    let e = conn.reader.read(&mut byte).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e:?}"
    );
    // ... then a clean close once the stall is over.
    conn.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(conn.drain().0, 0);
    assert!(started.elapsed() >= stall);

    // Through the SDK, without its stalled-stream protection: the next chunk just does not come.
    let c = client(&f.server);
    f.server
        .add_fault(FaultRule::new(Fault::StallAfter { after: 0, stall }));
    let mut out = get(&c, "data.bin", None).await.unwrap();
    let next = tokio::time::timeout(Duration::from_millis(300), out.body.next()).await;
    assert!(next.is_err(), "a chunk arrived during the stall");
    drop(out);

    // With it, the SDK reports the stall as an error of the body stream.
    let c = client_with(
        &f.server,
        StalledStreamProtectionConfig::enabled()
            .grace_period(Duration::from_millis(200))
            .build(),
    );
    f.server.add_fault(FaultRule::new(Fault::StallAfter {
        after: 0,
        stall: Duration::from_secs(5),
    }));
    let mut out = get(&c, "data.bin", None).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(4), out.body.next()).await;
    let err = next.unwrap().unwrap().unwrap_err();
    // "streaming error: minimum throughput was specified at 1 B/s, but throughput of 0 B/s was
    // observed", after about a second (it measures over 1 s windows) even with a 200 ms grace.
    let message = DisplayErrorContext(&err).to_string();
    assert!(message.contains("minimum throughput"), "{message}");

    // A stalled HEAD answers nothing at all.
    f.server
        .add_fault(FaultRule::new(Fault::StallAfter { after: 0, stall }).on_method("HEAD"));
    let mut conn = RawConn::open(addr);
    conn.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    conn.send("HEAD /bkt/small.txt HTTP/1.1\r\n\r\n");
    assert!(conn.head().is_err());
}

#[tokio::test]
async fn wrong_content_range() {
    let f = fixture();
    let c = client(&f.server);
    let data = data();
    let size = DATA_LEN;
    let cases = [
        (Some("bytes=100-199"), (101, 201)),
        // At the end: shifted back instead.
        (Some("bytes=-100"), (size - 101, size - 1)),
        // The whole object: a 206 missing its first byte.
        (None, (1, size)),
    ];
    for (range, (a, b)) in cases {
        f.server.add_fault(FaultRule::new(Fault::WrongContentRange));
        let out = get(&c, "data.bin", range).await.unwrap();
        assert_eq!(
            out.content_range(),
            Some(format!("bytes {a}-{}/{size}", b - 1).as_str()),
            "{range:?}"
        );
        assert_eq!(out.content_length(), Some((b - a) as i64));
        assert!(out.body.collect().await.unwrap().into_bytes() == data[a..b]);
    }
    // GETs only: a HEAD does not use the rule up.
    f.server.add_fault(FaultRule::new(Fault::WrongContentRange));
    c.head_object()
        .bucket(BUCKET)
        .key("data.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(f.server.faults().last().unwrap().times, 1);
    let stats = f.server.stats();
    assert_eq!(stats.faults, 3);
    assert_eq!(stats.get_log[0], rec("data.bin", Some((100, 200)), 206));
    assert_eq!(stats.get_log[2], rec("data.bin", None, 206));
}

#[tokio::test]
async fn replace_changes_the_etag() {
    let f = fixture();
    let c = client(&f.server);
    let head = |c: &Client| {
        let c = c.clone();
        async move {
            c.head_object()
                .bucket(BUCKET)
                .key("data.bin")
                .send()
                .await
                .unwrap()
                .e_tag()
                .unwrap()
                .to_owned()
        }
    };
    let first = head(&c).await;
    assert_eq!(head(&c).await, first, "ETags are stable");
    f.server
        .add_fault(FaultRule::new(Fault::Replace).on_method("HEAD"));
    let second = head(&c).await;
    assert_ne!(second, first);
    assert_eq!(head(&c).await, second);

    let e = c
        .get_object()
        .bucket(BUCKET)
        .key("data.bin")
        .if_match(&first)
        .range("bytes=0-9")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), status(&e)),
        (Some("PreconditionFailed"), Some(412))
    );
    let ok = c
        .get_object()
        .bucket(BUCKET)
        .key("data.bin")
        .if_match(&second)
        .range("bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.e_tag(), Some(second.as_str()));

    // The GET that hits the fault already carries the new ETag.
    f.server.add_fault(FaultRule::new(Fault::Replace));
    let third = get(&c, "data.bin", Some("bytes=0-9")).await.unwrap();
    let third = third.e_tag().unwrap().to_owned();
    assert!(third != first && third != second);
    let listed = c.list_objects_v2().bucket(BUCKET).send().await.unwrap();
    assert_eq!(listed.contents()[0].e_tag(), Some(third.as_str()));
    // Other keys keep theirs.
    assert_eq!(f.server.stats().faults, 2);
}

/// How long until the first byte of a response to `request`.
fn first_byte(addr: SocketAddr, request: &str) -> Duration {
    let mut conn = RawConn::open(addr);
    let started = Instant::now();
    conn.send(request);
    let mut byte = [0];
    conn.reader.read_exact(&mut byte).unwrap();
    started.elapsed()
}

#[test]
fn latency() {
    let latency = Duration::from_millis(150);
    let f = fixture_with(|c| ServerConfig { latency, ..c });
    let addr = f.server.addr();
    for request in [
        "GET /bkt/small.txt HTTP/1.1\r\n\r\n",
        "HEAD /bkt/small.txt HTTP/1.1\r\n\r\n",
        "GET /bkt?list-type=2 HTTP/1.1\r\n\r\n",
        "GET /bkt/missing HTTP/1.1\r\n\r\n",
    ] {
        let t = first_byte(addr, request);
        assert!(t >= latency && t < latency * 3, "{request:?}: {t:?}");
    }
    f.server
        .add_fault(FaultRule::new(Fault::Latency(Duration::from_millis(200))));
    let t = first_byte(addr, "GET /bkt/small.txt HTTP/1.1\r\n\r\n");
    assert!(
        t >= Duration::from_millis(350) && t < Duration::from_millis(700),
        "{t:?}"
    );

    let f = fixture();
    let t = first_byte(f.server.addr(), "GET /bkt/small.txt HTTP/1.1\r\n\r\n");
    assert!(t < Duration::from_millis(100), "{t:?}");
    f.server
        .add_fault(FaultRule::new(Fault::Latency(Duration::from_millis(200))).on_method("HEAD"));
    let t = first_byte(f.server.addr(), "HEAD /bkt/small.txt HTTP/1.1\r\n\r\n");
    assert!(t >= Duration::from_millis(200), "{t:?}");
}

/// Downloads `data.bin` over a fresh connection; returns how long it took.
fn timed_download(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let r = raw(addr, "GET", "/bkt/data.bin", "");
    assert_eq!(r.body.len(), DATA_LEN);
    started.elapsed()
}

#[test]
fn bandwidth_limits() {
    let rate = 4_000_000;
    let expected = Duration::from_secs_f64(DATA_LEN as f64 / rate as f64);
    let f = fixture_with(|c| ServerConfig {
        conn_bandwidth: Some(rate),
        ..c
    });
    let t = timed_download(f.server.addr());
    assert!(
        t > expected.mul_f64(0.85) && t < expected.mul_f64(1.6),
        "one connection: {t:?}, expected {expected:?}"
    );
    // The limit is per connection: two at once take about as long as one.
    let addr = f.server.addr();
    let started = Instant::now();
    let other = std::thread::spawn(move || timed_download(addr));
    timed_download(addr);
    other.join().unwrap();
    let t = started.elapsed();
    assert!(t < expected.mul_f64(1.6), "two connections: {t:?}");

    // A total limit is shared.
    let f = fixture_with(|c| ServerConfig {
        total_bandwidth: Some(2 * rate),
        ..c
    });
    let addr = f.server.addr();
    let started = Instant::now();
    let other = std::thread::spawn(move || timed_download(addr));
    let mine = timed_download(addr);
    let theirs = other.join().unwrap();
    let t = started.elapsed();
    assert!(
        t > expected.mul_f64(0.85) && t < expected.mul_f64(1.6),
        "shared: {t:?}, expected {expected:?}"
    );
    assert!(
        mine > expected.mul_f64(0.7) && theirs > expected.mul_f64(0.7),
        "{mine:?} {theirs:?}"
    );

    // Without limits the same download is much faster.
    let f = fixture();
    let t = timed_download(f.server.addr());
    assert!(t < expected / 4, "unshaped: {t:?}");
}

/// Downloads `data.bin` over a fresh connection as the client whose access key is `key` (the
/// SigV4 `Credential`; the server checks no signature); returns how long it took.
fn timed_download_as(addr: SocketAddr, key: &str) -> Duration {
    let auth = format!(
        "Authorization: AWS4-HMAC-SHA256 Credential={key}/20260101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=0\r\n"
    );
    let started = Instant::now();
    let r = raw(addr, "GET", "/bkt/data.bin", &auth);
    assert_eq!(r.body.len(), DATA_LEN);
    started.elapsed()
}

#[test]
fn client_bandwidth_is_per_access_key() {
    let rate = 4_000_000;
    let expected = Duration::from_secs_f64(DATA_LEN as f64 / rate as f64);
    let f = fixture_with(|c| ServerConfig {
        client_bandwidth: Some(rate),
        ..c
    });
    let addr = f.server.addr();
    // Two connections of one client share its cap...
    let started = Instant::now();
    let other = std::thread::spawn(move || timed_download_as(addr, "alice"));
    timed_download_as(addr, "alice");
    other.join().unwrap();
    let t = started.elapsed();
    assert!(
        t > expected.mul_f64(1.7) && t < expected.mul_f64(3.2),
        "one client, two connections: {t:?}, expected {:?}",
        expected * 2
    );
    // ...and two clients have one each.
    let started = Instant::now();
    let other = std::thread::spawn(move || timed_download_as(addr, "bob"));
    timed_download_as(addr, "carol");
    other.join().unwrap();
    let t = started.elapsed();
    assert!(
        t > expected.mul_f64(0.85) && t < expected.mul_f64(1.6),
        "two clients: {t:?}, expected {expected:?}"
    );
}

#[test]
fn stats_reset() {
    let f = fixture();
    let addr = f.server.addr();
    raw(addr, "GET", "/bkt/small.txt", "Range: bytes=0-1\r\n");
    raw(addr, "GET", "/bkt/missing", "Range: bytes=5-\r\n");
    raw(addr, "HEAD", "/bkt/small.txt", "");
    raw(addr, "GET", "/bkt?list-type=2", "");
    let stats = f.server.stats();
    assert_eq!(
        stats,
        Stats {
            connections: 4,
            gets: 2,
            heads: 1,
            lists: 1,
            other: 0,
            body_bytes: 2,
            faults: 0,
            get_log: vec![
                rec("small.txt", Some((0, 2)), 206),
                // The size of a missing object is unknown.
                rec("missing", None, 404),
            ],
        }
    );
    f.server.reset_stats();
    assert_eq!(f.server.stats(), Stats::default());
}

#[test]
fn fault_spec_text() {
    let ok = [
        (
            "status:503:SlowDown:times=3",
            FaultRule::new(Fault::Status {
                status: 503,
                code: "SlowDown",
            })
            .times(3),
        ),
        (
            "status:500",
            FaultRule::new(Fault::Status {
                status: 500,
                code: "InternalError",
            }),
        ),
        (
            "status:403:times=always:method=head",
            FaultRule::new(Fault::Status {
                status: 403,
                code: "AccessDenied",
            })
            .always()
            .on_method("HEAD"),
        ),
        (
            "status:400:MyCode",
            FaultRule::new(Fault::Status {
                status: 400,
                code: "MyCode",
            }),
        ),
        (
            "reset:after=100000:times=1",
            FaultRule::new(Fault::ResetAfter(100_000)),
        ),
        ("reset", FaultRule::new(Fault::ResetAfter(0))),
        (
            "stall:after=0:ms=5000",
            FaultRule::new(Fault::StallAfter {
                after: 0,
                stall: Duration::from_secs(5),
            }),
        ),
        (
            "stall",
            FaultRule::new(Fault::StallAfter {
                after: 0,
                stall: Duration::from_secs(10),
            }),
        ),
        ("short:after=1000", FaultRule::new(Fault::ShortBody(1000))),
        ("wrong-range", FaultRule::new(Fault::WrongContentRange)),
        (
            "replace:key=__0_0.distcp:method=GET",
            FaultRule::new(Fault::Replace)
                .on_key("__0_0.distcp")
                .on_method("GET"),
        ),
        (
            "latency:ms=250:times=5:method=LIST",
            FaultRule::new(Fault::Latency(Duration::from_millis(250)))
                .times(5)
                .on_method("LIST"),
        ),
    ];
    for (spec, rule) in ok {
        let parsed: FaultRule = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(parsed, rule, "{spec}");
        // The text form reads back to the same rule.
        assert_eq!(
            parsed.to_string().parse::<FaultRule>().unwrap(),
            rule,
            "{spec}"
        );
    }
    for spec in [
        "",
        "explode",
        "status",
        "status:200",
        "status:abc",
        "status:503:SlowDown:extra",
        "reset:after=x",
        "reset:ms=5",
        "wrong-range:after=5",
        "latency",
        "short:10",
        "reset:times=-1",
        "reset:method=PUT",
        "reset:key=",
        "reset:colour=red",
    ] {
        let e = spec.parse::<FaultRule>().unwrap_err();
        assert!(e.contains(&format!("{spec:?}")), "{spec}: {e}");
    }
}

#[test]
fn dates_are_formatted_by_hand() {
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    let cases = [
        (
            0,
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "1970-01-01T00:00:00.000Z",
        ),
        (
            784_111_777,
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "1994-11-06T08:49:37.000Z",
        ),
        (
            951_782_400,
            "Tue, 29 Feb 2000 00:00:00 GMT",
            "2000-02-29T00:00:00.000Z",
        ),
        (
            1_700_000_000,
            "Tue, 14 Nov 2023 22:13:20 GMT",
            "2023-11-14T22:13:20.000Z",
        ),
        // 2100 is not a leap year.
        (
            4_107_542_399,
            "Sun, 28 Feb 2100 23:59:59 GMT",
            "2100-02-28T23:59:59.000Z",
        ),
        (
            4_107_542_400,
            "Mon, 01 Mar 2100 00:00:00 GMT",
            "2100-03-01T00:00:00.000Z",
        ),
        (
            4_133_980_799,
            "Fri, 31 Dec 2100 23:59:59 GMT",
            "2100-12-31T23:59:59.000Z",
        ),
    ];
    for (secs, http, iso) in cases {
        assert_eq!(s3_server::http_date(at(secs)), http);
        assert_eq!(s3_server::iso_date(at(secs)), iso);
    }
    // Before the epoch: the epoch.
    let before = UNIX_EPOCH - Duration::from_secs(10);
    assert_eq!(
        s3_server::http_date(before),
        "Thu, 01 Jan 1970 00:00:00 GMT"
    );
    let now = SystemTime::now();
    assert!(s3_server::http_date(now).ends_with(" GMT"));
}

#[test]
fn start_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let start = |config: ServerConfig| TestServer::start(config).unwrap_err().kind();
    let addr = |s: &str| s.parse().unwrap();
    assert_eq!(
        start(ServerConfig {
            addr: addr("0.0.0.0:0"),
            ..ServerConfig::new(dir.path())
        }),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        start(ServerConfig {
            addr: addr("[::]:0"),
            ..ServerConfig::new(dir.path())
        }),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        start(ServerConfig {
            conn_bandwidth: Some(0),
            ..ServerConfig::new(dir.path())
        }),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        start(ServerConfig::new(dir.path().join("missing"))),
        ErrorKind::NotFound
    );

    let server = TestServer::start(ServerConfig::new(dir.path())).unwrap();
    let addr = server.addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    assert_eq!(
        server.endpoint(),
        format!("http://127.0.0.1:{}", addr.port())
    );
    assert!(format!("{server:?}").contains("TestServer"));
    // An open connection is closed when the server stops, and nothing listens any more.
    let mut conn = RawConn::open(addr);
    assert_eq!(conn.request("GET", "/", "").status, 200);
    drop(server);
    assert_eq!(conn.drain().0, 0);
    assert!(TcpStream::connect(addr).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_and_stops_inside_a_runtime() {
    let f = fixture();
    let c = client(&f.server);
    assert_eq!(get_bytes(&c, "small.txt", None).await, b"hello world");
    drop(f);
}
