//! Reading what torch reads (issue 15): Megatron-Core's planner classes in `.metadata`, pickles
//! of protocols 0 and 1, dtypes dcpfetch does not know, items of 0 bytes, and folders of
//! safetensors files written instead of a DCP checkpoint.

mod common;

use std::path::Path;

use common::{
    copy_fixture, dcpfetch, edit_metadata, expected, fixture, json, set_item, storage_info,
};
use dcpfetch::metadata::Checkpoint;
use dcpfetch::metadata::pickle::{Node, Value};
use serde_json::Value as Json;

fn location(dir: &Path) -> String {
    dir.to_str().unwrap().to_owned()
}

/// `verify --json`: (exit code, report, stderr).
fn verify(dir: &Path) -> (Option<i32>, Json, String) {
    let out = dcpfetch()
        .args(["verify", &location(dir), "--json"])
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

/// The Megatron-like fixture and its protocol 0 and 1 twins: listed and verified clean, with no
/// warning about the planner classes (or protocol 0's `copy_reg._reconstructor`).
#[test]
fn megatron_plans_and_old_protocols_list_and_verify_clean() {
    for name in ["megatron", "protocol0", "protocol1"] {
        let dir = fixture(name);
        let want = expected(name);
        let out = dcpfetch()
            .args(["ls", &location(&dir), "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "{name}: {stderr}");
        let got: Json = serde_json::from_slice(&out.stdout).unwrap();
        let fqns: std::collections::BTreeSet<&str> = got["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["fqn"].as_str().unwrap())
            .collect();
        let want_fqns: std::collections::BTreeSet<&str> = want["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["fqn"].as_str().unwrap())
            .collect();
        assert_eq!(fqns, want_fqns, "{name}");

        let (code, r, stderr) = verify(&dir);
        assert_eq!(code, Some(0), "{name}: {r:#}");
        assert_eq!(r["ok"], true);
        assert!(failed(&r).is_empty(), "{name}");
        assert!(!stderr.contains("warning"), "{name}: {stderr}");
        assert_eq!(check(&r, "metadata.globals")["status"], "pass", "{name}");
        assert_eq!(
            check(&r, "items.archive")["checked"],
            want["storage_count"],
            "{name}"
        );
    }
    // The fixture holds what makes it Megatron-like: torch's planner classes.
    let globals = &expected("megatron")["metadata_file_info"][".metadata"]["pickle_globals"];
    for class in ["SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"] {
        assert!(
            globals
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g[0] == "torch.distributed.checkpoint.planner" && g[1] == class),
            "{class}"
        );
    }
}

/// Protocols 0 and 1 read into the same model as torch's own protocol 4 file.
#[test]
fn protocol_0_and_1_read_the_same_model_as_protocol_4() {
    let read = |name: &str| {
        let data = std::fs::read(fixture(name).join(".metadata")).unwrap();
        Checkpoint::from_files(&[(".metadata".to_owned(), data)]).unwrap()
    };
    let p4 = read("megatron");
    assert_eq!(p4.metadata_files[0].protocol, 4);
    for name in ["protocol0", "protocol1"] {
        let want_opcodes = &expected(name)["metadata_file_info"][".metadata"]["pickle_opcodes"];
        let opcodes: Vec<&str> = want_opcodes
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        let ck = read(name);
        // Neither writes PROTO.
        assert_eq!(ck.metadata_files[0].protocol, 0, "{name}");
        assert!(!opcodes.contains(&"PROTO"), "{name}");
        if name == "protocol0" {
            for op in [
                "INT", "UNICODE", "GLOBAL", "PUT", "GET", "DICT", "LIST", "TUPLE", "MARK",
            ] {
                assert!(opcodes.contains(&op), "{name}: {op}");
            }
        } else {
            for op in [
                "BINPUT",
                "BINGET",
                "BININT1",
                "BINUNICODE",
                "EMPTY_DICT",
                "SETITEMS",
            ] {
                assert!(opcodes.contains(&op), "{name}: {op}");
            }
        }
        assert!(
            ck.unsafe_globals.is_empty(),
            "{name}: {:?}",
            ck.unsafe_globals
        );
        assert!(ck.warnings.is_empty(), "{name}: {:?}", ck.warnings);
        assert_eq!(ck.entries, p4.entries, "{name}");
        assert_eq!(ck.storage, p4.storage, "{name}");
        assert_eq!(ck.planner_data, p4.planner_data, "{name}");
        assert_eq!(
            ck.metadata_files[0].storage_meta, p4.metadata_files[0].storage_meta,
            "{name}"
        );
        assert_eq!(
            ck.metadata_files[0].version, p4.metadata_files[0].version,
            "{name}"
        );
    }
}

/// Renames the one `torch.complex128` global of `single`'s metadata to a dtype dcpfetch does not
/// know.
fn with_unknown_dtype(dir: &Path, new_name: &str) {
    edit_metadata(dir, |p| {
        let mut renamed = 0;
        for id in 0..p.node_count() as u32 {
            if let Some(Node::Global(g)) = p.node_mut(Value::Node(id))
                && g.module == "torch"
                && g.name == "complex128"
            {
                g.name = new_name.to_owned();
                renamed += 1;
            }
        }
        assert_eq!(renamed, 1);
    });
}

#[test]
fn an_unknown_dtype_is_listed_fetched_and_left_unchecked() {
    let ck = copy_fixture("single");
    let dir = ck.path();
    with_unknown_dtype(dir, "bcomplex32");
    let fqn = "dtypes.complex128";

    // Listed with its name; the rest of the checkpoint as before.
    let got = json(&["ls", &location(dir), "--json"]);
    let entries = got["entries"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        expected("single")["entries"].as_array().unwrap().len()
    );
    let e = entries.iter().find(|e| e["fqn"] == fqn).unwrap();
    assert_eq!(e["dtype"], "bcomplex32");

    // A selection that does not touch it, and one that does: both fetch, byte for byte.
    let (file, offset, length) = {
        let e = expected("single")["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["fqn"] == fqn)
            .unwrap()
            .clone();
        let s = e["chunks"][0]["storage"][0].clone();
        (
            s["file"].as_str().unwrap().to_owned(),
            s["offset"].as_u64().unwrap() as usize,
            s["length"].as_u64().unwrap() as usize,
        )
    };
    for select in ["dtypes.int64", fqn] {
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("copy");
        dcpfetch()
            .args(["fetch", &location(dir), "-s", select, "-o"])
            .arg(&out)
            .assert()
            .success();
        if select == fqn {
            let src = std::fs::read(dir.join(&file)).unwrap();
            let copy = std::fs::read(out.join(&file)).unwrap();
            assert_eq!(copy[offset..offset + length], src[offset..offset + length]);
        }
    }

    // verify: the item's archive is checked, its tensor is not, and that is a note.
    let (code, r, _) = verify(dir);
    assert_eq!(code, Some(0), "{r:#}");
    assert!(failed(&r).is_empty());
    assert_eq!(check(&r, "metadata.globals")["status"], "pass");
    let tensor = check(&r, "items.tensor");
    assert_eq!(tensor["status"], "pass");
    let notes: Vec<&str> = tensor["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        notes.len() == 1 && notes[0].contains(fqn) && notes[0].contains("bcomplex32 is unknown"),
        "{notes:?}"
    );
    // One tensor fewer was checked than in the untouched fixture.
    let (_, clean, _) = verify(&fixture("single"));
    assert_eq!(
        tensor["checked"].as_u64().unwrap() + 1,
        check(&clean, "items.tensor")["checked"].as_u64().unwrap()
    );

    // A name shaped like anything else than a dtype stays a security finding.
    let ck = copy_fixture("single");
    with_unknown_dtype(ck.path(), "load");
    let out = dcpfetch()
        .args(["ls", &location(ck.path())])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn items_of_zero_bytes_are_flagged_and_named() {
    let ck = copy_fixture("single");
    let dir = ck.path();
    edit_metadata(dir, |p| {
        let info = storage_info(p, "dtypes.float32");
        set_item(p, info, "length", Value::Int(0));
    });
    let (code, r, _) = verify(dir);
    assert_eq!(code, Some(1), "{r:#}");
    assert_eq!(failed(&r), ["items.archive"]);
    let problems = check(&r, "items.archive")["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = &problems[0];
    assert_eq!(p["length"], 0);
    assert!(p["fqn"].as_str().unwrap().starts_with("dtypes.float32"));
    let msg = p["message"].as_str().unwrap();
    assert!(
        msg.contains("12 elements") && msg.contains("stored in 0 bytes"),
        "{msg}"
    );
    // --quick reads no item bytes and still sees it.
    let out = dcpfetch()
        .args(["verify", &location(dir), "--json", "--quick"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // fetch says what it fetched for it: nothing.
    let out_dir = tempfile::tempdir().unwrap();
    let out = dcpfetch()
        .args(["fetch", &location(dir), "-s", "dtypes.*", "-o"])
        .arg(out_dir.path().join("copy"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 item of 0 bytes fetched as nothing: dtypes.float32 chunk [0, 0]"),
        "{stderr}"
    );
    // Without such items, no such warning.
    let out = dcpfetch()
        .args([
            "fetch",
            &location(&fixture("single")),
            "-s",
            "dtypes.*",
            "-o",
        ])
        .arg(out_dir.path().join("clean"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("0 bytes"));
}

/// A safetensors file: 8-byte little-endian header length, JSON header, data
/// (docs/export-formats.md).
fn safetensors_file(tensors: &[(&str, &[f32])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, values) in tensors {
        let start = data.len();
        for v in *values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": "F32", "shape": [values.len()], "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    out
}

#[test]
fn a_folder_of_safetensors_files_is_named_for_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("model-00001-of-00002.safetensors"),
        safetensors_file(&[("embed.weight", &[1.0, 2.0, 3.0])]),
    )
    .unwrap();
    std::fs::write(
        d.join("model-00002-of-00002.safetensors"),
        safetensors_file(&[("lm_head.weight", &[4.0, 5.0])]),
    )
    .unwrap();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        br#"{"metadata": {"total_size": 20}, "weight_map": {"embed.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    for cmd in ["ls", "verify", "fetch"] {
        let mut c = dcpfetch();
        c.args([cmd, &location(d)]);
        if cmd == "fetch" {
            c.arg("-o").arg(dir.path().join("out"));
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{cmd}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("holds safetensors files (model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, model.safetensors.index.json)")
                && stderr.contains("not a DCP checkpoint")
                && stderr.contains("hint: torch writes such folders with HuggingFaceStorageWriter")
                && stderr.contains("safetensors.torch.load_file")
                && stderr.contains("huggingface_hub")
                && !stderr.contains("a save is complete only once"),
            "{cmd}: {stderr}"
        );
    }
    // A folder with nothing of the kind keeps the old hint.
    let empty = tempfile::tempdir().unwrap();
    let out = dcpfetch()
        .args(["ls", &location(empty.path())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a save is complete only once .metadata exists")
            && !stderr.contains("safetensors"),
        "{stderr}"
    );
}
