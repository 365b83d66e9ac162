#!/usr/bin/env bash
# Bench set-up (not part of the test suite): installs the peer rate-limit
# server loadgen compares the broker with, throttlecrab-server 0.4.40 (a Rust
# GCRA server on tonic 0.14), into target/peer/bin. Its build needs protoc:
# Debian's protobuf-compiler is installed for it when missing.
#
#   install-peer.sh          # its own release profile, as `cargo install` builds it
#   install-peer.sh --lto    # the broker's release profile (lto = "fat",
#                            # codegen-units = 1), into target/peer-lto/bin:
#                            # pass it to `loadgen peer --peer-bin`
set -euo pipefail
version=0.4.40
repo="$(cd "$(dirname "$0")/../../.." && pwd)"
root="$repo/target/peer"
profile=()
case "${1:-}" in
    "") ;;
    --lto)
        root="$repo/target/peer-lto"
        profile=(env CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1)
        ;;
    *) echo "usage: $0 [--lto]" >&2; exit 2 ;;
esac
if [ -x "$root/bin/throttlecrab-server" ]; then
    echo "throttlecrab-server already in $root/bin"
    exit 0
fi
if ! command -v protoc >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler
fi
PROTOC="$(command -v protoc)" "${profile[@]}" cargo install --locked --root "$root" \
    throttlecrab-server --version "$version"
echo "installed: $root/bin/throttlecrab-server"
