#!/usr/bin/env bash
# Starts a 3-node `raftkv server` cluster on loopback (fresh data directories, free ports),
# runs `raftkv bench` against it for each client count, and stops the cluster.
#
#   scripts/cluster-bench.sh [--duration 10s] [--clients "1 16 64"] [--workload put]
#                            [--server-flags "--threads 2"] [-- BENCH FLAGS]
#
# Uses target/release/raftkv (build it first: cargo build --release) or $RAFTKV.
# KEEP=1 keeps the data directories and server logs.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${RAFTKV:-target/release/raftkv}
DURATION=10s
CLIENTS="1 16 64"
WORKLOAD=put
SERVER_FLAGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --workload) WORKLOAD=$2; shift 2 ;;
    --server-flags) SERVER_FLAGS=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "no $BIN: run cargo build --release" >&2; exit 1; }
DIR=$(mktemp -d -t raftkv-bench.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$DIR"
}
trap cleanup EXIT
# Three free loopback ports (bound and released; a race with another program is possible).
read -r P1 P2 P3 < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
CLUSTER="1=127.0.0.1:$P1,2=127.0.0.1:$P2,3=127.0.0.1:$P3"
SERVERS="127.0.0.1:$P1,127.0.0.1:$P2,127.0.0.1:$P3"
for id in 1 2 3; do
  # shellcheck disable=SC2086 # the flags are words
  "$BIN" server --id "$id" --cluster "$CLUSTER" --data-dir "$DIR/node$id" $SERVER_FLAGS \
    >"$DIR/out$id" 2>"$DIR/err$id" &
  PIDS+=($!)
done
# Wait (bounded) until every node announced its address and a leader is known.
for _ in $(seq 1 300); do
  if "$BIN" status --servers "$SERVERS" --json 2>/dev/null | grep -q '"role":"leader"'; then
    break
  fi
  sleep 0.1
done
"$BIN" status --servers "$SERVERS"
for clients in $CLIENTS; do
  "$BIN" bench --servers "$SERVERS" --clients "$clients" --duration "$DURATION" \
    --workload "$WORKLOAD" "$@"
done
