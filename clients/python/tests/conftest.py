"""Fixtures: a real quota-broker process per test, on a free 127.0.0.1 port.

The binary is $QUOTA_BROKER_BIN (relative paths from the current directory),
default ../../target/debug/quota-broker relative to clients/python.
"""
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from quota_broker_client import QuotaBroker

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
listen = "127.0.0.1:{port}"
state_dir = "{state_dir}"
shutdown_grace_ms = 2000

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


def broker_bin():
    path = os.environ.get("QUOTA_BROKER_BIN") or DEFAULT_BIN
    return os.path.abspath(path)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """A broker process; ``port`` reuses a port (to restart a broker where clients expect it)."""

    def __init__(self, tmp_path, auth="", single_ttl_ms=1500, port=None, state_dir=""):
        exe = broker_bin()
        if not os.access(exe, os.X_OK):
            pytest.fail(
                f"quota-broker binary not found at {exe}: run `cargo build --bin quota-broker` "
                "in the repo root or set QUOTA_BROKER_BIN"
            )
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.killed = False
        self.config = tmp_path / f"broker-{self.port}.toml"
        self.config.write_text(BASE_CONFIG.format(port=self.port, auth=auth, single_ttl_ms=single_ttl_ms,
                                                  state_dir=state_dir))
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_BROKER__")}
        env["RUST_LOG"] = "info"
        env["NO_COLOR"] = "1"
        self.lines = []
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
            if "quota-broker serving" in line:
                self._ready.set()

    def log(self):
        return "\n".join(self.lines[-50:])

    def client(self, token=None):
        return QuotaBroker(self.addr, token=token, timeout=10)

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
