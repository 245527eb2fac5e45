//! The command-line edge: clap's view of the flags ([`args`]), their resolution into one settings
//! value per command ([`settings`]), the one [`printer`] of reports, warnings and progress, and
//! the request [`log`] of `-v`.

pub mod args;
pub mod log;
pub mod printer;
pub mod settings;

pub use args::{Cli, Command};
pub use printer::{Printer, ReportFormat};
pub use settings::{Output, Settings, UsageError};
