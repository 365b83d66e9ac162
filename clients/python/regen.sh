#!/usr/bin/env bash
# Regenerates quota_broker_client/quota/v1/broker_pb2{.py,.pyi,_grpc.py} from
# ../../proto/quota/v1/broker.proto. Needs grpcio-tools==1.62.3
# (pip install '.[test]'); PYTHON selects the interpreter (default: .venv's,
# else python3).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" regen.py
