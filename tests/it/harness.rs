//! Starts a broker on an ephemeral port and hands back connected clients.

use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireRequest, AcquireResponse, QuotaStatus};
use quota_broker::Settings;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub struct TestBroker {
    pub client: QuotaBrokerClient<Channel>,
    pub admin: QuotaAdminClient<Channel>,
    pub channel: Channel,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), quota_broker::ServerError>>,
}

/// A state directory of this test process named `name`, empty (an
/// earlier run's left behind is removed).
pub fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("quota-broker-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A tenant "t" with the given bucket tables.
pub fn config(buckets: &str) -> String {
    format!(
        "[server]\nshutdown_grace_ms = 2000\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n{buckets}"
    )
}

pub async fn start(toml: &str) -> TestBroker {
    let settings = Settings::from_toml(toml).expect("test config is valid");
    // Bound before the server task runs, so the client can connect at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        quota_broker::run(listener, &settings, async {
            let _ = stopped.await;
        })
        .await
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    serving(&channel).await;
    TestBroker {
        client: QuotaBrokerClient::new(channel.clone()),
        admin: QuotaAdminClient::new(channel.clone()),
        channel,
        addr,
        stop: Some(stop),
        server,
    }
}

impl TestBroker {
    /// The gRPC port's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// A Watch of every bucket this broker shows.
    pub async fn watch_all(&self) -> tonic::Streaming<QuotaStatus> {
        self.client
            .clone()
            .watch(quota_broker::pb::WatchRequest::default())
            .await
            .unwrap()
            .into_inner()
    }

    /// A Watch of `tenant`'s buckets.
    pub async fn watch_tenant(&self, tenant: &str) -> tonic::Streaming<QuotaStatus> {
        self.client
            .clone()
            .watch(quota_broker::pb::WatchRequest {
                tenant: tenant.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Signals shutdown and waits for the server to exit.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.server).await.unwrap().unwrap();
    }

    pub fn trigger_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn join(self) {
        self.server.await.unwrap().unwrap();
    }

    pub async fn acquire(&self, req: AcquireRequest) -> AcquireResponse {
        self.client.clone().acquire(req).await.unwrap().into_inner()
    }

    pub async fn bucket(&self, name: &str) -> QuotaStatus {
        let list = self
            .admin
            .clone()
            .list_buckets(quota_broker::pb::ListBucketsRequest::default())
            .await
            .unwrap()
            .into_inner();
        list.buckets
            .into_iter()
            .find(|b| b.bucket == name)
            .unwrap_or_else(|| panic!("no bucket {name}"))
    }
}

/// Waits until the broker on `channel` has started: its port answers
/// while it starts (health NOT_SERVING, calls UNAVAILABLE), and a test's
/// first call must get the broker's answer. On the health Watch, so on
/// what the broker says, not on the clock.
pub async fn serving(channel: &Channel) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest::default())
        .await
        .expect("the health Watch is answered")
        .into_inner();
    while let Some(status) = watch.message().await.expect("the health Watch goes on") {
        if status.status() == ServingStatus::Serving {
            return;
        }
    }
    panic!("the health Watch ended before the broker served");
}

pub fn req(method: &str, path: &str, max_wait_ms: u64) -> AcquireRequest {
    AcquireRequest {
        tenant: "t".into(),
        client_id: "test".into(),
        priority_class: String::new(),
        method: method.into(),
        path: path.into(),
        oauth_client: String::new(),
        permits: 0,
        max_wait_ms: Some(max_wait_ms),
        idempotency_key: String::new(),
    }
}

/// Reads a Watch stream until an update satisfies `pred` (fails the test if
/// the stream ends first). Waits on the broker's own updates, not the clock.
pub async fn wait_for(
    stream: &mut tonic::Streaming<QuotaStatus>,
    pred: impl Fn(&QuotaStatus) -> bool,
) -> QuotaStatus {
    loop {
        match stream.message().await.unwrap() {
            Some(s) if pred(&s) => return s,
            Some(_) => {}
            None => panic!("the Watch stream ended before the expected update"),
        }
    }
}

/// How long [`clock_held`] lets a wait take in real time.
const HELD_AT_MOST: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `fut` on a paused clock that does not move meanwhile, and panics
/// (naming `what`) if it takes more than 20 s of real time.
///
/// A paused runtime with nothing to run moves its clock to the next timer
/// at once; a loopback packet still on its way through a loaded kernel (a
/// connect, a close, an answer) leaves it with nothing to run for a moment,
/// and time jumps by a keep-alive interval that never passed for the broker.
/// Here the runtime is kept busy, so only real progress finishes `fut`:
/// something done within `clock_held` took no time on the broker's clock.
pub async fn clock_held<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    let real = std::time::Instant::now();
    let spin = async {
        // A task that yields is run again before the runtime parks, and a
        // park that must not block does not advance a paused clock.
        while real.elapsed() < HELD_AT_MOST {
            tokio::task::yield_now().await;
        }
    };
    let started = tokio::time::Instant::now();
    let out = tokio::select! {
        biased;
        out = fut => out,
        () = spin => panic!("{what}: not done within {HELD_AT_MOST:?} of real time"),
    };
    assert_eq!(
        started.elapsed(),
        std::time::Duration::ZERO,
        "{what}: the clock moved while held"
    );
    out
}

/// Reads until the broker closes the socket; true if it did (EOF or reset).
pub async fn closed_by_broker(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf).await, Ok(0) | Err(_))
}

/// Whether the socket is open with nothing to read, asked without waiting.
pub fn still_open(s: &tokio::net::TcpStream) -> bool {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(s).peek(&mut buf),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}
