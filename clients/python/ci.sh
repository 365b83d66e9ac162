#!/usr/bin/env bash
# CI for the Python client: venv, install .[test,genesys], pytest against a
# real broker. The caller sets QUOTA_BROKER_BIN to the built binary (default
# ../../target/debug/quota-broker). Exits non-zero on any failure.
set -euo pipefail

if [ -n "${QUOTA_BROKER_BIN:-}" ]; then
  # Relative to the caller's directory, resolved before the cd below.
  case "$QUOTA_BROKER_BIN" in /*) ;; *) QUOTA_BROKER_BIN="$PWD/$QUOTA_BROKER_BIN" ;; esac
  export QUOTA_BROKER_BIN
  echo "ci.sh: QUOTA_BROKER_BIN=${QUOTA_BROKER_BIN}"
else
  echo "ci.sh: QUOTA_BROKER_BIN not set; tests use ../../target/debug/quota-broker"
fi
cd "$(dirname "$0")"

PY=python3
if [ -x .venv/bin/python ] || python3 -m venv .venv; then
  PY=.venv/bin/python
  USER_FLAG=()
else
  echo "ci.sh: python3 -m venv failed; installing with pip --user" >&2
  USER_FLAG=(--user)
fi

"$PY" -m pip install --quiet --disable-pip-version-check "${USER_FLAG[@]}" ".[test,genesys]"

# The cluster tests (tests/test_cluster.py) run a real etcd: install it when
# missing (Debian etcd-server; we are root on CI). tests/conftest.py tries
# the same and fails those tests loudly if it cannot.
if [ ! -x /usr/bin/etcd ]; then
  echo "ci.sh: /usr/bin/etcd missing; installing etcd-server"
  if [ "$(id -u)" -ne 0 ]; then
    echo "ci.sh: not root: install etcd-server (apt-get install -y etcd-server) for the cluster tests" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends etcd-server \
    || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null \
         && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends etcd-server; } \
    || { echo "ci.sh: apt-get could not install etcd-server, needed by the cluster tests" >&2; exit 1; }
  [ -x /usr/bin/etcd ] || { echo "ci.sh: etcd-server installed but /usr/bin/etcd is missing" >&2; exit 1; }
fi

# -P: no current directory on sys.path, so the installed package (not the
# source tree) is what gets tested.
"$PY" -P -m pytest -q "$@"
