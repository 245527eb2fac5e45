//! A bounded soak: many fetches of random selections with random settings and random faults at
//! random offsets (fixed seed), every output verified byte for byte. Zero corrupted outputs are
//! allowed: each fetch either produces exactly the source's bytes or fails naming a file and leaves
//! no output that looks complete.
//!
//! `DCPFETCH_SOAK_RUNS` (default 40) and `DCPFETCH_SOAK_SEED` (default 1) choose the length and the
//! sequence; docs/reliability.md records the long runs.

mod common;
#[path = "support/s3_server.rs"]
mod s3_server;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{dcpfetch, fixture, json};
use s3_server::{Fault, FaultRule, ServerConfig, TestServer};
use serde_json::Value;

/// xorshift64*: a small deterministic generator (the sequence must not depend on a crate's).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const NAMES: [&str; 6] = [
    "model",
    "single",
    "dtensor",
    "zstd",
    "per_rank",
    "torch1_13",
];

/// A glob that matches exactly this fqn.
fn literal(fqn: &str) -> String {
    let mut out = String::new();
    for c in fqn.chars() {
        if "*?[]{}\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A fault and whether the fetch can still succeed through it.
fn random_fault(rng: &mut Rng, files: &[String]) -> (FaultRule, bool) {
    let file = rng.pick(files).clone();
    let at = rng.below(6000);
    let (fault, recoverable) = match rng.below(10) {
        0 | 1 => (
            Fault::Status {
                status: 503,
                code: "SlowDown",
            },
            true,
        ),
        2 => (
            Fault::Status {
                status: 500,
                code: "InternalError",
            },
            true,
        ),
        3 | 4 => (Fault::ResetAfter(at), true),
        5 => (Fault::ShortBody(at), true),
        6 => (
            Fault::StallAfter {
                after: at,
                stall: Duration::from_millis(800),
            },
            true,
        ),
        7 => (Fault::WrongContentRange, false),
        8 => (Fault::Replace, false),
        _ => (
            Fault::Status {
                status: 404,
                code: "NoSuchKey",
            },
            false,
        ),
    };
    let times = 1 + rng.below(2) as u32;
    (
        FaultRule::new(fault)
            .on_key(file)
            .on_method("GET")
            .times(times),
        recoverable,
    )
}

/// Every selected item's bytes equal the source's; everything else in the folder is a hole.
fn check_folder(
    name: &str,
    out: &Path,
    items: &BTreeSet<(String, u64, u64)>,
) -> Result<(), String> {
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap();
        let file = f.file_name().to_str().unwrap().to_owned();
        let src = std::fs::read(f.path()).unwrap();
        let dst = std::fs::read(out.join(&file)).map_err(|e| format!("{file}: {e}"))?;
        if file.ends_with(".metadata") {
            if src != dst {
                return Err(format!("{file} differs"));
            }
            continue;
        }
        if src.len() != dst.len() {
            return Err(format!("{file}: {} bytes, want {}", dst.len(), src.len()));
        }
        let mut covered = vec![false; src.len()];
        for (_, o, l) in items.iter().filter(|(f, ..)| *f == file) {
            let (a, b) = (*o as usize, (*o + *l) as usize);
            if src[a..b] != dst[a..b] {
                return Err(format!("{file}: bytes {a}..{b} differ"));
            }
            covered[a..b].iter_mut().for_each(|c| *c = true);
        }
        if dst.iter().zip(&covered).any(|(b, c)| !*c && *b != 0) {
            return Err(format!("{file}: bytes outside the selection are not zero"));
        }
    }
    Ok(())
}

/// The stream holds every selected item, in plan order, exactly.
fn check_stream(name: &str, stream: &[u8], manifest: &Value) -> Result<(), String> {
    let mut expect = Vec::new();
    let mut seen = BTreeSet::new();
    for it in manifest["items"].as_array().unwrap() {
        let key = (
            it["file"].as_str().unwrap().to_owned(),
            it["offset"].as_u64().unwrap(),
        );
        if !seen.insert(key.clone()) {
            continue;
        }
        let src = std::fs::read(fixture(name).join(&key.0)).unwrap();
        let l = it["length"].as_u64().unwrap() as usize;
        expect.extend_from_slice(&src[key.1 as usize..key.1 as usize + l]);
    }
    if stream != expect {
        return Err(format!(
            "the stream differs ({} bytes, want {})",
            stream.len(),
            expect.len()
        ));
    }
    Ok(())
}

#[test]
fn soak() {
    let runs: u64 = std::env::var("DCPFETCH_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("DCPFETCH_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);

    let root = tempfile::tempdir().unwrap();
    for name in NAMES {
        let dir = root.path().join("ckpt").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(fixture(name)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
    }
    let server = TestServer::start(ServerConfig::new(root.path())).unwrap();
    let started = Instant::now();
    let (mut ok, mut failed_cleanly, mut faults) = (0, 0, 0);
    for run in 0..runs {
        let name = *rng.pick(&NAMES);
        let listing = json(&["ls", fixture(name).to_str().unwrap(), "--json"]);
        let fqns: Vec<String> = listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["fqn"].as_str().unwrap().to_owned())
            .collect();
        let files: Vec<String> = listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| {
                e["chunks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["file"].as_str().unwrap().to_owned())
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut selection = Vec::new();
        for _ in 0..1 + rng.below(4) {
            selection.push("--select".to_owned());
            let fqn: &String = rng.pick(&fqns);
            selection.push(literal(fqn));
        }
        let settings = [
            "--part-size".to_owned(),
            rng.pick(&["1KiB", "4KiB", "16KiB", "1MiB"]).to_string(),
            "--max-gap-size".to_owned(),
            rng.pick(&["0", "1KiB", "inf"]).to_string(),
            "--concurrency".to_owned(),
            rng.pick(&["1", "2", "8"]).to_string(),
        ];
        server.clear_faults();
        let mut recoverable = true;
        for _ in 0..rng.below(4) {
            let (rule, r) = random_fault(&mut rng, &files);
            recoverable &= r;
            server.add_fault(rule);
            faults += 1;
        }
        let to_stdout = rng.below(3) == 0;
        let work = tempfile::tempdir().unwrap();
        let out_dir = work.path().join("copy");
        let manifest = work.path().join("manifest.json");
        let mut cmd = dcpfetch();
        cmd.args([
            "fetch",
            &format!("s3://ckpt/{name}"),
            "--endpoint-url",
            &server.endpoint(),
            "--path-style",
            "--quiet",
        ])
        .args(&selection)
        .args(&settings)
        .args(["--stall-timeout", "0.3", "--max-attempts", "4"])
        .timeout(Duration::from_secs(120));
        if to_stdout {
            cmd.args(["-o", "-", "--manifest"]).arg(&manifest);
        } else {
            cmd.arg("-o").arg(&out_dir);
        }
        let res = cmd.output().unwrap();
        let what = format!(
            "run {run}: {name} {selection:?} {settings:?} stdout={to_stdout} faults={:?}",
            server.faults()
        );
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        if res.status.success() {
            let verdict = if to_stdout {
                check_stream(
                    name,
                    &res.stdout,
                    &serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap(),
                )
            } else {
                let mut args = vec!["ls", "--json"];
                let path = fixture(name);
                args.insert(1, path.to_str().unwrap());
                args.extend(selection.iter().map(String::as_str));
                let items = json(&args)["entries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|e| e["chunks"].as_array().unwrap().clone())
                    .map(|c| {
                        (
                            c["file"].as_str().unwrap().to_owned(),
                            c["offset"].as_u64().unwrap(),
                            c["length"].as_u64().unwrap(),
                        )
                    })
                    .collect();
                check_folder(name, &out_dir, &items)
            };
            if let Err(e) = verdict {
                panic!("{what}: CORRUPTED OUTPUT: {e}");
            }
            ok += 1;
        } else {
            assert!(
                !recoverable || faults_exhausted(&stderr),
                "{what}: only recoverable faults, yet it failed: {stderr}"
            );
            assert!(matches!(res.status.code(), Some(1 | 2)), "{what}: {stderr}");
            assert!(
                stderr.contains(".distcp") || stderr.contains(".metadata"),
                "{what}: the message names no file: {stderr}"
            );
            assert!(
                !out_dir.join(".metadata").exists() && !out_dir.join("__0.metadata").exists(),
                "{what}: looks complete"
            );
            failed_cleanly += 1;
        }
    }
    eprintln!(
        "soak: seed {seed}, {runs} fetches, {faults} faults injected, {ok} complete and byte-exact, {failed_cleanly} failed cleanly, 0 corrupted, {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Recoverable faults can still exhaust the attempts when several hit the same request.
fn faults_exhausted(stderr: &str) -> bool {
    stderr.contains("gave up after")
}
