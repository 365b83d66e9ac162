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

# -P: no current directory on sys.path, so the installed package (not the
# source tree) is what gets tested.
"$PY" -P -m pytest -q "$@"
