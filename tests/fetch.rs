//! `dcpfetch fetch` and `dcpfetch plan` end to end on the fixtures, through the local folder and a
//! real S3-protocol server (moto): sparse folders, stdout, tar and manifests, resume and refusals.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{Backend, dcpfetch, expected, fixture, json, sha256};
use serde_json::Value;

/// `(file, offset) -> (length, sha256 of the item bytes)` for every stored item torch recorded.
fn expected_items(name: &str) -> BTreeMap<(String, u64), (u64, String)> {
    let want = expected(name);
    let mut out = BTreeMap::new();
    for e in want["entries"].as_array().unwrap() {
        let storages: Vec<&Value> = if e["kind"] == "tensor" {
            e["chunks"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c["storage"].as_array().unwrap())
                .collect()
        } else {
            e["storage"].as_array().unwrap().iter().collect()
        };
        for s in storages {
            out.insert(
                (
                    s["file"].as_str().unwrap().to_owned(),
                    s["offset"].as_u64().unwrap(),
                ),
                (
                    s["length"].as_u64().unwrap(),
                    s["sha256"].as_str().unwrap().to_owned(),
                ),
            );
        }
    }
    out
}

/// The stored items a selection names, from `ls --json` (whose agreement with torch tests/ls.rs
/// checks).
fn selected_items(name: &str, selection: &[&str]) -> BTreeSet<(String, u64, u64)> {
    let mut args = vec!["ls", "--json"];
    let path = fixture(name);
    args.insert(1, path.to_str().unwrap());
    args.extend_from_slice(selection);
    let got = json(&args);
    got["entries"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["chunks"].as_array().unwrap().iter())
        .map(|c| {
            (
                c["file"].as_str().unwrap().to_owned(),
                c["offset"].as_u64().unwrap(),
                c["length"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn run_fetch(backend: Backend, name: &str, out: &Path, extra: &[&str]) -> Value {
    let location = backend.location(name);
    let mut cmd = dcpfetch();
    cmd.args(["fetch", &location, "-o"])
        .arg(out)
        .arg("--json")
        .args(backend.args())
        .args(extra);
    let res = cmd.output().unwrap();
    assert!(
        res.status.success(),
        "fetch {name} {extra:?}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    serde_json::from_slice(&res.stdout).unwrap()
}

/// The output folder holds every shard file at its original size, the selected items' bytes as
/// torch wrote them, zeros elsewhere, and the metadata files byte for byte.
fn check_sparse_copy(name: &str, out: &Path, selected: &BTreeSet<(String, u64, u64)>) {
    let want = expected(name);
    let items = expected_items(name);
    for (file, info) in want["files"].as_object().unwrap() {
        let got = common::read(&out.join(file));
        assert_eq!(
            got.len() as u64,
            info["size"].as_u64().unwrap(),
            "{name}/{file}: size"
        );
        let mut covered = vec![false; got.len()];
        for (f, offset, length) in selected.iter().filter(|(f, ..)| f == file) {
            let (len, sha) = &items[&(f.clone(), *offset)];
            assert_eq!(len, length);
            let (a, b) = (*offset as usize, (*offset + *length) as usize);
            assert_eq!(&sha256(&got[a..b]), sha, "{name}/{file}: item at {offset}");
            covered[a..b].iter_mut().for_each(|c| *c = true);
        }
        let stray = got
            .iter()
            .zip(&covered)
            .filter(|(byte, c)| !**c && **byte != 0)
            .count();
        assert_eq!(
            stray, 0,
            "{name}/{file}: bytes outside the selection must be holes"
        );
    }
    for m in want["metadata_files"].as_array().unwrap() {
        let m = m.as_str().unwrap();
        assert_eq!(
            common::read(&out.join(m)),
            common::read(&fixture(name).join(m)),
            "{name}/{m}"
        );
    }
}

fn check_fetch_everything(name: &str, backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy");
    let summary = run_fetch(backend, name, &out, &[]);
    let selected = selected_items(name, &[]);
    check_sparse_copy(name, &out, &selected);
    assert_eq!(summary["items"], selected.len());
    let needed: u64 = selected.iter().map(|(_, _, l)| l).sum();
    assert_eq!(summary["bytes_needed"], needed);
}

macro_rules! fetch_suite {
    ($backend:ident, $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                check_fetch_everything(stringify!($name), Backend::$backend);
            }
        )*
    };
}

mod everything_local {
    use super::*;
    fetch_suite!(
        Local, single, model, dtensor, per_item, zstd, per_rank, torch1_13, torch2_5
    );
}

mod everything_s3 {
    use super::*;
    fetch_suite!(
        S3, single, model, dtensor, per_item, zstd, per_rank, torch1_13, torch2_5
    );
}

/// Selections, with settings that split items across many small requests.
#[test]
fn selections_fetch_exactly_their_items() {
    let selections: &[&[&str]] = &[
        &["--select", "model.*"],
        &["--exclude", "optim.*"],
        &[
            "--select",
            "model.layers.1.*",
            "--select",
            "optim.state.layers.1.*",
        ],
        &["--select", "model.layers.*.attn.wq.weight"],
        &["--select", "optim.param_groups.*"],
    ];
    let settings: &[&[&str]] = &[
        &[],
        &[
            "--max-gap-size",
            "0",
            "--part-size",
            "1000",
            "--concurrency",
            "3",
            "--max-memory",
            "4KiB",
        ],
        &["--max-gap-size", "inf", "--part-size", "64KiB"],
    ];
    for backend in [Backend::Local, Backend::S3] {
        for sel in selections {
            for set in settings {
                let dir = tempfile::tempdir().unwrap();
                let out = dir.path().join("copy");
                let args: Vec<&str> = sel.iter().chain(set.iter()).copied().collect();
                let summary = run_fetch(backend, "model", &out, &args);
                let selected = selected_items("model", sel);
                check_sparse_copy("model", &out, &selected);
                assert_eq!(summary["items"], selected.len(), "{sel:?} {set:?}");
            }
        }
    }
}

#[test]
fn requests_match_the_plan() {
    for (set, gap) in [
        (&["--max-gap-size", "0"][..], "0"),
        (&["--max-gap-size", "inf"][..], "inf"),
    ] {
        let mut args = vec!["plan", "--json", "--exclude", "optim.*"];
        let path = fixture("model");
        args.insert(1, path.to_str().unwrap());
        args.extend_from_slice(set);
        let plan = json(&args);
        let dir = tempfile::tempdir().unwrap();
        let mut fetch_args = vec!["--exclude", "optim.*"];
        fetch_args.extend_from_slice(set);
        let summary = run_fetch(Backend::S3, "model", &dir.path().join("o"), &fetch_args);
        assert_eq!(summary["requests"], plan["totals"]["requests"], "gap {gap}");
        assert_eq!(summary["retries"], 0);
        assert_eq!(
            summary["bytes_transferred"], plan["totals"]["bytes_fetched"],
            "gap {gap}"
        );
        assert_eq!(summary["gap_bytes"], plan["totals"]["gap_bytes"]);
        assert_eq!(summary["bytes_needed"], plan["totals"]["bytes_needed"]);
    }
}

#[test]
fn plan_json_accounts_for_every_byte() {
    let path = fixture("model");
    for gap in ["0", "1KiB", "32MiB", "inf"] {
        let p = json(&[
            "plan",
            path.to_str().unwrap(),
            "--json",
            "--select",
            "model.*",
            "--max-gap-size",
            gap,
            "--groups",
        ]);
        let t = &p["totals"];
        let fetched = t["bytes_fetched"].as_u64().unwrap();
        assert_eq!(
            fetched,
            t["bytes_needed"].as_u64().unwrap() + t["gap_bytes"].as_u64().unwrap()
        );
        assert_eq!(
            t["checkpoint_bytes"].as_u64().unwrap(),
            fetched + t["bytes_skipped"].as_u64().unwrap()
        );
        let mut groups = 0;
        for f in p["files"].as_array().unwrap() {
            let gs = f["range_groups"].as_array().unwrap();
            groups += gs.len();
            assert_eq!(gs.len() as u64, f["groups"].as_u64().unwrap());
            for w in gs.windows(2) {
                let gap_bytes = w[1]["start"].as_u64().unwrap() - w[0]["end"].as_u64().unwrap();
                if gap != "inf" {
                    let limit: dcpfetch::units::ByteSize = gap.parse().unwrap();
                    assert!(gap_bytes > limit.0, "groups separated by more than {gap}");
                }
            }
        }
        assert_eq!(groups as u64, t["groups"].as_u64().unwrap());
        if gap == "inf" {
            assert_eq!(t["groups"], t["files"]);
        }
    }
}

/// Reads a tar stream: (name, data) per regular entry, honouring PAX `path` records.
fn untar(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut long_name = None;
    while pos + 512 <= data.len() {
        let h = &data[pos..pos + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let stored: u32 =
            u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let sum: u32 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    *b as u32
                }
            })
            .sum();
        assert_eq!(stored, sum, "tar header checksum");
        let name =
            String::from_utf8(h[..100].iter().take_while(|b| **b != 0).copied().collect()).unwrap();
        let size =
            u64::from_str_radix(std::str::from_utf8(&h[124..135]).unwrap(), 8).unwrap() as usize;
        let body = &data[pos + 512..pos + 512 + size];
        pos += 512 + size.div_ceil(512) * 512;
        match h[156] {
            b'x' => {
                let text = std::str::from_utf8(body).unwrap();
                long_name = text
                    .lines()
                    .find_map(|l| l.split_once(" path=").map(|(_, p)| p.to_owned()));
            }
            b'0' => out.push((long_name.take().unwrap_or(name), body.to_vec())),
            other => panic!("unexpected tar entry type {other}"),
        }
    }
    out
}

#[test]
fn stdout_raw_tar_and_manifest_agree_with_torch() {
    for backend in [Backend::Local, Backend::S3] {
        for name in [
            "single",
            "dtensor",
            "zstd",
            "per_rank",
            "torch1_13",
            "torch2_5",
        ] {
            let items = expected_items(name);
            let dir = tempfile::tempdir().unwrap();
            let manifest = dir.path().join("m.json");
            let location = backend.location(name);
            for format in ["raw", "tar"] {
                let res = dcpfetch()
                    .args([
                        "fetch",
                        &location,
                        "-o",
                        "-",
                        "--format",
                        format,
                        "--manifest",
                    ])
                    .arg(&manifest)
                    .args(backend.args())
                    .args(["--part-size", "2KiB", "--max-gap-size", "0"])
                    .output()
                    .unwrap();
                assert!(
                    res.status.success(),
                    "{}",
                    String::from_utf8_lossy(&res.stderr)
                );
                let stream = res.stdout;
                let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
                assert_eq!(m["format"], format);
                assert_eq!(m["total_bytes"], stream.len());
                let entries = m["items"].as_array().unwrap();
                assert_eq!(entries.len(), items.len(), "{name}: every stored item once");
                let mut last: Option<(String, u64)> = None;
                for e in entries {
                    let key = (
                        e["file"].as_str().unwrap().to_owned(),
                        e["offset"].as_u64().unwrap(),
                    );
                    let (len, sha) = &items[&key];
                    let at = e["stream_offset"].as_u64().unwrap() as usize;
                    assert_eq!(
                        &sha256(&stream[at..at + *len as usize]),
                        sha,
                        "{name} {key:?}"
                    );
                    // Plan order: file (natural order), then offset.
                    let order = (
                        e["file"].as_str().unwrap().to_owned(),
                        e["offset"].as_u64().unwrap(),
                    );
                    if let Some(prev) = &last {
                        let ordered = dcpfetch::units::natural_cmp(&prev.0, &order.0)
                            .then(prev.1.cmp(&order.1));
                        assert!(ordered.is_lt(), "{name}: {prev:?} before {order:?}");
                    }
                    last = Some(order);
                }
                if format == "raw" {
                    let total: u64 = items.values().map(|(l, _)| l).sum();
                    assert_eq!(stream.len() as u64, total);
                } else {
                    let tar = untar(&stream);
                    assert_eq!(tar.len(), items.len());
                    for e in entries {
                        let (_, data) = tar
                            .iter()
                            .find(|(n, _)| n == e["tar_name"].as_str().unwrap())
                            .unwrap();
                        let key = (
                            e["file"].as_str().unwrap().to_owned(),
                            e["offset"].as_u64().unwrap(),
                        );
                        assert_eq!(&sha256(data), &items[&key].1);
                        let zstd = !e["transform_descriptors"].as_array().unwrap().is_empty();
                        assert_eq!(e["tar_name"].as_str().unwrap().ends_with(".pt"), !zstd);
                        // Every tensor entry is a standalone torch.save archive (or its zstd frame).
                        assert!(
                            data.starts_with(b"PK\x03\x04")
                                || (zstd && data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn resume_adds_only_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy");
    let first = run_fetch(
        Backend::Local,
        "model",
        &out,
        &["--select", "model.layers.0.*"],
    );
    assert_eq!(first["items"], 6);
    // Without --resume, an earlier fetch is not silently overwritten.
    let res = dcpfetch()
        .args(["fetch"])
        .arg(fixture("model"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("--resume"));
    let second = run_fetch(
        Backend::Local,
        "model",
        &out,
        &["--select", "model.layers.{0,1}.*", "--resume"],
    );
    assert_eq!(second["items"], 6, "only layer 1 is fetched");
    assert_eq!(second["items_already_present"], 6);
    check_sparse_copy(
        "model",
        &out,
        &selected_items("model", &["--select", "model.layers.{0,1}.*"]),
    );
    // A resume from another source is refused.
    let res = dcpfetch()
        .args(["fetch"])
        .arg(fixture("single"))
        .arg("-o")
        .arg(&out)
        .arg("--resume")
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("--force"));
}

#[test]
fn a_folder_holding_something_else_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let res = dcpfetch()
        .args(["fetch"])
        .arg(fixture("per_item"))
        .arg("-o")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("not empty"));
    assert!(!dir.path().join(".metadata").exists());
    run_fetch(Backend::Local, "per_item", dir.path(), &["--force"]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(),
        "mine"
    );
    check_sparse_copy("per_item", dir.path(), &selected_items("per_item", &[]));
}

#[test]
fn a_truncated_shard_fails_naming_file_and_range() {
    let ck = common::copy_fixture("model");
    let f = ck.path().join("__0_1.distcp");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy");
    let res = dcpfetch()
        .args(["fetch"])
        .arg(ck.path())
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("__0_1.distcp") && err.contains("past the end"),
        "{err}"
    );
    assert!(!out.join(".metadata").exists());
}

#[test]
fn a_missing_shard_fails_and_leaves_no_complete_looking_folder() {
    let ck = common::copy_fixture("model");
    std::fs::remove_file(ck.path().join("__0_0.distcp")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy");
    let res = dcpfetch()
        .args(["fetch"])
        .arg(ck.path())
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("__0_0.distcp") && err.contains("not found"),
        "{err}"
    );
    assert!(!out.join(".metadata").exists());
}

#[test]
fn safetensors_shards_are_refused_with_the_reason() {
    for backend in [Backend::Local, Backend::S3] {
        let dir = tempfile::tempdir().unwrap();
        let res = dcpfetch()
            .args(["fetch", &backend.location("safetensors"), "-o"])
            .arg(dir.path().join("o"))
            .args(backend.args())
            .output()
            .unwrap();
        assert_eq!(res.status.code(), Some(1));
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            err.contains("SAFETENSORS") && err.contains("__0_0.distcp"),
            "{err}"
        );
    }
}

#[test]
fn names_that_escape_the_output_folder_are_refused() {
    // A real .metadata whose first relative_path is rewritten to climb out of the folder.
    let ck = common::copy_fixture("per_item");
    let meta = ck.path().join(".metadata");
    let data = std::fs::read(&meta).unwrap();
    let (from, to) = (&b"__0_0.distcp"[..], &b"../../x.distc"[..]);
    // SHORT_BINUNICODE <len> <bytes>: the new name is one byte longer, so its length byte grows
    // too, and FRAME (optional, and its length would now be wrong) is dropped.
    let at = data.windows(from.len()).position(|w| w == from).unwrap();
    assert_eq!(data[at - 1] as usize, from.len());
    let mut evil = data[..2].to_vec();
    evil.extend_from_slice(&data[11..at - 1]);
    evil.push(to.len() as u8);
    evil.extend_from_slice(to);
    evil.extend_from_slice(&data[at + from.len()..]);
    std::fs::write(&meta, &evil).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a").join("b");
    for cmd in [vec!["fetch", "-o", out.to_str().unwrap()], vec!["plan"]] {
        let res = dcpfetch()
            .arg(cmd[0])
            .arg(ck.path())
            .args(&cmd[1..])
            .output()
            .unwrap();
        assert_eq!(res.status.code(), Some(1), "{cmd:?}");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            err.contains("unsafe file name") && err.contains("../../x.distc"),
            "{err}"
        );
    }
    assert!(!dir.path().join("x.distc").exists());
}

#[test]
fn closed_stdout_is_not_an_error() {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("dcpfetch"))
        .args(["fetch"])
        .arg(fixture("model"))
        .args(["-o", "-", "--part-size", "1KiB", "--max-gap-size", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 10];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With `-o -` the stream stays pure on stdout and the `--json` summary goes to stderr.
#[test]
fn stdout_json_summary_goes_to_stderr() {
    let items = expected_items("single");
    let out = dcpfetch()
        .args(["fetch"])
        .arg(fixture("single"))
        .args(["-o", "-", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let total: u64 = items.values().map(|(l, _)| l).sum();
    assert_eq!(out.stdout.len() as u64, total);
    let summary: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(summary["output"], "-");
    assert_eq!(summary["items"], items.len());
    assert_eq!(summary["bytes_needed"], total);
}

/// The manifest is known from the plan: it is written before the first byte, so a reader that
/// closes stdout early still gets it, and it is the same as a whole run's (and matches the bytes).
#[test]
fn manifest_is_written_when_stdout_closes_early() {
    for format in ["raw", "tar"] {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.json");
        let out = dcpfetch()
            .args(["fetch"])
            .arg(fixture("model"))
            .args(["-o", "-", "--format", format, "--manifest"])
            .arg(&whole)
            .output()
            .unwrap();
        assert!(out.status.success(), "{format}");
        let stream = out.stdout;

        let early = dir.path().join("early.json");
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("dcpfetch"))
            .args(["fetch"])
            .arg(fixture("model"))
            .args(["-o", "-", "--part-size", "1KiB", "--max-gap-size", "0"])
            .args(["--format", format, "--manifest"])
            .arg(&early)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 10];
        std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
        drop(stdout);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{format}");

        let whole: Value = serde_json::from_slice(&std::fs::read(&whole).unwrap()).unwrap();
        let early: Value = serde_json::from_slice(&std::fs::read(&early).unwrap()).unwrap();
        assert_eq!(whole, early, "{format}");
        assert_eq!(whole["total_bytes"].as_u64().unwrap(), stream.len() as u64);
        for item in whole["items"].as_array().unwrap() {
            let at = item["stream_offset"].as_u64().unwrap() as usize;
            let len = item["length"].as_u64().unwrap() as usize;
            let file = fixture("model").join(item["file"].as_str().unwrap());
            let off = item["offset"].as_u64().unwrap() as usize;
            assert_eq!(
                stream[at..at + len],
                common::read(&file)[off..off + len],
                "{format} {}",
                item["fqn"]
            );
        }
    }
}

/// A copy made by `fetch -o DIR` used as a source: every command warns that the items not fetched
/// into it read as zeros. The original checkpoint gets no such warning.
#[test]
fn a_copy_used_as_a_source_is_named_for_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy");
    let out = dcpfetch()
        .args(["fetch"])
        .arg(fixture("model"))
        .args(["-s", "model.layers.0.*", "-o"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success());
    for args in [&["ls"][..], &["plan"], &["fetch", "-o", "-"]] {
        let out = dcpfetch()
            .args(args[..1].iter())
            .arg(&copy)
            .args(args[1..].iter())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is a copy made by dcpfetch") && err.contains("reads as zeros"),
            "{args:?}: {err}"
        );
    }
    let out = dcpfetch().arg("ls").arg(fixture("model")).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("copy made by dcpfetch"),
        "the original is no copy"
    );
}
