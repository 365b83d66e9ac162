//! `gcsim`: the Genesys Cloud stand-in as a process. Prints
//! `gcsim listening on http://ADDR` once bound and serves until SIGTERM,
//! SIGINT or the end of its stdin (so a parent that dies takes it along).

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gcsim::{Sim, SimConfig};
use tokio::sync::oneshot;
use tracing_subscriber::EnvFilter;

/// A simulated Genesys Cloud org (rate limits, 429s, analytics data) on
/// loopback. The contract is testbed/gcsim/README.md.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML config (default: the built-in one-org config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to bind: a loopback address only (the `/_sim` control
    /// plane has no authentication).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, value_parser = positive_scale, allow_negative_numbers = true)]
    time_scale: Option<f64>,
    /// Seed of the analytics data.
    #[arg(long)]
    seed: Option<u64>,
    /// Log filter (tracing `EnvFilter` syntax), to stderr.
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gcsim: --log {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "gcsim: --listen {}: only a loopback address (127.0.0.1, ::1) is allowed: \
             the /_sim control plane has no authentication",
            args.listen
        );
        return ExitCode::from(2);
    }
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gcsim: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gcsim: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args.listen, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gcsim: {e}");
            ExitCode::from(2)
        }
    }
}

/// A `--time-scale` value: checked here, so that a bad one is blamed on the
/// flag rather than on the config it overrides.
fn positive_scale(text: &str) -> Result<f64, String> {
    let range = gcsim::TIME_SCALES;
    match text.parse::<f64>() {
        Ok(scale) if range.contains(&scale) => Ok(scale),
        _ => Err(format!(
            "must be a number from {} to {}",
            range.start(),
            range.end()
        )),
    }
}

/// The config of `args` (file or built-in, then the flags), checked.
fn load(args: &Args) -> Result<SimConfig, String> {
    let source = args.config.as_ref().map_or_else(
        || "the built-in config".to_owned(),
        |p| p.display().to_string(),
    );
    let mut config = match &args.config {
        None => SimConfig::default(),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {source}: {e}"))?;
            SimConfig::from_toml(&text).map_err(|e| format!("{source}: {e}"))?
        }
    };
    if let Some(scale) = args.time_scale {
        config.time_scale = scale;
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    config.check().map_err(|e| format!("{source}: {e}"))?;
    Ok(config)
}

async fn serve(listen: SocketAddr, config: SimConfig) -> Result<(), gcsim::SimError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| gcsim::SimError::Io {
            what: format!("bind {listen}"),
            source,
        })?;
    let sim = Sim::start(config, listener)?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "gcsim listening on http://{}", sim.addr());
    let _ = out.flush();
    // A plain thread, not tokio's stdin: a blocking read there would hold
    // up the runtime's shutdown.
    let (eof_tx, eof_rx) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = eof_tx.send(());
    });
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = terminate => tracing::info!("SIGTERM: stopping"),
        _ = eof_rx => tracing::info!("stdin closed: stopping"),
    }
    sim.shutdown().await;
    Ok(())
}
