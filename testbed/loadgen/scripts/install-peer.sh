#!/usr/bin/env bash
# Bench set-up (not part of the test suite): installs the peer rate-limit
# server loadgen compares the broker with, throttlecrab-server 0.4.40 (a Rust
# GCRA server on tonic 0.14), into target/peer/bin. Its build needs protoc:
# Debian's protobuf-compiler is installed for it when missing.
set -euo pipefail
version=0.4.40
root="$(cd "$(dirname "$0")/../../.." && pwd)/target/peer"
if [ -x "$root/bin/throttlecrab-server" ]; then
    echo "throttlecrab-server already in $root/bin"
    exit 0
fi
if ! command -v protoc >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler
fi
PROTOC="$(command -v protoc)" cargo install --locked --root "$root" \
    throttlecrab-server --version "$version"
echo "installed: $root/bin/throttlecrab-server"
