//! dcpfetch: download exactly the bytes you need from a PyTorch Distributed Checkpoint.
//!
//! The pipeline, one module per stage:
//! [`metadata`] (read `.metadata` safely) -> [`selection`] (what the person asked for) ->
//! [`plan`] (byte ranges, range groups, requests) -> [`fetch`] (concurrent reads into per-item
//! buffers) -> [`sink`] (sparse files, stdout, tar, or nothing). [`source`] is the storage backend
//! (a local folder or S3) the fetch engine reads from; [`verify`] checks what the stages read;
//! [`commands`] ties the stages to the CLI.

pub mod cli;
pub mod commands;
pub mod export;
pub mod fetch;
pub mod item;
pub mod metadata;
pub mod pipeline;
pub mod plan;
pub mod report;
pub mod selection;
pub mod sink;
pub mod source;
pub mod units;
pub mod verify;

pub use report::Outcome;

/// Runs one command line to completion: its flags are resolved (and refused if they cannot run)
/// before anything is read or written; `-v` logs every request on stderr.
pub fn run(cli: cli::Cli) -> anyhow::Result<Outcome> {
    let settings = cli::Settings::resolve(cli.command)?;
    cli::log::init(cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(commands::dispatch(settings))
}
