#!/usr/bin/env bash
# Bench (not part of the test suite): instructions per unary Acquire of the
# broker (metrics on and off) against throttlecrab-server's Throttle, counted
# by valgrind's callgrind, so the comparison holds on a busy machine where
# timed runs vary by ±30 %. One key, 4 connections × 32 in flight.
#
# Each server runs under callgrind twice through `loadgen peer`: a long run
# (DURATION seconds) and a short one (0.05 s, one call per loop); the
# difference of their totals over the difference of their calls is the cost
# of one call, with start-up and shutdown taken out.
#
#   testbed/loadgen/scripts/callgrind-peer.sh [BROKER_BIN] [DURATION]
#
# Needs valgrind, `cargo build --release -p quota-broker -p loadgen` and
# scripts/install-peer.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
broker="${1:-$root/target/release/quota-broker}"
duration="${2:-8}"
peer="$root/target/peer/bin/throttlecrab-server"
loadgen="$root/target/release/loadgen"
short=0.05
for bin in "$broker" "$peer" "$loadgen"; do
    [ -x "$bin" ] || { echo "missing $bin (see the comment at the top)" >&2; exit 1; }
done
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
out="$(mktemp -d)"
for who in broker peer; do
    bin="$broker"
    [ "$who" = peer ] && bin="$peer"
    # Detached from the wrapper, which loadgen kills with SIGKILL: the server
    # lives on until SIGTERM below, and callgrind writes its totals then.
    cat >"$out/$who.sh" <<EOF
#!/bin/sh
setsid valgrind --tool=callgrind --callgrind-out-file="$out/\$CGTAG.$who.%p.out" "$bin" "\$@" 2>>"$out/valgrind.log" &
wait \$!
EOF
    chmod +x "$out/$who.sh"
done

stop_servers() {
    pkill -TERM -f "callgrind-out-file=$out" || true
    for _ in $(seq 120); do
        pgrep -f "callgrind-out-file=$out" >/dev/null || return 0
        sleep 1
    done
    echo "callgrind did not stop within 120 s" >&2
    exit 1
}

run() {
    CGTAG="$1" "$loadgen" peer --runs 1 --duration "$2" --warmup 0 --cell one-key \
        --broker-bin "$out/broker.sh" --peer-bin "$out/peer.sh" >/dev/null 2>"$out/$1.err"
    stop_servers
}

run long "$duration"
run short "$short"

# Totals in start order (metrics on, metrics off, peer) and calls/s per run.
totals() {
    for f in $(ls "$out"/"$1".broker.*.out | sort -t. -k3 -n) $(ls "$out"/"$1".peer.*.out); do
        awk '/^summary:/ {print $2}' "$f"
    done
}
rates() {
    sed -n 's/.* run 1: \([0-9]*\) calls\/s.*/\1/p' "$out/$1.err"
}
paste <(totals long) <(totals short) <(rates long) <(rates short) |
    awk -v d="$duration" -v s="$short" '
    BEGIN {
        split("broker (metrics on)|broker (metrics off)|throttlecrab-server", name, "|")
        print "| target | calls (long run) | instructions per call | vs peer |"
        print "|---|---:|---:|---:|"
    }
    {
        calls = $3 * d - $4 * s
        per[NR] = ($1 - $2) / calls
        n[NR] = $3 * d
    }
    END {
        for (i = 1; i <= 3; i++)
            printf "| %s | %d | %.0f | %.2f× |\n", name[i], n[i], per[i], per[i] / per[3]
    }'
rm -rf "$out"
