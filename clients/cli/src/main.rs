//! `quotactl`, the command-line tool of quota-broker: status and live watch
//! of every bucket, priority classes, bucket limits, pause and resume.
//!
//! Exit status: 0 on success, 2 for usage errors (from clap), 1 for anything
//! else, reported as one line `quotactl: <error>` on stderr.

mod cli;
mod commands;
mod error;
mod table;

use clap::Parser;
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`quotactl watch --json | head -1`): done.
        Err(error::Error::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quotactl: {e}");
            ExitCode::FAILURE
        }
    }
}
