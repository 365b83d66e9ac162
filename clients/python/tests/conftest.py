"""Fixtures: a real quota-broker process per test, on a free 127.0.0.1 port.

The binary is $QUOTA_BROKER_BIN (relative paths from the current directory),
default ../../target/debug/quota-broker relative to clients/python.
``Pki`` makes a CA and certificates at test time (``cryptography``), for
brokers started with ``tls=pki.server_tls(...)``.
"""
import collections
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from quota_broker_client import DeadlineExceeded, QuotaBroker

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_ROOT = os.path.dirname(HERE)
DEFAULT_BIN = os.path.join(CLIENT_ROOT, "..", "..", "target", "debug", "quota-broker")
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

TENANT = "demo"
ANALYTICS_QUERY = "/api/v2/analytics/conversations/details/query"
SINGLE_PATH = "/api/v2/test/single"

# The embedded default's demo tenant, plus a one-slot bucket with a short TTL.
BASE_CONFIG = """
[server]
listen = "{listen_host}:{port}"
state_dir = "{state_dir}"
shutdown_grace_ms = 2000

{tls}

{extra}

{auth}

[[tenants]]
id = "demo"

[[tenants.buckets]]
name = "per-client"
scope = "oauth_client"
routes = ["* /**"]
permits = 300
window_ms = 60000
burst = 300

[[tenants.buckets]]
name = "analytics-query"
routes = ["POST /api/v2/analytics/**/query"]
permits = 60
window_ms = 60000
burst = 10
max_in_flight = 8
lease_ttl_ms = 30000

[[tenants.buckets]]
name = "single"
routes = ["* /api/v2/test/single"]
max_in_flight = 1
lease_ttl_ms = {single_ttl_ms}
"""


class Changes:
    """What the cluster tests wait on instead of a clock: each line any broker
    process logs (a take-over, a hand-over, a step down, a leader change a
    follower saw, a join, a lease lost, health turning) and each change of
    leader or member keys an etcd watch reports (``EtcdProcess.watch``),
    counted. Take ``seen()`` before checking a state, then ``wait(seen, …)``
    wakes on anything after."""

    def __init__(self):
        self._cond = threading.Condition()
        self._count = 0

    def bump(self):
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def seen(self):
        with self._cond:
            return self._count

    def wait(self, seen, timeout_s):
        """True once something happened after ``seen``; False if ``timeout_s`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count > seen, max(timeout_s, 0))


CHANGES = Changes()


def broker_bin():
    path = os.environ.get("QUOTA_BROKER_BIN") or DEFAULT_BIN
    return os.path.abspath(path)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """A broker process; ``port`` reuses a port (to restart a broker where clients expect it).

    ``tls``: a ``[server.tls]`` table (``Pki.server_tls``); ``extra``: more
    top-level tables (e.g. ``[overload]``); ``listen_host``: the address to
    bind (clients still connect to ``host``, 127.0.0.1 unless given).
    Returns once the broker has started (its "broker started" line);
    ``started=False``: once its ports answer ("quota-broker serving"), the
    broker's calls maybe still answered UNAVAILABLE "starting".
    """

    def __init__(self, tmp_path, auth="", single_ttl_ms=1500, port=None, state_dir="", tls="",
                 extra="", listen_host="127.0.0.1", host=None, config_text=None, started=True):
        exe = broker_bin()
        if not os.access(exe, os.X_OK):
            pytest.fail(
                f"quota-broker binary not found at {exe}: run `cargo build --bin quota-broker` "
                "in the repo root or set QUOTA_BROKER_BIN"
            )
        self.port = port or free_port()
        self.host = host or "127.0.0.1"
        self.addr = f"{self.host}:{self.port}"
        self.tls = bool(tls)
        #: The url clients use: https:// for a TLS broker.
        self.url = f"https://{self.addr}" if self.tls else self.addr
        self.killed = False
        self.config = tmp_path / f"broker-{self.port}.toml"
        if config_text is not None:
            # A whole config of its own (e.g. a cluster node), "{port}" filled in.
            self.config.write_text(config_text.replace("{port}", str(self.port)))
        else:
            self.config.write_text(BASE_CONFIG.format(port=self.port, auth=auth,
                                                      single_ttl_ms=single_ttl_ms, state_dir=state_dir,
                                                      tls=tls, extra=extra, listen_host=listen_host))
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_BROKER__")}
        env["RUST_LOG"] = "info"
        env["NO_COLOR"] = "1"
        self.lines = []
        self._ready_line = "broker started" if started else "quota-broker serving"
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [exe, "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=str(tmp_path),
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(2)
                pytest.fail(f"quota-broker exited with {self.proc.returncode} before serving:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"quota-broker not serving after {START_TIMEOUT_S}s:\n{self.log()}")

    def _read(self):
        # Drains stderr for the whole life of the process (a full pipe would block it).
        for raw in self.proc.stderr:
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
            self.lines.append(line)
            CHANGES.bump()
            # Its ports answer from the "quota-broker serving" line on, the
            # broker's calls UNAVAILABLE "starting" until "broker started".
            if self._ready_line in line:
                self._ready.set()

    def log(self):
        return "\n".join(self.lines[-50:])

    def client(self, token=None, **kw):
        return QuotaBroker(self.url, token=token, timeout=10, **kw)

    def freeze(self):
        """SIGSTOP, as a host that hangs: returns once every thread of the
        process is stopped (the signal reaches threads running on another
        core a moment after kill() returns)."""
        stopped = threading.Event()

        def wait_stopped():
            # The kernel tells the parent once the group stop is complete,
            # i.e. every thread is stopped; WNOWAIT leaves that status (and
            # the process's exit, later) for Popen's own wait.
            try:
                os.waitid(os.P_PID, self.proc.pid, os.WSTOPPED | os.WNOWAIT)
            except ChildProcessError:
                return  # gone (reaped): not stopped
            stopped.set()

        self.proc.send_signal(signal.SIGSTOP)
        threading.Thread(target=wait_stopped, name="sigstop-wait", daemon=True).start()
        if not stopped.wait(STOP_TIMEOUT_S):
            states = []
            task_dir = f"/proc/{self.proc.pid}/task"
            for tid in (os.listdir(task_dir) if os.path.isdir(task_dir) else ()):
                try:
                    with open(f"{task_dir}/{tid}/stat") as f:
                        # state is the field after the ")" closing the name
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    continue  # a thread that ended meanwhile
            pytest.fail(f"quota-broker not stopped {STOP_TIMEOUT_S}s after SIGSTOP: {states}")

    def thaw(self):
        """SIGCONT."""
        self.proc.send_signal(signal.SIGCONT)

    def kill(self):
        """SIGKILL, as a crash would: no graceful shutdown. Returns once the process is gone."""
        self.killed = True
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT_S)
        self._reader.join(5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


@pytest.fixture(autouse=True)
def own_fallbacks():
    """Each test plays a process of its own: the fallbacks a process's
    clients share (per brokers, settings and clock) start afresh, so a port
    reused from an earlier test does not find that test's outage."""
    from quota_broker_client import fallback
    fallback.forget_shared()
    yield
    fallback.forget_shared()


@pytest.fixture
def start_broker(tmp_path):
    """Factory: start_broker(auth="...toml...") -> BrokerProcess; all stopped at teardown."""
    started = []

    def start(**kw):
        b = BrokerProcess(tmp_path, **kw)
        started.append(b)
        return b

    yield start
    for b in started:
        if b.killed:
            continue
        rc = b.stop()
        assert rc == 0, f"quota-broker exited with {rc} on SIGTERM:\n{b.log()}"


def non_loopback_ipv4():
    """An IPv4 address of this host other than loopback that can be bound, or None."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # no packet is sent: only picks the route's source address
            candidates.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        candidates.extend(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    for ip in candidates:
        if ipaddress.ip_address(ip).is_loopback or ip == "0.0.0.0":
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((ip, 0))
            except OSError:
                continue
        return ip
    return None


class Pki:
    """A CA, a server certificate (127.0.0.1, localhost and ``server_ips``) and a
    client certificate it signed, made at test time and written to ``directory``.

    ``ca_pem``, ``server_pem``, ``client_pem``, ``client_key_pem`` are the PEM
    bytes; ``path(name)`` the files (ca.pem, server.pem, server.key,
    client.pem, client.key).
    """

    def __init__(self, directory, name="quota-broker python test CA", server_ips=()):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

        def key_pem(key):
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())

        def cert_pem(cert):
            return cert.public_bytes(serialization.Encoding.PEM)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        def leaf(cn, sans, usage):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            return cert_pem(cert), key_pem(key)

        ips = ["127.0.0.1", *server_ips]
        server_sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName("localhost")]
        self.ca_pem = cert_pem(ca)
        self.server_pem, self.server_key_pem = leaf("quota-broker", server_sans, ExtendedKeyUsageOID.SERVER_AUTH)
        self.client_pem, self.client_key_pem = leaf("ingest-1", [x509.DNSName("ingest-1")],
                                                    ExtendedKeyUsageOID.CLIENT_AUTH)
        for file, pem in (("ca.pem", self.ca_pem), ("server.pem", self.server_pem),
                          ("server.key", self.server_key_pem), ("client.pem", self.client_pem),
                          ("client.key", self.client_key_pem)):
            self.path(file).write_bytes(pem)

    def path(self, file):
        return self.dir / file

    def server_tls(self, mutual=False):
        """``[server.tls]`` for these files; with ``client_ca`` (mutual TLS) if ``mutual``."""
        s = f'[server.tls]\ncert = "{self.path("server.pem")}"\nkey = "{self.path("server.key")}"\n'
        if mutual:
            s += f'client_ca = "{self.path("ca.pem")}"\n'
        return s


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "pki")


@pytest.fixture
def broker_proc(start_broker):
    return start_broker()


@pytest.fixture
def broker(broker_proc):
    with broker_proc.client() as client:
        yield client


def bucket(client, name, oauth_client=""):
    b = client.bucket(TENANT, name, oauth_client)
    assert b is not None, f"no bucket {name!r} in {[x.bucket for x in client.list_buckets(TENANT)]}"
    return b


class FakeClock:
    """A clock for QuotaBroker(clock=...): ``sleep`` advances it at once, nothing else does."""

    def __init__(self, start=1000.0):
        self.now = float(start)
        self.slept = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0, seconds
        self.now += seconds
        self.slept += seconds

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def fake_clock():
    return FakeClock()


# -- etcd, for the cluster tests ---------------------------------------------

ETCD_BIN = "/usr/bin/etcd"
ETCD_START_TIMEOUT_S = 30
_APT_LOCK = "/tmp/quota-broker-testsvc-apt.lock"  # the Rust tests' testsvc uses the same lock


def ensure_etcd():
    """The etcd binary, installing Debian ``etcd-server`` when missing (as root).

    Fails the test with what to do when it cannot: never skips.
    """
    if os.access(ETCD_BIN, os.X_OK):
        return ETCD_BIN
    if os.geteuid() != 0:
        pytest.fail(f"the cluster tests need etcd ({ETCD_BIN}, Debian package etcd-server): "
                    "run `apt-get install -y etcd-server`, or run the tests as root so they install it")
    script = ("export DEBIAN_FRONTEND=noninteractive; "
              "apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends etcd-server "
              "|| { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && "
              "apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends etcd-server; }")
    cmd = ["flock", _APT_LOCK, "sh", "-c", script] if shutil.which("flock") else ["sh", "-c", script]
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"installing etcd-server with apt-get failed: {e}")
    if out.returncode != 0 or not os.access(ETCD_BIN, os.X_OK):
        tail = (out.stdout + out.stderr).decode("utf-8", "replace")[-2000:]
        pytest.fail(f"apt-get could not install etcd-server (exit {out.returncode}); "
                    f"the cluster tests need {ETCD_BIN}:\n{tail}")
    return ETCD_BIN


class EtcdProcess:
    """A one-member etcd on 127.0.0.1, ephemeral ports, data under ``directory``."""

    def __init__(self, directory):
        exe = ensure_etcd()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log_path = self.dir / "etcd.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [exe, "--name", "t", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + ETCD_START_TIMEOUT_S
        while not self.healthy():
            if self.proc.poll() is not None:
                pytest.fail(f"etcd exited with {self.proc.returncode} before being healthy:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"etcd not healthy after {ETCD_START_TIMEOUT_S}s:\n{self.log()}")
            time.sleep(0.05)  # polling a server until it is up

    def watch(self, prefix):
        """Watches the leader and member keys under ``prefix`` (etcd's JSON
        gateway, ``POST /v3/watch``): each change etcd reports bumps
        ``CHANGES``. Returns once etcd has created the watch; it ends with
        etcd."""
        import base64
        import http.client
        import json

        def b64(raw):
            return base64.b64encode(raw).decode()

        key = f"{prefix}/".encode()
        end = key[:-1] + bytes([key[-1] + 1])
        wanted = (f"{prefix}/leaders/", f"{prefix}/members/")
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=10)
        conn.request("POST", "/v3/watch",
                     body=json.dumps({"create_request": {"key": b64(key), "range_end": b64(end)}}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        assert resp.status == 200 and b'"created":true' in first, (resp.status, first)
        conn.sock.settimeout(None)  # from now on a change may be long in coming

        def read():
            try:
                for line in iter(resp.readline, b""):
                    events = json.loads(line).get("result", {}).get("events", [])
                    keys = [base64.b64decode(e["kv"]["key"]).decode("utf-8", "replace") for e in events]
                    if any(k.startswith(wanted) for k in keys):
                        CHANGES.bump()
            except (OSError, ValueError, http.client.HTTPException):
                pass  # etcd stopped
            finally:
                conn.close()

        threading.Thread(target=read, name="etcd-watch", daemon=True).start()

    def healthy(self):
        import urllib.request
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                return '"health":"true"' in r.read().decode("utf-8", "replace").replace(" ", "")
        except OSError:
            return False

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
        self._log.close()


@pytest.fixture
def etcd(tmp_path):
    e = EtcdProcess(tmp_path / "etcd")
    yield e
    e.stop()


# -- waiting on events, not on a clock ----------------------------------------

def watch_bucket(client, name, until, timeout_s, oauth_client="", tenant=TENANT):
    """Waits on the broker's Watch stream (a snapshot, then each change of a
    bucket) for bucket ``name`` (instance ``oauth_client``) to satisfy
    ``until(status)``, at most ``timeout_s``. Returns (True, that status),
    or (False, the last status of it seen, None if none) once ``timeout_s``
    has passed. ``until`` may also read client state that changes before
    the broker's (e.g. ``pending_reports``, taken out before it is sent)."""
    last = None
    try:
        with client.watch(tenant, timeout=max(timeout_s, 0.001)) as stream:
            for st in stream:
                if st.bucket == name and st.oauth_client == oauth_client:
                    last = st
                    if until(st):
                        return True, st
    except DeadlineExceeded:
        pass  # timeout_s passed
    return False, last


class Calls:
    """Methods wrapped (``wrap(obj, name)``: a client's stub methods, its
    background senders ``_release_deferred`` / ``flush_reports``, its
    ``_probe``) so that each call's start and end wake ``wait``: the events
    the client's threads make, for a test to wait on instead of a clock.
    ``running``: wrapped calls under way; ``ended[name]``: calls ended."""

    def __init__(self):
        self.cond = threading.Condition()
        self.running = 0
        self.ended = collections.Counter()

    def wrap(self, obj, name):
        real = getattr(obj, name)

        def wrapped(*a, **kw):
            with self.cond:
                self.running += 1
                self.cond.notify_all()
            try:
                return real(*a, **kw)
            finally:
                with self.cond:
                    self.running -= 1
                    self.ended[name] += 1
                    self.cond.notify_all()

        setattr(obj, name, wrapped)
        return self

    def count(self):
        """How many wrapped calls have ended."""
        with self.cond:
            return sum(self.ended.values())

    def wait(self, until, timeout_s):
        """True once ``until()`` holds (checked now and at each wrapped call's
        start and end, under the lock); False once ``timeout_s`` has passed."""
        with self.cond:
            return self.cond.wait_for(until, max(timeout_s, 0))

    def wait_idle(self, until, timeout_s):
        """``wait`` for ``until()`` at a moment no wrapped call is under way:
        what they change (a kept release taken out, then put back when its
        call fails) is not read half-way."""
        return self.wait(lambda: self.running == 0 and until(), timeout_s)
