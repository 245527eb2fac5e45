//! The command-line edge: clap's view of the flags ([`args`]), their resolution into one settings
//! value per command ([`settings`]) and the one [`printer`] of reports, warnings and progress.

pub mod args;
pub mod printer;
pub mod settings;

pub use args::{Cli, Command};
pub use printer::{Printer, ReportFormat};
pub use settings::{Output, Settings, UsageError};
