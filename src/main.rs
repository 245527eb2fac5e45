use std::process::ExitCode;

use clap::Parser;

// mimalloc keeps freed memory for reuse: received buffers are recycled instead of being returned
// to the kernel and faulted in again (0.50 -> 0.37 CPU s/GiB fetched; docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = dcpfetch::cli::Cli::parse();
    match dcpfetch::run(cli) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => dcpfetch::report::fail(&e),
    }
}
