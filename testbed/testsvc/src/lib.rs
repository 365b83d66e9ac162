//! Test support for tests that need a real server: installs the Debian
//! packages they need (once per machine, serialised across the test
//! processes that run at the same time) and runs PostgreSQL and etcd on
//! 127.0.0.1 on ephemeral ports, each in a directory of its own, stopped and
//! removed when dropped. Every failure is an `Err` that says what to install or what
//! went wrong, so a test fails with it instead of skipping.

#![warn(missing_docs)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Serialises `apt-get` across the test binaries cargo runs in parallel;
/// `DPkg::Lock::Timeout` below also waits out any other apt run (dpkg fails
/// at once on a held lock by default).
const APT_LOCK: &str = "/tmp/quota-broker-testsvc-apt.lock";

/// Installs the Debian packages `packages` that are not installed yet.
pub fn apt_install(packages: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "these tests need the Debian packages {missing:?}; install them \
             (apt-get install {}) or run the tests as root so they install themselves",
            missing.join(" ")
        ));
    }
    // Checked again under the lock: another test process may have installed
    // them while this one waited.
    let script = format!(
        "missing=''; for p in {pkgs}; do \
           dpkg-query -W -f='${{Status}}' \"$p\" 2>/dev/null | grep -q 'install ok installed' \
           || missing=\"$missing $p\"; done; \
         [ -z \"$missing\" ] && exit 0; \
         export DEBIAN_FRONTEND=noninteractive; \
         apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && \
         apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends $missing",
        pkgs = missing.join(" ")
    );
    let out = run(Command::new("flock").args([APT_LOCK, "sh", "-c", &script]))
        .map_err(|e| format!("installing {missing:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "apt-get could not install {missing:?}: {}",
            tail(&out.stderr)
        ));
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A port on 127.0.0.1 that was free a moment ago, for a server that must
/// be told its port before it starts (etcd, PostgreSQL, a cluster node that
/// advertises its URL).
///
/// Picked below the kernel's ephemeral range, so a socket another test
/// binds to port 0 in the meantime (the kernel hands those out from the
/// ephemeral range) cannot take it; spread by process id and a counter so
/// concurrent test processes rarely try the same one, and checked by
/// binding it.
pub fn free_port() -> Result<u16, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = ephemeral_low().unwrap_or(32_768);
    let (first, span) = (10_000u32, u32::from(low).saturating_sub(10_000).max(1_000));
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..200 {
        let k = start.wrapping_add(NEXT.fetch_add(97, Ordering::Relaxed));
        let port = u16::try_from(first + k % span).unwrap_or(20_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!(
        "no free port on 127.0.0.1 between {first} and {low}"
    ))
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// A directory of its own under the system's temporary directory.
pub fn scratch_dir(what: &str) -> Result<PathBuf, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "testsvc-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

fn run(command: &mut Command) -> Result<Output, String> {
    command
        .output()
        .map_err(|e| format!("running {:?}: {e}", command.get_program()))
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A PostgreSQL server of its own on 127.0.0.1, trusting local connections
/// as `postgres`; stopped and its directory removed when dropped.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Postgres {
    /// Installs PostgreSQL if needed, makes a cluster in a fresh directory
    /// and starts it.
    pub fn start() -> Result<Postgres, String> {
        let bin = match postgres_bin() {
            Some(bin) => bin,
            None => {
                apt_install(&["postgresql"])?;
                postgres_bin().ok_or(
                    "the postgresql package is installed but no /usr/lib/postgresql/*/bin/initdb",
                )?
            }
        };
        let dir = scratch_dir("pg")?;
        let data = dir.join("data");
        // PostgreSQL refuses to run as root: as root, the cluster belongs to
        // the `postgres` user the package created.
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir))?;
        }
        let initdb = run(pg_command(&bin, "initdb", as_postgres)
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data))?;
        if !initdb.status.success() {
            return Err(format!("initdb failed: {}", tail(&initdb.stderr)));
        }
        let mut last = String::new();
        // The port is free when picked but may be taken before the server
        // binds it: a few tries.
        for _ in 0..3 {
            let port = free_port()?;
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
                dir.display()
            );
            let start = run(pg_command(&bin, "pg_ctl", as_postgres)
                .arg("-D")
                .arg(&data)
                .args(["-w", "-t", "60", "-o", &options, "-l"])
                .arg(dir.join("log"))
                .arg("start"))?;
            if start.status.success() {
                return Ok(Postgres { bin, dir, port });
            }
            last = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!(
            "PostgreSQL did not start: {}",
            tail(last.as_bytes())
        ))
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates database `name` (lower-case letters, digits, `_`) and
    /// returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err("a database name here is 1-63 of [a-z0-9_]".into());
        }
        let out = run(Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-p", &self.port.to_string()])
            .args(["-c", &format!("CREATE DATABASE {name}")]))?;
        if !out.status.success() {
            return Err(format!("CREATE DATABASE {name}: {}", tail(&out.stderr)));
        }
        Ok(self.url_of(name))
    }
}

impl Postgres {
    /// Stops the server at once (its clients' connections break; a new one
    /// is refused), for tests of what happens while the database is away.
    pub fn stop(&self) {
        let _ = pg_command(&self.bin, "pg_ctl", is_root())
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pg_command(bin: &Path, tool: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// An etcd server of its own on 127.0.0.1 (one member, ephemeral ports, a
/// fresh data directory), or one member of a cluster of them
/// ([`Etcd::start_members`]); killed and its directory removed when
/// dropped. It can be stopped and started again on the same ports and
/// data, for tests of what happens while etcd (or a member) is away.
pub struct Etcd {
    child: Option<std::process::Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` and `/metrics` (the client port may be TLS).
    health_port: u16,
    tls: Option<EtcdTls>,
    /// The member's name, and `--initial-cluster` (every member's name and
    /// peer URL).
    name: String,
    initial_cluster: String,
    /// More `etcd` flags (e.g. `--max-txn-ops=1`).
    flags: Vec<String>,
}

/// PEM files of an etcd served over TLS.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The server's certificate (for 127.0.0.1).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// With `Some(ca)`, clients must present a certificate signed by it
    /// (etcd's `--client-cert-auth`).
    pub client_ca: Option<PathBuf>,
}

impl Etcd {
    /// Installs etcd (Debian `etcd-server`) if needed and starts it.
    pub fn start() -> Result<Etcd, String> {
        Etcd::start_with(None, &[])
    }

    /// Like [`Etcd::start`], with more `etcd` flags (`--max-txn-ops=1`:
    /// every transaction of more than one operation refused).
    pub fn start_with_flags(flags: &[&str]) -> Result<Etcd, String> {
        Etcd::start_with(None, flags)
    }

    /// Like [`Etcd::start`], its client URL `https://` with `tls`.
    pub fn start_tls(tls: EtcdTls) -> Result<Etcd, String> {
        Etcd::start_with(Some(tls), &[])
    }

    fn start_with(tls: Option<EtcdTls>, flags: &[&str]) -> Result<Etcd, String> {
        if !Path::new(ETCD_BIN).exists() {
            apt_install(&["etcd-server"])?;
        }
        let peer_port = free_port()?;
        let mut etcd = Etcd {
            child: None,
            dir: scratch_dir("etcd")?,
            client_port: free_port()?,
            peer_port,
            health_port: free_port()?,
            tls,
            name: "t".to_owned(),
            initial_cluster: format!("t=http://127.0.0.1:{peer_port}"),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        };
        etcd.resume()?;
        Ok(etcd)
    }

    /// A cluster of `n` members (plain HTTP), each started, once all of
    /// them answer their health check (a member does only once the
    /// cluster has a leader).
    pub fn start_members(n: usize) -> Result<Vec<Etcd>, String> {
        if !Path::new(ETCD_BIN).exists() {
            apt_install(&["etcd-server"])?;
        }
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Etcd {
                child: None,
                dir: scratch_dir("etcd")?,
                client_port: free_port()?,
                peer_port: free_port()?,
                health_port: free_port()?,
                tls: None,
                name: format!("m{i}"),
                initial_cluster: String::new(),
                flags: Vec::new(),
            });
        }
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = cluster.clone();
            m.spawn()?;
        }
        for m in &mut members {
            m.await_healthy()?;
        }
        Ok(members)
    }

    /// This member leads the etcd cluster (its `/metrics` say so).
    pub fn is_leader(&self) -> bool {
        self.get("/metrics")
            .lines()
            .any(|l| l.trim() == "etcd_server_is_leader 1")
    }

    /// The ids of the leases etcd holds (LeaseLeases, through etcd's
    /// JSON gateway on the client port; plain HTTP only).
    pub fn leases(&self) -> Result<Vec<String>, String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.client_port))
            .map_err(|e| format!("etcd client port: {e}"))?;
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let request = "POST /v3/lease/leases HTTP/1.0\r\nHost: 127.0.0.1\r\n\
                       Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        let mut answer = String::new();
        s.write_all(request.as_bytes())
            .and_then(|()| s.read_to_string(&mut answer))
            .map_err(|e| format!("etcd LeaseLeases: {e}"))?;
        if !answer.contains("\"header\"") {
            return Err(format!("etcd LeaseLeases: {answer}"));
        }
        Ok(answer
            .split("\"ID\":\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_owned)
            .collect())
    }

    /// The value of the Prometheus sample `series` (its name and labels
    /// as `/metrics` writes them), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.get("/metrics")
            .lines()
            .filter_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .next()
            .unwrap_or(0.0)
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), the client URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Kills the server (its data stays, for [`Etcd::resume`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is
    /// answered, as with a host that hangs.
    pub fn freeze(&self) -> Result<(), String> {
        self.signal("-STOP")
    }

    /// Lets a frozen server run again (SIGCONT).
    pub fn thaw(&self) -> Result<(), String> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<(), String> {
        let pid = self
            .child
            .as_ref()
            .ok_or("etcd is not running")?
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .map_err(|e| format!("kill {signal}: {e}"))?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("kill {signal} {pid}: {status}"))
    }

    /// Starts the server again (after [`Etcd::stop`]) and waits until it
    /// answers its health check (at most 30 s).
    pub fn resume(&mut self) -> Result<(), String> {
        self.spawn()?;
        self.await_healthy()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let (client, peer, health) = (
            self.url(),
            format!("http://127.0.0.1:{}", self.peer_port),
            format!("http://127.0.0.1:{}", self.health_port),
        );
        let log = std::fs::File::create(self.dir.join("log"))
            .map_err(|e| format!("etcd log file: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("etcd log file: {e}"))?;
        let mut command = Command::new(ETCD_BIN);
        command
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-metrics-urls", &health])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(&self.flags);
        if let Some(tls) = &self.tls {
            command.arg("--cert-file").arg(&tls.cert);
            command.arg("--key-file").arg(&tls.key);
            if let Some(ca) = &tls.client_ca {
                command
                    .arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(ca);
            }
        }
        let child = command
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("{ETCD_BIN} did not start: {e}"))?;
        self.child = Some(child);
        Ok(())
    }

    fn await_healthy(&mut self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if self.healthy() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                return Err(format!("etcd exited ({status}): {}", tail(log.as_bytes())));
            }
            // Waiting for a process to come up, not for time to pass.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        Err(format!(
            "etcd not healthy after 30 s: {}",
            tail(log.as_bytes())
        ))
    }

    /// GET /health answers `"health":"true"`.
    fn healthy(&self) -> bool {
        self.get("/health").contains("\"health\":\"true\"")
    }

    /// What GET `path` on the health port answers (empty if nothing).
    fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.health_port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        let mut answer = String::new();
        if s.write_all(request.as_bytes()).is_err() || s.read_to_string(&mut answer).is_err() {
            return String::new();
        }
        answer
    }
}

/// A change of a key that an etcd [`Watch`] reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: String,
    /// Deleted (by a call, or with the lease it was on); else put.
    pub deleted: bool,
}

/// An etcd watch of the keys under a prefix, read through etcd's JSON
/// gateway (`POST /v3/watch`, a stream of JSON messages): every change
/// etcd applies is reported as it happens, a lease's expiry deleting the
/// keys on it included; an iterator of them. A test waits on it instead of
/// asking etcd again and again.
pub struct Watch {
    reader: std::io::BufReader<std::net::TcpStream>,
    /// Bytes of the stream not yet split into messages.
    pending: Vec<u8>,
}

/// Ends a [`Watch`] from another thread: its iterator ends.
pub struct WatchCloser(std::net::TcpStream);

impl WatchCloser {
    /// Closes the watch's connection.
    pub fn close(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

impl Etcd {
    /// Watches the keys under `prefix` (plain HTTP only). Returns once
    /// etcd has created the watch: every change from then on is reported.
    pub fn watch(&self, prefix: &str) -> Result<Watch, String> {
        use std::io::{BufRead, Write};
        if self.tls.is_some() {
            return Err("an etcd watch through the JSON gateway needs plain HTTP".into());
        }
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = format!(
            "{{\"create_request\":{{\"key\":\"{}\",\"range_end\":\"{}\"}}}}",
            base64(prefix.as_bytes()),
            base64(&end)
        );
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.client_port))
            .map_err(|e| format!("etcd client port: {e}"))?;
        let request = format!(
            "POST /v3/watch HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.client_port,
            body.len()
        );
        s.write_all(request.as_bytes())
            .map_err(|e| format!("etcd watch: {e}"))?;
        let mut reader = std::io::BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return Err(format!("etcd watch: no answer ({head})")),
                Ok(_) if line == "\r\n" => break,
                Ok(_) => head.push_str(&line),
            }
        }
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        if !head.starts_with("HTTP/1.1 200") || !chunked {
            return Err(format!("etcd watch: {head}"));
        }
        let mut watch = Watch {
            reader,
            pending: Vec::new(),
        };
        match watch.message() {
            Some(m) if m.contains("\"created\":true") => Ok(watch),
            other => Err(format!("etcd watch not created: {other:?}")),
        }
    }
}

/// Each item: the changes etcd reported next (waited for); the iterator
/// ends with the watch (etcd stopped, or [`WatchCloser::close`]).
impl Iterator for Watch {
    type Item = Vec<Change>;

    fn next(&mut self) -> Option<Vec<Change>> {
        loop {
            let m = self.message()?;
            let marker = "\"kv\":{\"key\":\"";
            let changes: Vec<Change> = m
                .match_indices(marker)
                .filter_map(|(at, _)| {
                    let rest = &m[at + marker.len()..];
                    let key = unbase64(rest.split('"').next()?)?;
                    Some(Change {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        deleted: m[..at].ends_with("\"type\":\"DELETE\","),
                    })
                })
                .collect();
            if !changes.is_empty() {
                return Some(changes);
            }
        }
    }
}

impl Watch {
    /// A handle that ends this watch from another thread.
    pub fn closer(&self) -> Result<WatchCloser, String> {
        self.reader
            .get_ref()
            .try_clone()
            .map(WatchCloser)
            .map_err(|e| format!("etcd watch: {e}"))
    }

    /// The next JSON message of the stream (one a line, in HTTP chunks).
    fn message(&mut self) -> Option<String> {
        use std::io::{BufRead, Read};
        loop {
            if let Some(n) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=n).collect();
                let text = String::from_utf8_lossy(&line).trim().to_owned();
                if !text.is_empty() {
                    return Some(text);
                }
                continue;
            }
            let mut size = String::new();
            if self.reader.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).ok()?;
            chunk.truncate(size);
            self.pending.extend_from_slice(&chunk);
        }
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64, padded (etcd's JSON gateway's bytes).
fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bytes of standard base64 `text` (`None` if it is not).
fn unbase64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut n, mut bits) = (0u32, 0);
    for c in text.bytes().take_while(|c| *c != b'=') {
        n = n << 6 | BASE64.iter().position(|b| *b == c)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits & 0xff) as u8);
        }
    }
    Some(out)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const ETCD_BIN: &str = "/usr/bin/etcd";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_both_ways() {
        for text in [
            "",
            "a",
            "ab",
            "abc",
            "/qb-test/leaders/t0",
            "/qb-test/leaders0",
        ] {
            let coded = base64(text.as_bytes());
            assert_eq!(coded.len() % 4, 0, "{coded}");
            assert_eq!(
                unbase64(&coded).as_deref(),
                Some(text.as_bytes()),
                "{coded}"
            );
        }
        assert_eq!(base64(b"/q/l/"), "L3EvbC8=");
        assert_eq!(unbase64("L3EvbC94").as_deref(), Some(&b"/q/l/x"[..]));
    }

    #[test]
    fn postgres_starts_takes_a_database_and_stops() {
        let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
        let url = pg
            .create_database("testsvc_check")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(url.ends_with("/testsvc_check"), "{url}");
        assert!(
            pg.create_database("testsvc_check").is_err(),
            "created twice"
        );
        assert!(pg.create_database("Bad-Name").is_err());
        let port = pg.port();
        let dir = pg.dir.clone();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(pg);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(!dir.exists());
    }
}
