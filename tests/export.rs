//! `dcpfetch export`: every fixture's tensors, whole, equal to what torch computed
//! (fixtures/expected/full_tensors.json), from a folder and through S3; the stream, folder and npy
//! outputs; names; and the refusals (unsupported dtypes, clashes, missing chunks, corrupt items,
//! existing outputs).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Backend, PLACED, dcpfetch, fixture, read, sha256, upload};
use serde_json::Value;

/// The fixtures export reads (the `safetensors` one is refused by the plan, as by fetch).
const EXPORTED: [&str; 12] = [
    "single",
    "model",
    "dtensor",
    "per_item",
    "zstd",
    "per_rank",
    "torch1_13",
    "torch2_5",
    "megatron",
    "protocol0",
    "protocol1",
    "large",
];

/// dtypes safetensors cannot hold, which `--skip-unsupported` leaves out.
const UNSUPPORTED: [&str; 1] = ["complex128"];

fn full_tensors() -> Value {
    let path = common::repo().join("fixtures/expected/full_tensors.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    dtype: String,
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// Reads a safetensors file as its readers do: the header, then the tensors back to back (no
/// gap, no overlap, the last one ending the file), each starting aligned to its element size
/// (a stream's are in read order, where a tensor may follow a narrower one).
fn parse_safetensors(bytes: &[u8]) -> BTreeMap<String, Stored> {
    parse(bytes, true)
}

fn parse_stream(bytes: &[u8]) -> BTreeMap<String, Stored> {
    parse(bytes, false)
}

fn parse(bytes: &[u8], aligned: bool) -> BTreeMap<String, Stored> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "the data starts 8-aligned");
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut spans = Vec::new();
    let mut out = BTreeMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let (a, b) = (
            v["data_offsets"][0].as_u64().unwrap(),
            v["data_offsets"][1].as_u64().unwrap(),
        );
        let dtype = v["dtype"].as_str().unwrap().to_owned();
        let shape: Vec<u64> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let elem = match dtype.as_str() {
            "F64" | "I64" | "U64" | "C64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        assert!(!aligned || a % elem == 0, "{name} starts aligned");
        assert_eq!(b - a, shape.iter().product::<u64>() * elem, "{name}'s size");
        spans.push((a, b));
        out.insert(
            name,
            Stored {
                dtype,
                shape,
                data: data[a as usize..b as usize].to_vec(),
            },
        );
    }
    spans.sort_unstable();
    let mut at = 0;
    for (a, b) in spans {
        assert_eq!(a, at, "tensors are back to back");
        at = b;
    }
    assert_eq!(at as usize, data.len(), "the last tensor ends the file");
    out
}

fn st_dtype(torch: &str) -> &'static str {
    match torch {
        "float64" => "F64",
        "float32" => "F32",
        "float16" => "F16",
        "bfloat16" => "BF16",
        "int64" => "I64",
        "int32" => "I32",
        "int16" => "I16",
        "int8" => "I8",
        "uint8" => "U8",
        "bool" => "BOOL",
        "float8_e4m3fn" => "F8_E4M3",
        "float8_e5m2" => "F8_E5M2",
        "complex64" => "C64",
        other => panic!("no safetensors dtype for {other} in the fixtures"),
    }
}

/// Exports a whole fixture and checks every tensor against torch's values.
fn check_fixture(backend: Backend, location: &str, name: &str, extra: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("x.safetensors");
    let mut args: Vec<String> = vec![
        "export".into(),
        location.into(),
        "-o".into(),
        file.display().to_string(),
        "--skip-unsupported".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(backend.args());
    let run = dcpfetch().args(&args).output().unwrap();
    assert!(
        run.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: Value = serde_json::from_slice(&run.stdout).unwrap();
    let got = parse_safetensors(&read(&file));
    let want = full_tensors()[name].as_object().unwrap().clone();
    let mut compared = 0;
    for (fqn, w) in &want {
        let dtype = w["dtype"].as_str().unwrap();
        if UNSUPPORTED.contains(&dtype) {
            assert!(!got.contains_key(fqn), "{name}: {fqn} should be skipped");
            assert!(
                summary["skipped"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["fqn"] == fqn.as_str()),
                "{name}: {fqn} not listed as skipped"
            );
            continue;
        }
        let g = got
            .get(fqn)
            .unwrap_or_else(|| panic!("{name}: {fqn} was not exported"));
        assert_eq!(g.dtype, st_dtype(dtype), "{name}: {fqn}");
        let shape: Vec<u64> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(g.shape, shape, "{name}: {fqn}");
        assert_eq!(
            sha256(&g.data),
            w["sha256"].as_str().unwrap(),
            "{name}: {fqn}"
        );
        compared += 1;
    }
    assert_eq!(compared, got.len(), "{name}: extra tensors exported");
    if extra == PLACED {
        // wide and half; wide_t is stored transposed and read whole.
        assert_eq!(summary["items_located"], 2, "{name}");
    }
    assert_eq!(summary["tensors"], compared, "{name}");
    assert_no_leftovers(out.path());
}

/// No temporary is left next to an output.
fn assert_no_leftovers(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.ends_with(".dcpfetch-partial"), "left behind: {n}");
    }
}

#[test]
fn every_fixture_exports_the_tensors_torch_computed() {
    for name in EXPORTED {
        check_fixture(
            Backend::Local,
            &fixture(name).display().to_string(),
            name,
            &[],
        );
    }
    check_fixture(
        Backend::Local,
        &fixture("large").display().to_string(),
        "large",
        &PLACED,
    );
}

#[test]
fn through_s3_too() {
    for name in ["dtensor", "zstd", "per_rank", "single"] {
        check_fixture(Backend::S3, &Backend::S3.location(name), name, &[]);
    }
    let large = upload(&fixture("large"), "export-large");
    check_fixture(Backend::S3, &large, "large", &PLACED);
}

#[test]
fn over_http_too() {
    let nginx = common::Nginx::start(&common::repo().join("fixtures"), "");
    // (per_rank has no .metadata, and HTTP no listing to find its __N.metadata.)
    for name in ["dtensor", "zstd", "model"] {
        check_fixture(Backend::Local, &nginx.url(name), name, &[]);
    }
    check_fixture(Backend::Local, &nginx.url("large"), "large", &PLACED);
}

fn export(args: &[&str]) -> std::process::Output {
    dcpfetch().arg("export").args(args).output().unwrap()
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_stream_holds_the_same_tensors_in_read_order() {
    let large = fixture("large").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("l.safetensors");
    let mut args = vec![large.as_str(), "-o", file.to_str().unwrap()];
    args.extend(PLACED);
    ok(&export(&args));
    let mut args = vec![large.as_str(), "-o", "-"];
    args.extend(PLACED);
    let stream = export(&args);
    ok(&stream);
    assert_eq!(
        parse_stream(&stream.stdout),
        parse_safetensors(&read(&file))
    );
}

#[test]
fn a_stream_reorders_tensors_split_across_files_on_disk_not_in_memory() {
    // dt.shard1's chunks lie in two files: what arrives before its turn waits in a scratch file,
    // whatever --max-memory is.
    let dtensor = fixture("dtensor").display().to_string();
    let want = full_tensors()["dtensor"].as_object().unwrap().clone();
    for extra in [&[][..], &["--max-memory", "64B", "--part-size", "64B"]] {
        let mut args = vec![dtensor.as_str(), "-o", "-"];
        args.extend(extra);
        let out = export(&args);
        ok(&out);
        let got = parse_stream(&out.stdout);
        assert_eq!(got.len(), want.len(), "{extra:?}");
        for (fqn, w) in &want {
            assert_eq!(
                sha256(&got[fqn].data),
                w["sha256"].as_str().unwrap(),
                "{fqn} {extra:?}"
            );
        }
    }
}

#[test]
fn a_folder_in_the_hugging_face_layout() {
    let model = fixture("model").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    ok(&export(&[
        &model,
        "--select",
        "model.*",
        "--max-shard-size",
        "40KiB",
        "-o",
        out.to_str().unwrap(),
    ]));
    let index: Value =
        serde_json::from_slice(&read(&out.join("model.safetensors.index.json"))).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let want = full_tensors()["model"].as_object().unwrap().clone();
    let mut total = 0;
    let mut files = std::collections::BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().unwrap();
        files.insert(file.to_owned());
        let tensors = parse_safetensors(&read(&out.join(file)));
        let t = &tensors[name];
        assert_eq!(
            sha256(&t.data),
            want[name]["sha256"].as_str().unwrap(),
            "{name}"
        );
        total += t.data.len() as u64;
    }
    let model_keys = want.keys().filter(|k| k.starts_with("model.")).count();
    assert_eq!(map.len(), model_keys);
    assert_eq!(index["metadata"]["total_size"], total);
    let n = files.len();
    assert!(n >= 3, "{n} files");
    for (i, f) in files.iter().enumerate() {
        assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let data: u64 = parse_safetensors(&read(&out.join(f)))
            .values()
            .map(|t| t.data.len() as u64)
            .sum();
        assert!(data <= 40 << 10, "{f}: {data} bytes of data");
    }
    // Again without --force: refused; with it, replaced.
    let again = export(&[
        &model,
        "--select",
        "model.*",
        "--max-shard-size",
        "1MiB",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds an export"));
    ok(&export(&[
        &model,
        "--select",
        "model.*",
        "--max-shard-size",
        "1MiB",
        "-o",
        out.to_str().unwrap(),
        "--force",
    ]));
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn one_tensor_as_npy() {
    let large = fixture("large").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.npy");
    ok(&export(&[
        &large,
        "--select",
        "wide",
        "--format",
        "npy",
        "-o",
        file.to_str().unwrap(),
    ]));
    let bytes = read(&file);
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let h = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + h) % 64, 0);
    let header = std::str::from_utf8(&bytes[10..10 + h]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'shape': (512, 256)"),
        "{header}"
    );
    let want = &full_tensors()["large"]["wide"]["sha256"];
    assert_eq!(sha256(&bytes[10 + h..]), want.as_str().unwrap());
    // numpy has no bfloat16, and npy holds one tensor.
    let bf16 = export(&[
        &large,
        "--select",
        "half",
        "--format",
        "npy",
        "-o",
        file.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(bf16.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bf16.stderr).contains("half is bfloat16, which npy cannot hold")
    );
    let two = export(&[
        &large,
        "--select",
        "wide*",
        "--format",
        "npy",
        "-o",
        file.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(two.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&two.stderr).contains("writes one tensor; the selection has 2")
    );
}

#[test]
fn names_are_stripped_and_renamed_and_must_stay_distinct() {
    let model = fixture("model").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    ok(&export(&[
        &model,
        "--select",
        "model.layers.0.attn.*",
        "--strip-prefix",
        "model.",
        "--rename",
        "layers.0.attn.=blk0.",
        "-o",
        file.to_str().unwrap(),
    ]));
    let names: Vec<String> = parse_safetensors(&read(&file)).into_keys().collect();
    assert!(names.iter().all(|n| n.starts_with("blk0.")), "{names:?}");
    assert!(names.contains(&"blk0.wq.weight".to_owned()), "{names:?}");
    let clash = export(&[
        &model,
        "--select",
        "model.layers.0.attn.w[qk].weight",
        "--rename",
        "model.layers.0.attn.wq=x",
        "--rename",
        "model.layers.0.attn.wk=x",
        "-o",
        file.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(clash.status.code(), Some(1));
    let err = String::from_utf8_lossy(&clash.stderr);
    assert!(err.contains("would both be named \"x.weight\""), "{err}");
}

#[test]
fn a_checkpoint_of_raw_safetensors_items_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.safetensors");
    let st = fixture("safetensors").display().to_string();
    let out = export(&[&st, "-o", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serialization_format=SAFETENSORS"), "{err}");
}

#[test]
fn unsupported_dtypes_fail_unless_skipped() {
    let single = fixture("single").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    let out = export(&[
        &single,
        "--select",
        "dtypes.*",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dtypes.complex128 is complex128, which safetensors cannot hold"),
        "{err}"
    );
    assert!(!file.exists());
}

#[test]
fn a_region_is_exported_as_its_own_tensor() {
    let large = fixture("large").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"regions": [{"fqn": "wide", "offsets": [100, 64], "sizes": [50, 128]}]}"#,
    )
    .unwrap();
    let whole = dir.path().join("w.safetensors");
    ok(&export(&[
        &large,
        "--select",
        "wide",
        "-o",
        whole.to_str().unwrap(),
    ]));
    let region = dir.path().join("r.safetensors");
    ok(&export(&[
        &large,
        "--spec",
        spec.to_str().unwrap(),
        "-o",
        region.to_str().unwrap(),
    ]));
    let full = &parse_safetensors(&read(&whole))["wide"];
    let got = &parse_safetensors(&read(&region))["wide"];
    assert_eq!(got.shape, vec![50, 128]);
    let mut want = Vec::new();
    for row in 100..150 {
        let at = (row * 256 + 64) * 4;
        want.extend_from_slice(&full.data[at..at + 128 * 4]);
    }
    assert_eq!(got.data, want);
}

#[test]
fn a_tensor_missing_chunks_names_what_is_missing() {
    // per_rank without rank 1's metadata: `sharded` keeps only rank 0's rows.
    let dir = common::copy_fixture("per_rank");
    std::fs::remove_file(dir.path().join("__1.metadata")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("x.safetensors");
    let run = export(&[
        dir.path().to_str().unwrap(),
        "--select",
        "sharded",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("sharded: indices 3..5 of dimension 0 are in no stored chunk"),
        "{err}"
    );
}

#[test]
fn a_corrupt_item_fails_and_leaves_nothing() {
    // A byte inside each of the three large tensors' data in turn, placed as it arrives or read
    // whole; then one in `wide`'s data.pkl (its item starts at 1261, its pickle 64 bytes in).
    let good = read(&fixture("large").join("__0_0.distcp"));
    let fifth = |n: usize| good.len() * n / 5;
    for (flip, extra) in [
        (fifth(1), &PLACED[..]),
        (fifth(2), &PLACED[..]),
        (fifth(4), &PLACED[..]),
        (fifth(1), &[]),
        (1261 + 64 + 15, &PLACED[..]),
        (1261 + 64 + 15, &[]),
    ] {
        let dir = common::copy_fixture("large");
        let mut bytes = good.clone();
        bytes[flip] ^= 0x40;
        std::fs::write(dir.path().join("__0_0.distcp"), &bytes).unwrap();
        let out = tempfile::tempdir().unwrap();
        let file = out.path().join("x.safetensors");
        let mut args = vec![dir.path().to_str().unwrap(), "-o", file.to_str().unwrap()];
        args.extend(extra);
        let run = export(&args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "byte {flip}, {extra:?}: {err}");
        assert!(err.contains("CRC32"), "{err}");
        assert!(!file.exists());
        assert_no_leftovers(out.path());
    }
}

#[test]
fn an_existing_output_is_kept_and_a_link_never_followed() {
    let model = fixture("model").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    std::fs::write(&file, b"mine").unwrap();
    let out = export(&[
        &model,
        "--select",
        "model.norm.*",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists (pass --force"));
    assert_eq!(read(&file), b"mine");
    // A link at the output's name (or its temporary's) is replaced, never written through.
    let target = dir.path().join("target");
    std::fs::write(&target, b"keep").unwrap();
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(&target, &file).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join(".m.safetensors.dcpfetch-partial"))
        .unwrap();
    ok(&export(&[
        &model,
        "--select",
        "model.norm.*",
        "-o",
        file.to_str().unwrap(),
        "--force",
    ]));
    assert_eq!(read(&target), b"keep");
    assert!(
        !std::fs::symlink_metadata(&file)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(parse_safetensors(&read(&file)).contains_key("model.norm.weight"));
}

#[test]
fn a_chunk_larger_than_its_item_is_refused_before_anything_is_written() {
    // The metadata says `wide` is stored in 100 bytes: a hostile or damaged .metadata, whatever
    // sizes it claims, never makes the export size a file for data that is not there.
    let dir = common::copy_fixture("large");
    common::edit_metadata(dir.path(), |p| {
        let info = common::storage_info(p, "wide");
        common::set_item(
            p,
            info,
            "length",
            dcpfetch::metadata::pickle::Value::Int(100),
        );
    });
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("x.safetensors");
    let run = export(&[
        dir.path().to_str().unwrap(),
        "--select",
        "wide",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("wide: the chunk at [0, 0] of sizes [512, 256] needs 524288 bytes"),
        "{err}"
    );
    assert!(std::fs::read_dir(out.path()).unwrap().next().is_none());
}

#[test]
fn a_failed_export_over_an_earlier_one_keeps_it() {
    let out = tempfile::tempdir().unwrap();
    let hf = out.path().join("hf");
    let large = fixture("large").display().to_string();
    ok(&export(&[
        &large,
        "--max-shard-size",
        "600KiB",
        "-o",
        hf.to_str().unwrap(),
    ]));
    let before = common::snapshot(&hf);
    assert_eq!(before.len(), 4, "{before:?}");
    // The same export with --force from a corrupt copy fails: the earlier one is still whole.
    let dir = common::copy_fixture("large");
    let shard = dir.path().join("__0_0.distcp");
    let mut bytes = read(&shard);
    let flip = bytes.len() / 2;
    bytes[flip] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let run = export(&[
        dir.path().to_str().unwrap(),
        "--max-shard-size",
        "1MiB",
        "-o",
        hf.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(common::snapshot(&hf), before);
}

#[test]
fn an_export_refused_by_the_engine_leaves_nothing() {
    // Parts larger than --max-memory: the engine refuses before fetching, after the output's
    // temporary was created; it goes with the refusal.
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("x.safetensors");
    let large = fixture("large").display().to_string();
    let run = export(&[&large, "-o", file.to_str().unwrap(), "--max-memory", "4MiB"]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("must not exceed --max-memory"));
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}
