//! Hostile `.metadata` files: each in the corpus under tests/hostile/ gives its expected outcome,
//! never a panic, never a hang, never a write outside the output folder, never a call.
//!
//! The corpus is built from the real `fixtures/single` (and `per_item`) metadata by the functions
//! below; `DCPFETCH_BLESS=1 cargo test --test hostile` rewrites the files. Larger cases (a million
//! entries, truncation at every byte) are built at test time.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{dcpfetch, edit_metadata, fixture, metadata_state, repo, set_item, storage_info};
use dcpfetch::metadata::pickle::{Node, Pickle, Value};

fn corpus() -> PathBuf {
    repo().join("tests/hostile")
}

/// A real metadata rewritten without FRAME (so bytes can be inserted), ending in SETITEMS BUILD
/// STOP.
fn unframed(name: &str) -> Vec<u8> {
    let dir = common::copy_fixture(name);
    edit_metadata(dir.path(), |_| {});
    let data = std::fs::read(dir.path().join(".metadata")).unwrap();
    assert!(data.ends_with(b"ub."));
    data
}

/// `data` with `extra` inserted as more attributes of the Metadata object.
fn with_attributes(name: &str, extra: &[u8]) -> Vec<u8> {
    let mut data = unframed(name);
    let at = data.len() - 3;
    data.splice(at..at, extra.iter().copied());
    data
}

fn bin_str(s: &str) -> Vec<u8> {
    let mut out = vec![b'X'];
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

/// A real metadata changed through its value graph.
fn edited(name: &str, edit: impl FnOnce(&mut Pickle)) -> Vec<u8> {
    let dir = common::copy_fixture(name);
    edit_metadata(dir.path(), edit);
    std::fs::read(dir.path().join(".metadata")).unwrap()
}

/// The string node of an item's `relative_path`, replaced.
fn set_path(p: &mut Pickle, fqn: &str, path: &str) {
    let info = storage_info(p, fqn);
    let v = p.get(info, "relative_path").unwrap();
    *p.node_mut(v).unwrap() = Node::Str(path.into());
}

/// The corpus: name, how it is made.
fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let mut system = bin_str("extra");
    system.extend_from_slice(b"cposix\nsystem\n");
    system.extend(bin_str("touch PWNED"));
    system.extend_from_slice(b"\x85R");
    let mut popen = bin_str("planner_data");
    popen.extend_from_slice(b"csubprocess\nPopen\n");
    popen.extend(bin_str("touch PWNED"));
    popen.extend_from_slice(b"\x85\x81");
    // Tuples that double at every level: 2**150 leaves if expanded, 150 nodes when shared.
    let mut bomb = bin_str("extra");
    bomb.extend_from_slice(b")\x94");
    for i in 0..150u32 {
        bomb.extend_from_slice(b"r");
        bomb.extend_from_slice(&(100_000 + i).to_le_bytes());
        bomb.extend_from_slice(b"j");
        bomb.extend_from_slice(&(100_000 + i).to_le_bytes());
        bomb.extend_from_slice(b"\x86");
    }
    let mut petabyte = bin_str("extra");
    petabyte.push(0x8d);
    petabyte.extend_from_slice(&(1u64 << 50).to_le_bytes());
    petabyte.extend_from_slice(b"not that long");

    let mut non_utf8 = unframed("single");
    let name = b"dtypes.float32";
    let at = non_utf8
        .windows(name.len())
        .position(|w| w == name)
        .unwrap();
    non_utf8[at] = 0xff;
    non_utf8[at + 1] = 0xfe;

    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend(std::iter::repeat_n(b'a', 99_999));
    deep.push(b'.');

    vec![
        ("os_system_attribute", with_attributes("single", &system)),
        (
            "builtins_exec_root",
            [
                &b"\x80\x02cbuiltins\nexec\n"[..],
                &bin_str("import os; os.system('touch PWNED')"),
                b"\x85R.",
            ]
            .concat(),
        ),
        (
            "subprocess_popen_planner_data",
            with_attributes("single", &popen),
        ),
        ("deep_nesting", deep),
        ("memo_bomb", with_attributes("single", &bomb)),
        ("petabyte_string", with_attributes("single", &petabyte)),
        ("non_utf8_fqn", non_utf8),
        (
            "negative_offset",
            edited("single", |p| {
                let info = storage_info(p, "dtypes.int8");
                set_item(p, info, "offset", Value::Int(-5));
            }),
        ),
        ("offset_wider_than_64_bits", {
            // LONG1 of 9 bytes: 2**64 + 5, where _StorageInfo.offset is.
            let mut data = unframed("single");
            let key = bin_str("offset");
            let first = data.windows(key.len()).position(|w| w == &key[..]).unwrap();
            let mut v = first + key.len();
            if data[v] == b'r' {
                v += 5; // the key is shared, so the writer memoizes it (LONG_BINPUT)
            }
            assert!(matches!(data[v], b'J' | b'K' | b'M'), "an integer follows");
            let len = match data[v] {
                b'J' => 5,
                b'K' => 2,
                _ => 3,
            };
            data.splice(v..v + len, [0x8a, 9, 5, 0, 0, 0, 0, 0, 0, 0, 1]);
            data
        }),
        (
            "overflowing_offset",
            edited("single", |p| {
                let info = storage_info(p, "dtypes.int8");
                set_item(p, info, "offset", Value::Int(i64::MAX - 10));
            }),
        ),
        (
            "absolute_path",
            edited("per_item", |p| set_path(p, "weight", "/etc/passwd")),
        ),
        (
            "dotdot_path",
            edited("per_item", |p| {
                set_path(p, "weight", "../../outside.distcp")
            }),
        ),
        (
            "nul_path",
            edited("per_item", |p| set_path(p, "weight", "__0_0.distcp\0.txt")),
        ),
        (
            "backslash_path",
            edited("per_item", |p| {
                set_path(p, "weight", "..\\..\\outside.distcp")
            }),
        ),
        (
            "duplicate_storage_key",
            edited("single", |p| {
                // storage_data gets the key of dtypes.int8 a second time, with the value of
                // dtypes.int16: Python's dict keeps the later value.
                let sd = p.get(metadata_state(p), "storage_data").unwrap();
                let key_of = |p: &Pickle, fqn: &str| {
                    p.pairs(sd)
                        .unwrap()
                        .iter()
                        .find(|(k, _)| {
                            let idx = p.object(*k).unwrap().state.unwrap();
                            p.str(p.get(idx, "fqn").unwrap()) == Some(fqn)
                        })
                        .copied()
                        .unwrap()
                };
                let (k8, _) = key_of(p, "dtypes.int8");
                let (_, v16) = key_of(p, "dtypes.int16");
                match p.node_mut(sd).unwrap() {
                    Node::Dict(pairs) => pairs.push((k8, v16)),
                    _ => unreachable!(),
                }
            }),
        ),
    ]
}

/// What a command must do with a case.
struct Expect {
    case: &'static str,
    command: &'static [&'static str],
    exit: i32,
    /// Text stderr (or stdout for --json reports) must contain.
    needle: &'static str,
}

const EXPECT: &[Expect] = &[
    Expect {
        case: "os_system_attribute",
        command: &["ls"],
        exit: 0,
        needle: "posix.system",
    },
    Expect {
        case: "os_system_attribute",
        command: &["verify", "--json"],
        exit: 1,
        needle: "posix.system",
    },
    Expect {
        case: "builtins_exec_root",
        command: &["ls"],
        exit: 2,
        needle: "not torch.distributed.checkpoint.metadata.Metadata",
    },
    Expect {
        case: "subprocess_popen_planner_data",
        command: &["ls"],
        exit: 0,
        needle: "subprocess.Popen",
    },
    Expect {
        case: "subprocess_popen_planner_data",
        command: &["verify", "--json"],
        exit: 1,
        needle: "subprocess.Popen",
    },
    Expect {
        case: "deep_nesting",
        command: &["ls"],
        exit: 2,
        needle: "nesting deeper than 200",
    },
    Expect {
        case: "memo_bomb",
        command: &["ls"],
        exit: 0,
        needle: "",
    },
    Expect {
        case: "memo_bomb",
        command: &["verify", "--json"],
        exit: 0,
        needle: "",
    },
    Expect {
        case: "petabyte_string",
        command: &["ls"],
        exit: 2,
        needle: "declared length 1125899906842624 exceeds",
    },
    Expect {
        case: "non_utf8_fqn",
        command: &["ls"],
        exit: 2,
        needle: "not valid UTF-8",
    },
    Expect {
        case: "negative_offset",
        command: &["ls"],
        exit: 2,
        needle: "negative value -5",
    },
    Expect {
        case: "overflowing_offset",
        command: &["plan"],
        exit: 1,
        needle: "past the end of the file",
    },
    Expect {
        case: "overflowing_offset",
        command: &["fetch", "-o", "OUT"],
        exit: 1,
        needle: "past the end of the file",
    },
    Expect {
        case: "overflowing_offset",
        command: &["verify", "--json"],
        exit: 1,
        needle: "past the end of the file",
    },
    Expect {
        case: "offset_wider_than_64_bits",
        command: &["ls"],
        exit: 2,
        needle: "wider than 64 bits",
    },
    Expect {
        case: "absolute_path",
        command: &["fetch", "-o", "OUT"],
        exit: 1,
        needle: "\"/etc/passwd\"",
    },
    Expect {
        case: "absolute_path",
        command: &["verify", "--json"],
        exit: 1,
        needle: "it is absolute",
    },
    Expect {
        case: "dotdot_path",
        command: &["fetch", "-o", "OUT"],
        exit: 1,
        needle: "'..' component",
    },
    Expect {
        case: "dotdot_path",
        command: &["fetch", "-o", "-"],
        exit: 1,
        needle: "'..' component",
    },
    Expect {
        case: "nul_path",
        command: &["fetch", "-o", "OUT"],
        exit: 1,
        needle: "NUL",
    },
    Expect {
        case: "backslash_path",
        command: &["fetch", "-o", "OUT"],
        exit: 1,
        needle: "backslash",
    },
    Expect {
        case: "backslash_path",
        command: &["verify", "--json"],
        exit: 1,
        needle: "backslash",
    },
    Expect {
        case: "duplicate_storage_key",
        command: &["ls", "--json"],
        exit: 0,
        needle: "more than once",
    },
];

#[test]
fn corpus_files_are_current() {
    let bless = std::env::var_os("DCPFETCH_BLESS").is_some();
    for (name, bytes) in cases() {
        let path = corpus().join(format!("{name}.metadata"));
        if bless {
            std::fs::create_dir_all(corpus()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).ok().as_deref(),
            Some(&bytes[..]),
            "{name}: run DCPFETCH_BLESS=1"
        );
    }
}

/// A checkpoint folder holding a corpus file as its `.metadata`, beside the fixture's shards.
fn checkpoint(case: &str) -> tempfile::TempDir {
    let fixture = if matches!(
        case,
        "absolute_path" | "dotdot_path" | "nul_path" | "backslash_path"
    ) {
        "per_item"
    } else {
        "single"
    };
    let dir = common::copy_fixture(fixture);
    std::fs::copy(
        corpus().join(format!("{case}.metadata")),
        dir.path().join(".metadata"),
    )
    .unwrap();
    dir
}

#[test]
fn each_case_gives_its_expected_outcome() {
    for e in EXPECT {
        let ck = checkpoint(e.case);
        let sandbox = tempfile::tempdir().unwrap();
        let out_dir = sandbox.path().join("a").join("b").join("out");
        let args: Vec<String> = e
            .command
            .iter()
            .map(|a| {
                if *a == "OUT" {
                    out_dir.display().to_string()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let started = Instant::now();
        let out = dcpfetch()
            .current_dir(sandbox.path())
            .arg(&args[0])
            .arg(ck.path())
            .args(&args[1..])
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap();
        let what = format!("{} {:?}", e.case, e.command);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: took {:?}",
            started.elapsed()
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(out.status.code(), Some(e.exit), "{what}: {text}");
        assert!(
            text.contains(e.needle),
            "{what}: {e:?} not in {text}",
            e = e.needle
        );
        assert!(!text.contains("panicked"), "{what}: {text}");
        // Nothing ran and nothing was written outside the output folder.
        assert!(
            !ck.path().join("PWNED").exists() && !sandbox.path().join("PWNED").exists(),
            "{what}"
        );
        assert!(
            !sandbox.path().join("outside.distcp").exists()
                && !sandbox.path().join("a").join("outside.distcp").exists(),
            "{what}"
        );
        assert!(
            !out_dir.join(".metadata").exists(),
            "{what}: a refused fetch must not look complete"
        );
    }
}

#[test]
fn duplicate_keys_keep_the_later_value_as_python_does() {
    let ck = checkpoint("duplicate_storage_key");
    let got = common::json(&[
        "ls",
        ck.path().to_str().unwrap(),
        "--json",
        "--select",
        "dtypes.int{8,16}",
    ]);
    let chunks = |fqn: &str| {
        got["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["fqn"] == fqn)
            .unwrap()["chunks"]
            .clone()
    };
    let (int8, int16) = (chunks("dtypes.int8"), chunks("dtypes.int16"));
    assert_eq!(
        int8.as_array().unwrap().len(),
        1,
        "one stored copy, the later one"
    );
    assert_eq!(int8[0]["offset"], int16[0]["offset"]);
    assert_eq!(got["totals"]["storage_entries"], 2);
}

/// Inputs the fuzzers found (fuzz/regressions/): each finishes quickly now.
#[test]
fn fuzz_regressions_stay_fixed() {
    let dir = repo().join("fuzz/regressions");
    let mut replayed = 0;
    for f in std::fs::read_dir(dir.join("unpickler")).unwrap() {
        let data = std::fs::read(f.unwrap().path()).unwrap();
        let started = Instant::now();
        if let Ok(p) = Pickle::parse(&data) {
            let again = Pickle::parse(&p.write().unwrap()).unwrap();
            assert_eq!(again.node_count(), p.node_count());
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        replayed += 1;
    }
    let ck = dcpfetch::metadata::Checkpoint::from_files(&[(
        ".metadata".into(),
        std::fs::read(fixture("model").join(".metadata")).unwrap(),
    )])
    .unwrap();
    for f in std::fs::read_dir(dir.join("selection")).unwrap() {
        let data = std::fs::read(f.unwrap().path()).unwrap();
        let started = Instant::now();
        if let Ok(spec) = serde_json::from_slice::<dcpfetch::selection::Spec>(&data) {
            let _ = spec.resolve(&ck);
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        replayed += 1;
    }
    assert!(replayed >= 3);
}

/// Every prefix of every fixture's metadata is refused cleanly (the protocol 0 and 1 ones too).
#[test]
fn truncation_at_every_byte_is_an_error() {
    let mut tried = 0;
    let more = ["megatron", "protocol0", "protocol1"];
    for name in common::FIXTURES.iter().chain(&more) {
        for f in std::fs::read_dir(fixture(name)).unwrap() {
            let path = f.unwrap().path();
            if !path.to_str().unwrap().ends_with(".metadata") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            for n in 0..data.len() {
                let r = dcpfetch::metadata::Checkpoint::from_files(&[(
                    ".metadata".into(),
                    data[..n].to_vec(),
                )]);
                assert!(
                    r.is_err(),
                    "{}: a prefix of {n} bytes was accepted",
                    path.display()
                );
                tried += 1;
            }
        }
    }
    assert!(tried > 60_000, "{tried}");
}

/// A `.metadata` with a million storage entries (one tensor of a million chunks), made with memo
/// references as Python's pickler would, parses in bounded time.
#[test]
fn a_million_entries() {
    let n: u32 = if cfg!(debug_assertions) {
        100_000
    } else {
        1_000_000
    };
    let data = million(n);
    let started = Instant::now();
    let ck = dcpfetch::metadata::Checkpoint::from_files(&[(".metadata".into(), data)]).unwrap();
    let took = started.elapsed();
    assert_eq!(ck.storage.len(), n as usize);
    assert_eq!(ck.entries[0].chunks.len(), n as usize);
    assert!(ck.entries[0].chunks.iter().all(|c| c.storage.len() == 1));
    assert!(took < Duration::from_secs(60), "{took:?}");
}

/// Builds the pickle of a Metadata with one float32 tensor of `n` one-row chunks, each stored in
/// `__0_0.distcp`.
fn million(n: u32) -> Vec<u8> {
    const MOD: &str = "torch.distributed.checkpoint.metadata";
    let mut o = b"\x80\x04".to_vec();
    let global = |o: &mut Vec<u8>, m: &str, name: &str| {
        o.push(b'c');
        o.extend_from_slice(m.as_bytes());
        o.push(b'\n');
        o.extend_from_slice(name.as_bytes());
        o.push(b'\n');
    };
    let put = |o: &mut Vec<u8>, i: u32| {
        o.push(b'r');
        o.extend_from_slice(&i.to_le_bytes());
    };
    let get = |o: &mut Vec<u8>, i: u32| {
        o.push(b'j');
        o.extend_from_slice(&i.to_le_bytes());
    };
    let int = |o: &mut Vec<u8>, v: u32| {
        o.push(b'J');
        o.extend_from_slice(&v.to_le_bytes());
    };
    let s = |o: &mut Vec<u8>, v: &str| o.extend(bin_str(v));
    // Memo: 0 Size, 1 Chunk cls, 2 Index cls, 3 StorageInfo cls, 4 fqn, 5 file.
    global(&mut o, "torch", "Size");
    put(&mut o, 0);
    o.push(b'0');
    global(&mut o, MOD, "ChunkStorageMetadata");
    put(&mut o, 1);
    o.push(b'0');
    global(&mut o, MOD, "MetadataIndex");
    put(&mut o, 2);
    o.push(b'0');
    global(
        &mut o,
        "torch.distributed.checkpoint.filesystem",
        "_StorageInfo",
    );
    put(&mut o, 3);
    o.push(b'0');
    s(&mut o, "w");
    put(&mut o, 4);
    o.push(b'0');
    s(&mut o, "__0_0.distcp");
    put(&mut o, 5);
    o.push(b'0');
    let size = |o: &mut Vec<u8>, a: u32, b: u32| {
        get(o, 0);
        int(o, a);
        int(o, b);
        o.extend_from_slice(b"\x86\x85R");
    };
    global(&mut o, MOD, "Metadata");
    o.extend_from_slice(b")\x81}(");
    s(&mut o, "state_dict_metadata");
    o.extend_from_slice(b"}(");
    get(&mut o, 4);
    global(&mut o, MOD, "TensorStorageMetadata");
    o.extend_from_slice(b")\x81}(");
    s(&mut o, "properties");
    global(&mut o, MOD, "TensorProperties");
    o.extend_from_slice(b")\x81(");
    global(&mut o, "torch", "float32");
    o.extend_from_slice(b"N\x89N\x89");
    o.extend_from_slice(b"tb");
    s(&mut o, "size");
    size(&mut o, n, 4);
    s(&mut o, "chunks");
    o.extend_from_slice(b"](");
    for i in 0..n {
        get(&mut o, 1);
        o.extend_from_slice(b")\x81}(");
        s(&mut o, "offsets");
        size(&mut o, i, 0);
        s(&mut o, "sizes");
        size(&mut o, 1, 4);
        o.extend_from_slice(b"ub");
    }
    o.extend_from_slice(b"eub");
    o.extend_from_slice(b"u");
    s(&mut o, "storage_data");
    o.extend_from_slice(b"}(");
    for i in 0..n {
        get(&mut o, 2);
        o.extend_from_slice(b")\x81}(");
        s(&mut o, "fqn");
        get(&mut o, 4);
        s(&mut o, "offset");
        size(&mut o, i, 0);
        o.extend_from_slice(b"ub");
        get(&mut o, 3);
        o.extend_from_slice(b")\x81}(");
        s(&mut o, "relative_path");
        get(&mut o, 5);
        s(&mut o, "offset");
        int(&mut o, i * 1300);
        s(&mut o, "length");
        int(&mut o, 1300);
        o.extend_from_slice(b"ub");
    }
    o.extend_from_slice(b"u");
    o.extend_from_slice(b"ub.");
    o
}
