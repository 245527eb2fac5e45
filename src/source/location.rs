//! Checkpoint locations as people write them: a folder, `file://...`, `s3://bucket/prefix` or
//! `https://host/path`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::http::HttpUrl;

/// Where a checkpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    /// `prefix` has no leading or trailing `/`; empty for the bucket root.
    S3 {
        bucket: String,
        prefix: String,
    },
    /// `http://` or `https://`: the objects are `base/NAME`.
    Http {
        base: HttpUrl,
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
        let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return HttpUrl::parse(s).map(|base| Location::Http { base });
        }
        if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err(format!("{s:?} names no folder"));
            }
            return Ok(Location::Local(PathBuf::from(path)));
        }
        if s.contains("://") {
            return Err(format!(
                "{s:?}: unsupported scheme (use a folder, file://..., s3://bucket/prefix or https://host/path)"
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
            Location::Http { base } => write!(f, "{base}"),
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
        for (s, want) in [
            ("https://h/a/ckpt/", "https://h/a/ckpt"),
            ("HTTP://h:8/x", "http://h:8/x"),
            ("https://h/c?sig=SECRET", "https://h/c?<redacted>"),
        ] {
            let loc = s.parse::<Location>().unwrap();
            assert!(matches!(loc, Location::Http { .. }), "{s}");
            assert_eq!(loc.to_string(), want);
            assert!(!format!("{loc:?}").contains("SECRET"));
        }
        for bad in [
            "s3://",
            "s3:///x",
            "gs://b/x",
            "",
            "file://",
            "https://",
            "http://h/x#f",
        ] {
            assert!(bad.parse::<Location>().is_err(), "{bad}");
        }
        assert_eq!(
            "s3://b/p/".parse::<Location>().unwrap().to_string(),
            "s3://b/p"
        );
    }
}
