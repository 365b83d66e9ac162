//! Command-line arguments of `quotactl` (clap derive). Parsing only: what
//! each command does is in [`crate::commands`].

use clap::{ArgGroup, Args, Parser, Subcommand};
use std::path::PathBuf;

/// Where the broker listens when neither `--broker` nor `QUOTA_BROKER_URL` says.
pub const DEFAULT_BROKER: &str = "http://127.0.0.1:50051";

/// Operate a quota-broker: look at its buckets, change classes and limits,
/// pause and resume buckets.
#[derive(Debug, Parser)]
#[command(name = "quotactl", version, about, propagate_version = true)]
pub struct Cli {
    /// Broker address: `http://host:port`, or `https://host:port` for a
    /// broker with `[server.tls]` (a bare `host:port` means http). A
    /// cluster: several, comma-separated (`http://b1:50051,http://b2:50051`);
    /// a command for one tenant goes to that tenant's leader, a command over
    /// every tenant asks every broker given.
    #[arg(
        long,
        global = true,
        env = "QUOTA_BROKER_URL",
        default_value = DEFAULT_BROKER,
        value_name = "URL[,URL...]",
        value_parser = parse_brokers
    )]
    pub broker: Brokers,

    /// Bearer token, sent as `authorization: Bearer <token>` on every call.
    #[arg(
        long,
        global = true,
        env = "QUOTA_BROKER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Seconds a unary call to one broker may take before quotactl gives up
    /// on it (and tries the next broker given, if any). Watch streams are
    /// not bounded by it.
    #[arg(
        long,
        global = true,
        env = "QUOTA_BROKER_TIMEOUT",
        default_value_t = 30,
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub timeout: u64,

    /// TLS options, for an `https://` broker.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// TLS options for an `https://` broker (all PEM files).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// CA certificate(s) to trust for the broker's certificate, instead of
    /// the system's trusted roots (a private CA).
    #[arg(long, global = true, env = "QUOTA_BROKER_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate chain for mutual TLS (with --client-key).
    #[arg(
        long,
        global = true,
        env = "QUOTA_BROKER_CLIENT_CERT",
        value_name = "PATH"
    )]
    pub client_cert: Option<PathBuf>,
    /// Private key of --client-cert.
    #[arg(
        long,
        global = true,
        env = "QUOTA_BROKER_CLIENT_KEY",
        value_name = "PATH"
    )]
    pub client_key: Option<PathBuf>,
    /// Name to check the broker's certificate against, when the URL's host
    /// is not one it names (an IP address, a tunnel, a load balancer's name).
    #[arg(
        long,
        global = true,
        env = "QUOTA_BROKER_TLS_SERVER_NAME",
        value_name = "NAME"
    )]
    pub tls_server_name: Option<String>,
}

impl Cli {
    /// What is wrong with the options together, which clap cannot say: a
    /// command for one tenant given none (`--tenant` is optional to clap,
    /// so that its usage does not demand the flag `QUOTA_BROKER_TENANT`
    /// can stand for), TLS options for a broker URL that is not
    /// `https://`, or a client certificate without its key (or a key
    /// without its certificate).
    pub fn usage_problem(&self) -> Option<String> {
        if let Some((command, None)) = self.command.one_tenant() {
            return Some(format!(
                "{command} needs a tenant: give --tenant <T> or set QUOTA_BROKER_TENANT"
            ));
        }
        if self.tls.any() {
            if let Some(url) = self.broker.0.iter().find(|u| !u.starts_with("https://")) {
                return Some(format!(
                    "--ca-cert, --client-cert, --client-key and --tls-server-name need an \
                     https:// broker URL (got {url})"
                ));
            }
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return Some(
                "--client-cert and --client-key go together (a certificate and its key)".into(),
            );
        }
        None
    }
}

impl TlsArgs {
    /// Whether any TLS option was given.
    pub fn any(&self) -> bool {
        self.ca_cert.is_some()
            || self.client_cert.is_some()
            || self.client_key.is_some()
            || self.tls_server_name.is_some()
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One table of every bucket (ListBuckets).
    Status(StatusArgs),
    /// The same table, live (Watch), redrawn whenever a bucket changes.
    Watch(WatchArgs),
    /// Priority classes.
    #[command(subcommand)]
    Class(ClassCommand),
    /// Bucket limits.
    #[command(subcommand)]
    Bucket(BucketCommand),
    /// Stop granting from a bucket until resumed; waiters get the reason.
    Pause(PauseArgs),
    /// Resume a paused bucket.
    Resume(ResumeArgs),
    /// Forget what the broker learned about a bucket (freeze, cut rate,
    /// learned limit, cooldown, the upstream's budget view): for when the
    /// upstream's block is over but the broker still holds the bucket back.
    Clear(ClearArgs),
}

impl Command {
    /// A command for one tenant: its name and the tenant given (`--tenant`
    /// or `QUOTA_BROKER_TENANT`), which [`Cli::usage_problem`] requires.
    /// `None` for `status` and `watch`, which cover every tenant without one.
    fn one_tenant(&self) -> Option<(&'static str, Option<&str>)> {
        let (command, tenant) = match self {
            Command::Status(_) | Command::Watch(_) => return None,
            Command::Class(ClassCommand::List(a)) => ("class list", &a.tenant),
            Command::Class(ClassCommand::Set(a)) => ("class set", &a.tenant),
            Command::Class(ClassCommand::Reset(a)) => ("class reset", &a.tenant),
            Command::Bucket(BucketCommand::SetLimit(a)) => ("bucket set-limit", &a.tenant),
            Command::Pause(a) => ("pause", &a.tenant),
            Command::Resume(a) => ("resume", &a.tenant),
            Command::Clear(a) => ("clear", &a.tenant),
        };
        Some((command, tenant.as_deref()))
    }
}

/// `quotactl status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this tenant (default: every tenant the token may see).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// A JSON array of the bucket states instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `quotactl watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this tenant (default: every tenant the token may see); in a
    /// cluster, followed to its next leader when it moves.
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// One JSON object per update and line, instead of the redrawn table.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many updates (the initial snapshot counts one per bucket).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
}

/// `quotactl class ...`.
#[derive(Debug, Subcommand)]
pub enum ClassCommand {
    /// A tenant's priority classes as now in force, served first to last
    /// (ListPriorityClasses).
    List(ClassListArgs),
    /// Create or change a priority class (SetPriorityClass). Every field is
    /// replaced, so give them all.
    Set(ClassSetArgs),
    /// Undo operators' changes to a class (SetPriorityClass with reset):
    /// the config file's class again, or, for a class the config lacks, the
    /// class removed (Acquires already waiting in it are still served).
    Reset(ClassResetArgs),
}

/// `quotactl class reset`.
#[derive(Debug, Args)]
pub struct ClassResetArgs {
    /// Tenant whose class is reset (required: this flag or its environment variable).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// Class name, e.g. `reports`.
    pub name: String,
    /// Print the class now in force as JSON (`null`: removed).
    #[arg(long)]
    pub json: bool,
}

/// `quotactl class list`.
#[derive(Debug, Args)]
pub struct ClassListArgs {
    /// Tenant whose classes to list (required: this flag or its environment variable).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// A JSON object (`classes`, `default_class`) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `quotactl class set`.
#[derive(Debug, Args)]
pub struct ClassSetArgs {
    /// Tenant whose classes change (required: this flag or its environment variable).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// Class name, e.g. `reports`.
    pub name: String,
    /// Lower is served first on ties.
    #[arg(long, value_name = "N")]
    pub order: u32,
    /// Share weight among classes competing for the same capacity.
    #[arg(long, value_name = "W")]
    pub weight: u32,
    /// Share (0.0 to below 1.0; all classes' together below 1) of every bucket's burst and slots lower classes may never take.
    #[arg(long, value_name = "R", value_parser = parse_share)]
    pub reserve: f64,
    /// Wait for Acquires of this class that give no max_wait_ms (0 = answer at once).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub default_max_wait_ms: u64,
    /// Print the class as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `quotactl bucket ...`.
#[derive(Debug, Subcommand)]
pub enum BucketCommand {
    /// Change a bucket's rate or concurrency limit (SetBucketLimit). Limits
    /// not given stay as they are; `--reset` puts them all back to the
    /// config file's.
    SetLimit(SetLimitArgs),
}

/// `quotactl bucket set-limit`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("limit")
        .args(["permits", "window_ms", "burst", "max_in_flight", "reset"])
        .required(true)
        .multiple(true)
))]
pub struct SetLimitArgs {
    /// Tenant of the bucket (required: this flag or its environment variable).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// Bucket name from the configuration.
    pub bucket: String,
    /// New rate: permits per window.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub permits: Option<u32>,
    /// New rate window in milliseconds.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub window_ms: Option<u64>,
    /// New burst: the most permits the bucket holds.
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u32).range(1..))]
    pub burst: Option<u32>,
    /// New concurrency limit (slots).
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: Option<u32>,
    /// Drop every limit operators set on the bucket: back to the config
    /// file's (a rate or concurrency limit the config lacks is removed),
    /// and no longer re-applied at start. A pause stays (`resume` ends it).
    #[arg(long, conflicts_with_all = ["permits", "window_ms", "burst", "max_in_flight"])]
    pub reset: bool,
    /// Print the resulting state as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `quotactl pause`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Tenant of the bucket (required: this flag or its environment variable).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// Bucket name from the configuration.
    pub bucket: String,
    /// Why, shown to waiting and new requests (default: "paused by" and the name of the admin token used).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Print the resulting state as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `quotactl clear`.
#[derive(Debug, Args)]
pub struct ClearArgs {
    /// Tenant of the bucket (required: this flag or its environment variable).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// Bucket name from the configuration.
    pub bucket: String,
    /// Only this OAuth client's instance of a per-client bucket (default: all).
    #[arg(long, value_name = "ID")]
    pub oauth_client: Option<String>,
    /// Print the resulting states as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `quotactl resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// Tenant of the bucket (required: this flag or its environment variable).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// Bucket name from the configuration.
    pub bucket: String,
    /// Print the resulting state as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Accepts `http://host:port`, `https://host:port` or a bare `host:port`
/// (taken as http); returns the URL with its scheme.
pub fn parse_broker_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty; expected a URL like http://127.0.0.1:50051".into());
    }
    let url = match s.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.trim_end_matches('/')),
        None => format!("http://{}", s.trim_end_matches('/')),
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err("expected an http:// or https:// URL, like http://127.0.0.1:50051".into());
    }
    match url.parse::<tonic::transport::Uri>() {
        // What the clients check too: a port from 1 to 65535, one host.
        Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) => {
            quota_broker_client::check_broker_address(&url)
                .map(|_| url)
                .map_err(|why| format!("not a valid broker address: {why}"))
        }
        _ => Err("not a valid URL; expected one like http://127.0.0.1:50051".into()),
    }
}

/// The broker addresses given (`--broker`, comma-separated): at least one,
/// each a URL with its scheme, no two the same, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Brokers(pub Vec<String>);

/// Accepts one broker address or several, comma-separated (blanks around
/// the commas are ignored, a repeated address counts once); each as
/// [`parse_broker_url`].
pub fn parse_brokers(s: &str) -> Result<Brokers, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() == 1 {
        return parse_broker_url(parts[0]).map(|u| Brokers(vec![u]));
    }
    let mut urls: Vec<String> = Vec::new();
    for part in parts {
        if part.is_empty() {
            return Err(format!(
                "empty address in {s:?}; expected URLs separated by commas, like \
                 http://10.0.0.1:50051,http://10.0.0.2:50051"
            ));
        }
        let url = parse_broker_url(part).map_err(|e| format!("{part}: {e}"))?;
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    Ok(Brokers(urls))
}

/// A share between 0.0 and 1.0.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        // Below 1: a class that reserved everything would starve the ones
        // below it (the broker refuses it too).
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err("expected a share from 0.0 to below 1.0, e.g. 0.1 for 10%".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("127.0.0.1:1").unwrap(),
            "http://127.0.0.1:1"
        );
        assert_eq!(
            parse_broker_url("http://broker:50051/").unwrap(),
            "http://broker:50051"
        );
        assert_eq!(
            parse_broker_url("https://broker:50051/").unwrap(),
            "https://broker:50051"
        );
        assert!(parse_broker_url("ftp://broker").is_err());
        // A port a broker cannot have is a usage error, not "unreachable".
        for bad in [
            "http://127.0.0.1:abc",
            "127.0.0.1:70000",
            "http://127.0.0.1:0",
        ] {
            let e = parse_broker_url(bad).unwrap_err();
            assert!(e.contains("is not a number from 1 to 65535"), "{bad}: {e}");
        }
        assert!(parse_broker_url("").is_err());
        assert!(parse_broker_url("http://").is_err());
        assert!(parse_broker_url("http://a b").is_err());
    }

    #[test]
    fn broker_lists() {
        assert_eq!(
            parse_brokers("127.0.0.1:1").unwrap(),
            Brokers(vec!["http://127.0.0.1:1".into()])
        );
        assert_eq!(
            parse_brokers("http://a:1, https://b:2/ ,a:1").unwrap(),
            Brokers(vec!["http://a:1".into(), "https://b:2".into()])
        );
        assert!(parse_brokers("").is_err());
        assert!(parse_brokers("a:1,,b:2").is_err());
        assert!(parse_brokers("a:1,").is_err());
        let e = parse_brokers("a:1,ftp://b").unwrap_err();
        assert!(e.starts_with("ftp://b: "), "{e}");
        let cli = Cli::try_parse_from(["quotactl", "--broker", "a:1,b:2", "status"]).unwrap();
        assert_eq!(cli.broker.0, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn shares() {
        assert_eq!(parse_share("0.1").unwrap(), 0.1);
        assert!(parse_share("1.5").is_err());
        assert!(parse_share("1.0").is_err());
        assert_eq!(parse_share("0").unwrap(), 0.0);
        assert!(parse_share("-0.1").is_err());
        assert!(parse_share("NaN").is_err());
        assert!(parse_share("x").is_err());
    }

    #[test]
    fn set_limit_needs_a_limit() {
        let e = Cli::try_parse_from(["quotactl", "bucket", "set-limit", "--tenant", "t", "b"])
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let ok = Cli::try_parse_from([
            "quotactl",
            "bucket",
            "set-limit",
            "--tenant",
            "t",
            "b",
            "--burst",
            "4",
        ]);
        assert!(ok.is_ok());
        let zero = Cli::try_parse_from([
            "quotactl",
            "bucket",
            "set-limit",
            "--tenant",
            "t",
            "b",
            "--permits",
            "0",
        ]);
        assert!(zero.is_err(), "0 would mean unchanged on the wire");
    }
}
