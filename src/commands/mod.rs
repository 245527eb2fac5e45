//! The command layer: each subcommand wires the pipeline stages together and reports. The rules
//! live in the library ([`crate::pipeline`], [`crate::plan`], [`crate::verify`], the sinks); the
//! flags arrive resolved ([`crate::cli::settings`]).

mod bench;
mod fetch;
mod ls;
mod plan;
mod plot;
mod verify;

use clap::CommandFactory;

use crate::cli::{Cli, Settings};
use crate::report::Outcome;

pub async fn dispatch(settings: Settings) -> anyhow::Result<Outcome> {
    match settings {
        Settings::Ls(s) => ls::run(s).await,
        Settings::Plan(s) => plan::run(s).await,
        Settings::Fetch(s) => fetch::run(s).await,
        Settings::Verify(s) => verify::run(s).await,
        Settings::Bench(s) => bench::run(s).await,
        Settings::Completions(shell) => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "dcpfetch",
                &mut std::io::stdout(),
            );
            Ok(Outcome::Ok)
        }
    }
}
