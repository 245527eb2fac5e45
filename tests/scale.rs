//! A guard against quadratic paths: the CPU time per storage entry of each command, on a
//! checkpoint and on one four times its size, must stay about the same.
//!
//! The checkpoints are written here (no torch needed): a `.metadata` pickled the way Python's
//! pickler writes torch's classes (protocol 2, classes and attribute names through the memo, dicts
//! in batches of 1,000), one chunk per tensor in one of 8 files, and sparse shard files of the
//! right size. A linear command spends the same per entry at both sizes
//! (less at the small one, where the fixed costs weigh more); a path that scans every entry for
//! each entry spends four times as much at the large one. The bound, 2.5x, leaves room for a busy
//! machine; each figure is the least of two runs, counted in user CPU time of the process, so
//! that waiting for a core does not count.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

/// Storage entries of the small checkpoint; the large one has four times as many.
const SMALL: usize = 24_000;
const FILES: usize = 8;
/// Bytes of each item: more than a chunk's raw data plus 512, so that it reads as a
/// `torch.save` archive, not a raw tensor (which `plan` refuses).
const ITEM: u64 = 600;
/// Items are this far apart in their file: with `--max-gap-size 0`, each is a range group.
const STRIDE: u64 = ITEM + 64;
/// The most the per-entry cost may grow from the small checkpoint to the large one.
const BOUND: f64 = 2.5;

/// Protocol 2 pickle opcodes, written the way Python's pickler writes them.
struct Pickler {
    out: Vec<u8>,
    memo: HashMap<String, u32>,
    next: u32,
}

impl Pickler {
    fn new() -> Self {
        Pickler {
            out: vec![0x80, 2],
            memo: HashMap::new(),
            next: 0,
        }
    }

    fn put(&mut self) -> u32 {
        let i = self.next;
        self.next += 1;
        match u8::try_from(i) {
            Ok(b) => self.out.extend([b'q', b]),
            Err(_) => {
                self.out.push(b'r');
                self.out.extend(i.to_le_bytes());
            }
        }
        i
    }

    /// A memoized value: written once, then fetched from the memo.
    fn memoized(&mut self, key: String, write: impl FnOnce(&mut Self)) {
        if let Some(&i) = self.memo.get(&key) {
            match u8::try_from(i) {
                Ok(b) => self.out.extend([b'h', b]),
                Err(_) => {
                    self.out.push(b'j');
                    self.out.extend(i.to_le_bytes());
                }
            }
            return;
        }
        write(self);
        let i = self.put();
        self.memo.insert(key, i);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.memoized(format!("global {module}.{name}"), |p| {
            p.out.push(b'c');
            p.out.extend(format!("{module}\n{name}\n").bytes());
        });
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.bytes());
        self.put();
    }

    /// An attribute name: Python interns them, so each is written once.
    fn key(&mut self, s: &str) {
        self.memoized(format!("str {s}"), |p| {
            p.out.push(b'X');
            p.out.extend((s.len() as u32).to_le_bytes());
            p.out.extend(s.bytes());
        });
    }

    fn int(&mut self, i: u64) {
        self.out.push(b'J');
        self.out.extend(i32::try_from(i).unwrap().to_le_bytes());
    }

    /// `torch.Size(dims)`.
    fn size(&mut self, dims: &[u64]) {
        self.global("torch", "Size");
        self.out.push(b'(');
        for &d in dims {
            self.int(d);
        }
        self.out.push(b't');
        self.put();
        self.out.push(0x85); // TUPLE1
        self.put();
        self.out.push(b'R');
        self.put();
    }

    /// `cls.__new__(cls)` with its `__dict__` set by BUILD: `fields` writes the key/value pairs.
    fn object(&mut self, module: &str, class: &str, fields: impl FnOnce(&mut Self)) {
        self.global(module, class);
        self.out.extend([b')', 0x81]); // EMPTY_TUPLE NEWOBJ
        self.put();
        self.out.push(b'}');
        self.put();
        self.out.push(b'(');
        fields(self);
        self.out.extend([b'u', b'b']); // SETITEMS BUILD
    }

    /// A dict of `n` pairs, in SETITEMS batches of 1,000 as Python writes them.
    fn dict(&mut self, n: usize, mut pair: impl FnMut(&mut Self, usize)) {
        self.out.push(b'}');
        self.put();
        for start in (0..n).step_by(1000) {
            self.out.push(b'(');
            for i in start..n.min(start + 1000) {
                pair(self, i);
            }
            self.out.push(b'u');
        }
    }
}

const MD: &str = "torch.distributed.checkpoint.metadata";

/// Writes a checkpoint of `tensors` tensors of `chunks` chunks each into `dir`: storage entry `i`
/// (chunk `c` of tensor `t` is entry `t * chunks + c`) is in file `i % FILES`, as FSDP's ranks
/// write them when `chunks` is `FILES`.
fn write_checkpoint(dir: &Path, tensors: usize, chunks: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let fqn = |t: usize| format!("model.layers.{}.block.{}.weight", t / 8, t % 8);
    let mut p = Pickler::new();
    p.object(MD, "Metadata", |p| {
        p.key("state_dict_metadata");
        p.dict(tensors, |p, t| {
            p.str(&fqn(t));
            p.object(MD, "TensorStorageMetadata", |p| {
                p.key("properties");
                p.global(MD, "TensorProperties");
                p.out.extend([b')', 0x81]); // EMPTY_TUPLE NEWOBJ
                p.put();
                // __setstate__'s (dtype, layout, requires_grad, memory_format, pin_memory)
                p.out.push(b'(');
                p.global("torch", "float32");
                p.out.extend([b'N', 0x89, b'N', 0x89, b't']); // None False None False TUPLE
                p.put();
                p.out.push(b'b'); // BUILD
                p.key("size");
                p.size(&[chunks as u64, 4]);
                p.key("chunks");
                p.out.push(b']');
                p.put();
                p.out.push(b'(');
                for c in 0..chunks {
                    p.object(MD, "ChunkStorageMetadata", |p| {
                        p.key("offsets");
                        p.size(&[c as u64, 0]);
                        p.key("sizes");
                        p.size(&[1, 4]);
                    });
                }
                p.out.push(b'e'); // APPENDS
            });
        });
        p.key("planner_data");
        p.out.push(b'N');
        p.key("storage_data");
        p.dict(tensors * chunks, |p, i| {
            let (t, c) = (i / chunks, i % chunks);
            p.object(MD, "MetadataIndex", |p| {
                p.key("fqn");
                p.str(&fqn(t));
                p.key("offset");
                p.size(&[c as u64, 0]);
                p.key("index");
                p.out.push(b'N');
            });
            p.object(
                "torch.distributed.checkpoint.filesystem",
                "_StorageInfo",
                |p| {
                    p.key("relative_path");
                    p.str(&format!("__{}_0.distcp", i % FILES));
                    p.key("offset");
                    p.int((i / FILES) as u64 * STRIDE);
                    p.key("length");
                    p.int(ITEM);
                },
            );
        });
    });
    p.out.push(b'.');
    std::fs::write(dir.join(".metadata"), &p.out).unwrap();
    for f in 0..FILES {
        let file = std::fs::File::create(dir.join(format!("__{f}_0.distcp"))).unwrap();
        file.set_len((tensors * chunks).div_ceil(FILES) as u64 * STRIDE)
            .unwrap();
    }
}

/// User CPU seconds of one run of dcpfetch, its output thrown away: read from `/proc/PID/stat`
/// once the process has exited and before it is reaped (`utime`, in clock ticks of 1/100 s). The
/// system's time is left out: it is mostly the kernel zeroing fresh pages, which varies from run
/// to run with what else the machine does.
fn cpu_seconds(args: &[&str]) -> f64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dcpfetch"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stat = format!("/proc/{}/stat", child.id());
    let ticks = loop {
        let text = std::fs::read_to_string(&stat).unwrap();
        // The fields after the command name (in parentheses, which may hold spaces).
        let fields: Vec<&str> = text[text.rfind(')').unwrap() + 2..].split(' ').collect();
        if fields[0] == "Z" {
            break fields[11].parse::<u64>().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let status = child.wait().unwrap();
    assert!(status.success(), "dcpfetch {args:?}: {status}");
    ticks as f64 / 100.0
}

#[test]
fn every_command_is_linear_in_storage_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    let large = tmp.path().join("large");
    write_checkpoint(&small, SMALL, 1);
    write_checkpoint(&large, 4 * SMALL, 1);
    let first = "model.layers.0.block.0.weight";
    let commands: [&[&str]; 7] = [
        &["ls", "--json"],
        &["ls"],
        &["plan", "--select", first],
        &["plan", "--json", "--groups", "--max-gap-size", "0"],
        &["verify", "--quick", "-q"],
        &["fetch", "-q", "-o", "-"],
        &["fetch", "-q", "-o", "-", "--format", "tar"],
    ];
    let mut report = Vec::new();
    let mut failed = false;
    for command in commands {
        let per_entry = |dir: &Path, entries: usize| {
            let mut args = command.to_vec();
            args.insert(1, dir.to_str().unwrap());
            let least = (0..2).map(|_| cpu_seconds(&args)).fold(f64::MAX, f64::min);
            least / entries as f64
        };
        let a = per_entry(&small, SMALL);
        let b = per_entry(&large, 4 * SMALL);
        let ratio = b / a;
        failed |= ratio > BOUND;
        report.push(format!(
            "{command:?}: {:.2} us/entry at {SMALL}, {:.2} at {}: {ratio:.2}x",
            a * 1e6,
            b * 1e6,
            4 * SMALL
        ));
    }
    assert!(
        !failed,
        "the CPU time per storage entry grew more than {BOUND}x:\n{}",
        report.join("\n")
    );
    eprintln!("{}", report.join("\n"));
}

/// The generated checkpoint reads as what it was written to be, so that the test above measures
/// the commands on a whole checkpoint, not on an error path.
#[test]
fn the_generated_checkpoint_is_whole() {
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(tmp.path(), 3, FILES);
    let out = Command::new(env!("CARGO_BIN_EXE_dcpfetch"))
        .args(["ls", tmp.path().to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let totals = &doc["totals"];
    assert_eq!(totals["entries"], 3);
    assert_eq!(totals["storage_entries"], 3 * FILES);
    assert_eq!(totals["files"], FILES);
    assert_eq!(doc["warnings"], serde_json::json!([]));
    let e = &doc["entries"][1];
    assert_eq!(e["fqn"], "model.layers.0.block.1.weight");
    assert_eq!(e["dtype"], "float32");
    assert_eq!(e["shape"], serde_json::json!([FILES, 4]));
    assert_eq!(e["chunks"][3]["offsets"], serde_json::json!([3, 0]));
    assert_eq!(e["chunks"][3]["file"], "__3_0.distcp");
    assert_eq!(e["chunks"][3]["offset"], STRIDE);
    assert_eq!(e["chunks"][3]["length"], ITEM);
    let verify = Command::new(env!("CARGO_BIN_EXE_dcpfetch"))
        .args(["verify", tmp.path().to_str().unwrap(), "--quick"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
