//! What each subcommand does: connect to the broker (with the bearer token on
//! every call), make the RPC, print the answer. Formatting is in
//! [`crate::table`].
//!
//! Several brokers (a cluster, `--broker URL,URL,...`): a call for one
//! tenant goes to the first broker given and follows the cluster as the
//! Rust client does ([`Cluster::call`]); a call over every tenant (`status`
//! or `watch` without `--tenant`) goes to every broker given and the
//! answers are merged ([`Cluster::each`]), each broker showing the tenants
//! it leads.

mod buckets;
mod classes;
mod cluster;
mod pause;
mod status;
mod tls;
mod watch;

use crate::cli::{BucketCommand, ClassCommand, Cli, Command};
use crate::error::Error;
use crate::table;
use buckets::{clear, set_limit};
use classes::{class_list, class_reset, class_set};
use cluster::Cluster;
use pause::{pause, resume};
use quota_broker::pb::QuotaStatus;
use status::status;
use std::io::Write;
use std::time::Duration;
use tls::tls_config;
use watch::watch;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let timeout = Duration::from_secs(cli.timeout);
    let mut c = Cluster::new(cli.broker.0, cli.token, cli.tls, timeout);
    // As with one broker: TLS options that cannot apply fail before any call.
    for url in &c.urls {
        tls_config(url, &c.tls)?;
    }
    match cli.command {
        Command::Status(a) => status(&mut c, a).await,
        Command::Watch(a) => watch(&mut c, a).await,
        Command::Class(ClassCommand::List(a)) => class_list(&mut c, a).await,
        Command::Class(ClassCommand::Set(a)) => class_set(&mut c, a).await,
        Command::Class(ClassCommand::Reset(a)) => class_reset(&mut c, a).await,
        Command::Bucket(BucketCommand::SetLimit(a)) => set_limit(&mut c, a).await,
        Command::Pause(a) => pause(&mut c, a).await,
        Command::Resume(a) => resume(&mut c, a).await,
        Command::Clear(a) => clear(&mut c, a).await,
    }
}

/// The tenant of a command for one tenant: given, since
/// [`Cli::usage_problem`] refuses such a command without one.
fn given(tenant: Option<String>) -> String {
    tenant.unwrap_or_default()
}

/// Prints the state an admin change answered with, as a one-row table or JSON.
fn print_status(
    status: Option<QuotaStatus>,
    json: bool,
    tenant: &str,
    bucket: &str,
    what: &str,
) -> Result<(), Error> {
    match (status, json) {
        (Some(s), true) => print(&format!("{}\n", pretty(&table::status_json(&s)))),
        (Some(s), false) => print(&table::render_status([&s])),
        (None, true) => print("null\n"),
        (None, false) => print(&format!("{tenant}/{bucket}: {what}\n")),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// Writes to stdout and flushes (so `watch` output appears at once).
fn print(s: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Error::Output)
}

#[cfg(test)]
mod tests;
