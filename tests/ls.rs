//! `dcpfetch ls` on every fixture, through the local folder and through a real S3-protocol server
//! (moto), compared with what torch recorded; and `ls` on hostile metadata.

mod common;

use std::collections::BTreeSet;

use common::{Backend, dcpfetch, expected, fixture, json, moto};
use serde_json::{Value, json};

/// A chunk's stored copy as a comparable value.
fn copies_of_expected(e: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chunks: Vec<(Value, Value, &Value)> = match e["kind"].as_str().unwrap() {
        "tensor" => e["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["offsets"].clone(), c["sizes"].clone(), &c["storage"]))
            .collect(),
        _ => vec![(Value::Null, Value::Null, &e["storage"])],
    };
    for (offsets, sizes, storage) in chunks {
        for s in storage.as_array().unwrap() {
            out.insert(
                json!({
                    "offsets": offsets, "sizes": sizes, "file": s["file"], "offset": s["offset"],
                    "length": s["length"], "transform_descriptors": s["transform_descriptors"],
                    "metadata_file": s["metadata_file"],
                })
                .to_string(),
            );
        }
    }
    out
}

fn copies_of_listed(e: &Value) -> BTreeSet<String> {
    e["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            json!({
                "offsets": c["offsets"], "sizes": c["sizes"], "file": c["file"], "offset": c["offset"],
                "length": c["length"], "transform_descriptors": c["transform_descriptors"],
                "metadata_file": c["metadata_file"],
            })
            .to_string()
        })
        .collect()
}

fn check_ls(name: &str, backend: Backend) {
    let want = expected(name);
    let location = backend.location(name);
    let mut args = vec!["ls", location.as_str(), "--json"];
    let extra = backend.args();
    args.extend(extra.iter().map(String::as_str));
    let got = json(&args);

    assert_eq!(got["checkpoint"], location.as_str());
    assert_eq!(got["version"], want["version"]);
    let files: Vec<&str> = got["metadata_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    let want_files: Vec<&str> = want["metadata_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(files, want_files);
    for f in got["metadata_files"].as_array().unwrap() {
        assert_eq!(f["checkpoint_id"], want["checkpoint_id"], "{name}");
        assert_eq!(f["protocol"], 4);
    }

    let entries = got["entries"].as_array().unwrap();
    let want_entries = want["entries"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        want_entries.len(),
        "{name}: number of entries"
    );
    for w in want_entries {
        let fqn = w["fqn"].as_str().unwrap();
        let g = entries
            .iter()
            .find(|e| e["fqn"] == fqn)
            .unwrap_or_else(|| panic!("{name}: {fqn} missing"));
        assert_eq!(g["kind"], w["kind"], "{name}: {fqn}");
        if w["kind"] == "tensor" {
            for field in ["dtype", "shape", "strides", "requires_grad"] {
                assert_eq!(g[field], w[field], "{name}: {fqn}: {field}");
            }
        } else {
            assert_eq!(g["dtype"], Value::Null);
        }
        assert_eq!(
            copies_of_listed(g),
            copies_of_expected(w),
            "{name}: {fqn}: chunks"
        );
    }

    // Rows in natural order.
    let fqns: Vec<&str> = entries.iter().map(|e| e["fqn"].as_str().unwrap()).collect();
    let mut sorted = fqns.clone();
    sorted.sort_by(|a, b| dcpfetch::units::natural_cmp(a, b));
    assert_eq!(fqns, sorted);

    let totals = &got["totals"];
    assert_eq!(totals["entries"], want_entries.len());
    assert_eq!(totals["storage_entries"], want["storage_count"]);
    let tensors = want_entries
        .iter()
        .filter(|e| e["kind"] == "tensor")
        .count();
    assert_eq!(totals["tensors"], tensors);
    assert_eq!(totals["bytes_entries"], want_entries.len() - tensors);
    let stored: u64 = want_entries
        .iter()
        .flat_map(|e| copies_of_expected(e).into_iter())
        .map(|c| {
            serde_json::from_str::<Value>(&c).unwrap()["length"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(totals["stored_bytes"], stored);
    let shard_files = want["files"].as_object().unwrap().len();
    assert_eq!(totals["files"], shard_files);
    assert_eq!(
        got["warnings"],
        json!([]),
        "{name}: no findings in torch-written metadata"
    );
}

macro_rules! ls_suite {
    ($backend:ident, $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                check_ls(stringify!($name), Backend::$backend);
            }
        )*
    };
}

mod local {
    use super::*;
    ls_suite!(
        Local,
        single,
        model,
        dtensor,
        per_item,
        zstd,
        per_rank,
        safetensors,
        torch1_13,
        torch2_5
    );
}

mod s3 {
    use super::*;
    ls_suite!(
        S3,
        single,
        model,
        dtensor,
        per_item,
        zstd,
        per_rank,
        safetensors,
        torch1_13,
        torch2_5
    );
}

#[test]
fn table_has_a_row_per_entry_and_totals() {
    let out = dcpfetch()
        .args(["ls"])
        .arg(fixture("single"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("FQN") && lines[0].contains("DTYPE") && lines[0].contains("FILES")
    );
    let n = expected("single")["entries"].as_array().unwrap().len();
    assert_eq!(lines.len(), n + 2, "header, {n} rows, totals");
    assert!(lines.last().unwrap().starts_with(&format!("{n} entries")));
    assert!(text.contains("dtypes.bfloat16") && text.contains("bfloat16"));
}

#[test]
fn select_filters_rows() {
    let got = json(&[
        "ls",
        fixture("model").to_str().unwrap(),
        "--json",
        "--select",
        "model.layers.*.attn.*",
        "--exclude",
        "*.wo.*",
    ]);
    let fqns: Vec<&str> = got["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["fqn"].as_str().unwrap())
        .collect();
    assert_eq!(fqns.len(), 12, "{fqns:?}");
    assert!(
        fqns.iter()
            .all(|f| f.starts_with("model.layers.") && f.contains(".attn.") && !f.contains(".wo."))
    );
    assert_eq!(fqns[0], "model.layers.0.attn.wk.weight");
    assert_eq!(fqns[11], "model.layers.3.attn.wv.weight");
}

#[test]
fn selection_matching_nothing_exits_1_with_near_misses() {
    let out = dcpfetch()
        .args(["ls"])
        .arg(fixture("model"))
        .args(["--select", "model.layers.0.atn.wq.weight"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("matches nothing"), "{err}");
    assert!(err.contains("model.layers.0.attn.wq.weight"), "{err}");
}

#[test]
fn missing_checkpoint_exits_2_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dcpfetch().args(["ls"]).arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("no .metadata"), "{err}");
    assert!(err.contains("hint: "), "{err}");
}

/// Without a region set, a custom S3 endpoint never waits for the EC2 metadata service (off EC2
/// its address often drops packets: 3 s of timeouts before every command). The "metadata
/// service" here accepts connections and never answers; it must see none.
#[test]
fn a_custom_endpoint_does_not_ask_the_metadata_service_for_a_region() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let imds = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(conn);
        }
    });
    for endpoint_from_env in [false, true] {
        let mut c = dcpfetch();
        c.env_remove("AWS_REGION")
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds)
            .args(["ls", &Backend::S3.location("model"), "--path-style"]);
        if endpoint_from_env {
            c.env("AWS_ENDPOINT_URL", &moto().endpoint);
        } else {
            c.args(["--endpoint-url", &moto().endpoint]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0);
}

// ---- hostile metadata ------------------------------------------------------------------------

/// A real `.metadata` with its FRAME removed (framing is optional in protocol 4), so bytes can be
/// inserted without breaking what Python would accept.
fn unframed(name: &str) -> Vec<u8> {
    let data = std::fs::read(fixture(name).join(".metadata")).unwrap();
    assert_eq!(&data[..3], b"\x80\x04\x95");
    let mut out = data[..2].to_vec();
    out.extend_from_slice(&data[11..]);
    out
}

fn checkpoint_with_metadata(bytes: &[u8]) -> tempfile::TempDir {
    let dir = common::copy_fixture("single");
    std::fs::write(dir.path().join(".metadata"), bytes).unwrap();
    dir
}

#[test]
fn reduce_of_os_system_is_reported_not_run() {
    // Metadata.extra = os.system('touch PWNED'): inserted before the final SETITEMS BUILD STOP.
    let mut data = unframed("single");
    assert!(data.ends_with(b"ub."));
    let at = data.len() - 3;
    let evil = b"\x8c\x05extracposix\nsystem\n\x8c\x0btouch PWNED\x85R";
    data.splice(at..at, evil.iter().copied());
    let dir = checkpoint_with_metadata(&data);
    let out = dcpfetch()
        .current_dir(dir.path())
        .args(["ls", ".", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("PWNED").exists());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("warning: ") && stderr.contains("posix.system"),
        "{stderr}"
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let w = &got["warnings"][0];
    assert_eq!(w["kind"], "unknown_global");
    assert_eq!(w["global"], "posix.system");
    assert_eq!(w["offset"], at as u64 + 7);
    assert_eq!(
        got["totals"]["entries"],
        expected("single")["entries"].as_array().unwrap().len()
    );
}

#[test]
fn unreadable_metadata_exits_2_naming_the_byte() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "declared 4 GiB string",
            b"\x80\x04X\xff\xff\xff\xffabc.".to_vec(),
            "declared length 4294967295",
        ),
        (
            "deep nesting",
            [
                &b"\x80\x04"[..],
                &vec![b']'; 100_000],
                &vec![b'a'; 99_999],
                b".",
            ]
            .concat(),
            "nesting deeper",
        ),
        ("truncated", unframed("single")[..500].to_vec(), "at byte"),
        (
            "not a pickle",
            b"PK\x03\x04 definitely a zip".to_vec(),
            "at byte 0",
        ),
        (
            "not metadata",
            b"\x80\x04}\x94.".to_vec(),
            "not a DCP metadata file",
        ),
        ("empty", Vec::new(), "no STOP"),
    ];
    for (what, bytes, needle) in cases {
        let dir = checkpoint_with_metadata(&bytes);
        let started = std::time::Instant::now();
        let out = dcpfetch().args(["ls"]).arg(dir.path()).output().unwrap();
        assert!(started.elapsed().as_secs() < 10, "{what}: took too long");
        assert_eq!(out.status.code(), Some(2), "{what}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains(".metadata") && err.contains(needle),
            "{what}: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
}
