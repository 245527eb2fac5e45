//! The command line itself: help text kept in golden files (docs/help/), completions, usage
//! errors. Regenerate the golden files with `DCPFETCH_BLESS=1 cargo test --test cli`.

mod common;

use common::{dcpfetch, repo};

const COMMANDS: [&str; 7] = ["", "ls", "plan", "fetch", "export", "verify", "bench"];

#[test]
fn help_matches_the_golden_files() {
    let bless = std::env::var_os("DCPFETCH_BLESS").is_some();
    for cmd in COMMANDS {
        let mut c = dcpfetch();
        if !cmd.is_empty() {
            c.arg(cmd);
        }
        let out = c.arg("--help").env_remove("COLUMNS").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let name = if cmd.is_empty() { "dcpfetch" } else { cmd };
        let path = repo().join("docs/help").join(format!("{name}.txt"));
        if bless {
            std::fs::write(&path, &text).unwrap();
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            text, golden,
            "`dcpfetch {cmd} --help` changed: run DCPFETCH_BLESS=1 cargo test --test cli and review"
        );
    }
}

#[test]
fn completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = dcpfetch().args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("dcpfetch") && text.contains("verify"),
            "{shell}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let cases: &[&[&str]] = &[
        &["fetch", "fixtures/model"],
        &["ls"],
        &["plan", "fixtures/model", "--max-gap-size", "12XB"],
        &["ls", "gs://bucket/x"],
        &["fetch", "fixtures/model", "-o", "x", "--concurrency", "0"],
        &["fetch", "fixtures/model", "-o", "x", "--part-size", "0"],
        &[
            "verify",
            "fixtures/model",
            "--part-size",
            "9MiB",
            "--max-memory",
            "8MiB",
        ],
        &["bench", "fixtures/model", "--concurrency", "8,0"],
        &["plan", "fixtures/model", "--part-size", "0"],
    ];
    for args in cases {
        let out = dcpfetch().current_dir(repo()).args(*args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("error"), "{args:?}: {err}");
    }
    let out = dcpfetch()
        .current_dir(repo())
        .args(["fetch", "fixtures/model", "-o", "d", "--manifest", "m.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-o -"));
}

/// Settings that cannot run are refused before the output folder is touched: a complete copy keeps
/// its metadata and its shard files.
#[test]
fn invalid_settings_leave_the_output_folder_alone() {
    let copy = common::copy_fixture("model");
    let before: Vec<(String, Vec<u8>)> = files_of(copy.path());
    let invalid: &[&[&str]] = &[
        &["--part-size", "64MiB", "--max-memory", "32MiB"],
        &["--part-size", "0"],
        &["--max-memory", "0"],
    ];
    for flags in invalid {
        for mode in ["--force", "--resume"] {
            let out = dcpfetch()
                .current_dir(repo())
                .args(["fetch", "fixtures/model", "-o"])
                .arg(copy.path())
                .arg(mode)
                .args(*flags)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{flags:?} {mode}");
            assert_eq!(files_of(copy.path()), before, "{flags:?} {mode}");
        }
    }
}

fn files_of(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// A closed stdout (`dcpfetch ... | true`, `dcpfetch ... | head -c 1`) ends every command that
/// writes to stdout quietly, with exit 0.
#[test]
fn a_closed_stdout_is_success() {
    let cases: &[&[&str]] = &[
        &["completions", "bash"],
        &["completions", "zsh"],
        &["completions", "fish"],
        &["ls", "fixtures/model"],
        &["ls", "fixtures/model", "--json"],
        &["plan", "fixtures/model", "--json"],
        &["plan", "fixtures/model", "--groups"],
        &["verify", "fixtures/model", "--json"],
        &["fetch", "fixtures/model", "-o", "-"],
        &["fetch", "fixtures/model", "-o", "-", "--format", "tar"],
    ];
    for args in cases {
        // 0: the reader is gone before the first write (`| true`); 1: after one byte (`| head -c 1`).
        for read_first in [0usize, 1] {
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dcpfetch"))
                .current_dir(repo())
                .args(*args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let mut first = vec![0u8; read_first];
            std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
            drop(stdout);
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{args:?} after {read_first}: {err}"
            );
            assert!(
                !err.contains("panicked") && !err.contains("error"),
                "{args:?} after {read_first}: {err}"
            );
        }
    }
}

/// `--no-progress` drops only the bar (the summary line stays), `--quiet` drops everything, and
/// `--include` selects as `--select` does.
#[test]
fn no_progress_keeps_the_summary() {
    let mut lines = Vec::new();
    for flag in ["--no-progress", "--quiet"] {
        let out_dir = tempfile::tempdir().unwrap();
        let out = dcpfetch()
            .current_dir(repo())
            .args([
                "fetch",
                "fixtures/model",
                "--include",
                "model.layers.0.*",
                "-o",
            ])
            .arg(out_dir.path().join("copy"))
            .arg(flag)
            .output()
            .unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{flag}: {err}");
        lines.push(err);
    }
    assert!(
        lines[0].starts_with("fetched 6 items"),
        "--no-progress: {}",
        lines[0]
    );
    assert_eq!(lines[1], "", "--quiet");
}

/// `fetch --dry-run` (and `--dryrun`) fetches nothing and points at `dcpfetch plan`.
#[test]
fn dry_run_points_at_plan() {
    for flag in ["--dry-run", "--dryrun"] {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("copy");
        let out = dcpfetch()
            .current_dir(repo())
            .args(["fetch", "fixtures/model", "-x", "optim.*", "-o"])
            .arg(&target)
            .arg(flag)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains("`dcpfetch plan fixtures/model`"),
            "{flag}: {err}"
        );
        assert!(!target.exists(), "{flag}");
    }
}

/// `-v` (before or after the command) changes nothing on stdout and adds only request lines
/// (target `dcpfetch::requests`) to stderr, never the AWS SDK's own events; without it stderr
/// stays empty.
#[test]
fn verbose_logs_only_requests() {
    let s3 = common::Backend::S3;
    let mut s3_ls = vec!["ls".to_owned(), s3.location("model")];
    s3_ls.extend(s3.args());
    let cases: Vec<Vec<String>> = [
        &["ls", "fixtures/model"][..],
        &["plan", "fixtures/model", "--json"],
        &["fetch", "fixtures/model", "-s", "model.embed.*", "-o", "-"],
    ]
    .iter()
    .map(|a| a.iter().map(|s| s.to_string()).collect())
    .chain([s3_ls])
    .collect();
    for args in cases {
        let quiet = dcpfetch().current_dir(repo()).args(&args).output().unwrap();
        assert!(quiet.status.success(), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&quiet.stderr), "", "{args:?}");
        for verbose in [&["-v"][..], &["--verbose"]] {
            for before in [true, false] {
                let mut c = dcpfetch();
                c.current_dir(repo());
                if before {
                    c.args(verbose).args(&args);
                } else {
                    c.args(&args).args(verbose);
                }
                let out = c.output().unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "{args:?} {verbose:?}: {err}");
                assert_eq!(out.stdout, quiet.stdout, "{args:?} {verbose:?}");
                for line in err.lines() {
                    assert!(line.contains("dcpfetch::requests"), "{args:?}: {line}");
                }
            }
        }
    }
}

/// Every example at the end of a help text that reads a bundled fixture runs and succeeds (the
/// part before a `|`, from a scratch folder, with `fixtures/` pointing at the repository's).
#[test]
fn help_examples_run() {
    let mut ran = 0;
    for cmd in COMMANDS {
        let mut c = dcpfetch();
        if !cmd.is_empty() {
            c.arg(cmd);
        }
        let help = String::from_utf8(c.arg("--help").output().unwrap().stdout).unwrap();
        let (_, examples) = help
            .split_once("\nExamples:\n")
            .unwrap_or_else(|| panic!("`dcpfetch {cmd} --help` has no examples"));
        let commands: Vec<&str> = examples
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("dcpfetch "))
            .collect();
        assert!(commands.len() >= 2, "{cmd}: {examples}");
        for line in commands {
            let line = line.split('|').next().unwrap();
            if !line.contains(" fixtures/") {
                continue;
            }
            let scratch = tempfile::tempdir().unwrap();
            let args: Vec<String> = line
                .split_whitespace()
                .skip(1)
                .map(|a| {
                    let a = a.trim_matches('\'');
                    match a.strip_prefix("fixtures/") {
                        Some(name) => common::fixture(name).display().to_string(),
                        None => a.to_owned(),
                    }
                })
                .collect();
            let out = dcpfetch()
                .current_dir(scratch.path())
                .args(&args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{line}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 8, "{ran} examples ran");
}

/// Run by `a_missing_moto_is_named` in a child process (and a no-op otherwise): starts the S3
/// suites' moto server.
#[test]
fn moto_probe() {
    if std::env::var_os("DCPFETCH_TEST_MOTO_PROBE").is_some() {
        common::moto();
    }
}

/// An S3 suite without moto_server on PATH fails at once, saying how to install it.
#[test]
fn a_missing_moto_is_named() {
    let empty = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "moto_probe",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("DCPFETCH_TEST_MOTO_PROBE", "1")
        .env("PATH", empty.path())
        .env_remove("DCPFETCH_TEST_S3_ENDPOINT")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for needle in [
        "moto_server not found / did not start",
        "python3 -m venv .venv && .venv/bin/pip install 'moto[server]'",
        "pipx install 'moto[server]'",
        "put it on PATH",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
