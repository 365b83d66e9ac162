//! The processes a mode runs against, each fresh per mode: the simulator
//! (the `gcsim` binary as a child, which prints its bound address on
//! stdout, or the gcsim library in this process) and, in broker mode, the
//! quota broker (the `quota-broker` binary as a child on a port picked by
//! binding 127.0.0.1:0 and dropping it, as loadgen does, or the
//! quota-broker library in this process). Children are
//! killed when dropped (`kill_on_drop`, and their stdin closes, which also
//! stops gcsim), which `main` makes happen on SIGINT/SIGTERM too; their config and log live in the run's temporary directory.
//! For chaos the broker child keeps a state directory there too, and can be
//! SIGKILLed and started again on the same address, config and state.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cli::{BrokerSource, Spec};
use crate::confgen::{broker_toml, Plan};
use crate::error::Error;

/// How long a child may take to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The end of a failed child's log shown in the error, bytes.
const LOG_TAIL: usize = 2_000;

/// The run's temporary directory (configs, child logs); removed when dropped.
pub(crate) struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// A fresh directory under the system's temporary directory.
    pub(crate) fn create() -> Result<WorkDir, Error> {
        let path = std::env::temp_dir().join(format!("scenario-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(Error::io(format!("create {}", path.display())))?;
        Ok(WorkDir { path })
    }

    /// `name` inside it.
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// An address on 127.0.0.1 that was free a moment ago (bound to port 0
/// and dropped).
pub(crate) fn free_addr() -> Result<SocketAddr, Error> {
    let probe =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("bind 127.0.0.1:0"))?;
    probe
        .local_addr()
        .map_err(Error::io("read the probe listener's address"))
}

/// The last `LOG_TAIL` bytes of the log at `path`.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let mut from = log.len().saturating_sub(LOG_TAIL);
    while !log.is_char_boundary(from) {
        from += 1;
    }
    log[from..].to_owned()
}

/// A child process with its log; killed when dropped.
struct ChildProcess {
    child: Child,
    /// Kept open: gcsim exits when its stdin reaches EOF, and its stdout
    /// stays readable so it never writes into a closed pipe.
    _stdout: Option<BufReader<ChildStdout>>,
}

impl ChildProcess {
    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Starts `command` with its stderr to `log`, killed on drop, and killed
/// by the kernel when this process dies (even by SIGKILL, which runs no
/// drop: a broker left serving would hold its port and state directory).
fn spawn(mut command: Command, what: &str, log: &Path) -> Result<Child, Error> {
    let log_file = File::create(log).map_err(Error::io(format!("create {}", log.display())))?;
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only prctl and getppid, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl: nobody would kill this one.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other(
                    "the scenario exited while starting it",
                ));
            }
            Ok(())
        });
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io(format!("start {what}")))
}

/// A running simulator: a child process, or the gcsim library serving on
/// its own socket in this process.
pub(crate) struct Simulator {
    addr: SocketAddr,
    running: Running,
}

enum Running {
    Child(Box<ChildProcess>),
    InProcess(gcsim::SimHandle),
}

impl Simulator {
    /// Starts a fresh simulator for `plan` as mode `name`.
    pub(crate) async fn start(
        spec: &Spec,
        plan: &Plan,
        dir: &WorkDir,
        name: &str,
    ) -> Result<Simulator, Error> {
        let Some(bin) = spec.gcsim_bin.as_deref() else {
            // The generated config carries the scale and the seed.
            let config = gcsim::SimConfig::from_toml(&plan.sim_toml(spec))
                .map_err(|e| Error::sim("the generated simulator config", e))?;
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(Error::io("bind 127.0.0.1:0"))?;
            let sim = gcsim::Sim::start(config, listener)
                .map_err(|e| Error::sim(format!("start gcsim ({name})"), e))?;
            return Ok(Simulator {
                addr: sim.addr(),
                running: Running::InProcess(sim),
            });
        };
        let config = dir.file(&format!("gcsim-{name}.toml"));
        std::fs::write(&config, plan.sim_toml(spec))
            .map_err(Error::io(format!("write {}", config.display())))?;
        let log = dir.file(&format!("gcsim-{name}.log"));
        let what = format!("gcsim ({name})");
        let mut command = Command::new(bin);
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--time-scale")
            .arg(spec.scale.to_string())
            .arg("--seed")
            .arg(spec.seed.to_string())
            .arg("--config")
            .arg(&config)
            .arg("--log")
            .arg("warn");
        let mut child = spawn(command, &what, &log)?;
        let fail = |why: String| Error::ChildStart {
            what: what.clone(),
            why,
            log: log_tail(&log),
        };
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| fail("no stdout pipe".into()))?;
        let mut stdout = BufReader::new(stdout);
        let read_addr = async {
            let mut line = String::new();
            loop {
                line.clear();
                let n = stdout
                    .read_line(&mut line)
                    .await
                    .map_err(|e| fail(format!("reading its stdout: {e}")))?;
                if n == 0 {
                    return Err(fail("exited before printing its address".into()));
                }
                if let Some(rest) = line.trim().strip_prefix("gcsim listening on http://") {
                    return rest
                        .parse::<SocketAddr>()
                        .map_err(|e| fail(format!("bad address {rest:?}: {e}")));
                }
            }
        };
        let addr = tokio::time::timeout(READY_TIMEOUT, read_addr)
            .await
            .map_err(|_| fail(format!("no address within {READY_TIMEOUT:?}")))??;
        Ok(Simulator {
            addr,
            running: Running::Child(Box::new(ChildProcess {
                child,
                _stdout: Some(stdout),
            })),
        })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops it.
    pub(crate) async fn stop(self) {
        match self.running {
            Running::Child(process) => process.kill().await,
            Running::InProcess(sim) => sim.shutdown().await,
        }
    }
}

/// A running quota broker.
pub(crate) enum BrokerServer {
    /// A child process.
    Child {
        /// Where it listens.
        addr: SocketAddr,
        /// The process, and how to start it again.
        process: Box<ChildProcessHandle>,
    },
    /// A task of this process, serving until `stop` is sent.
    InProcess {
        /// Where it listens.
        addr: SocketAddr,
        /// Stops it.
        stop: oneshot::Sender<()>,
        /// The serving task.
        task: JoinHandle<()>,
    },
}

/// A broker child process (boxed: much larger than a task's) and what it
/// takes to start it again on the same port, config and state directory.
pub(crate) struct ChildProcessHandle {
    /// None between a kill and the restart.
    process: Option<ChildProcess>,
    bin: PathBuf,
    config: PathBuf,
    /// The log of each process started, in order.
    logs: Vec<PathBuf>,
    /// The `RUST_LOG` of every start.
    log_filter: &'static str,
}

/// How a restart went.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Restarted {
    /// Processes started until one listened (1: the first).
    pub(crate) attempts: u32,
}

/// A restart is tried this many times when the new process exits before
/// it listens (the port briefly still in use, say).
const RESTART_ATTEMPTS: u32 = 20;
/// Pause between two restart attempts, real.
const RESTART_PAUSE: Duration = Duration::from_millis(100);
/// The broker's log filter when it keeps state: warnings, and the restart
/// learning mode's own lines (entered, leases adopted, over).
const CHAOS_LOG_FILTER: &str =
    "warn,quota_broker::tenant::restart=info,quota_broker::tenant::learn=info";
/// A child broker's log: what it learned (cuts, freezes, limits; a line per
/// congestion episode), for `--keep-logs`.
const LEARNING_LOG_FILTER: &str = "warn,quota_broker::tenant::learn=info";

/// Why a broker process did not come up.
enum StartFailure {
    /// It exited before listening (worth another attempt on a restart).
    Exited(Error),
    /// Anything else.
    Other(Error),
}

impl StartFailure {
    fn error(self) -> Error {
        match self {
            StartFailure::Exited(e) | StartFailure::Other(e) => e,
        }
    }
}

/// Whether the broker on `addr` answers and says it serves (grpc.health.v1
/// SERVING for the whole server): before its start is done it answers
/// NOT_SERVING, and its calls "starting".
async fn serving(addr: SocketAddr) -> bool {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
    else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

impl ChildProcessHandle {
    /// Starts one broker process and waits until it serves on `addr`.
    async fn spawn_ready(&mut self, addr: SocketAddr) -> Result<(), StartFailure> {
        // broker.toml: broker.log, then broker-1.log, ... per restart.
        let stem = self
            .config
            .file_stem()
            .map_or_else(|| "broker".into(), |s| s.to_string_lossy().into_owned());
        let log = match self.logs.len() {
            0 => self.config.with_file_name(format!("{stem}.log")),
            n => self.config.with_file_name(format!("{stem}-{n}.log")),
        };
        self.logs.push(log.clone());
        let what = format!("quota-broker ({})", self.bin.display());
        let mut command = Command::new(&self.bin);
        command
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", self.log_filter);
        let mut child = spawn(command, &what, &log).map_err(StartFailure::Other)?;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(StartFailure::Exited(Error::ChildStart {
                    what,
                    why: format!("exited with {status}"),
                    log: log_tail(&log),
                }));
            }
            if serving(addr).await {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StartFailure::Other(Error::ChildStart {
                    what,
                    why: format!("not serving on {addr} within {READY_TIMEOUT:?}"),
                    log: log_tail(&log),
                }));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.process = Some(ChildProcess {
            child,
            _stdout: None,
        });
        Ok(())
    }
}

impl BrokerServer {
    /// Starts a fresh broker for a run at the spec's time scale (with a
    /// state directory when the run has chaos: the restart must find it).
    pub(crate) async fn start(spec: &Spec, dir: &WorkDir) -> Result<BrokerServer, Error> {
        match &spec.broker {
            BrokerSource::Binary(bin) => {
                Self::child(bin, spec.scale, dir, spec.chaos.is_some()).await
            }
            BrokerSource::InProcess => Self::in_process(spec.scale).await,
        }
    }

    async fn child(
        bin: &Path,
        scale: f64,
        dir: &WorkDir,
        keep_state: bool,
    ) -> Result<BrokerServer, Error> {
        let addr = free_addr()?;
        let state_dir = dir.file("broker-state");
        if keep_state {
            // Fresh: what the first process finds is an empty directory.
            let _ = std::fs::remove_dir_all(&state_dir);
            std::fs::create_dir_all(&state_dir)
                .map_err(Error::io(format!("create {}", state_dir.display())))?;
        }
        let toml = broker_toml(scale, Some(addr), keep_state.then_some(state_dir.as_path()));
        // Reject a bad config here, with every problem listed, rather than
        // through a child's exit status.
        quota_broker::Settings::from_toml(&toml)?;
        let filter = if keep_state {
            CHAOS_LOG_FILTER
        } else {
            LEARNING_LOG_FILTER
        };
        Self::process(bin, addr, &dir.file("broker.toml"), &toml, filter).await
    }

    /// Starts the broker binary `bin` listening on `addr` with config
    /// `toml` (written to `config`; its log next to it) and `RUST_LOG`
    /// `log_filter`.
    pub(crate) async fn process(
        bin: &Path,
        addr: SocketAddr,
        config: &Path,
        toml: &str,
        log_filter: &'static str,
    ) -> Result<BrokerServer, Error> {
        std::fs::write(config, toml).map_err(Error::io(format!("write {}", config.display())))?;
        let mut process = Box::new(ChildProcessHandle {
            process: None,
            bin: bin.to_owned(),
            config: config.to_owned(),
            logs: Vec::new(),
            log_filter,
        });
        process
            .spawn_ready(addr)
            .await
            .map_err(StartFailure::error)?;
        Ok(BrokerServer::Child { addr, process })
    }

    async fn in_process(scale: f64) -> Result<BrokerServer, Error> {
        let settings = quota_broker::Settings::from_toml(&broker_toml(scale, None, None))?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::io("bind 127.0.0.1:0"))?;
        let addr = listener
            .local_addr()
            .map_err(Error::io("read the listener's address"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = quota_broker::run(listener, &settings, shutdown).await {
                tracing::error!(error = %e, "in-process broker failed");
            }
        });
        // The port answers at once, "starting" until the broker has.
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while !serving(addr).await {
            if task.is_finished() || tokio::time::Instant::now() >= deadline {
                return Err(Error::ChildStart {
                    what: "the in-process broker".into(),
                    why: format!("not serving on {addr} within {READY_TIMEOUT:?}"),
                    log: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(BrokerServer::InProcess { addr, stop, task })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        match self {
            BrokerServer::Child { addr, .. } | BrokerServer::InProcess { addr, .. } => *addr,
        }
    }

    /// SIGKILLs the child process (and reaps it): no shutdown of any kind,
    /// as in a crash. An error for a broker in process.
    pub(crate) async fn kill(&mut self) -> Result<(), Error> {
        match self {
            BrokerServer::Child { process, .. } => {
                if let Some(p) = process.process.take() {
                    p.kill().await;
                }
                Ok(())
            }
            BrokerServer::InProcess { .. } => Err(Error::BrokerServer(
                "a broker in process cannot be killed".into(),
            )),
        }
    }

    /// Starts the killed child again, on the same address, config and
    /// state directory; a process that exits before it listens (the port
    /// briefly in use) is tried again, up to [`RESTART_ATTEMPTS`] times.
    pub(crate) async fn restart(&mut self) -> Result<Restarted, Error> {
        let BrokerServer::Child { addr, process } = self else {
            return Err(Error::BrokerServer(
                "a broker in process cannot be restarted".into(),
            ));
        };
        if process.process.is_some() {
            return Err(Error::BrokerServer("restart of a running broker".into()));
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match process.spawn_ready(*addr).await {
                Ok(()) => return Ok(Restarted { attempts }),
                Err(StartFailure::Exited(e)) if attempts < RESTART_ATTEMPTS => {
                    tracing::warn!(attempt = attempts, error = %e, "broker restart failed; trying again");
                    tokio::time::sleep(RESTART_PAUSE).await;
                }
                Err(e) => return Err(e.error()),
            }
        }
    }

    /// The logs of every broker process started, in order (none in process).
    pub(crate) fn logs(&self) -> &[PathBuf] {
        match self {
            BrokerServer::Child { process, .. } => &process.logs,
            BrokerServer::InProcess { .. } => &[],
        }
    }

    /// Stops it: a kill for a child, a bounded graceful shutdown in process.
    pub(crate) async fn stop(self) {
        match self {
            BrokerServer::Child { process, .. } => {
                if let Some(p) = process.process {
                    p.kill().await;
                }
            }
            BrokerServer::InProcess { stop, task, .. } => {
                let _ = stop.send(());
                let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
            }
        }
    }
}
