//! `dcpfetch verify`: integrity checks for CI, each reported by name and, on failure, per item.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cli::VerifyArgs;
use crate::fetch::{self, Cancel, EngineOptions, Progress};
use crate::metadata::Checkpoint;
use crate::plan::{FilePlan, Plan, PlanItem, describe_storage};
use crate::report::Outcome;
use crate::sink::{VerifyResults, VerifySink};
use crate::source::{ObjectMeta, ObjectName, Source, SourceError};
use crate::units::count;
use crate::verify::{self, CheckResult, Checks, Finding, Status, safetensors};

/// The `--json` document (docs/output.md).
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub checkpoint: String,
    /// Every check passed or was skipped.
    pub ok: bool,
    pub checks: Vec<CheckResult>,
    pub elapsed_seconds: f64,
}

/// The manifest layout Megatron-Core writes as `integrity.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    algorithm: String,
    files: BTreeMap<String, String>,
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let spec = args.selection.spec()?;
    let everything = spec.selects_all() && spec.exclude.is_empty();
    let (source, ck) = super::open(&args.checkpoint, &args.s3).await?;
    let (selected, _) = spec.resolve(&ck)?;
    let ck = Arc::new(ck);
    let mut checks = Checks::new();

    verify::check_globals(&ck, &mut checks);
    let storage = verify::selected_storage(&ck, &selected, everything);
    let storage = verify::check_paths(&ck, &storage, &mut checks);
    verify::check_chunks(&ck, &selected, everything, &mut checks);

    // The files: the selected items' files, or (with a manifest) every shard file.
    let mut names: BTreeSet<String> = storage
        .iter()
        .map(|&s| ck.storage[s].info.relative_path.clone())
        .collect();
    if args.manifest.is_some() {
        names.extend(
            ck.files()
                .into_iter()
                .filter(|n| ObjectName::new(n).is_ok())
                .map(str::to_owned),
        );
    }
    let objects = stat_files(&source, &names).await?;
    let missing: Vec<Finding> = names
        .iter()
        .filter(|n| !objects.contains_key(n.as_str()))
        .map(|n| Finding {
            file: Some(n.clone()),
            ..Finding::new(format!("{n} does not exist in {}", source.describe()))
        })
        .collect();
    checks.record("storage.files_exist", names.len() as u64, missing);

    let mut in_bounds = Vec::new();
    let mut out_of_bounds = Vec::new();
    for &s in &storage {
        let info = &ck.storage[s].info;
        let Some(meta) = objects.get(info.relative_path.as_str()) else {
            continue;
        };
        match info.offset.checked_add(info.length) {
            Some(end) if end <= meta.size => in_bounds.push(s),
            Some(end) => out_of_bounds.push(Finding::item(
                &ck,
                s,
                format!("bytes {}..{end} are past the end of the file ({} bytes): the shard is truncated", info.offset, meta.size),
            )),
            None => out_of_bounds.push(Finding::item(&ck, s, "offset + length overflows a 64-bit integer")),
        }
    }
    checks.record("storage.in_bounds", storage.len() as u64, out_of_bounds);
    let overlapping = verify::check_overlaps(&ck, &in_bounds, &mut checks);

    let raw_files = check_format(&source, &ck, &objects, &mut checks).await?;

    if args.quick {
        for name in ["items.archive", "items.transform", "items.tensor"] {
            checks.get(name).notes.push("not run: --quick".into());
        }
    } else {
        let deep: Vec<usize> = in_bounds
            .iter()
            .copied()
            .filter(|s| overlapping.binary_search(s).is_err())
            .filter(|&s| {
                !(raw_files.contains(ck.storage[s].info.relative_path.as_str())
                    && is_raw_tensor(&ck, s))
            })
            .collect();
        let results = check_bytes(
            &source,
            &ck,
            &deep,
            &objects,
            args.manifest.is_some(),
            &args,
        )
        .await?;
        record_byte_checks(&ck, &results, &mut checks);
        if let Some(path) = &args.manifest {
            check_manifest(
                path,
                &ck,
                &names,
                &objects,
                &results.file_sha256,
                &mut checks,
            )?;
        }
    }
    if args.manifest.is_none() {
        checks
            .get("manifest")
            .notes
            .push("not run: no --manifest".into());
    } else if args.quick {
        checks.get("manifest").notes.push("not run: --quick".into());
    }

    let results = checks.into_results();
    let ok = results.iter().all(|c| c.status != Status::Fail);
    let report = VerifyReport {
        checkpoint: source.describe(),
        ok,
        checks: results,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    };
    super::print(args.json, &report, |out| write_report(out, &report))?;
    Ok(if ok { Outcome::Ok } else { Outcome::Problems })
}

/// Size and version of each file; a missing file is not an error here (it is a finding).
async fn stat_files(
    source: &Source,
    names: &BTreeSet<String>,
) -> anyhow::Result<HashMap<String, ObjectMeta>> {
    let names: Vec<ObjectName> = names
        .iter()
        .map(|n| ObjectName::new(n))
        .collect::<Result<_, _>>()?;
    let mut out = HashMap::new();
    for (name, meta) in super::stat_each(source, &names).await {
        match meta {
            Ok(m) => {
                out.insert(name.to_string(), m);
            }
            Err(SourceError::NotFound { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot inspect {name}")),
        }
    }
    Ok(out)
}

/// A tensor item whose length is that of its raw data: not a torch.save archive.
fn is_raw_tensor(ck: &Checkpoint, s: usize) -> bool {
    ck.is_raw_tensor(s)
}

/// `storage.format`: files whose tensor items are raw data (the SAFETENSORS serialization
/// format) are read for their header, which is checked against the metadata. Returns their names.
async fn check_format(
    source: &Source,
    ck: &Checkpoint,
    objects: &HashMap<String, ObjectMeta>,
    checks: &mut Checks,
) -> anyhow::Result<BTreeSet<String>> {
    let mut raw: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut archive_end: HashMap<&str, u64> = HashMap::new();
    for s in 0..ck.storage.len() {
        let info = &ck.storage[s].info;
        if !objects.contains_key(info.relative_path.as_str()) {
            continue;
        }
        if is_raw_tensor(ck, s) {
            raw.entry(info.relative_path.clone()).or_default().push(s);
        } else {
            let end = archive_end.entry(&info.relative_path).or_default();
            *end = (*end).max(info.offset.saturating_add(info.length));
        }
    }
    let mut problems = Vec::new();
    for (file, items) in &raw {
        let meta = &objects[file];
        // Bytes entries (torch.save archives) come first; the safetensors data follows them.
        let at = archive_end.get(file.as_str()).copied().unwrap_or(0);
        let header = read_header(source, file, at, meta).await?;
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                problems.push(Finding {
                    file: Some(file.clone()),
                    ..Finding::new(format!(
                        "its {} tensor items hold only their raw data size, so they are not torch.save archives, \
                         and no safetensors header was found at byte {at} either: {e}",
                        items.len()
                    ))
                });
                continue;
            }
        };
        problems.push(Finding {
            file: Some(file.clone()),
            ..Finding::new(format!(
                "{file} is a safetensors file (saved with serialization_format=SAFETENSORS; header at byte {at}, {} \
                 tensors): torch's .metadata offsets for its tensors are unusable (they do not locate the data; \
                 the real ranges are in the header), and torch cannot load this checkpoint back",
                header.tensors.len()
            ))
        });
        for &s in items {
            let st = &ck.storage[s];
            let e = ck.entry_of(s).expect("raw items have entries");
            let t = e.tensor.as_ref().expect("raw items are tensors");
            let chunk = ck.chunk_of(s).expect("linked");
            let Some(h) = header.tensors.get(&st.fqn) else {
                problems.push(Finding::item(
                    ck,
                    s,
                    format!(
                        "the safetensors header of {file} has no tensor {:?}",
                        st.fqn
                    ),
                ));
                continue;
            };
            let (a, b) = h.data_offsets;
            let mut wrong = Vec::new();
            if safetensors::torch_dtype(&h.dtype) != Some(t.dtype.as_str()) {
                wrong.push(format!("dtype {} (metadata: {})", h.dtype, t.dtype));
            }
            if Some(&h.shape) != chunk.sizes.as_ref() {
                wrong.push(format!("shape {:?} (chunk: {:?})", h.shape, chunk.sizes));
            }
            if b < a || b - a != st.info.length {
                wrong.push(format!(
                    "{} data bytes (metadata: {})",
                    b.saturating_sub(a),
                    st.info.length
                ));
            }
            if header.data_start.saturating_add(b) > meta.size {
                wrong.push(format!("data {a}..{b} past the end of the file"));
            }
            if !wrong.is_empty() {
                problems.push(Finding::item(
                    ck,
                    s,
                    format!("the safetensors header disagrees: {}", wrong.join(", ")),
                ));
            } else {
                checks.get("storage.format").notes.push(format!(
                    "{}: real range in {file} is bytes {}..{}",
                    describe_storage(ck, s),
                    header.data_start + a,
                    header.data_start + b
                ));
            }
        }
    }
    checks.record("storage.format", objects.len() as u64, problems);
    Ok(raw.into_keys().collect())
}

async fn read_header(
    source: &Source,
    file: &str,
    at: u64,
    meta: &ObjectMeta,
) -> anyhow::Result<Result<safetensors::Header, String>> {
    if at + 8 > meta.size {
        return Ok(Err("the file is too short".into()));
    }
    let first = source
        .read_all_range(file, at..at + 9.min(meta.size - at), meta)
        .await?;
    let Some(len) = safetensors::header_len(&first) else {
        return Ok(Err(
            "the bytes there are not a safetensors header length".into()
        ));
    };
    if at + 8 + len > meta.size {
        return Ok(Err(format!(
            "a header of {len} bytes does not fit in the file"
        )));
    }
    let json = source
        .read_all_range(file, at + 8..at + 8 + len, meta)
        .await?;
    Ok(safetensors::parse(&json, at))
}

/// Runs the byte checks of `storage` through the fetch engine.
async fn check_bytes(
    source: &Source,
    ck: &Arc<Checkpoint>,
    storage: &[usize],
    objects: &HashMap<String, ObjectMeta>,
    whole_files: bool,
    args: &VerifyArgs,
) -> anyhow::Result<VerifyResults> {
    let opts = args.plan.options();
    let fqn_of = |s: usize| describe_storage(ck, s);
    let mut by_file: BTreeMap<String, Vec<PlanItem>> = BTreeMap::new();
    for &s in storage {
        let info = &ck.storage[s].info;
        by_file
            .entry(info.relative_path.clone())
            .or_default()
            .push(PlanItem {
                range: info.offset..info.offset + info.length,
                storage: vec![s],
            });
    }
    if whole_files {
        for name in objects.keys() {
            by_file.entry(name.clone()).or_default();
        }
    }
    let mut files = Vec::new();
    let mut metas = HashMap::new();
    for (name, items) in by_file {
        let object = ObjectName::new(&name)?;
        let mut plan = FilePlan::new(object.clone(), items, opts, &fqn_of)
            .context("cannot plan the byte checks")?;
        if whole_files {
            // Fill the gaps so that every byte of the file passes the manifest's hash.
            let size = objects[&name].size;
            let mut items = plan.items.clone();
            let mut pos = 0;
            for it in &plan.items {
                if it.range.start > pos {
                    items.push(PlanItem {
                        range: pos..it.range.start,
                        storage: Vec::new(),
                    });
                }
                pos = pos.max(it.range.end);
            }
            if pos < size {
                items.push(PlanItem {
                    range: pos..size,
                    storage: Vec::new(),
                });
            }
            plan = FilePlan::new(object.clone(), items, opts, &fqn_of)
                .context("cannot plan the byte checks")?;
        }
        metas.insert(object, objects[&name].clone());
        files.push(plan);
    }
    files.sort_by(|a, b| crate::units::natural_cmp(a.name.as_str(), b.name.as_str()));
    let plan = Arc::new(Plan {
        options: opts,
        files,
    });
    let results = Arc::new(Mutex::new(VerifyResults::default()));
    let sink = VerifySink::new(ck.clone(), whole_files, results.clone());
    let progress = Progress::new(plan.fetched(), plan.items() as u64, args.quiet || args.json);
    let engine = EngineOptions {
        concurrency: args.engine.concurrency as usize,
        max_memory: args.engine.max_memory.0,
    };
    fetch::run(
        source,
        plan,
        &metas,
        engine,
        Box::new(sink),
        progress,
        Cancel::on_ctrl_c(),
    )
    .await
    .context("cannot read the items to check them")?;
    let mut r = std::mem::take(&mut *results.lock().expect("not poisoned"));
    // An empty file has no bytes to pass the hasher.
    if whole_files {
        for (name, m) in objects {
            if m.size == 0 {
                r.file_sha256
                    .insert(name.clone(), crate::sink::folder::sha256_hex(b""));
            }
        }
    }
    Ok(r)
}

fn record_byte_checks(ck: &Checkpoint, results: &VerifyResults, checks: &mut Checks) {
    let (mut archive, mut transform, mut tensor) = (Vec::new(), Vec::new(), Vec::new());
    let (mut n_archive, mut n_transform, mut n_tensor) = (0u64, 0u64, 0u64);
    let mut unchecked = Vec::new();
    for r in &results.items {
        let s = r.storage[0];
        if r.transformed {
            n_transform += 1;
            if let Some(e) = &r.transform {
                transform.push(Finding::item(ck, s, e.clone()));
                continue;
            }
        }
        n_archive += 1;
        if let Some(e) = &r.archive {
            archive.push(Finding::item(ck, s, e.clone()));
            continue;
        }
        for name in &r.unchecked_crc {
            unchecked.push(format!(
                "{}: record {name} has no CRC32 (saved with compute_crc32=False)",
                describe_storage(ck, s)
            ));
        }
        if r.tensor_checked {
            n_tensor += 1;
            tensor.extend(r.tensor.iter().map(|m| Finding::item(ck, s, m.clone())));
        }
    }
    checks.record("items.archive", n_archive, archive);
    checks.get("items.archive").notes.extend(unchecked);
    if n_transform > 0 {
        checks.record("items.transform", n_transform, transform);
    } else {
        checks
            .get("items.transform")
            .notes
            .push("no item has a transform".into());
    }
    checks.record("items.tensor", n_tensor, tensor);
}

/// `manifest`: compare with the file, or write it when it does not exist.
fn check_manifest(
    path: &std::path::Path,
    ck: &Checkpoint,
    names: &BTreeSet<String>,
    objects: &HashMap<String, ObjectMeta>,
    computed: &BTreeMap<String, String>,
    checks: &mut Checks,
) -> anyhow::Result<()> {
    let _ = ck;
    match std::fs::read(path) {
        Ok(text) => {
            let m: Manifest = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a sha256 manifest", path.display()))?;
            if m.algorithm != "sha256" {
                anyhow::bail!(
                    "{}: algorithm {:?} is not supported (only sha256)",
                    path.display(),
                    m.algorithm
                );
            }
            let mut problems = Vec::new();
            for (name, want) in &m.files {
                match computed.get(name) {
                    Some(got) if got == want => {}
                    Some(got) => problems.push(Finding {
                        file: Some(name.clone()),
                        ..Finding::new(format!("sha256 is {got}, the manifest says {want}"))
                    }),
                    None if !objects.contains_key(name) => problems.push(Finding {
                        file: Some(name.clone()),
                        ..Finding::new("listed in the manifest but missing from the checkpoint")
                    }),
                    None => {}
                }
            }
            for name in names {
                if !m.files.contains_key(name) {
                    problems.push(Finding {
                        file: Some(name.clone()),
                        ..Finding::new("not listed in the manifest")
                    });
                }
            }
            checks.record("manifest", m.files.len() as u64, problems);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let m = Manifest {
                algorithm: "sha256".into(),
                files: computed.clone(),
            };
            let text = serde_json::to_vec_pretty(&m).expect("serializes");
            std::fs::write(path, text)
                .with_context(|| format!("cannot write the manifest {}", path.display()))?;
            checks.record("manifest", computed.len() as u64, Vec::new());
            checks.get("manifest").notes.push(format!(
                "wrote {} ({} files)",
                path.display(),
                computed.len()
            ));
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the manifest {}", path.display()));
        }
    }
    Ok(())
}

/// The human report.
fn write_report(out: &mut dyn Write, r: &VerifyReport) -> std::io::Result<()> {
    let failed = r.checks.iter().filter(|c| c.status == Status::Fail).count();
    let width = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    writeln!(
        out,
        "verify {}: {}",
        r.checkpoint,
        if failed == 0 {
            "all checks passed".to_owned()
        } else {
            format!("{failed} of {} checks failed", r.checks.len())
        }
    )?;
    for c in &r.checks {
        let status = match c.status {
            Status::Pass => "ok  ",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        };
        let detail = match c.status {
            Status::Fail => format!(
                "{} in {} checked",
                count(c.problems.len() as u64, "problem"),
                c.checked
            ),
            Status::Pass => format!("{} checked", c.checked),
            Status::Skipped => c.notes.first().cloned().unwrap_or_default(),
        };
        writeln!(out, "  {status}  {:width$}  {detail}", c.name)?;
        for p in c.problems.iter().take(20) {
            let mut place = Vec::new();
            if let Some(f) = &p.file {
                place.push(f.clone());
            }
            if let (Some(o), Some(l)) = (p.offset, p.length) {
                place.push(format!("bytes {o}..{}", o + l));
            }
            if let Some(fqn) = &p.fqn {
                place.push(format!("({fqn})"));
            }
            let place = if place.is_empty() {
                String::new()
            } else {
                format!("{}: ", place.join(" "))
            };
            writeln!(out, "          {place}{}", p.message)?;
        }
        if c.problems.len() > 20 {
            writeln!(
                out,
                "          ... and {} more (see --json)",
                c.problems.len() - 20
            )?;
        }
    }
    Ok(())
}
