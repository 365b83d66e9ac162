//! `quotactl`, the command-line tool of quota-broker: status and live watch
//! of every bucket, priority classes, bucket limits, pause and resume.
//!
//! Exit status: 0 on success, 2 for usage errors (bad or missing flags, or
//! flags that do not go together; a bad value from an environment variable
//! is said with the variable's name), 1 for anything else; an error is one
//! line `quotactl: <error>` on stderr (clap's usage errors: its own text).

mod cli;
mod commands;
mod error;
mod table;

use clap::FromArgMatches;
use std::process::ExitCode;

/// Longest argument accepted: names, reasons, URLs and tokens are all far
/// shorter, and clap's errors would echo a longer one whole.
const MAX_ARG_BYTES: usize = 8192;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some((i, len)) = args
        .iter()
        .map(|a| a.len())
        .enumerate()
        .find(|&(_, len)| len > MAX_ARG_BYTES)
    {
        eprintln!(
            "quotactl: {} is {len} bytes long; at most {MAX_ARG_BYTES}",
            which_argument(&args, i)
        );
        return ExitCode::from(2);
    }
    let mut command = cli::command();
    let parsed = match command.try_get_matches_from_mut(&args) {
        Ok(mut matches) => {
            cli::Cli::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut command))
        }
        Err(e) => Err(e),
    };
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(problem) = cli::from_environment(&e, &args, &command) {
                eprintln!("quotactl: {problem}");
                return ExitCode::from(2);
            }
            // Help and version too (exit status 0).
            cli::clip_value(e).exit()
        }
    };
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
        Err(e @ error::Error::Usage(_)) => {
            eprintln!("quotactl: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("quotactl: {}", not_a_broker(e).await);
            ExitCode::FAILURE
        }
    }
}

/// Argument `i` of `args` named for an error: the flag it is the value of
/// (`--reason`, or `--reason=…` itself), else its place.
fn which_argument(args: &[std::ffi::OsString], i: usize) -> String {
    // A flag of some subcommand that takes a value (not `--json`).
    fn takes_value(cmd: &clap::Command, long: &str) -> bool {
        cmd.get_arguments()
            .any(|a| a.get_long() == Some(long) && a.get_action().takes_values())
            || cmd.get_subcommands().any(|c| takes_value(c, long))
    }
    let command = <cli::Cli as clap::CommandFactory>::command();
    let flag = |a: &std::ffi::OsString| {
        let a = a.to_str()?;
        let long = a.strip_prefix("--").filter(|l| l.len() <= 64)?;
        takes_value(&command, long).then(|| a.to_owned())
    };
    if let Some(own) = args[i]
        .to_str()
        .and_then(|a| a.strip_prefix("--"))
        .and_then(|a| a.split_once('='))
        .filter(|(name, _)| name.len() <= 64)
    {
        return format!("the value of --{}", own.0);
    }
    match i.checked_sub(1).and_then(|p| flag(&args[p])) {
        Some(f) => format!("the value of {f}"),
        None => format!("argument {i}"),
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
                 (server.listen){}",
                error::short(url),
                error::port_hint(url)
            );
        }
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::which_argument;

    #[test]
    fn a_long_argument_is_named_by_its_flag() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let long = "x".repeat(9000);
        let given = args(&["quotactl", "pause", "--tenant", "t", "b", "--reason", &long]);
        assert_eq!(which_argument(&given, 6), "the value of --reason");
        let eq = format!("--reason={long}");
        let given = args(&["quotactl", "pause", "b", &eq]);
        assert_eq!(which_argument(&given, 3), "the value of --reason");
        let given = args(&["quotactl", "pause", "b", "--tenant", &long]);
        assert_eq!(which_argument(&given, 4), "the value of --tenant");
        // A bucket after a value, or after a flag that takes none.
        let given = args(&["quotactl", "pause", "--tenant", "t", &long]);
        assert_eq!(which_argument(&given, 4), "argument 4");
        let given = args(&["quotactl", "bucket", "set-limit", "--reset", &long]);
        assert_eq!(which_argument(&given, 4), "argument 4");
    }
}
