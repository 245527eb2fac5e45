//! `dcpfetch verify`: every fixture passes; corrupted copies made here are each caught by the
//! right named check, through the local folder and through S3 (moto).

mod common;

use std::path::Path;

use common::{
    Backend, copy_fixture, dcpfetch, edit_metadata, expected, fixture, set_item, storage_info,
};
use dcpfetch::metadata::pickle::{Node, Value};
use serde_json::Value as Json;

fn verify(location: &str, backend: Backend, extra: &[&str]) -> (Option<i32>, Json) {
    let out = dcpfetch()
        .args(["verify", location, "--json"])
        .args(backend.args())
        .args(extra)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

fn check<'a>(report: &'a Json, name: &str) -> &'a Json {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

fn failed(report: &Json) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_fixture_passes_except_safetensors() {
    for backend in [Backend::Local, Backend::S3] {
        for name in common::FIXTURES.iter().filter(|n| **n != "safetensors") {
            let (code, r) = verify(&backend.location(name), backend, &[]);
            assert_eq!(code, Some(0), "{name}: {r:#}");
            assert_eq!(r["ok"], true);
            let items = expected(name)["storage_count"].as_u64().unwrap();
            let archive = check(&r, "items.archive");
            assert_eq!(archive["status"], "pass", "{name}");
            // Items at identical ranges are checked once.
            assert!(archive["checked"].as_u64().unwrap() <= items);
            assert_eq!(check(&r, "storage.in_bounds")["checked"], items, "{name}");
        }
    }
}

#[test]
fn zstd_items_are_decoded_and_checked() {
    let (_, r) = verify(fixture("zstd").to_str().unwrap(), Backend::Local, &[]);
    assert_eq!(check(&r, "items.transform")["status"], "pass");
    assert_eq!(check(&r, "items.transform")["checked"], 4);
    assert_eq!(check(&r, "items.tensor")["checked"], 3);
}

#[test]
fn safetensors_shards_are_reported_plainly() {
    for backend in [Backend::Local, Backend::S3] {
        let (code, r) = verify(&backend.location("safetensors"), backend, &[]);
        assert_eq!(code, Some(1));
        let format = check(&r, "storage.format");
        assert_eq!(format["status"], "fail");
        let msg = format["problems"][0]["message"].as_str().unwrap();
        assert!(
            msg.contains("safetensors") && msg.contains("unusable"),
            "{msg}"
        );
        // The header was read and agrees with the metadata: the real ranges are listed.
        let want = &expected("safetensors")["safetensors_headers"]["__0_0.distcp"];
        let notes: Vec<&str> = format["notes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(notes.len(), want.as_object().unwrap().len(), "{notes:?}");
        assert_eq!(
            format["problems"].as_array().unwrap().len(),
            1,
            "{format:#}"
        );
    }
}

#[test]
fn quick_reads_no_item_bytes() {
    let (code, r) = verify(
        fixture("model").to_str().unwrap(),
        Backend::Local,
        &["--quick"],
    );
    assert_eq!(code, Some(0));
    assert_eq!(check(&r, "items.archive")["status"], "skipped");
    assert_eq!(check(&r, "storage.in_bounds")["status"], "pass");
}

#[test]
fn manifest_is_written_then_compared() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("integrity.json");
    let m = manifest.to_str().unwrap();
    let (code, r) = verify(
        fixture("model").to_str().unwrap(),
        Backend::Local,
        &["--manifest", m],
    );
    assert_eq!(code, Some(0), "{r:#}");
    let written: Json = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(written["algorithm"], "sha256");
    for (file, info) in expected("model")["files"].as_object().unwrap() {
        assert_eq!(written["files"][file], info["sha256"], "{file}");
    }
    // The same manifest against S3 passes; against a damaged copy it names the file.
    let (code, _) = verify(
        &Backend::S3.location("model"),
        Backend::S3,
        &["--manifest", m],
    );
    assert_eq!(code, Some(0));
    let ck = copy_fixture("model");
    flip(&ck.path().join("__0_1.distcp"), 100);
    let (code, r) = verify(
        ck.path().to_str().unwrap(),
        Backend::Local,
        &["--manifest", m],
    );
    assert_eq!(code, Some(1));
    let problems = &check(&r, "manifest")["problems"];
    assert_eq!(problems.as_array().unwrap().len(), 1);
    assert_eq!(problems[0]["file"], "__0_1.distcp");
}

fn flip(path: &Path, at: u64) {
    let mut data = std::fs::read(path).unwrap();
    data[at as usize] ^= 0x01;
    std::fs::write(path, data).unwrap();
}

/// The first stored copy of an fqn's first chunk, from torch's values: (file, offset, length).
fn item_of(name: &str, fqn: &str) -> (String, u64, u64) {
    let e = expected(name)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["fqn"] == fqn)
        .unwrap()
        .clone();
    let s = if e["kind"] == "tensor" {
        &e["chunks"][0]["storage"][0]
    } else {
        &e["storage"][0]
    };
    (
        s["file"].as_str().unwrap().to_owned(),
        s["offset"].as_u64().unwrap(),
        s["length"].as_u64().unwrap(),
    )
}

/// One damaged copy: what was done, and the check that must catch it.
struct Case {
    what: &'static str,
    fixture: &'static str,
    damage: fn(&Path),
    check: &'static str,
    /// Text the problem must contain.
    needle: &'static str,
}

const CASES: &[Case] = &[
    Case {
        what: "a flipped byte in tensor data",
        fixture: "model",
        damage: |d| {
            let (f, o, l) = item_of("model", "model.layers.0.attn.wq.weight");
            flip(&d.join(f), o + l / 2);
        },
        check: "items.archive",
        needle: "CRC32",
    },
    Case {
        what: "a flipped byte in a zip header",
        fixture: "model",
        damage: |d| {
            let (f, o, _) = item_of("model", "model.layers.2.mlp.w1.weight");
            flip(&d.join(f), o + 1);
        },
        check: "items.archive",
        needle: "local header",
    },
    Case {
        what: "a flipped byte in a bytes entry's zip64 end records",
        fixture: "single",
        damage: |d| {
            let (f, o, l) = item_of("single", "step");
            flip(&d.join(f), o + l - 30);
        },
        check: "items.archive",
        needle: "",
    },
    Case {
        what: "a truncated shard",
        fixture: "model",
        damage: |d| {
            let f = d.join("__0_0.distcp");
            let len = std::fs::metadata(&f).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .unwrap()
                .set_len(len - 1000)
                .unwrap();
        },
        check: "storage.in_bounds",
        needle: "truncated",
    },
    Case {
        what: "a deleted shard",
        fixture: "dtensor",
        damage: |d| std::fs::remove_file(d.join("__1_0.distcp")).unwrap(),
        check: "storage.files_exist",
        needle: "__1_0.distcp",
    },
    Case {
        what: "an overlapping storage entry",
        fixture: "single",
        damage: |d| {
            let (_, o, _) = item_of("single", "dtypes.float32");
            edit_metadata(d, |p| {
                let info = storage_info(p, "dtypes.int64");
                set_item(p, info, "offset", Value::Int(o as i64 + 10));
            });
        },
        check: "storage.no_overlap",
        needle: "overlap",
    },
    Case {
        what: "a missing chunk",
        fixture: "dtensor",
        damage: |d| {
            edit_metadata(d, |p| {
                let sdm = p
                    .get(common::metadata_state(p), "state_dict_metadata")
                    .unwrap();
                let tsm = p
                    .pairs(sdm)
                    .unwrap()
                    .iter()
                    .find(|(k, _)| p.str(*k) == Some("dt.shard0"))
                    .unwrap()
                    .1;
                let state = p.object(tsm).unwrap().state.unwrap();
                let chunks = p.get(state, "chunks").unwrap();
                match p.node_mut(chunks).unwrap() {
                    Node::List(items) => {
                        items.pop();
                    }
                    _ => unreachable!(),
                }
            });
        },
        check: "chunks.tile",
        needle: "not stored",
    },
    Case {
        what: "a malicious global",
        fixture: "per_item",
        damage: |d| {
            // Rewritten without FRAME, so that bytes can be inserted; then `extra: os.system(...)`
            // goes before the final SETITEMS BUILD STOP.
            edit_metadata(d, |_| {});
            let path = d.join(".metadata");
            let data = std::fs::read(&path).unwrap();
            assert!(data.ends_with(b"ub."));
            let mut out = data[..data.len() - 3].to_vec();
            out.extend_from_slice(
                b"X\x05\x00\x00\x00extracposix\nsystem\nX\x0b\x00\x00\x00touch PWNEDR",
            );
            out.extend_from_slice(b"ub.");
            std::fs::write(&path, out).unwrap();
        },
        check: "metadata.globals",
        needle: "posix.system",
    },
];

#[test]
fn each_damage_is_caught_by_its_check() {
    for (n, case) in CASES.iter().enumerate() {
        let ck = copy_fixture(case.fixture);
        (case.damage)(ck.path());
        let s3 = common::upload(ck.path(), &format!("damaged/{n}"));
        for (backend, location) in [
            (Backend::Local, ck.path().to_str().unwrap().to_owned()),
            (Backend::S3, s3),
        ] {
            let (code, r) = verify(&location, backend, &[]);
            assert_eq!(code, Some(1), "{}: {r:#}", case.what);
            let failing = failed(&r);
            assert!(
                failing.contains(&case.check.to_owned()),
                "{}: failed {failing:?}",
                case.what
            );
            let c = check(&r, case.check);
            let text = c["problems"].to_string();
            assert!(text.contains(case.needle), "{}: {text}", case.what);
            assert!(!ck.path().join("PWNED").exists());
        }
    }
}

#[test]
fn report_is_readable_and_exit_codes_are_for_ci() {
    let ck = copy_fixture("model");
    let (f, o, l) = item_of("model", "model.layers.1.mlp.w2.weight");
    flip(&ck.path().join(&f), o + l / 2);
    let out = dcpfetch().args(["verify"]).arg(ck.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("1 of 12 checks failed"), "{text}");
    assert!(text.contains("FAIL  items.archive"), "{text}");
    assert!(
        text.contains(&format!("{f} bytes {o}..{}", o + l))
            && text.contains("model.layers.1.mlp.w2.weight"),
        "{text}"
    );
    // No progress output when stderr is not a terminal.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Could not run: exit 2.
    let out = dcpfetch()
        .args(["verify", "/nonexistent/checkpoint"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
