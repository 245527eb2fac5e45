//! Checkpoint locations as people write them: a folder, `file://...` or `s3://bucket/prefix`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a checkpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    /// `prefix` has no leading or trailing `/`; empty for the bucket root.
    S3 {
        bucket: String,
        prefix: String,
    },
}

impl FromStr for Location {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "{s:?} names no bucket (expected s3://bucket/prefix)"
                ));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err(format!("{s:?} names no folder"));
            }
            return Ok(Location::Local(PathBuf::from(path)));
        }
        if s.contains("://") {
            return Err(format!(
                "{s:?}: unsupported scheme (use a folder, file://... or s3://bucket/prefix)"
            ));
        }
        if s.is_empty() {
            return Err("the checkpoint location is empty".into());
        }
        Ok(Location::Local(PathBuf::from(s)))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        let table = [
            ("ckpt", Location::Local("ckpt".into())),
            ("file:///data/ckpt", Location::Local("/data/ckpt".into())),
            (
                "s3://b/run/step-100/",
                Location::S3 {
                    bucket: "b".into(),
                    prefix: "run/step-100".into(),
                },
            ),
            (
                "s3://b",
                Location::S3 {
                    bucket: "b".into(),
                    prefix: "".into(),
                },
            ),
        ];
        for (s, want) in table {
            assert_eq!(s.parse::<Location>().unwrap(), want, "{s}");
        }
        for bad in ["s3://", "s3:///x", "gs://b/x", "", "file://"] {
            assert!(bad.parse::<Location>().is_err(), "{bad}");
        }
        assert_eq!(
            "s3://b/p/".parse::<Location>().unwrap().to_string(),
            "s3://b/p"
        );
    }
}
