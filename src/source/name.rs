//! Object names inside a checkpoint, checked once so that no name from a `.metadata` can reach
//! outside the checkpoint when read, or outside the output folder when written.

use std::fmt;

/// A relative name of normal `/`-separated components: never absolute, never `.` or `..`, no
/// empty components, no NUL, no backslash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName(String);

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsafe file name {name:?} in the metadata: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: &'static str,
}

/// Longest name accepted (S3 keys are at most 1024 bytes).
const MAX_NAME: usize = 1024;

impl ObjectName {
    pub fn new(name: &str) -> Result<ObjectName, NameError> {
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_NAME {
            Some("it is longer than 1024 bytes")
        } else if name.starts_with('/') {
            Some("it is absolute")
        } else if name.contains('\0') {
            Some("it contains a NUL byte")
        } else if name.contains('\\') {
            Some("it contains a backslash")
        } else if name.chars().any(char::is_control) {
            Some("it contains a control character")
        } else if name.split('/').any(|c| c.is_empty()) {
            Some("it has an empty path component")
        } else if name.split('/').any(|c| c == "." || c == "..") {
            Some("it has a '.' or '..' component")
        } else if name.len() >= 2 && name.as_bytes()[1] == b':' {
            Some("it looks like a drive path")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(NameError {
                name: name.to_owned(),
                reason,
            }),
            None => Ok(ObjectName(name.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name's components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_normal_names() {
        for ok in [
            "__0_0.distcp",
            ".metadata",
            "sub/__1_0.distcp",
            "a b.distcp",
            "..x",
            "x..",
        ] {
            assert!(ObjectName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_names_that_escape() {
        let table = [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("./x", "'.'"),
            ("a//b", "empty path component"),
            ("a/", "empty path component"),
            ("a\\..\\b", "backslash"),
            ("a\0b", "NUL"),
            ("C:evil", "drive"),
            ("a\nb", "control"),
        ];
        for (name, reason) in table {
            let e = ObjectName::new(name).unwrap_err();
            assert!(e.to_string().contains(reason), "{name:?}: {e}");
        }
    }

    proptest! {
        /// Whatever is accepted stays inside a folder when joined to it.
        #[test]
        fn accepted_names_stay_inside(name in "[a-z./\\\\]{0,12}") {
            if let Ok(n) = ObjectName::new(&name) {
                let base = std::path::Path::new("/out");
                let joined = base.join(n.as_str());
                let mut depth = 0i32;
                for c in joined.strip_prefix(base).unwrap().components() {
                    match c {
                        std::path::Component::Normal(_) => depth += 1,
                        _ => depth -= 100,
                    }
                }
                prop_assert!(depth > 0, "{name} -> {}", joined.display());
            }
        }
    }
}
