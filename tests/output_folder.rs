//! The output folder is hostile ground: links, hard links, FIFOs, planted temporaries, damaged or
//! huge journals, a second dcpfetch, the checkpoint's own folder, and changes made while a fetch
//! runs. Each case is refused with a message naming the file, or fetched again, and nothing
//! outside the output folder changes (docs/reliability.md, "The output folder").

mod common;
#[path = "support/s3_server.rs"]
mod s3_server;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::{copy_fixture, dcpfetch, fixture, read, snapshot};
use s3_server::{Fault, FaultRule, ServerConfig, TestServer};
use serde_json::Value;

const LAYER0: [&str; 2] = ["--select", "model.layers.0.*"];

fn fetch(src: &Path, out: &Path, extra: &[&str]) -> Output {
    dcpfetch()
        .arg("fetch")
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(["--json", "--quiet"])
        .args(extra)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap()
}

/// `fetch --resume` of `model` into `out` without --quiet, so that its warnings show.
fn resume_loud(out: &Path) -> Output {
    dcpfetch()
        .arg("fetch")
        .arg(fixture("model"))
        .arg("-o")
        .arg(out)
        .args(["--json", "--resume", "--no-progress"])
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap()
}

fn ok(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A refusal: a non-zero exit and a message holding every one of `words`.
fn refused(out: &Output, words: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    for w in words {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
}

/// A fetch into `out` that finished complete: the shard files and `.metadata` equal the source.
fn assert_whole_copy(src: &Path, out: &Path) {
    for f in [".metadata", "__0_0.distcp", "__0_1.distcp"] {
        assert!(read(&src.join(f)) == read(&out.join(f)), "{f} differs");
    }
}

/// A place outside the output folder, with a file whose bytes must never change.
struct Victim {
    _dir: tempfile::TempDir,
    file: PathBuf,
}

fn victim() -> Victim {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious");
    std::fs::write(&file, b"not dcpfetch's to touch").unwrap();
    Victim { _dir: dir, file }
}

impl Victim {
    fn untouched(&self) {
        assert_eq!(read(&self.file), b"not dcpfetch's to touch");
    }
}

fn out_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("copy");
    (d, p)
}

/// A layer-0 fetch of `model` into a fresh folder: an earlier fetch to resume or force over.
fn partial() -> (tempfile::TempDir, PathBuf) {
    let (d, out) = out_dir();
    ok(&fetch(&fixture("model"), &out, &LAYER0));
    (d, out)
}

#[test]
fn a_symlinked_output_folder_is_refused() {
    let target = tempfile::tempdir().unwrap();
    std::fs::write(target.path().join("mine.txt"), "mine").unwrap();
    let before = snapshot(target.path());
    let d = tempfile::tempdir().unwrap();
    let link = d.path().join("link");
    symlink(target.path(), &link).unwrap();
    let with_slash = format!("{}/", link.display());
    for out in [link.display().to_string(), with_slash] {
        for extra in [&[][..], &["--force"], &["--resume"]] {
            let res = fetch(&fixture("model"), Path::new(&out), extra);
            refused(&res, &["link", "symbolic link"]);
        }
    }
    assert_eq!(snapshot(target.path()), before);
}

#[test]
fn a_symlinked_shard_file_is_refused() {
    let v = victim();
    // In a folder of an earlier fetch (resumed or forced over), and in a fresh folder (forced).
    let (_d, out) = partial();
    let shard = out.join("__0_0.distcp");
    std::fs::remove_file(&shard).unwrap();
    symlink(&v.file, &shard).unwrap();
    for extra in [&["--resume"][..], &["--force"]] {
        refused(
            &fetch(&fixture("model"), &out, extra),
            &["__0_0.distcp", "symbolic link"],
        );
    }
    let (_d2, fresh) = out_dir();
    std::fs::create_dir(&fresh).unwrap();
    symlink(&v.file, fresh.join("__0_1.distcp")).unwrap();
    refused(
        &fetch(&fixture("model"), &fresh, &["--force"]),
        &["__0_1.distcp", "symbolic link"],
    );
    v.untouched();
    assert!(!out.join(".metadata").exists() && !fresh.join(".metadata").exists());
}

#[test]
fn a_hard_linked_shard_file_is_refused() {
    let v = victim();
    let (_d, out) = partial();
    let shard = out.join("__0_1.distcp");
    std::fs::remove_file(&shard).unwrap();
    std::fs::hard_link(&v.file, &shard).unwrap();
    for extra in [&["--resume"][..], &["--force"]] {
        refused(
            &fetch(&fixture("model"), &out, extra),
            &["__0_1.distcp", "2 hard links"],
        );
    }
    v.untouched();
}

#[test]
fn a_symlinked_state_folder_or_journal_is_refused() {
    // `.dcpfetch/` a link to a folder outside.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("journal.jsonl"), "theirs").unwrap();
    let before = snapshot(elsewhere.path());
    let (_d, out) = partial();
    std::fs::remove_dir_all(out.join(".dcpfetch")).unwrap();
    symlink(elsewhere.path(), out.join(".dcpfetch")).unwrap();
    for extra in [&[][..], &["--resume"], &["--force"]] {
        refused(
            &fetch(&fixture("model"), &out, extra),
            &[".dcpfetch", "symbolic link"],
        );
    }
    assert_eq!(snapshot(elsewhere.path()), before);

    // The journal a link to a file outside.
    let v = victim();
    let (_d, out) = partial();
    let journal = out.join(".dcpfetch/journal.jsonl");
    std::fs::remove_file(&journal).unwrap();
    symlink(&v.file, &journal).unwrap();
    for extra in [&[][..], &["--resume"], &["--force"]] {
        refused(
            &fetch(&fixture("model"), &out, extra),
            &["journal.jsonl", "symbolic link"],
        );
    }
    v.untouched();
}

#[test]
fn planted_temporaries_are_removed_not_followed() {
    let v = victim();
    let (_d, out) = partial();
    for tmp in [".metadata.tmp", "journal.jsonl.tmp", "blocker.tmp"] {
        symlink(&v.file, out.join(".dcpfetch").join(tmp)).unwrap();
    }
    ok(&fetch(&fixture("model"), &out, &["--resume"]));
    v.untouched();
    assert_whole_copy(&fixture("model"), &out);
    let meta = std::fs::symlink_metadata(out.join(".metadata")).unwrap();
    assert!(meta.file_type().is_file());
}

#[test]
fn a_fifo_socket_or_device_where_a_file_is_expected_is_refused_without_blocking() {
    use rustix::fs::{CWD, FileType, Mode, mknodat};
    let mode = Mode::from_bits_truncate(0o666);
    // (name planted, how, what the message calls it)
    let cases: [(&str, &str, &str); 4] = [
        ("__0_0.distcp", "fifo", "a FIFO"),
        (".dcpfetch/journal.jsonl", "fifo", "a FIFO"),
        ("__0_1.distcp", "socket", "a socket"),
        ("__0_1.distcp", "device", "a character device"),
    ];
    for (name, how, kind) in cases {
        let (_d, out) = partial();
        let path = out.join(name);
        std::fs::remove_file(&path).unwrap();
        let _listener;
        match how {
            "fifo" => mknodat(CWD, &path, FileType::Fifo, mode, 0).unwrap(),
            "socket" => _listener = std::os::unix::net::UnixListener::bind(&path).unwrap(),
            _ => {
                // /dev/null's numbers; making a device needs CAP_MKNOD.
                if mknodat(
                    CWD,
                    &path,
                    FileType::CharacterDevice,
                    mode,
                    rustix::fs::makedev(1, 3),
                )
                .is_err()
                {
                    eprintln!("skipping the device case: mknod is not allowed here");
                    continue;
                }
            }
        }
        for extra in [&["--resume"][..], &["--force"]] {
            let started = Instant::now();
            refused(&fetch(&fixture("model"), &out, extra), &[name, kind]);
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{name} blocked"
            );
        }
    }
}

/// The items of a journal: (file, start, end), skipping the header.
fn journal_items(out: &Path) -> Vec<(String, u64, u64)> {
    let text = std::fs::read_to_string(out.join(".dcpfetch/journal.jsonl")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let v: Value = serde_json::from_str(&l[9..]).unwrap();
            (
                v["file"].as_str().unwrap().to_owned(),
                v["start"].as_u64().unwrap(),
                v["end"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn resume_fetches_again_an_item_whose_bytes_changed() {
    let (_d, out) = partial();
    let items = journal_items(&out);
    assert_eq!(items.len(), 6);
    let (file, start, end) = &items[2];
    let path = out.join(file);
    let mut data = read(&path);
    let at = (*start + (end - start) / 2) as usize;
    data[at] ^= 0xff;
    std::fs::write(&path, &data).unwrap();
    let run = resume_loud(&out);
    let s = ok(&run);
    assert_eq!(s["items_already_present"], 5, "{s:#}");
    assert_eq!(s["items"], 115);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("1 item recorded in the journal changed on disk since"),
        "{err}"
    );
    assert_whole_copy(&fixture("model"), &out);
}

#[test]
fn a_damaged_journal_vouches_only_for_what_it_can_prove() {
    // (what is done to the journal, items still trusted of 6, the warning)
    type Damage = fn(&str) -> String;
    let cases: [(&str, Damage, u64, &str); 4] = [
        (
            "a flipped digit in an offset",
            |t| {
                let mut lines: Vec<String> = t.lines().map(str::to_owned).collect();
                let line = &mut lines[3];
                let at = line.find("\"start\":").unwrap() + 8;
                let digit = line.as_bytes()[at];
                let flipped = if digit == b'9' {
                    '8'
                } else {
                    (digit + 1) as char
                };
                line.replace_range(at..at + 1, &flipped.to_string());
                lines.join("\n") + "\n"
            },
            5,
            "1 line of the earlier fetch's journal could not be read",
        ),
        (
            "a cut last line",
            |t| t[..t.len() - 7].to_owned(),
            5,
            "1 line of the earlier fetch's journal could not be read",
        ),
        (
            "a damaged header",
            |t| t.replacen("size", "sise", 1),
            0,
            "journal is damaged (its header is damaged): every item is fetched again",
        ),
        (
            "an empty journal",
            |_| String::new(),
            0,
            "journal is damaged",
        ),
    ];
    for (what, damage, trusted, warning) in cases {
        let (_d, out) = partial();
        let journal = out.join(".dcpfetch/journal.jsonl");
        let text = std::fs::read_to_string(&journal).unwrap();
        std::fs::write(&journal, damage(&text)).unwrap();
        // Without --resume or --force, a folder with a journal is still an earlier fetch.
        refused(&fetch(&fixture("model"), &out, &[]), &["--resume"]);
        let run = resume_loud(&out);
        let s = ok(&run);
        assert_eq!(s["items_already_present"], trusted, "{what}");
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains(warning), "{what}: {err}");
        assert_whole_copy(&fixture("model"), &out);
    }
}

#[test]
fn a_huge_journal_is_not_read_and_means_fetch_again() {
    let (_d, out) = partial();
    let journal = out.join(".dcpfetch/journal.jsonl");
    // 8 GiB, sparse: reading it into memory would take the machine down.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let started = Instant::now();
    let s = ok(&fetch(&fixture("model"), &out, &["--resume"]));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(s["items_already_present"], 0);
    assert_eq!(s["items"], 120);
    assert_whole_copy(&fixture("model"), &out);
    assert!(std::fs::metadata(&journal).unwrap().len() < 1 << 20);
}

#[test]
fn resume_fetches_again_the_items_of_a_missing_or_resized_shard() {
    let (_d, out) = partial();
    let by_file = |f: &str| journal_items(&out).iter().filter(|i| i.0 == f).count() as u64;
    let (on0, on1) = (by_file("__0_0.distcp"), by_file("__0_1.distcp"));
    assert_eq!(on0 + on1, 6);
    std::fs::remove_file(out.join("__0_0.distcp")).unwrap();
    let s = ok(&fetch(&fixture("model"), &out, &["--resume"]));
    assert_eq!(s["items_already_present"], on1);
    assert_whole_copy(&fixture("model"), &out);

    let (_d, out) = partial();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(out.join("__0_1.distcp"))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() + 1).unwrap();
    let s = ok(&fetch(&fixture("model"), &out, &["--resume"]));
    assert_eq!(s["items_already_present"], on0);
    assert_whole_copy(&fixture("model"), &out);
}

#[test]
fn a_changed_source_is_refused_naming_the_file() {
    let src = copy_fixture("model");
    let (_d, out) = out_dir();
    ok(&fetch(src.path(), &out, &LAYER0));
    let shard = src.path().join("__0_1.distcp");
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
    refused(
        &fetch(src.path(), &out, &["--resume"]),
        &["another version", "__0_1.distcp", "--force"],
    );
    ok(&fetch(src.path(), &out, &["--resume", "--force"]));
    assert_whole_copy(src.path(), &out);
}

#[test]
fn the_checkpoint_folder_is_never_the_output() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("ckpt");
    std::fs::create_dir(&src).unwrap();
    for f in std::fs::read_dir(fixture("model")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), src.join(f.file_name())).unwrap();
    }
    symlink(&src, base.path().join("alias")).unwrap();
    let before = snapshot(base.path());
    let b = base.path();
    let cases: [(PathBuf, &str); 7] = [
        (src.clone(), "is the folder of"),
        (
            PathBuf::from(format!("{}/", src.display())),
            "is the folder of",
        ),
        (src.join("sub"), "inside"),
        (src.join("a/b"), "inside"),
        (b.to_path_buf(), "contains"),
        (b.join("alias"), "is the folder of"),
        (b.join("alias/sub"), "inside"),
    ];
    for (out, why) in &cases {
        for extra in [&[][..], &["--force"], &["--resume"]] {
            refused(&fetch(&src, out, extra), &[why]);
        }
    }
    // Through `..` and through a link, as the source.
    let dotdot = src.join("..").join("ckpt");
    refused(&fetch(&dotdot, &src, &["--force"]), &["is the folder of"]);
    refused(
        &fetch(&b.join("alias"), &src, &["--force"]),
        &["is the folder of"],
    );
    refused(
        &fetch(&src, &b.join("alias/../ckpt"), &["--force"]),
        &["is the folder of"],
    );
    assert_eq!(snapshot(base.path()), before);
}

/// A fixture served at `s3://ckpt/NAME` with `ms` of latency on every shard-file GET, so that a
/// fetch lasts long enough for something to happen to its folder.
struct Slow {
    _root: tempfile::TempDir,
    server: TestServer,
    name: &'static str,
}

fn slow(name: &'static str, ms: u64) -> Slow {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let server = TestServer::start(ServerConfig::new(root.path())).unwrap();
    server.add_fault(
        FaultRule::new(Fault::Latency(Duration::from_millis(ms)))
            .on_key(".distcp")
            .on_method("GET")
            .always(),
    );
    Slow {
        _root: root,
        server,
        name,
    }
}

impl Slow {
    fn args(&self, out: &Path) -> Vec<String> {
        vec![
            "fetch".into(),
            format!("s3://ckpt/{}", self.name),
            "--endpoint-url".into(),
            self.server.endpoint(),
            "--path-style".into(),
            "-o".into(),
            out.display().to_string(),
            "--quiet".into(),
            "--concurrency".into(),
            "1".into(),
            "--part-size".into(),
            "2KiB".into(),
            "--max-gap-size".into(),
            "0".into(),
        ]
    }

    /// Starts a fetch into `out` and waits until it has prepared the folder.
    fn start(&self, out: &Path) -> Child {
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("dcpfetch"))
            .args(self.args(out))
            .envs([
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The journal is written before the shard files are created, the last one last.
        let last = std::fs::read_dir(fixture(self.name))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".distcp"))
            .max()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !out.join(".dcpfetch/journal.jsonl").exists() || !out.join(&last).exists() {
            assert!(Instant::now() < deadline, "the fetch did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }
}

#[test]
fn a_folder_in_use_is_refused_naming_the_other_pid() {
    let s = slow("model", 100);
    let (_d, out) = out_dir();
    let child = s.start(&out);
    let pid = child.id().to_string();
    for extra in [&[][..], &["--resume"], &["--force"]] {
        let res = dcpfetch()
            .args(s.args(&out))
            .args(extra)
            .timeout(Duration::from_secs(10))
            .output()
            .unwrap();
        refused(
            &res,
            &["is in use by another dcpfetch", &format!("(pid {pid})")],
        );
    }
    let res = child.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_whole_copy(&fixture("model"), &out);
}

#[test]
fn a_failure_between_metadata_renames_leaves_no_complete_checkpoint() {
    let s = slow("per_rank", 300);
    let (_d, out) = out_dir();
    let child = s.start(&out);
    // A folder where rank 1's metadata file goes: its rename fails after rank 0's succeeded.
    std::fs::create_dir_all(out.join("__1.metadata/keep")).unwrap();
    let res = child.wait_with_output().unwrap();
    refused(&res, &["__1.metadata"]);
    assert!(
        out.join("__0.metadata").exists(),
        "rank 0 was renamed first"
    );
    let ls = dcpfetch().arg("ls").arg(&out).output().unwrap();
    assert!(
        !ls.status.success(),
        "the folder reads as a checkpoint: {}",
        String::from_utf8_lossy(&ls.stdout)
    );
    // Once the obstacle is gone, --resume completes it.
    std::fs::remove_dir_all(out.join("__1.metadata")).unwrap();
    s.server.clear_faults();
    let res = dcpfetch()
        .args(s.args(&out))
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(!out.join(".metadata").exists());
    for f in [
        "__0.metadata",
        "__1.metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ] {
        assert!(
            read(&fixture("per_rank").join(f)) == read(&out.join(f)),
            "{f}"
        );
    }
    let ls = dcpfetch().arg("ls").arg(&out).output().unwrap();
    assert!(ls.status.success());
}

#[test]
fn a_shard_file_linked_or_replaced_under_the_fetch_fails() {
    type Change = fn(&Path, &Path);
    let cases: [(&str, Change); 2] = [
        ("hard links", |out, outside| {
            std::fs::hard_link(out.join("__0_0.distcp"), outside.join("stolen")).unwrap()
        }),
        ("was moved or replaced", |out, _| {
            let shard = out.join("__0_1.distcp");
            std::fs::remove_file(&shard).unwrap();
            std::fs::write(&shard, b"").unwrap();
        }),
    ];
    for (why, change) in cases {
        let s = slow("model", 100);
        let (d, out) = out_dir();
        let child = s.start(&out);
        change(&out, d.path());
        let res = child.wait_with_output().unwrap();
        refused(&res, &[why]);
        assert!(!out.join(".metadata").exists());
    }
}

#[test]
fn an_output_folder_moved_under_the_fetch_fails() {
    let s = slow("model", 100);
    let (d, out) = out_dir();
    let child = s.start(&out);
    let moved = d.path().join("moved");
    std::fs::rename(&out, &moved).unwrap();
    std::fs::create_dir(&out).unwrap();
    let res = child.wait_with_output().unwrap();
    refused(
        &res,
        &["was moved or replaced while dcpfetch wrote into it"],
    );
    assert!(!out.join(".metadata").exists() && !moved.join(".metadata").exists());
}

/// Another checkpoint's per-rank metadata left in the folder (a fetch of it, then one of this
/// checkpoint with --force) is removed: a reader would merge it with this checkpoint's.
#[test]
fn stale_rank_metadata_of_another_checkpoint_is_removed() {
    let (_d, out) = out_dir();
    ok(&fetch(&fixture("per_rank"), &out, &[]));
    // A third rank's metadata, as a checkpoint with more ranks would have left.
    std::fs::copy(out.join("__1.metadata"), out.join("__7.metadata")).unwrap();
    std::fs::write(out.join("__notarank.metadata"), b"kept").unwrap();
    ok(&fetch(&fixture("per_rank"), &out, &["--force"]));
    assert!(!out.join("__7.metadata").exists());
    assert!(out.join("__0.metadata").exists() && out.join("__1.metadata").exists());
    assert_eq!(read(&out.join("__notarank.metadata")), b"kept");
    // And into a folder fetched from a per-rank checkpoint, a checkpoint with one .metadata.
    ok(&fetch(&fixture("model"), &out, &["--force"]));
    assert!(!out.join("__0.metadata").exists() && !out.join("__1.metadata").exists());
    assert_eq!(
        read(&out.join(".metadata")),
        read(&fixture("model").join(".metadata"))
    );
}
