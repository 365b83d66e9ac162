//! Command-line arguments of `quotactl` (clap derive). Parsing only: what
//! each command does is in [`crate::commands`].

use crate::error::{clip, short};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

/// Where the broker listens when neither `--broker` nor `QUOTA_BROKER_URL` says.
pub const DEFAULT_BROKER: &str = "http://127.0.0.1:50051";
/// The broker's gRPC port unless its `server.listen` says another.
pub const DEFAULT_PORT: u16 = 50051;

/// Weight and reserve of a class that `class set` creates without them:
/// those of a `[[classes]]` entry of the config without them.
pub const NEW_CLASS_WEIGHT: u32 = 1;
pub const NEW_CLASS_RESERVE: f64 = 0.0;

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

/// The command line's definition, with every environment variable it
/// reads that is set but empty (or blanks only) taken as unset, as an
/// empty `QUOTA_BROKER_TOKEN` always was: `QUOTA_BROKER_URL=` is the
/// default broker, `QUOTA_BROKER_TENANT=` no tenant.
pub fn command() -> clap::Command {
    fn unset_blank(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            let blank = a
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|v| v.to_str().is_some_and(|v| v.trim().is_empty()));
            if blank {
                a.env(None::<&'static str>)
            } else {
                a
            }
        })
        .mut_subcommands(unset_blank)
    }
    unset_blank(Cli::command())
}

/// Most characters of a value a clap error shows (it echoes what was given,
/// up to 8 KiB).
const VALUE_CHARS: usize = 100;

/// Clap's error for a bad value that came from an environment variable
/// rather than from the command line, which clap reports as a bad flag:
/// said with the variable's name. `None` for any other error. (Clap checks
/// the variable of a global flag even when the flag is given before the
/// subcommand: `QUOTA_BROKER_TIMEOUT=abc quotactl --timeout 5 status`.)
pub fn from_environment(
    e: &clap::Error,
    args: &[OsString],
    command: &clap::Command,
) -> Option<String> {
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(flag)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    // `--timeout <SECS>`
    let long = flag.strip_prefix("--")?.split([' ', '=']).next()?;
    fn find<'a>(cmd: &'a clap::Command, long: &str) -> Option<&'a clap::Arg> {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long) && a.get_env().is_some())
            .or_else(|| cmd.get_subcommands().find_map(|c| find(c, long)))
    }
    let arg = find(command, long)?;
    let Some(ContextValue::String(refused)) = e.get(ContextKind::InvalidValue) else {
        return None;
    };
    let var = arg.get_env()?.to_string_lossy().into_owned();
    let value = std::env::var_os(&var)?;
    if value.to_string_lossy() != refused.as_str() {
        return None;
    }
    // The same value given on the command line: clap's error says it.
    let (flag_eq, flag_alone) = (format!("--{long}={refused}"), format!("--{long}"));
    let on_line = args
        .windows(2)
        .any(|w| w[0] == *flag_alone && w[1] == **refused)
        || args.iter().any(|a| *a == *flag_eq);
    if on_line {
        return None;
    }
    let why = std::error::Error::source(e)
        .map_or_else(|| "not a value it takes".to_owned(), |why| why.to_string());
    let value = if arg.is_hide_env_values_set() {
        String::new()
    } else {
        format!(" '{}'", clip(&value.to_string_lossy(), VALUE_CHARS))
    };
    Some(format!(
        "invalid value{value} for {flag} from the environment variable {var}: {}; fix or \
         unset {var}",
        short(&why)
    ))
}

/// Clap's error with the value it echoes cut to [`VALUE_CHARS`]
/// characters (`ftp://` and 5,000 more would be printed whole).
pub fn clip_value(mut e: clap::Error) -> clap::Error {
    if let Some(ContextValue::String(v)) = e.get(ContextKind::InvalidValue) {
        if v.chars().nth(VALUE_CHARS).is_some() {
            let shown = clip(v, VALUE_CHARS);
            e.insert(ContextKind::InvalidValue, ContextValue::String(shown));
        }
    }
    e
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
                     https:// broker URL (got {})",
                    short(url)
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
    /// Create or change a priority class (SetPriorityClass). Fields not
    /// given keep the class's values now in force (read first with
    /// ListPriorityClasses); a new class needs --order and takes the
    /// config's defaults for the others (weight 1, reserve 0, wait 0).
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
#[command(group(
    ArgGroup::new("field")
        .args(["order", "weight", "reserve", "default_max_wait_ms"])
        .required(true)
        .multiple(true)
))]
pub struct ClassSetArgs {
    /// Tenant whose classes change (required: this flag or its environment variable).
    #[arg(long, env = "QUOTA_BROKER_TENANT", value_name = "T")]
    pub tenant: Option<String>,
    /// Class name, e.g. `reports`.
    pub name: String,
    /// Lower is served first on ties (default: the class's now; a new class needs it).
    #[arg(long, value_name = "N")]
    pub order: Option<u32>,
    /// Share weight among classes competing for the same capacity (default:
    /// the class's now; 1 for a new class).
    #[arg(long, value_name = "W")]
    pub weight: Option<u32>,
    /// Share (0.0 to below 1.0; all classes' together below 1) of every
    /// bucket's burst and slots lower classes may never take (default: the
    /// class's now; 0 for a new class).
    #[arg(long, value_name = "R", value_parser = parse_share)]
    pub reserve: Option<f64>,
    /// Wait for Acquires of this class that give no max_wait_ms, 0 = answer
    /// at once (default: the class's now; 0 for a new class).
    #[arg(long, value_name = "MS")]
    pub default_max_wait_ms: Option<u64>,
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
/// (taken as http); returns the URL with its scheme. A URL without a port
/// is taken (the scheme's port, 80 or 443: a broker behind a proxy); an
/// error reaching it says so ([`crate::error::port_hint`]). A path or a
/// query is refused: gRPC would drop it.
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
            if uri.path() != "/" || uri.query().is_some() {
                let at = url.find("://").map_or(0, |i| i + 3);
                let rest = url[at..].find(['/', '?']).map_or("", |i| &url[at + i..]);
                return Err(format!(
                    "a gRPC broker URL has no path or query (got {}): give http://host:port or \
                     https://host:port, like http://127.0.0.1:{DEFAULT_PORT}",
                    clip(rest, VALUE_CHARS)
                ));
            }
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
                "empty address in {:?}; expected URLs separated by commas, like \
                 http://10.0.0.1:50051,http://10.0.0.2:50051",
                short(s)
            ));
        }
        let url = parse_broker_url(part).map_err(|e| format!("{}: {e}", short(part)))?;
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
        // No port: taken (a broker behind a proxy on 443); an error
        // reaching it says which port was used.
        assert_eq!(parse_broker_url("127.0.0.1").unwrap(), "http://127.0.0.1");
        // gRPC dials host:port only: a path or query would be dropped.
        for bad in [
            "http://127.0.0.1:50051/foo",
            "https://broker:443/quota/",
            "127.0.0.1:50051/foo",
            "http://127.0.0.1:50051?tenant=t",
        ] {
            let e = parse_broker_url(bad).unwrap_err();
            assert!(
                e.starts_with("a gRPC broker URL has no path or query (got /")
                    || e.starts_with("a gRPC broker URL has no path or query (got ?"),
                "{bad}: {e}"
            );
        }
        let long = format!("http://b:1/{}", "p".repeat(5_000));
        let e = parse_broker_url(&long).unwrap_err();
        assert!(e.len() < 300 && e.contains("… (5001 bytes)"), "{e}");
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
        // What was given is shown clipped.
        let long = format!("a:1,ftp://{}", "x".repeat(5_000));
        let e = parse_brokers(&long).unwrap_err();
        assert!(e.len() < 400 && e.contains("… (5006 bytes): "), "{e}");
        let e = parse_brokers(&format!("a:1,,{}", "x".repeat(5_000))).unwrap_err();
        assert!(e.len() < 400 && e.contains("… (5005 bytes)"), "{e}");
        let cli = Cli::try_parse_from(["quotactl", "--broker", "a:1,b:2", "status"]).unwrap();
        assert_eq!(cli.broker.0, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn the_default_broker_is_on_the_default_port() {
        assert!(DEFAULT_BROKER.ends_with(&format!(":{DEFAULT_PORT}")));
    }

    #[test]
    fn a_long_value_in_a_clap_error_is_clipped() {
        let long = format!("ftp://{}", "x".repeat(5_000));
        let e = command()
            .try_get_matches_from(["quotactl", "--broker", &long, "status"])
            .unwrap_err();
        let shown = clip_value(e).to_string();
        assert!(shown.len() < 500, "{} bytes: {shown}", shown.len());
        assert!(shown.contains("… (5006 bytes)' for '--broker"), "{shown}");
        // One given on the command line is clap's to say.
        let e = command()
            .try_get_matches_from(["quotactl", "--timeout", "abc", "status"])
            .unwrap_err();
        let args = ["quotactl", "--timeout", "abc", "status"].map(OsString::from);
        assert_eq!(from_environment(&e, &args, &command()), None);
    }

    #[test]
    fn class_set_needs_a_field_and_takes_any() {
        let set = |fields: &[&str]| {
            let mut args = vec!["quotactl", "class", "set", "--tenant", "t", "reports"];
            args.extend_from_slice(fields);
            Cli::try_parse_from(args)
        };
        assert_eq!(set(&[]).unwrap_err().exit_code(), 2);
        let Command::Class(ClassCommand::Set(a)) = set(&["--order", "3"]).unwrap().command else {
            panic!("not class set");
        };
        assert_eq!(
            (a.order, a.weight, a.reserve, a.default_max_wait_ms),
            (Some(3), None, None, None)
        );
        assert!(set(&["--reserve", "0.05"]).is_ok());
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
