//! A progress bar on stderr (bytes, rate, ETA, items), shown only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
        let bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
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
        let bar = ProgressBar::with_draw_target(Some(runs), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {pos}/{len} runs, ETA {eta} {msg}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
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

    pub fn add_bytes(&self, n: u64) {
        self.bar.inc(n);
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
