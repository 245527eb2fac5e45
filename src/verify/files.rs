//! The checks over the shard files: that they exist, that every item lies inside its file, their
//! format (torch.save archives, or safetensors files whose `.metadata` offsets are unusable), and
//! their sha256 against a manifest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Check, Checks, Finding, VerifyError, safetensors};
use crate::metadata::Checkpoint;
use crate::plan::describe_storage;
use crate::source::{Ahead, ObjectMeta, ObjectName, Source, SourceError, stat_each};

/// A sha256 manifest of shard files, in the layout Megatron-Core writes as `integrity.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HashManifest {
    pub algorithm: String,
    pub files: BTreeMap<String, String>,
}

/// `storage.files_exist`: size and version of each file; a missing file is a finding, another
/// failure to stat is an error.
pub async fn check_exist(
    source: &Source,
    names: &BTreeSet<ObjectName>,
    in_flight: usize,
    ahead: &Ahead,
    checks: &mut Checks,
) -> Result<HashMap<ObjectName, ObjectMeta>, VerifyError> {
    let names: Vec<ObjectName> = names.iter().cloned().collect();
    let mut out = HashMap::new();
    let mut missing = Vec::new();
    for (name, meta) in stat_each(source, &names, in_flight, ahead).await {
        match meta {
            Ok(m) => {
                out.insert(name, m);
            }
            Err(SourceError::NotFound { .. }) => missing.push(Finding {
                file: Some(name.to_string()),
                ..Finding::new(format!("{name} does not exist in {}", source.describe()))
            }),
            Err(source) => return Err(VerifyError::Stat { name, source }),
        }
    }
    checks.record(Check::StorageFilesExist, names.len() as u64, missing);
    Ok(out)
}

/// `storage.in_bounds`: returns the storage entries that lie inside their (existing) file.
pub fn check_in_bounds(
    ck: &Checkpoint,
    storage: &[usize],
    objects: &HashMap<ObjectName, ObjectMeta>,
    checks: &mut Checks,
) -> Vec<usize> {
    let mut in_bounds = Vec::new();
    let mut problems = Vec::new();
    for &s in storage {
        let info = &ck.storage[s].info;
        let Some(meta) = ObjectName::new(&info.relative_path)
            .ok()
            .and_then(|name| objects.get(&name))
        else {
            continue;
        };
        match info.offset.checked_add(info.length) {
            Some(end) if end <= meta.size => in_bounds.push(s),
            Some(end) => problems.push(Finding::item(
                ck,
                s,
                format!(
                    "bytes {}..{end} are past the end of the file ({} bytes): the shard is truncated",
                    info.offset, meta.size
                ),
            )),
            None => problems.push(Finding::item(
                ck,
                s,
                "offset + length overflows a 64-bit integer",
            )),
        }
    }
    checks.record(Check::StorageInBounds, storage.len() as u64, problems);
    in_bounds
}

/// `storage.format`: files whose tensor items are raw data (the SAFETENSORS serialization
/// format) are read for their header, which is checked against the metadata. Returns their names.
pub async fn check_format(
    source: &Source,
    ck: &Checkpoint,
    objects: &HashMap<ObjectName, ObjectMeta>,
    checks: &mut Checks,
) -> Result<BTreeSet<String>, VerifyError> {
    let present: HashMap<&str, &ObjectMeta> =
        objects.iter().map(|(n, m)| (n.as_str(), m)).collect();
    let mut raw: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut archive_end: HashMap<&str, u64> = HashMap::new();
    for s in 0..ck.storage.len() {
        let info = &ck.storage[s].info;
        if !present.contains_key(&*info.relative_path) {
            continue;
        }
        if ck.is_raw_tensor(s) {
            raw.entry(info.relative_path.to_string())
                .or_default()
                .push(s);
        } else {
            let end = archive_end.entry(&info.relative_path).or_default();
            *end = (*end).max(info.offset.saturating_add(info.length));
        }
    }
    let mut problems = Vec::new();
    for (file, items) in &raw {
        let meta = present[file.as_str()];
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
            let Some(h) = header.tensors.get(&*st.fqn) else {
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
            if safetensors::torch_dtype(&h.dtype) != Some(&*t.dtype) {
                wrong.push(format!("dtype {} (metadata: {})", h.dtype, t.dtype));
            }
            if Some(&h.shape[..]) != chunk.sizes.as_deref() {
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
                checks.get(Check::StorageFormat).notes.push(format!(
                    "{}: real range in {file} is bytes {}..{}",
                    describe_storage(ck, s),
                    header.data_start + a,
                    header.data_start + b
                ));
            }
        }
    }
    checks.record(Check::StorageFormat, objects.len() as u64, problems);
    Ok(raw.into_keys().collect())
}

async fn read_header(
    source: &Source,
    file: &str,
    at: u64,
    meta: &ObjectMeta,
) -> Result<Result<safetensors::Header, String>, VerifyError> {
    let failed = |source| VerifyError::Header {
        name: file.to_owned(),
        source,
    };
    if at + 8 > meta.size {
        return Ok(Err("the file is too short".into()));
    }
    let first = source
        .read_all_range(file, at..at + 9.min(meta.size - at), meta)
        .await
        .map_err(failed)?;
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
        .await
        .map_err(failed)?;
    Ok(safetensors::parse(&json, at))
}

/// `manifest`: compare with the file, or write it when it does not exist.
pub fn check_manifest(
    path: &Path,
    names: &BTreeSet<ObjectName>,
    objects: &HashMap<ObjectName, ObjectMeta>,
    computed: &BTreeMap<String, String>,
    checks: &mut Checks,
) -> Result<(), VerifyError> {
    match std::fs::read(path) {
        Ok(text) => {
            let m: HashManifest =
                serde_json::from_slice(&text).map_err(|source| VerifyError::ManifestFormat {
                    path: shown(path),
                    source,
                })?;
            if m.algorithm != "sha256" {
                return Err(VerifyError::ManifestAlgorithm {
                    path: shown(path),
                    algorithm: m.algorithm,
                });
            }
            let mut problems = Vec::new();
            for (name, want) in &m.files {
                match computed.get(name) {
                    Some(got) if got == want => {}
                    Some(got) => problems.push(Finding {
                        file: Some(name.clone()),
                        ..Finding::new(format!("sha256 is {got}, the manifest says {want}"))
                    }),
                    None if !ObjectName::new(name).is_ok_and(|n| objects.contains_key(&n)) => {
                        problems.push(Finding {
                            file: Some(name.clone()),
                            ..Finding::new("listed in the manifest but missing from the checkpoint")
                        })
                    }
                    None => {}
                }
            }
            for name in names {
                if !m.files.contains_key(name.as_str()) {
                    problems.push(Finding {
                        file: Some(name.to_string()),
                        ..Finding::new("not listed in the manifest")
                    });
                }
            }
            checks.record(Check::Manifest, m.files.len() as u64, problems);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let m = HashManifest {
                algorithm: "sha256".into(),
                files: computed.clone(),
            };
            let text = serde_json::to_vec_pretty(&m).expect("serializes");
            std::fs::write(path, text).map_err(|source| VerifyError::ManifestWrite {
                path: shown(path),
                source,
            })?;
            checks.record(Check::Manifest, computed.len() as u64, Vec::new());
            checks.get(Check::Manifest).notes.push(format!(
                "wrote {} ({} files)",
                path.display(),
                computed.len()
            ));
        }
        Err(source) => {
            return Err(VerifyError::ManifestRead {
                path: shown(path),
                source,
            });
        }
    }
    Ok(())
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}
