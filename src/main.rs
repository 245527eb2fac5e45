use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = dcpfetch::cli::Cli::parse();
    match dcpfetch::run(cli) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => dcpfetch::report::fail(&e),
    }
}
