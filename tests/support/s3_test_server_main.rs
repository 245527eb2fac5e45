//! `s3-test-server`: serves a folder over the S3 protocol on loopback, for manual runs and
//! benchmarks, with the latency, bandwidth and fault knobs of `tests/support/s3_server.rs`.
//!
//! ```text
//! cargo run --release --example s3-test-server -- --root DIR [--listen 127.0.0.1:9000]
//!     [--latency-ms 30] [--conn-bandwidth 90MB] [--total-bandwidth 1GB]
//!     [--client-bandwidth 200MB] [--fault SPEC]...
//! ```
//! It prints `listening on http://ADDR` once ready and runs until SIGINT or SIGTERM, then prints
//! a one-line summary of the requests served.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[path = "s3_server.rs"]
mod s3_server;

use s3_server::{FaultRule, ServerConfig, TestServer};

/// An S3-protocol test server serving a local folder (path-style, loopback only, signatures
/// ignored): its subfolders are buckets and the files under them objects.
#[derive(Debug, Parser)]
#[command(name = "s3-test-server")]
struct Args {
    /// The folder to serve.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,

    /// Address to listen on; loopback only (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0", value_parser = parse_loopback)]
    listen: SocketAddr,

    /// First-byte latency added to every request, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 0)]
    latency_ms: u64,

    /// Body bandwidth per connection, bytes per second (suffixes k, M, G, KiB, MiB, GiB).
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_rate)]
    conn_bandwidth: Option<u64>,

    /// Body bandwidth over all connections, bytes per second (suffixes as above).
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_rate)]
    total_bandwidth: Option<u64>,

    /// Body bandwidth over all connections of one client (one access key), bytes per second
    /// (suffixes as above): worker processes on one machine, each with its own
    /// AWS_ACCESS_KEY_ID, are capped as machines with their own links would be.
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_rate)]
    client_bandwidth: Option<u64>,

    /// A fault to inject (repeatable; rules are tried in order). SPEC is a kind and `:`-separated
    /// fields: `status:503[:SlowDown]`, `reset[:after=N]`, `stall[:after=N][:ms=N]`,
    /// `short[:after=N]`, `wrong-range`, `replace`, `ignore-range`, `wrong-total`,
    /// `long[:after=N]`, `wrong-etag`, `dribble[:after=N][:ms=N]` or `latency:ms=N`, then
    /// optionally `times=N|always` (default 1), `key=SUBSTR` and `method=GET|HEAD|LIST`.
    /// Example: `status:503:SlowDown:times=3:key=.distcp`.
    #[arg(long = "fault", value_name = "SPEC", value_parser = parse_fault)]
    faults: Vec<FaultRule>,
}

fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IP:PORT address"))?;
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!("{addr} is not a loopback address"))
    }
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a byte rate such as 50000000 or 50MB"))?;
    let scale: u64 = match unit.trim().trim_end_matches("/s") {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    match number.checked_mul(scale) {
        Some(0) => Err("a bandwidth must be at least 1 byte per second".into()),
        Some(rate) => Ok(rate),
        None => Err(format!("{s:?} is too large")),
    }
}

fn parse_fault(s: &str) -> Result<FaultRule, String> {
    s.parse()
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> std::io::Result<()> {
    let config = ServerConfig {
        addr: args.listen,
        latency: Duration::from_millis(args.latency_ms),
        conn_bandwidth: args.conn_bandwidth,
        total_bandwidth: args.total_bandwidth,
        client_bandwidth: args.client_bandwidth,
        ..ServerConfig::new(&args.root)
    };
    let server = TestServer::start(config)?;
    for rule in args.faults {
        eprintln!("fault: {rule}");
        server.add_fault(rule);
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", server.endpoint())?;
    stdout.flush()?;
    drop(stdout);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;

    let s = server.stats();
    println!(
        "served {} GET, {} HEAD, {} LIST, {} other on {} connections; {} body bytes; {} faults injected",
        s.gets, s.heads, s.lists, s.other, s.connections, s.body_bytes, s.faults
    );
    Ok(())
}
