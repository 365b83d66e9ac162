//! The `[server]` section as written, its defaults and bounds, and its
//! validation into `ServerSettings`.

use super::super::tls::RawTls;
use super::super::{LogFormat, ServerSettings};
use crate::error::clip;
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    listen: String,
    max_wait_ms: u64,
    max_lease_ttl_ms: u64,
    shutdown_grace_ms: u64,
    state_dir: String,
    pub(super) tls: RawTls,
    handshake_timeout_ms: u64,
    max_pending_connections: u32,
    max_connections: u32,
    /// `None`: not set, a quarter of `max_connections`.
    max_connections_per_address: Option<u32>,
    /// `None`: not set, the default address (see `DEFAULT_HTTP_LISTEN`).
    http_listen: Option<String>,
    log_format: String,
    /// `None`: not set (see `ServerSettings::io_threads`).
    io_threads: Option<u32>,
    max_watch_streams: u32,
}

/// The HTTP port when `server.http_listen` is not set: best effort (a
/// taken port is logged, gRPC served without it); an address set in the
/// config must be bound.
pub(crate) const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9464";

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:50051".to_owned(),
            max_wait_ms: 60_000,
            max_lease_ttl_ms: 600_000,
            shutdown_grace_ms: 10_000,
            state_dir: "state".to_owned(),
            tls: RawTls::default(),
            handshake_timeout_ms: 5_000,
            max_pending_connections: 256,
            max_connections: 10_000,
            max_connections_per_address: None,
            http_listen: None,
            log_format: "text".to_owned(),
            io_threads: None,
            max_watch_streams: 512,
        }
    }
}

/// Bounds of `server.handshake_timeout_ms`: long enough for a TLS handshake
/// over a slow link, short enough that idle sockets cannot pile up.
const HANDSHAKE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=60_000;

/// Most `server.io_threads`: more threads than any machine has CPUs only
/// cost memory and wake-ups.
const MAX_IO_THREADS: u32 = 1024;

/// Bounds of `server.max_watch_streams`: each Watch stream and event feed
/// keeps its own copy of every bucket instance it shows, so the broker's
/// memory grows with their count times the instances.
const MAX_WATCH_STREAMS: std::ops::RangeInclusive<u32> = 1..=100_000;

/// Longest `server.shutdown_grace_ms`.
const MAX_SHUTDOWN_GRACE_MS: u64 = 3_600_000;

/// Longest `server.max_wait_ms`, and a class's `default_max_wait_ms`.
pub(crate) const MAX_WAIT_MS: u64 = 3_600_000;

impl RawServer {
    pub(super) fn validate(self, problems: &mut Vec<String>) -> ServerSettings {
        let listen = self.listen.parse().unwrap_or_else(|e| {
            problems.push(format!(
                "server.listen {} is not an IP:port address ({e})",
                clip(&self.listen)
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        if self.max_lease_ttl_ms == 0 {
            problems.push("server.max_lease_ttl_ms must be above 0".into());
        }
        if self.max_wait_ms > MAX_WAIT_MS {
            problems.push(format!(
                "server.max_wait_ms {} is over an hour ({MAX_WAIT_MS}): a caller waiting that \
                 long has given up, and its slot in the queue holds others back",
                self.max_wait_ms
            ));
        }
        // A drain longer than this is no drain: an orchestrator has long
        // since killed the process, and a typo must not hold a stop.
        if self.shutdown_grace_ms > MAX_SHUTDOWN_GRACE_MS {
            problems.push(format!(
                "server.shutdown_grace_ms {} is over an hour ({MAX_SHUTDOWN_GRACE_MS})",
                self.shutdown_grace_ms
            ));
        }
        if !HANDSHAKE_TIMEOUT_MS.contains(&self.handshake_timeout_ms) {
            problems.push(format!(
                "server.handshake_timeout_ms {} must be between {} and {}",
                self.handshake_timeout_ms,
                HANDSHAKE_TIMEOUT_MS.start(),
                HANDSHAKE_TIMEOUT_MS.end()
            ));
        }
        if self.max_pending_connections == 0 {
            problems.push("server.max_pending_connections must be at least 1".into());
        }
        if self.max_connections < self.max_pending_connections {
            problems.push(format!(
                "server.max_connections {} must be at least server.max_pending_connections {} \
                 (pending connections count among the open ones)",
                self.max_connections, self.max_pending_connections
            ));
        }
        if let Some(n) = self.max_connections_per_address {
            if n == 0 || n > self.max_connections {
                problems.push(format!(
                    "server.max_connections_per_address {n} must be between 1 and \
                     server.max_connections {} (behind a proxy every caller has the proxy's \
                     address: set it to server.max_connections there)",
                    self.max_connections
                ));
            }
        }
        if let Some(n) = self.io_threads.filter(|n| *n > MAX_IO_THREADS) {
            problems.push(format!(
                "server.io_threads {n} is over {MAX_IO_THREADS}: one thread per CPU is enough \
                 (0 serves on the broker's main threads)"
            ));
        }
        if !MAX_WATCH_STREAMS.contains(&self.max_watch_streams) {
            problems.push(format!(
                "server.max_watch_streams {} must be between {} and {} (Watch streams and \
                 dashboard event feeds open at once, every caller's together)",
                self.max_watch_streams,
                MAX_WATCH_STREAMS.start(),
                MAX_WATCH_STREAMS.end()
            ));
        }
        let tls = self.tls.validate(problems);
        let http_listen_required = self.http_listen.is_some();
        let http_text = self.http_listen.as_deref().unwrap_or(DEFAULT_HTTP_LISTEN);
        let http_listen = (!http_text.is_empty())
            .then(|| {
                http_text
                    .parse::<SocketAddr>()
                    .map_err(|e| {
                        problems.push(format!(
                            "server.http_listen {} is not an IP:port address ({e}); \
                             \"\" turns the HTTP port off",
                            clip(http_text)
                        ))
                    })
                    .ok()
            })
            .flatten();
        let same_port = |h: &SocketAddr| {
            h.port() == listen.port()
                && h.port() != 0
                && (h.ip() == listen.ip()
                    || h.ip().is_unspecified()
                    || listen.ip().is_unspecified())
        };
        if let Some(http) = http_listen.filter(|h| http_listen_required && same_port(h)) {
            problems.push(format!(
                "server.http_listen {http} is the gRPC port (server.listen): give the HTTP \
                 port its own, or \"\" to turn it off"
            ));
        }
        let log_format = match self.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                problems.push(format!(
                    "server.log_format {} must be \"text\" or \"json\"",
                    clip(other)
                ));
                LogFormat::Text
            }
        };
        ServerSettings {
            listen,
            max_wait: Duration::from_millis(self.max_wait_ms),
            max_lease_ttl: Duration::from_millis(self.max_lease_ttl_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            state_dir: (!self.state_dir.is_empty()).then(|| self.state_dir.into()),
            tls,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            max_pending_connections: self.max_pending_connections as usize,
            max_connections: self.max_connections as usize,
            max_connections_per_address: self
                .max_connections_per_address
                .map_or((self.max_connections / 4).max(1), |n| n)
                as usize,
            io_threads: self.io_threads.map(|n| n as usize),
            http_listen,
            http_listen_required,
            log_format,
            max_watch_streams: self.max_watch_streams as usize,
        }
    }
}
