//! `dcpfetch bench` against the test S3 server: every setting's requests are exactly the plan's
//! and the server's count, bytes add up, and the table, CSV, JSON and SVG outputs agree.

mod common;
#[path = "support/s3_server.rs"]
mod s3_server;

use common::{dcpfetch, fixture};
use s3_server::{ServerConfig, TestServer};
use serde_json::Value;

fn serve() -> (tempfile::TempDir, TestServer) {
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

fn bench(server: &TestServer, extra: &[&str]) -> std::process::Output {
    dcpfetch()
        .args([
            "bench",
            "s3://ckpt/model",
            "--endpoint-url",
            &server.endpoint(),
            "--path-style",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn every_setting_sends_exactly_the_planned_requests() {
    let (_root, server) = serve();
    let args = [
        "--select",
        "model.*",
        "--gap-sizes",
        "0,16KiB,inf",
        "--concurrency",
        "1,8",
        "--part-sizes",
        "4KiB,1MiB",
        "--repeat",
        "2",
        "--json",
    ];
    server.reset_stats();
    let out = bench(&server, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 3 * 2 * 2);
    assert_eq!(r["sink"], "null");
    let mut expected_gets = 0;
    for s in results {
        let gap = s["max_gap_size"]
            .as_u64()
            .map_or("inf".to_owned(), |g| g.to_string());
        let part = s["part_size"].as_u64().unwrap().to_string();
        let plan: Value = serde_json::from_slice(
            &dcpfetch()
                .args(["plan"])
                .arg(fixture("model"))
                .args([
                    "--select",
                    "model.*",
                    "--json",
                    "--max-gap-size",
                    &gap,
                    "--part-size",
                    &part,
                ])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert_eq!(s["requests"], plan["totals"]["requests"], "{s}");
        assert_eq!(
            s["requests_sent"], plan["totals"]["requests"],
            "no retries on a healthy server"
        );
        assert_eq!(s["groups"], plan["totals"]["groups"]);
        assert_eq!(s["bytes_needed"], plan["totals"]["bytes_needed"]);
        assert_eq!(s["bytes_transferred"], plan["totals"]["bytes_fetched"]);
        assert_eq!(s["seconds"]["runs"].as_array().unwrap().len(), 2);
        let peak = s["peak_memory"].as_u64().unwrap();
        assert!(peak > 0 && peak <= 256 << 20);
        expected_gets += 2 * s["requests"].as_u64().unwrap();
    }
    // The server saw exactly those ranged reads (plus the metadata read).
    let gets = server
        .stats()
        .get_log
        .iter()
        .filter(|g| g.key.ends_with(".distcp"))
        .count() as u64;
    assert_eq!(gets, expected_gets);
}

#[test]
fn table_csv_and_plot() {
    let (_root, server) = serve();
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("sweep.svg");
    let out = bench(
        &server,
        &[
            "--gap-sizes",
            "0,inf",
            "--concurrency",
            "2,4",
            "--repeat",
            "1",
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("120 items") && lines[0].contains("null sink"),
        "{table}"
    );
    assert!(lines[1].contains("GAP") && lines[1].contains("THROUGHPUT"));
    assert_eq!(lines.len(), 2 + 4);
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(drawing.starts_with("<svg") && drawing.matches("<polyline").count() == 4);

    let out = bench(&server, &["--gap-sizes", "0,inf", "--repeat", "1", "--csv"]);
    let csv = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3);
    let columns = rows[0].split(',').count();
    assert!(rows.iter().all(|r| r.split(',').count() == columns));
    assert!(rows[2].starts_with("inf,32,8388608,2,"));

    // The plot is SVG: any other file name is refused before the sweep runs.
    let png = dir.path().join("sweep.png");
    let out = bench(&server, &["--repeat", "1", "--plot", png.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must end in .svg"), "{err}");
    assert!(!png.exists());
}

#[test]
fn into_a_folder() {
    let (_root, server) = serve();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("copy");
    let out = bench(
        &server,
        &[
            "--gap-sizes",
            "inf",
            "--repeat",
            "2",
            "-o",
            out_dir.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["sink"], "folder");
    assert_eq!(
        common::read(&out_dir.join("__0_0.distcp")),
        common::read(&fixture("model").join("__0_0.distcp"))
    );
}
