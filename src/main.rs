//! The `quota-broker` process: flags, configuration, logging, signals.

use quota_broker::{server, Settings};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: quota-broker [--config PATH]
       quota-broker hash-token    (reads a token on stdin, prints its SHA-256 for [[auth.tokens]])

Runs the quota broker. Without --config it runs the embedded default
(tenant \"demo\" on 127.0.0.1:50051; see examples/broker.toml).
QUOTA_BROKER__SECTION__KEY environment variables override single keys,
e.g. QUOTA_BROKER__SERVER__LISTEN=0.0.0.0:50051. Logging: RUST_LOG
(default \"info\").";

/// Parses the one flag by hand: a crate for `--config PATH` and `--help`
/// would cost more build time than it saves.
fn parse_args() -> Result<Option<PathBuf>, String> {
    let mut args = std::env::args_os().skip(1);
    let mut config = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--config" | "-c") => {
                config = Some(PathBuf::from(args.next().ok_or("--config needs a PATH")?));
            }
            Some("--help" | "-h") => return Err(String::new()),
            Some("hash-token") => return Err("hash-token".into()),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(config)
}

fn main() -> ExitCode {
    let config_path = match parse_args() {
        Ok(p) => p,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) if e == "hash-token" => {
            let mut token = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut token) {
                eprintln!("quota-broker: cannot read the token from stdin: {e}");
                return ExitCode::FAILURE;
            }
            println!(
                "{}",
                quota_broker::auth::hash_token(token.trim_end_matches(['\r', '\n']))
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("quota-broker: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = match Settings::load(config_path.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("quota-broker: {e}");
            return ExitCode::from(2);
        }
    };
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
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("quota-broker: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(settings.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("quota-broker: cannot listen on {}: {e}", settings.server.listen);
                return ExitCode::FAILURE;
            }
        };
        let tenants: Vec<&str> = settings.tenants.iter().map(|t| t.id.as_str()).collect();
        let listen = listener.local_addr().unwrap_or(settings.server.listen);
        tracing::info!(
            %listen,
            config = %config_path.as_deref().map_or("embedded default".into(), |p| p.display().to_string()),
            ?tenants,
            "quota-broker serving"
        );
        match server::run(listener, &settings, shutdown).await {
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
/// completes on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
