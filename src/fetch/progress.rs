//! A progress bar on stderr (bytes, rate, ETA, items), shown only when stderr is a terminal.
//!
//! A run's bar follows the bytes its source has received ([`Progress::follow`]), counted per chunk
//! as it arrives, not per part delivered: with 32 parts of 8 MiB in flight, the bar moves as the
//! link does instead of jumping when a part completes.
//!
//! The bar redraws every [`TICK`] whether or not bytes arrived, so the elapsed time, the spinner and
//! the rate keep moving while a large part is in flight; indicatif's estimator weights the recent
//! rate most, so the rate and the ETA follow the link's current speed.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::source::TransferStats;

/// How often a visible bar redraws.
const TICK: Duration = Duration::from_millis(250);

const BYTES_TEMPLATE: &str = "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}";
const RUNS_TEMPLATE: &str =
    "{spinner} [{elapsed_precise}] [{wide_bar}] {pos}/{len} runs, ETA {eta} {msg}";

/// A visible bar of `len` steps drawn to `target`, redrawn every [`TICK`].
fn drawn(target: ProgressDrawTarget, len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(TICK);
    bar
}

/// Progress of one run; a no-op when hidden.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
    items: u64,
    done: Arc<AtomicU64>,
}

impl Progress {
    /// A bar over `bytes` bytes and `items` items, drawn when stderr is a terminal and not `quiet`.
    pub fn new(bytes: u64, items: u64, quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        Progress::bytes_to(ProgressDrawTarget::stderr(), bytes, items)
    }

    fn bytes_to(target: ProgressDrawTarget, bytes: u64, items: u64) -> Progress {
        let bar = drawn(target, bytes, BYTES_TEMPLATE);
        bar.set_message(format!("0/{items} items"));
        Progress {
            bar,
            items,
            done: Arc::default(),
        }
    }

    /// A bar over `runs` runs of a sweep (`bench`), drawn when stderr is a terminal and not
    /// `quiet`; [`Progress::set_message`] names the current run.
    pub fn runs(runs: u64, quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        let bar = drawn(ProgressDrawTarget::stderr(), runs, RUNS_TEMPLATE);
        Progress {
            bar,
            items: 0,
            done: Arc::default(),
        }
    }

    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    /// One step done (a run of a sweep).
    pub fn step(&self) {
        self.bar.inc(1);
    }

    pub fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            items: 0,
            done: Arc::default(),
        }
    }

    /// Moves the bar, every 250 ms until [`Progress::finish`], to the body bytes `stats` has
    /// counted since now (bytes of a retried attempt count again, so the position is capped at the
    /// bar's length). Nothing happens for a hidden bar. Call inside the async runtime.
    pub fn follow(&self, stats: Arc<TransferStats>) {
        if self.bar.is_hidden() {
            return;
        }
        let base = stats.bytes.load(Ordering::Relaxed);
        let bar = self.bar.clone();
        tokio::spawn(async move {
            while !bar.is_finished() {
                let received = stats.bytes.load(Ordering::Relaxed).saturating_sub(base);
                bar.set_position(received.min(bar.length().unwrap_or(u64::MAX)));
                tokio::time::sleep(TICK).await;
            }
        });
    }

    pub fn item_done(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.bar.is_hidden() {
            self.bar.set_message(format!("{done}/{} items", self.items));
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use indicatif::TermLike;

    use super::*;

    /// A terminal that keeps every line drawn on it.
    #[derive(Debug, Default, Clone)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            100
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if !s.is_empty() {
                self.0.lock().unwrap().push(s.to_owned());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_visible_bar_redraws_while_no_bytes_arrive() {
        let screen = Screen::default();
        let progress = Progress::bytes_to(
            ProgressDrawTarget::term_like(Box::new(screen.clone())),
            8 << 20,
            3,
        );
        progress.bar.inc(1 << 20);
        std::thread::sleep(Duration::from_millis(100));
        let before = screen.0.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(1100));
        let drawn = screen.0.lock().unwrap().clone();
        progress.finish();
        assert!(
            drawn.len() >= before + 2,
            "{} draws in 1.1 s without progress: {drawn:?}",
            drawn.len() - before
        );
        let last = drawn.last().unwrap();
        assert!(last.contains("1.00 MiB/8.00 MiB"), "{last}");
        assert!(last.contains("0/3 items"), "{last}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_followed_bar_moves_with_the_bytes_received() {
        let screen = Screen::default();
        let progress = Progress::bytes_to(
            ProgressDrawTarget::term_like(Box::new(screen.clone())),
            10 << 20,
            1,
        );
        let stats = Arc::new(TransferStats::default());
        stats.add_bytes(123);
        progress.follow(stats.clone());
        stats.add_bytes(3 << 20);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(progress.bar.position(), 3 << 20);
        // A retried attempt's bytes count again: the bar stops at its length.
        stats.add_bytes(20 << 20);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(progress.bar.position(), 10 << 20);
        progress.finish();
        assert!(progress.bar.is_finished());
    }
}
