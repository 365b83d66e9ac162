//! `quotactl`, the command-line tool of quota-broker: status and live watch
//! of every bucket, priority classes, bucket limits, pause and resume.
//!
//! Exit status: 0 on success, 2 for usage errors (bad or missing flags, or
//! flags that do not go together), 1 for anything else; an error is one
//! line `quotactl: <error>` on stderr (clap's usage errors: its own text).

mod cli;
mod commands;
mod error;
mod table;

use clap::Parser;
use std::process::ExitCode;

/// Longest argument accepted: names, reasons, URLs and tokens are all far
/// shorter, and clap's errors would echo a longer one whole.
const MAX_ARG_BYTES: usize = 8192;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if let Some((i, len)) = std::env::args_os()
        .map(|a| a.len())
        .enumerate()
        .find(|&(_, len)| len > MAX_ARG_BYTES)
    {
        eprintln!("quotactl: argument {i} is {len} bytes long; at most {MAX_ARG_BYTES}");
        return ExitCode::from(2);
    }
    let cli = cli::Cli::parse();
    if let Some(problem) = cli.usage_problem() {
        eprintln!("quotactl: {problem}");
        return ExitCode::from(2);
    }
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`quotactl watch --json | head -1`): done.
        Err(error::Error::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quotactl: {}", not_a_broker(e).await);
            ExitCode::FAILURE
        }
    }
}

/// `e`, or, when a plaintext broker URL dropped the connection because the
/// server there is an HTTP/1 server (the broker's HTTP port, most often),
/// what it is instead: hyper reads its answer as a connection closed.
async fn not_a_broker(e: error::Error) -> String {
    if let error::Error::Lost { url, .. } = &e {
        let within = std::time::Duration::from_secs(2);
        // A TLS port addressed with http:// keeps the error's own advice.
        if let Some(why @ quota_broker_client::NotAGrpcPort::Http1(_)) =
            quota_broker_client::not_a_grpc_port(url, within).await
        {
            return format!(
                "{} is not a quota-broker's gRPC port: {why}; give the broker's gRPC address \
                 (server.listen)",
                error::short(url)
            );
        }
    }
    e.to_string()
}
