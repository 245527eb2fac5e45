//! The command layer: each subcommand wires the pipeline stages together and reports. The rules
//! live in the library ([`crate::pipeline`], [`crate::plan`], [`crate::verify`], the sinks); the
//! flags arrive resolved ([`crate::cli::settings`]).

mod bench;
mod export;
mod fetch;
mod ls;
mod plan;
mod plot;
mod verify;

use std::io::Write;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::{Cli, Settings};
use crate::report::Outcome;

pub async fn dispatch(settings: Settings) -> anyhow::Result<Outcome> {
    match settings {
        Settings::Ls(s) => ls::run(s).await,
        Settings::Plan(s) => plan::run(s).await,
        Settings::Fetch(s) => fetch::run(s).await,
        Settings::Export(s) => export::run(s).await,
        Settings::Verify(s) => verify::run(s).await,
        Settings::Combine(s) => verify::combine(s),
        Settings::Bench(s) => bench::run(s).await,
        Settings::Completions(shell) => {
            completions(shell)?;
            Ok(Outcome::Ok)
        }
    }
}

/// Prints the completion script for `shell`. clap_complete panics when its writer fails, so the
/// script is generated into memory and written here: a closed stdout is an error like any other
/// command's (which `report::fail` counts as success).
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "dcpfetch", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("cannot write the completions to stdout")
}
