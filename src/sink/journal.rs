//! The folder sink's journal (`.dcpfetch/journal.jsonl`): what an earlier fetch was of, and which
//! items it finished, with each item's CRC32.
//!
//! Every line is `CCCCCCCC JSON`: the CRC32 (8 hex digits) of the JSON text that follows, so a cut
//! line or a flipped digit is detected. The first line is the header (the fetch's [`Identity`]),
//! every other line one finished item. Nothing in the file is trusted: it is read with a size cap
//! and a line-length cap ([`Limits`]), a line that does not check out is ignored (its item is
//! fetched again), and a damaged header or a file over the cap means the whole journal is ignored.
//!
//! A fetch split among workers (`--shard I/N`) has one journal per share
//! (`journal.I-of-N.jsonl`), each with the same header: the checkpoint and the [`Split`] that
//! every worker must agree on. A share's items are the plan's items clipped to its parts, so a
//! line records a byte range, which may be part of a stored item. The last line of a share that
//! finished says so (`{"done": {"index": I, "count": N}}`): the worker that finds every share done
//! publishes the metadata.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::plan::{Share, Split};
use crate::source::ObjectName;

/// The journal's format; a journal of another version is not read.
pub const VERSION: u32 = 3;

/// What makes two fetches "of the same checkpoint": the source, the metadata bytes and every
/// shard file's size and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub source: String,
    /// Name and sha256 of each metadata file.
    pub metadata: Vec<(String, String)>,
    /// Name, size and version (ETag, or size and modification time) of each shard file, by name.
    pub files: Vec<(String, u64, Option<String>)>,
    /// How the work is split among workers (`--shard`); `None` for a fetch of the whole plan.
    pub split: Option<Split>,
}

impl Identity {
    /// What differs between an earlier fetch's identity and this one, naming the file.
    pub fn difference(&self, earlier: &Identity) -> String {
        if self.source != earlier.source {
            return format!("it was fetched from {}", earlier.source);
        }
        // By name, so that a checkpoint of many files costs a lookup per file, not a scan.
        let earlier_metadata: HashMap<&str, &String> = earlier
            .metadata
            .iter()
            .map(|(n, sha)| (n.as_str(), sha))
            .collect();
        let metadata: HashSet<&str> = self.metadata.iter().map(|(n, _)| n.as_str()).collect();
        for (name, sha) in &self.metadata {
            match earlier_metadata.get(name.as_str()) {
                None => return format!("the metadata file {name} is new"),
                Some(&old) if old != sha => {
                    return format!("the metadata file {name} changed");
                }
                Some(_) => {}
            }
        }
        if let Some((name, _)) = earlier
            .metadata
            .iter()
            .find(|(n, _)| !metadata.contains(n.as_str()))
        {
            return format!("the metadata file {name} is gone");
        }
        let earlier_files: HashMap<&str, (&u64, &Option<String>)> = earlier
            .files
            .iter()
            .map(|(n, size, version)| (n.as_str(), (size, version)))
            .collect();
        let files: HashSet<&str> = self.files.iter().map(|(n, ..)| n.as_str()).collect();
        for (name, size, version) in &self.files {
            match earlier_files.get(name.as_str()) {
                None => return format!("the shard file {name} is new"),
                Some(&(old_size, _)) if old_size != size => {
                    return format!(
                        "the shard file {name} changed size ({old_size} -> {size} bytes)"
                    );
                }
                Some(&(_, old)) if old != version => {
                    return format!(
                        "the shard file {name} changed (version {} -> {})",
                        old.as_deref().unwrap_or("none"),
                        version.as_deref().unwrap_or("none")
                    );
                }
                Some(_) => {}
            }
        }
        if let Some((name, ..)) = earlier
            .files
            .iter()
            .find(|(n, ..)| !files.contains(n.as_str()))
        {
            return format!("the shard file {name} is gone");
        }
        if let Some(split) = self.split_difference(earlier) {
            return split;
        }
        "nothing differs".to_owned()
    }

    /// Whether the checkpoint is the same (source, metadata, files), whatever the split.
    pub fn same_checkpoint(&self, earlier: &Identity) -> bool {
        (&self.source, &self.metadata, &self.files)
            == (&earlier.source, &earlier.metadata, &earlier.files)
    }

    /// How the split of the work differs from an earlier fetch's, in words.
    fn split_difference(&self, earlier: &Identity) -> Option<String> {
        match (&self.split, &earlier.split) {
            (None, None) => None,
            (None, Some(old)) => Some(format!(
                "it is split among {} workers (--shard I/{}), this fetch is not",
                old.shares, old.shares
            )),
            (Some(new), None) => Some(format!(
                "it was not split among workers, this fetch is (--shard I/{})",
                new.shares
            )),
            (Some(new), Some(old)) => new.difference(old),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Header {
        dcpfetch_journal: u32,
        identity: Identity,
    },
    Item {
        file: String,
        start: u64,
        end: u64,
        crc32: u32,
    },
    /// The share finished: every byte of it is on disk and recorded above.
    Done { done: Share },
}

/// A finished item: its bytes are on disk, and their CRC32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub file: ObjectName,
    pub range: Range<u64>,
    pub crc32: u32,
}

fn encode(line: &Line) -> String {
    let json = serde_json::to_string(line).expect("journal lines serialize");
    format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()))
}

/// The header line of a journal.
pub fn header(identity: &Identity) -> String {
    encode(&Line::Header {
        dcpfetch_journal: VERSION,
        identity: identity.clone(),
    })
}

/// The line of a finished item.
pub fn item(f: &Finished) -> String {
    encode(&Line::Item {
        file: f.file.to_string(),
        start: f.range.start,
        end: f.range.end,
        crc32: f.crc32,
    })
}

/// The last line of a share that finished.
pub fn done(share: Share) -> String {
    encode(&Line::Done { done: share })
}

/// A line whose checksum holds, parsed; `None` otherwise.
fn decode(line: &[u8]) -> Option<Line> {
    let text = std::str::from_utf8(line).ok()?;
    let (sum, json) = text.split_once(' ')?;
    if sum.len() != 8 || u32::from_str_radix(sum, 16).ok()? != crc32fast::hash(json.as_bytes()) {
        return None;
    }
    serde_json::from_str(json).ok()
}

/// How much of a journal is read: a journal longer than `total`, or a line longer than its cap,
/// is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total: u64,
    pub header_line: usize,
    pub item_line: usize,
}

impl Limits {
    /// The limits for a fetch of `identity` from a checkpoint of `items` stored items whose
    /// longest shard file name is `longest_name` bytes: the header may be twice as long as this
    /// fetch's own header plus 64 KiB (an earlier fetch of another checkpoint still gets its
    /// "another checkpoint" message), and there is at most one line per stored item (a resume
    /// rewrites the journal with the items it kept, and fetches only the others; a share may
    /// hold one clipped item more at each end, and ends with its `done` line), each at most 256
    /// bytes plus twice the longest name (JSON escapes).
    pub fn for_fetch(identity: &Identity, items: usize, longest_name: usize) -> Limits {
        let header_line = 2 * header(identity).len() + (64 << 10);
        let item_line = 256 + 2 * longest_name;
        Limits {
            total: header_line as u64 + (items as u64 + 3) * item_line as u64,
            header_line,
            item_line,
        }
    }
}

/// What a journal said.
#[derive(Debug, PartialEq, Eq)]
pub enum Earlier {
    /// A readable header, and the items whose lines check out.
    Found {
        identity: Identity,
        items: Vec<Finished>,
        /// Lines that did not check out (cut, flipped, too long, or not an item).
        distrusted: usize,
        /// The share's `done` line, if it has one.
        done: Option<Share>,
    },
    /// Too long, or no readable header of this version: nothing in it is trusted.
    Damaged(String),
}

/// Reads a journal of at most `limits.total` bytes (never more is read into memory).
pub fn read(file: impl Read, size: u64, limits: Limits) -> std::io::Result<Earlier> {
    if size > limits.total {
        return Ok(Earlier::Damaged(format!(
            "it is {size} bytes long, more than the {} bytes a journal of this fetch can have",
            limits.total
        )));
    }
    let mut data = Vec::with_capacity(size as usize);
    file.take(limits.total + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limits.total {
        return Ok(Earlier::Damaged(format!(
            "it is longer than the {} bytes a journal of this fetch can have",
            limits.total
        )));
    }
    let mut lines = data.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let identity = match (first.len() <= limits.header_line)
        .then(|| decode(first))
        .flatten()
    {
        Some(Line::Header {
            dcpfetch_journal: VERSION,
            identity,
        }) => identity,
        _ => return Ok(Earlier::Damaged("its header is damaged".to_owned())),
    };
    let mut items = Vec::new();
    let mut distrusted = 0;
    let mut done = None;
    // A journal ends with a newline, so the last piece of the split is empty unless a line was cut.
    for line in lines.filter(|l| !l.is_empty()) {
        let parsed = (line.len() <= limits.item_line)
            .then(|| decode(line))
            .flatten();
        match parsed {
            Some(Line::Item {
                file,
                start,
                end,
                crc32,
            }) if start < end => match ObjectName::new(&file) {
                Ok(file) => items.push(Finished {
                    file,
                    range: start..end,
                    crc32,
                }),
                Err(_) => distrusted += 1,
            },
            Some(Line::Done { done: share }) => done = Some(share),
            _ => distrusted += 1,
        }
    }
    Ok(Earlier::Found {
        identity,
        items,
        distrusted,
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            source: "ckpt".into(),
            metadata: vec![(".metadata".into(), "ab".into())],
            files: vec![("__0_0.distcp".into(), 1000, Some("v1".into()))],
            split: None,
        }
    }

    fn finished(start: u64, end: u64) -> Finished {
        Finished {
            file: ObjectName::new("__0_0.distcp").unwrap(),
            range: start..end,
            crc32: 0xdead_beef,
        }
    }

    fn journal() -> String {
        header(&identity()) + &item(&finished(0, 100)) + &item(&finished(100, 250))
    }

    fn read_str(text: &str) -> Earlier {
        let limits = Limits::for_fetch(&identity(), 10, 12);
        read(text.as_bytes(), text.len() as u64, limits).unwrap()
    }

    #[test]
    fn reads_what_it_wrote() {
        assert_eq!(
            read_str(&journal()),
            Earlier::Found {
                identity: identity(),
                items: vec![finished(0, 100), finished(100, 250)],
                distrusted: 0,
                done: None,
            }
        );
        let share = Share::new(1, 3).unwrap();
        let text = journal() + &done(share);
        assert!(matches!(read_str(&text), Earlier::Found { done: Some(s), .. } if s == share));
    }

    #[test]
    fn a_flipped_digit_or_a_cut_line_is_distrusted() {
        let text = journal();
        let flipped = text.replacen("\"start\":100", "\"start\":900", 1);
        assert_ne!(flipped, text);
        let cut = &text[..text.len() - 5];
        for damaged in [flipped.as_str(), cut] {
            assert_eq!(
                read_str(damaged),
                Earlier::Found {
                    identity: identity(),
                    items: vec![finished(0, 100)],
                    distrusted: 1,
                    done: None,
                },
                "{damaged}"
            );
        }
    }

    #[test]
    fn a_damaged_header_or_an_overlong_journal_is_damaged() {
        let text = journal();
        let bad_header = text.replacen("1000", "1001", 1);
        assert!(matches!(read_str(&bad_header), Earlier::Damaged(_)));
        let limits = Limits::for_fetch(&identity(), 1, 12);
        let long = text.clone() + &" ".repeat(limits.total as usize);
        assert!(matches!(
            read(long.as_bytes(), long.len() as u64, limits).unwrap(),
            Earlier::Damaged(_)
        ));
        // A size that lies (a file that grows while read) is still capped.
        assert!(matches!(
            read(long.as_bytes(), 10, limits).unwrap(),
            Earlier::Damaged(_)
        ));
    }

    #[test]
    fn an_overlong_line_is_distrusted() {
        let limits = Limits::for_fetch(&identity(), 10, 12);
        let text = header(&identity())
            + &encode(&Line::Item {
                file: "y".repeat(limits.item_line),
                start: 0,
                end: 1,
                crc32: 0,
            });
        assert_eq!(
            read(text.as_bytes(), text.len() as u64, limits).unwrap(),
            Earlier::Found {
                identity: identity(),
                items: vec![],
                distrusted: 1,
                done: None,
            }
        );
    }

    #[test]
    fn differences_name_the_file() {
        let old = identity();
        let mut new = identity();
        new.files[0].2 = Some("v2".into());
        assert!(new.difference(&old).contains("__0_0.distcp"));
        new.files[0].1 = 999;
        assert!(new.difference(&old).contains("changed size"));
        let mut new = identity();
        new.metadata[0].1 = "cd".into();
        assert!(
            new.difference(&old)
                .contains("metadata file .metadata changed")
        );
        // Splits: the number of shares, the part size, the selection.
        let split = |shares, part_size, plan: &str| Split {
            shares,
            part_size,
            max_gap: 0,
            items: 3,
            bytes: 30,
            plan_sha256: plan.into(),
        };
        let mut old = identity();
        old.split = Some(split(4, 8, "a"));
        let mut new = old.clone();
        assert_eq!(new.difference(&old), "nothing differs");
        new.split = Some(split(2, 8, "a"));
        assert!(
            new.difference(&old)
                .contains("split into 4 shares, this one into 2")
        );
        new.split = Some(split(4, 16, "a"));
        assert!(new.difference(&old).contains("--part-size"));
        new.split = Some(split(4, 8, "b"));
        assert!(new.difference(&old).contains("selects other items"));
        new.split = None;
        assert!(new.difference(&old).contains("split among 4 workers"));
        assert!(new.same_checkpoint(&old));
    }
}
