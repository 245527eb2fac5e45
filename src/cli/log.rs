//! `-v/--verbose`: one line per request on stderr, from the `tracing` events of target
//! [`REQUESTS`] that the sources emit (method, key, byte range, HTTP status or "local read", time
//! taken, attempt). Without `-v` nothing is installed, so stderr carries only warnings, errors, the
//! summary and the progress bar; the AWS SDK's own events are never shown.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

/// The target of the per-request events.
pub const REQUESTS: &str = "dcpfetch::requests";

/// A subscriber that writes the request events (DEBUG and above) to `writer` and drops the rest.
fn subscriber<W>(writer: W, ansi: bool) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .with_filter(Targets::new().with_target(REQUESTS, LevelFilter::DEBUG)),
    )
}

/// Logs every request to stderr when `verbose` (colours only when stderr is a terminal).
pub fn init(verbose: bool) {
    if verbose {
        let ansi = std::io::stderr().is_terminal();
        // Fails only when a subscriber is already installed (a second run in one process), which
        // then keeps logging.
        let _ = tracing::subscriber::set_global_default(subscriber(std::io::stderr, ansi));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn only_request_events_are_written() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let sub = subscriber(move || writer.clone(), false);
        tracing::subscriber::with_default(sub, || {
            tracing::debug!(
                target: "dcpfetch::requests",
                method = "GET",
                key = "run/step-1/__0_0.distcp",
                start = 0u64,
                end = 8_388_608u64,
                status = 206u16,
                ms = 31u64,
                attempt = 1u32,
            );
            tracing::trace!(target: "dcpfetch::requests", "finer than the log");
            tracing::debug!(target: "aws_smithy_runtime::client", "the sdk's own event");
            tracing::info!(target: "dcpfetch::fetch", "another target");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        for needle in [
            "DEBUG",
            "dcpfetch::requests",
            "run/step-1/__0_0.distcp",
            "start=0",
            "end=8388608",
            "status=206",
            "ms=31",
            "attempt=1",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        assert!(!text.contains('\x1b'), "no colours off a terminal: {text}");
    }
}
