//! The gRPC server: the broker's services plus grpc.health.v1 (per
//! service) and server reflection (v1 and v1alpha) on one listener, the
//! HTTP port beside it when one is given, the start (both ports answer
//! while the broker starts: `starting`), and the shutdown sequence (health
//! goes NOT_SERVING, streams and waiters end, open calls drain for at most
//! the grace period). Connections come through `transport` (handshake
//! timeout, connection caps, TLS), are served on `threads` (one
//! single-threaded runtime per CPU) unless `server.io_threads` is 0, and
//! every RPC goes through `observe` (request
//! id, latency) and `overload` (plaintext tokens from afar refused,
//! per-caller rates); then a unary Acquire is read and answered by `fast`
//! (its own gRPC framing), every other call by tonic's router.

mod admin_service;
mod broker_service;
mod caps;
mod coalesce;
mod codec;
mod embedded;
mod fast;
mod http1;
mod lease_stream;
mod observe;
mod ops;
mod overload;
mod starting;
mod stopping;
mod threads;
mod throttled;
mod transport;

pub(crate) use caps::{per_peer_cap, PerPeer};
pub(crate) use http1::answer_505;
pub(crate) use throttled::Throttled;
pub(crate) use transport::PREFACE;

pub use codec::MAX_CONCURRENT_STREAMS;
pub use embedded::Embedded;

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::clock::millis;
use crate::config::Settings;
use crate::http::StartStage;
use crate::metrics::{BucketCollector, Metrics};
use crate::pb;
use admin_service::AdminService;
use broker_service::BrokerService;
use codec::MAX_MESSAGE_BYTES;
use fast::FastAcquireLayer;
use observe::ObserveLayer;
use overload::GuardLayer;
pub(crate) use overload::{Overload, RETRY_AFTER_MS};
use pb::quota_admin_server::QuotaAdminServer;
use pb::quota_broker_server::QuotaBrokerServer;
use starting::{GateLayer, Starting};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use stopping::EndOnStop;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;
pub(crate) use transport::PeerInfo;

/// HTTP/2 PING interval on idle connections, so a sidecar that vanished
/// without closing its socket (and the waits, leases and streams it holds)
/// is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keepalive PING may go unanswered before the connection is
/// closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Before 16 hex digits drawn at start, the health name only this server
/// answers (see `Broker::instance_name`).
pub(crate) const INSTANCE_PREFIX: &str = "quota-broker.instance.";
/// grpc.health.v1's own name, checked like the others.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// The reflection services, both versions.
const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Sets every name the health service answers for to `status`: "" (the
/// whole server), the broker's services, health and reflection. The whole
/// server is set last when it turns SERVING and first when it stops, so a
/// caller that saw "" SERVING finds every service SERVING too.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    let services = [
        <QuotaBrokerServer<BrokerService> as NamedService>::NAME,
        <QuotaAdminServer<AdminService> as NamedService>::NAME,
        HEALTH_SERVICE,
    ];
    let serving = status == ServingStatus::Serving;
    if !serving {
        health.set_service_status("", status).await;
    }
    for service in services.iter().chain(&REFLECTION_SERVICES) {
        health.set_service_status(*service, status).await;
    }
    if serving {
        health.set_service_status("", status).await;
    }
}

/// How often cluster mode checks whether the broker is in the cluster (its
/// etcd lease runs out on the clock, with no event to wait for).
const READINESS_EVERY: Duration = Duration::from_millis(250);

/// Cluster mode: keeps gRPC health in step with `/readyz`. Without a valid
/// etcd lease the broker leads no tenant and knows no leader to send
/// callers to, so health says NOT_SERVING (a gRPC readiness probe, and the
/// clients' health probes before they leave their fallback, see the same
/// as `/readyz`); SERVING again once it is back in the cluster. Ends with
/// the shutdown.
async fn follow_readiness(
    broker: Broker,
    health: HealthReporter,
    may_serve: Arc<tokio::sync::Mutex<bool>>,
    mut serving: bool,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(READINESS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let unready = broker.not_ready();
        if unready.is_none() == serving {
            continue;
        }
        let allowed = may_serve.lock().await;
        if !*allowed {
            return;
        }
        serving = unready.is_none();
        match unready {
            None => {
                set_health(&health, ServingStatus::Serving).await;
                tracing::info!("in the cluster again: health SERVING");
            }
            Some(why) => {
                set_health(&health, ServingStatus::NotServing).await;
                tracing::warn!("health NOT_SERVING: {why}");
            }
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The reflection service could not load the descriptor set.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A serving thread (`server.io_threads`) could not be started.
    #[error("cannot start gRPC serving thread {0}: {1}")]
    Thread(usize, std::io::Error),
    /// A serving thread's server panicked.
    #[error("gRPC serving thread {0} panicked (its log line says where)")]
    ThreadPanicked(usize),
    /// The broker's start-up work did not finish (the runtime is shutting
    /// down under it).
    #[error("the broker's start was cut short: {0} (is the runtime shutting down?)")]
    Start(tokio::task::JoinError),
}

/// The listeners the broker serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC port.
    pub grpc: TcpListener,
    /// The HTTP port (`/metrics`, the dashboard, health probes); `None`:
    /// none, and no metrics are counted.
    pub http: Option<TcpListener>,
}

/// Serves the broker on `listener` (gRPC only) until `shutdown` completes,
/// then shuts down gracefully within `settings.server.shutdown_grace`. The
/// port answers at once, the broker's calls UNAVAILABLE "starting" until
/// its start is done (see [`serve`]; [`Embedded::started`] waits for it).
pub async fn run(
    listener: TcpListener,
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listeners = Listeners {
        grpc: listener,
        http: None,
    };
    serve(listeners, settings, shutdown).await
}

/// Serves the broker on `listeners` until `shutdown` completes, then shuts
/// down gracefully within `settings.server.shutdown_grace`.
///
/// Both ports answer from the call on; the broker's start-up work runs
/// meanwhile (see `starting`): until it is done, grpc.health.v1 answers
/// NOT_SERVING and the broker's calls UNAVAILABLE "the broker is
/// starting". Once it is, health turns SERVING and "broker started" is
/// logged.
pub async fn serve(
    listeners: Listeners,
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_telling(listeners, settings, shutdown, None).await
}

/// [`serve`], setting `started` to true once the broker serves.
pub(crate) async fn serve_telling(
    listeners: Listeners,
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started_tell: Option<tokio::sync::watch::Sender<bool>>,
) -> Result<(), ServerError> {
    let begun = std::time::Instant::now();
    let Listeners {
        grpc: listener,
        http,
    } = listeners;
    let token = CancellationToken::new();
    // Stops the accept loop (and the broker's tasks) if the start fails
    // below; a normal stop cancels it anyway.
    let _stop_guard = token.clone().drop_guard();
    // The HTTP port answers from now on (probes during a long start), and
    // outlives the gRPC drain, so /readyz can say 503 during it.
    let http_stop = CancellationToken::new();
    // Stops it too if the start fails below.
    let http_stop_guard = http_stop.clone().drop_guard();
    let http = http.map(|listener| {
        crate::http::Port::open(listener, settings.server.max_connections, http_stop.clone())
    });
    let stage = http
        .as_ref()
        .map_or_else(StartStage::new, |(port, _)| port.stage());
    let with_metrics = http.is_some();

    let auth = Authenticator::new(settings.tokens.clone());
    if auth.is_open() {
        // The address bound (an embedding caller may bind another port
        // than the config's).
        let listen = listener.local_addr().map_or(settings.server.listen, |a| a);
        tracing::warn!(
            %listen,
            "no [[auth.tokens]] configured: running OPEN (no authentication), allowed on loopback only"
        );
    }
    match &settings.server.tls {
        Some(tls) => {
            tracing::info!(
                cert = %tls.cert.display(),
                mutual = tls.is_mutual(),
                "serving gRPC over TLS"
            );
            tls.warn_if_expiring();
        }
        None => tracing::info!("serving plaintext gRPC (no [server.tls])"),
    }
    let overload = Overload::new(settings, auth.clone());

    // Health: every name NOT_SERVING until the broker has started (the
    // reporter starts with "" SERVING).
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    // This server's own name, SERVING while its port is open: a broker
    // dialling its `cluster.advertise` finds it only at its own port.
    let instance = format!("{INSTANCE_PREFIX}{:016x}", fastrand::u64(..));
    health
        .set_service_status(&instance, ServingStatus::Serving)
        .await;
    // Each version lists the other too (a client sees every service the
    // port serves, whichever it asks).
    let reflection = EndOnStop::new(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .build_v1()?,
        token.clone(),
    );
    // v1alpha too: Python's grpcio-reflection, Postman and older
    // grpcurl/grpcui ask only for it.
    let reflection_v1alpha = EndOnStop::new(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?,
        token.clone(),
    );
    let health_service = EndOnStop::new(health_service, token.clone());

    // The gRPC port answers from now on too (see `starting`): health and
    // reflection as they are, the broker's services UNAVAILABLE "starting"
    // until `started` holds the full stack.
    let started = Arc::new(OnceLock::new());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    // A stop asked for during the start: health never says SERVING.
    let stop_early = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // False once shutdown began: held while health is set, so that the
    // cluster's readiness never says SERVING after the stop's NOT_SERVING.
    let may_serve = Arc::new(tokio::sync::Mutex::new(true));
    let signal = {
        let token = token.clone();
        let health = health.clone();
        let stop_early = stop_early.clone();
        let may_serve = may_serve.clone();
        async move {
            // A stop asked for during the start is noted at once and acted
            // on once the start is done (its work cannot be cut short).
            let mut shutdown = std::pin::pin!(shutdown);
            let mut started_rx = started_rx;
            let started = tokio::select! {
                biased;
                () = &mut shutdown => {
                    stop_early.store(true, std::sync::atomic::Ordering::Release);
                    tracing::info!("shutdown requested during the start: acted on once it is done");
                    started_rx.await
                }
                started = &mut started_rx => {
                    if started.is_ok() {
                        shutdown.await;
                    }
                    started
                }
            };
            if started.is_err() {
                return std::future::pending().await;
            }
            tracing::info!("shutdown requested: health NOT_SERVING, ending streams and waits");
            let mut serving = may_serve.lock().await;
            *serving = false;
            set_health(&health, ServingStatus::NotServing).await;
            drop(serving);
            token.cancel();
            let _ = draining_tx.send(());
        }
    };
    let router = || {
        Server::builder()
            // Explicit transport limits (README "Transport limits").
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(GateLayer::new(
                ObserveLayer::new(None),
                GuardLayer::new(overload.clone()),
                started.clone(),
            ))
            .add_service(health_service.clone())
            .add_service(reflection.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(Starting::<QuotaBrokerServer<BrokerService>>::new(
                stage.clone(),
            ))
            .add_service(Starting::<QuotaAdminServer<AdminService>>::new(
                stage.clone(),
            ))
    };
    // The serving threads' end once the shutdown grace is over.
    let force = CancellationToken::new();
    let serve: Pin<Box<dyn Future<Output = Result<(), ServerError>> + Send>> =
        match settings.server.io_threads.unwrap_or(0) {
            0 => {
                let served = router().serve_with_incoming_shutdown(
                    transport::incoming(listener, &settings.server, token.clone()),
                    signal,
                );
                Box::pin(async move { served.await.map_err(ServerError::from) })
            }
            n => {
                let drain = CancellationToken::new();
                tokio::spawn({
                    let drain = drain.clone();
                    let token = token.clone();
                    async move {
                        // The token alone is cancelled when the start
                        // fails: the threads' servers end then too.
                        tokio::select! {
                            biased;
                            () = signal => {}
                            () = token.cancelled() => {}
                        }
                        drain.cancel();
                    }
                });
                let servers = (0..n)
                    .map(|_| {
                        let router = router();
                        let serve: threads::ServeOn = Box::new(move |incoming, drain| {
                            Box::pin(router.serve_with_incoming_shutdown(incoming, drain))
                        });
                        serve
                    })
                    .collect();
                Box::pin(threads::serve(
                    servers,
                    listener,
                    &settings.server,
                    token.clone(),
                    drain,
                    force.clone(),
                )?)
            }
        };
    tokio::pin!(serve);

    // The start's work is synchronous and may take seconds (tenants, label
    // sets, state files): off the async threads, so the ports answer.
    let starting = {
        let settings = settings.clone();
        let token = token.clone();
        tokio::task::spawn_blocking(move || {
            let tell = |what: &str| stage.set(what);
            let mut registry = crate::metrics::registry();
            let metrics = with_metrics.then(|| {
                tell(&format!(
                    "resolving the metrics' label sets of {} tenants",
                    settings.tenants.len()
                ));
                Arc::new(Metrics::new(&settings, &mut registry))
            });
            let (broker, drivers) = Broker::start_telling(&settings, token, metrics.clone(), &tell);
            tell("starting the gRPC services");
            (registry, metrics, broker, drivers)
        })
    };
    let started_work = tokio::select! {
        started = starting => started,
        // Before the start is done the server ends only on an error (its
        // stop waits for the start).
        r = &mut serve => return r,
    };
    let (mut registry, metrics, broker, drivers) = match started_work {
        Ok(started) => started,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => return Err(ServerError::Start(e)),
    };
    broker.set_instance_name(instance);
    let broker_service = BrokerService::new(broker.clone(), auth.clone(), overload.clone());
    let routes = Routes::new(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            QuotaBrokerServer::new(broker_service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            QuotaAdminServer::new(AdminService::new(broker.clone(), auth))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .prepare();
    let stack = ServiceBuilder::new()
        .layer(ObserveLayer::new(metrics.clone()))
        .layer(GuardLayer::new(overload.clone()))
        .layer(FastAcquireLayer::new(broker_service))
        .service(routes);
    if started.set(stack).is_err() {
        tracing::error!("the gRPC services were installed twice; the first are kept");
    }
    // The HTTP port's routes after the gRPC port's and before health says
    // SERVING: a /readyz that says ready means both ports serve, and so
    // does SERVING.
    let http_task = http.map(|(port, task)| {
        if let Some(m) = &metrics {
            registry.register_collector(Box::new(BucketCollector::new(broker.clone(), m.clone())));
        }
        port.serve(
            Arc::new(registry),
            broker.clone(),
            overload.clone(),
            token.clone(),
        );
        task
    });
    let stopping = stop_early.load(std::sync::atomic::Ordering::Acquire);
    // In cluster mode health says what /readyz says: SERVING only while
    // the broker is in the cluster (see `follow_readiness`).
    let unready = broker.not_ready();
    if !stopping && unready.is_none() {
        set_health(&health, ServingStatus::Serving).await;
    }
    let _ = started_tx.send(());
    if let Some(tell) = started_tell {
        tell.send_replace(true);
    }
    if stopping {
        tracing::info!(
            took_ms = millis(begun.elapsed()),
            "broker started, and stops at once (asked to during the start): health stays \
             NOT_SERVING"
        );
    } else {
        if settings.cluster.is_some() {
            tokio::spawn(follow_readiness(
                broker.clone(),
                health.clone(),
                may_serve.clone(),
                unready.is_none(),
                token.clone(),
            ));
        }
        match unready {
            None => tracing::info!(
                took_ms = millis(begun.elapsed()),
                "broker started: health SERVING, calls answered"
            ),
            Some(why) => tracing::info!(
                took_ms = millis(begun.elapsed()),
                "broker started: health NOT_SERVING until it is in the cluster ({why})"
            ),
        }
    }
    let grace = settings.server.shutdown_grace;
    let drain_deadline = async {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = serve => r?,
        _ = drain_deadline => {
            tracing::warn!(grace_ms = millis(grace), "open calls did not finish within the shutdown grace; stopping anyway");
            force.cancel();
        }
    }
    token.cancel();
    broker.record_stop();
    drop(http_stop_guard);
    if let Some(task) = http_task {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "the HTTP server task failed");
        }
    }
    drivers.join().await;
    tracing::info!("broker stopped");
    Ok(())
}
