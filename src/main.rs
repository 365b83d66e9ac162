//! The `quota-broker` process: flags, configuration, logging, signals.

use clap::{Parser, Subcommand};
use quota_broker::{LogFormat, Settings};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the quota broker.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "Runs the quota broker.",
    after_help = "Without --config it runs the embedded default (tenant \"demo\" on \
127.0.0.1:50051; see examples/broker.toml). QUOTA_BROKER__SECTION__KEY environment \
variables override single keys, e.g. QUOTA_BROKER__SERVER__LISTEN=0.0.0.0:50051. \
Logging: RUST_LOG (default \"info\"), server.log_format = \"text\" or \"json\". \
HTTP (metrics, dashboard, probes): server.http_listen, default 127.0.0.1:9464."
)]
struct Cli {
    /// A config file to run instead of the embedded default.
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reads a token on stdin and prints its SHA-256, for [[auth.tokens]].
    HashToken,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::HashToken) = cli.command {
        return match read_token() {
            Ok(token) => {
                println!("{}", quota_broker::hash_token(&token));
                let length = token.chars().count();
                if length < MIN_TOKEN_CHARS {
                    eprintln!(
                        "quota-broker: hash-token: warning: the token is {length} characters; \
                         tokens are compared by their SHA-256, unsalted: use at least \
                         {MIN_TOKEN_CHARS} random characters, e.g. `openssl rand -hex 32`"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("quota-broker: hash-token: {e}");
                ExitCode::from(2)
            }
        };
    }
    let config_path = cli.config;
    let (mut settings, warnings) =
        match Settings::load_with_warnings(config_path.as_deref(), std::env::vars()) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("quota-broker: {e}");
                return ExitCode::from(2);
            }
        };
    settings.server.resolve_io_threads();
    if let Err(e) = settings.check_state_dir() {
        eprintln!("quota-broker: {e}");
        return ExitCode::from(2);
    }
    // Held until the process ends.
    let _state_lock = match settings.lock_state_dir() {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("quota-broker: {e}");
            return ExitCode::from(2);
        }
    };
    // A RUST_LOG that does not parse is said once the logs are set up.
    let (filter, unread_filter) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    // Colours only on a terminal: not in files, pipes or journald.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A log line that cannot be written (whatever read stderr went away:
        // a pipe closed, a log shipper restarting) is dropped: by default the
        // subscriber reports it with `eprintln!`, which panics on that same
        // closed stderr and would take the broker down mid-request.
        .log_internal_errors(false);
    match settings.server.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    if let Some(e) = unread_filter.filter(|_| std::env::var_os("RUST_LOG").is_some()) {
        let why = e.to_string();
        let why: String = why.chars().take(200).collect();
        tracing::warn!(error = %why, "RUST_LOG cannot be read: logging at info (directives are \
            LEVEL or TARGET=LEVEL, comma-separated, e.g. info,quota_broker=debug)");
    }
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    for var in quota_broker::unread_env_vars(std::env::vars()) {
        tracing::warn!(%var, "environment variable not read: config overrides are \
            QUOTA_BROKER__<SECTION>__<KEY>, two underscores after QUOTA_BROKER and between parts");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quota-broker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = match shutdown_signal(config_path.clone()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("quota-broker: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(settings.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "quota-broker: cannot listen on server.listen {}: {e} (another broker, or \
                     another program, may hold it: stop it, or set server.listen in the config \
                     or QUOTA_BROKER__SERVER__LISTEN)",
                    settings.server.listen
                );
                return ExitCode::FAILURE;
            }
        };
        let http = match settings.server.http_listen {
            None => None,
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                // A port the config asks for: probes and scrapes there would
                // reach whatever holds it, describing another process.
                Err(e) if settings.server.http_listen_required => {
                    eprintln!(
                        "quota-broker: cannot listen on server.http_listen {addr}: {e} (set \
                         another address, or \"\" to turn the HTTP port off)"
                    );
                    return ExitCode::FAILURE;
                }
                // The default port, taken (another broker on this host): it
                // must not take the quota decisions down with it.
                Err(e) => {
                    tracing::error!(
                        http_listen = %addr, error = %e,
                        "cannot listen on server.http_listen: serving gRPC without /metrics, \
                         the dashboard and the HTTP health probes"
                    );
                    None
                }
            },
        };
        // The first few by name: a line of ten thousand ids says nothing.
        const NAMED: usize = 10;
        let mut tenants: Vec<&str> = settings
            .tenants
            .iter()
            .take(NAMED)
            .map(|t| t.id.as_str())
            .collect();
        let more = settings.tenants.len().saturating_sub(NAMED);
        let more = format!("… and {more} more");
        if settings.tenants.len() > NAMED {
            tenants.push(&more);
        }
        let listen = listener.local_addr().unwrap_or(settings.server.listen);
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        tracing::info!(
            %listen,
            http = %http_addr.map_or("off".into(), |a| a.to_string()),
            config = %config_path.as_deref().map_or("embedded default".into(), |p| p.display().to_string()),
            tenants = %tenants.join(","),
            io_threads = settings.server.io_threads.unwrap_or(0),
            "quota-broker serving"
        );
        let listeners = quota_broker::Listeners {
            grpc: listener,
            http,
        };
        match quota_broker::serve(listeners, &settings, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Installs the SIGINT/SIGTERM handlers now (so a signal that arrives
/// right after the "serving" log line is not lost) and returns a future that
/// completes on either. SIGHUP reloads nothing: it is logged, and the
/// config file the broker started with (`config`; `None`: the embedded
/// default, nothing to read again) is read and checked as a start would,
/// so an operator who edited it learns whether a restart would fail.
fn shutdown_signal(
    config: Option<PathBuf>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        // SIGHUP's default action ends the process at once (no graceful
        // stop, no lease record); `systemctl reload` and habit send it.
        let mut hangup = signal(SignalKind::hangup())?;
        Ok(async move {
            // The check of the config file under way, off the async threads
            // (it reads files) and awaited beside the signals: a SIGTERM
            // meanwhile is taken at once.
            let mut checking: Option<tokio::task::JoinHandle<()>> = None;
            loop {
                let checked = async {
                    match checking.as_mut() {
                        Some(check) => check.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // A SIGHUP that came first is told of first.
                    biased;
                    _ = hangup.recv() => {
                        tracing::warn!(
                            "SIGHUP ignored: nothing is reloaded at run time (the config, \
                             tokens and certificates are read at start); restart the broker \
                             to apply changes (SIGTERM stops it gracefully)"
                        );
                        if let (Some(path), None) = (&config, &checking) {
                            let path = path.clone();
                            checking = Some(tokio::task::spawn_blocking(move || {
                                log_check(&path, Settings::check_file(&path, std::env::vars()))
                            }));
                        }
                    }
                    done = checked => {
                        checking = None;
                        if let Err(e) = done {
                            tracing::error!(error = %e,
                                "the check of the config file after SIGHUP failed");
                        }
                    }
                    _ = interrupt.recv() => {
                        tracing::info!("SIGINT received");
                        break;
                    }
                    _ = terminate.recv() => {
                        tracing::info!("SIGTERM received");
                        break;
                    }
                }
            }
        })
    }
    #[cfg(not(unix))]
    {
        let _ = config;
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// Most problems of a config file named in the log line after a SIGHUP
/// (the line says how many more there are).
const LOGGED_PROBLEMS: usize = 10;

/// Logs what a start on the config file at `config` would say of it:
/// valid, with its warnings, or its problems.
fn log_check(config: &std::path::Path, checked: Result<Vec<String>, quota_broker::ConfigError>) {
    let config = config.display();
    match checked {
        Ok(warnings) => {
            for warning in &warnings {
                tracing::warn!(%config, "the config file would start with a warning: {warning}");
            }
            tracing::info!(%config, "the config file is valid now: restart to apply it");
        }
        Err(e) => tracing::warn!(
            %config,
            problems = e.problems.len(),
            "the config file is not valid: a restart would fail; fix it first (this broker \
             runs on the config it started with): {}",
            e.one_line(LOGGED_PROBLEMS)
        ),
    }
}

/// Shortest token `hash-token` takes without a warning: 32 random
/// characters are beyond guessing even against an unsalted hash.
const MIN_TOKEN_CHARS: usize = 32;

/// Longest token `hash-token` reads (tokens are tens of characters).
const MAX_TOKEN_BYTES: u64 = 4096;

/// The one token on stdin, without the whitespace around it (the broker
/// trims a bearer token the same way). Nothing, several lines or too much
/// is refused: a hash of those would never match what a client sends.
fn read_token() -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::io::stdin()
        .take(MAX_TOKEN_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(format!(
            "more than {MAX_TOKEN_BYTES} bytes on stdin; give one token"
        ));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err("no token on stdin (an empty or unset variable?); give one token".into());
    }
    if token.contains(['\n', '\r']) {
        return Err("more than one line on stdin; give one token".into());
    }
    Ok(token.to_owned())
}
