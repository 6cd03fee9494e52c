#!/usr/bin/env bash
# Starts a 3-member etcd cluster on loopback (fresh data directories, free ports), runs the
# etcd load generator (tools/etcd-bench) against it for each client count, and stops the
# cluster: the etcd counterpart of scripts/cluster-bench.sh, with the same contract (durable
# puts of 128-byte values over 1000 random keys, closed-loop clients) and the same figures.
#
#   scripts/etcd-bench.sh [--duration 10s] [--clients "1 16 64"] [-- LOADGEN FLAGS]
#
# LOADGEN FLAGS go to every run (e.g. --json, --seed S, --target all, --keys K, --warmup 0s).
# Needs etcd and etcdctl on PATH (Debian: apt-get install etcd-server etcd-client; 3.4.23 on
# bookworm). Uses $ETCD_BENCH, or builds tools/etcd-bench (release) into $CARGO_TARGET_DIR
# (default tools/etcd-bench/target) if its binary is missing; building needs protoc (Debian:
# protobuf-compiler). etcd keeps its defaults (fdatasync of the WAL before acknowledging).
# KEEP=1 keeps the data directories and etcd logs.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=10s
CLIENTS="1 16 64"
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
for tool in etcd etcdctl python3; do
  command -v "$tool" >/dev/null || { echo "no $tool on PATH (apt-get install etcd-server etcd-client)" >&2; exit 1; }
done
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/tools/etcd-bench/target}
BIN=${ETCD_BENCH:-$TARGET_DIR/release/etcd-bench}
if [ ! -x "$BIN" ]; then
  echo "building $BIN" >&2
  CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet \
    --manifest-path tools/etcd-bench/Cargo.toml
fi
DIR=$(mktemp -d -t etcd-bench.XXXXXX)   # like cluster-bench.sh ($TMPDIR or /tmp)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
# Six free loopback ports, client and peer for each member (bound and released; a race with
# another program is possible).
read -r C1 C2 C3 R1 R2 R3 < <(python3 -c '
import socket
s = [socket.socket() for _ in range(6)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
CLIENT_PORTS=("$C1" "$C2" "$C3")
PEER_PORTS=("$R1" "$R2" "$R3")
CLUSTER="e1=http://127.0.0.1:$R1,e2=http://127.0.0.1:$R2,e3=http://127.0.0.1:$R3"
ENDPOINTS="http://127.0.0.1:$C1,http://127.0.0.1:$C2,http://127.0.0.1:$C3"
TOKEN=etcd-bench-$$-$RANDOM
for i in 0 1 2; do
  name=e$((i + 1))
  client=http://127.0.0.1:${CLIENT_PORTS[$i]}
  peer=http://127.0.0.1:${PEER_PORTS[$i]}
  etcd --name "$name" --data-dir "$DIR/$name" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token "$TOKEN" \
    --logger zap --log-outputs stderr --log-level warn \
    >"$DIR/$name.out" 2>"$DIR/$name.log" &
  PIDS+=($!)
done
echo "etcd pids ${PIDS[*]}, data in $DIR" >&2
# Wait (bounded, 30 s) until every member is healthy (a quorum read through each).
healthy=
for _ in $(seq 1 300); do
  if etcdctl --endpoints "$ENDPOINTS" --dial-timeout 1s --command-timeout 2s \
    endpoint health >/dev/null 2>&1; then
    healthy=1
    break
  fi
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "etcd $pid exited; logs in $DIR" >&2; KEEP=1; exit 1; }
  done
  sleep 0.1
done
[ -n "$healthy" ] || { echo "etcd cluster not healthy after 30 s; logs in $DIR" >&2; KEEP=1; exit 1; }
etcdctl --endpoints "$ENDPOINTS" endpoint status -w table >&2
for clients in $CLIENTS; do
  "$BIN" --endpoints "$ENDPOINTS" --clients "$clients" --duration "$DURATION" \
    --value-size 128 --keys 1000 "$@"
done
