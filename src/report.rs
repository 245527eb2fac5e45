//! How dcpfetch ends: exit codes and the one style of error message.
//!
//! Messages are lowercase without a trailing period, printed as `error: ...`, each cause on its own
//! `  caused by: ...` line, and a `hint: ...` line where there is a likely fix. Exit codes: 0 ok,
//! 1 the check or fetch found a problem, 2 usage error or could not run, 130 interrupted (Ctrl-C).

use std::io::Write;
use std::process::ExitCode;

use crate::fetch::FetchError;
use crate::metadata::MetadataError;
use crate::pipeline::PipelineError;
use crate::selection::SelectionError;
use crate::source::SourceError;

/// How a command that ran to the end went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything as asked: exit 0.
    Ok,
    /// The command ran but found problems (a failed check): exit 1.
    Problems,
}

impl Outcome {
    pub fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Ok => ExitCode::SUCCESS,
            Outcome::Problems => ExitCode::from(1),
        }
    }
}

/// Marks an error as a problem found in the checkpoint or selection (exit 1), as opposed to a
/// failure to run (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Problem(pub String);

/// Whether an error means the run found a problem with the checkpoint or the selection.
fn is_problem(e: &anyhow::Error) -> bool {
    // `downcast_ref` sees context values (`.context(Problem(..))`) at any depth; `chain` sees causes.
    e.downcast_ref::<Problem>().is_some()
        || e.chain().any(|c| {
            c.is::<Problem>()
                || c.downcast_ref::<PipelineError>()
                    .is_some_and(PipelineError::is_problem)
                || matches!(
                    c.downcast_ref::<SelectionError>(),
                    Some(SelectionError::NothingMatched { .. })
                )
                || matches!(
                    c.downcast_ref::<crate::fetch::SinkError>(),
                    Some(crate::fetch::SinkError::Bad(_))
                )
                || c.downcast_ref::<SourceError>()
                    .is_some_and(SourceError::is_checkpoint_problem)
                    && !e.chain().any(|c| c.is::<MetadataError>())
        })
}

/// Whether the error is only a closed stdout (`dcpfetch ... | head`), which is not a failure.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A likely fix for a known kind of error.
fn hint(e: &anyhow::Error) -> Option<String> {
    for c in e.chain() {
        if let Some(s) = c.downcast_ref::<SourceError>() {
            match s {
                // A store that knows the likely fix (HTTP: a token, a presigned URL) says it.
                SourceError::AccessDenied {
                    hint: Some(hint), ..
                } => return Some((*hint).into()),
                SourceError::AccessDenied { hint: None, .. } => {
                    return Some(
                        "check the credentials (AWS_PROFILE or --profile, AWS_ACCESS_KEY_ID) and the bucket policy; \
                         for a public bucket pass --no-sign-request"
                            .into(),
                    );
                }
                SourceError::Exhausted { .. } => {
                    return Some(
                        "the endpoint kept failing; check --endpoint-url and the network, or raise --max-attempts".into(),
                    );
                }
                SourceError::Unreachable { .. } => {
                    return Some(
                        "check --endpoint-url (scheme, host name and port) and that the server is up"
                            .into(),
                    );
                }
                SourceError::Credentials(_) => {
                    return Some(
                        "`aws configure list` shows what the AWS tools find; --profile NAME picks a \
                         profile, --no-sign-request reads a public bucket without credentials"
                            .into(),
                    );
                }
                s if crate::source::http::is_untrusted_certificate(s) => {
                    return Some(
                        "if the server's certificate comes from a private CA, pass --ca-bundle FILE \
                         (or set SSL_CERT_FILE) with that CA's certificate in PEM; a certificate \
                         for another host name, or an expired one, must be fixed on the server"
                            .into(),
                    );
                }
                SourceError::BadResponse { .. } => {
                    return Some(
                        "the server's answer does not match the request; if it is not AWS S3, check \
                         that it supports ranged GETs (HTTP 206 with Content-Range)"
                            .into(),
                    );
                }
                SourceError::Changed { .. } => {
                    return Some(
                        "the checkpoint is being rewritten; fetch again once the save has finished"
                            .into(),
                    );
                }
                _ => {}
            }
        }
        if let Some(MetadataError::NoMetadata { safetensors, .. }) =
            c.downcast_ref::<MetadataError>()
        {
            if !safetensors.is_empty() {
                return Some(
                    "torch writes such folders with HuggingFaceStorageWriter and reads them back with \
                     HuggingFaceStorageReader; load the files with the safetensors library \
                     (safetensors.torch.load_file) or huggingface_hub (hf_hub_download, or \
                     from_pretrained in transformers): dcpfetch reads DCP checkpoints only"
                        .into(),
                );
            }
            return Some(
                "point dcpfetch at the folder or prefix that holds the checkpoint's .metadata (a save is complete \
                 only once .metadata exists)"
                    .into(),
            );
        }
        if let Some(SelectionError::NothingMatched { .. }) = c.downcast_ref::<SelectionError>() {
            return Some(
                "`dcpfetch ls CKPT` lists every fqn; `*` in a glob also matches dots".into(),
            );
        }
    }
    None
}

/// Prints an error in the house style and returns its exit code.
pub fn fail(e: &anyhow::Error) -> ExitCode {
    if is_broken_pipe(e) {
        return ExitCode::SUCCESS;
    }
    let mut err = std::io::stderr().lock();
    let mut chain = e.chain();
    if let Some(first) = chain.next() {
        let _ = writeln!(err, "error: {first}");
    }
    let mut previous = e.to_string();
    for cause in chain {
        let text = cause.to_string();
        // thiserror's transparent wrappers repeat their source: print each message once.
        if previous.contains(&text) {
            continue;
        }
        let _ = writeln!(err, "  caused by: {text}");
        previous = text;
    }
    if let Some(h) = hint(e) {
        let _ = writeln!(err, "hint: {h}");
    }
    if is_interrupted(e) {
        // The shell's convention for a run stopped by SIGINT.
        ExitCode::from(130)
    } else if is_problem(e) {
        ExitCode::from(1)
    } else {
        ExitCode::from(2)
    }
}

fn is_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<FetchError>(),
            Some(FetchError::Interrupted)
        )
    })
}

/// Prints a warning on stderr.
pub fn warn(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "warning: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errors() {
        let p = anyhow::Error::new(Problem("x".into()));
        assert!(is_problem(&p));
        let nothing = anyhow::Error::new(SelectionError::NothingMatched {
            patterns: "x".into(),
            suggestions: vec![],
        });
        assert!(is_problem(&nothing));
        let io = anyhow::Error::new(std::io::Error::other("disk on fire"));
        assert!(!is_problem(&io));
        let pipe = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing to stdout");
        assert!(is_broken_pipe(&pipe));
    }

    #[test]
    fn a_refusal_gets_the_stores_own_hint_or_the_credentials_one() {
        let refused = |hint| {
            anyhow::Error::new(SourceError::AccessDenied {
                location: "somewhere".into(),
                name: ".metadata".into(),
                detail: "HTTP 403".into(),
                hint,
            })
            .context("cannot read the metadata")
        };
        assert_eq!(
            hint(&refused(Some("check the token"))).as_deref(),
            Some("check the token")
        );
        let aws = hint(&refused(None)).unwrap();
        assert!(aws.contains("AWS_PROFILE"), "{aws}");
    }
}
