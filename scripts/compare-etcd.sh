#!/usr/bin/env bash
# raftkv against etcd, side by side: alternates scripts/etcd-bench.sh and scripts/cluster-bench.sh
# (etcd, raftkv, etcd, raftkv, ...) for R rounds and prints one table: per client count the
# puts/s and p99 of every run, their medians, and the ratios raftkv/etcd (throughput) and
# raftkv/etcd (p99) — the figures issue 7 sets targets on (≥ 3× at 1 client, ≥ 10× at 64,
# p99 ≤ 1/5).
#
#   scripts/compare-etcd.sh [--rounds 2] [--duration 10s] [--clients "1 16 64"]
#                           [--raftkv-flags "FLAGS"]... [--etcd-idle-poll]
#
# Each --raftkv-flags adds a raftkv variant whose servers get FLAGS (for example
# --raftkv-flags "" --raftkv-flags "--busy-poll 1ms" runs the default and busy polling, each
# round: etcd, then every variant); the table has a row per client count and variant.
#
# --etcd-idle-poll also runs etcd, every round, while this script holds the machine-wide CPU
# latency request that `raftkv server --idle-poll` takes (0 µs on /dev/cpu_dma_latency: idle
# CPUs poll instead of halting; needs root), so a raftkv variant with --idle-poll can be
# compared with etcd under the same machine setting too: the table then has a second ratio
# column, against that run.
#
# When the client counts include 1, each round also runs scripts/commit-floor.py (about 7 s):
# the p50/p99 of a durable majority commit on this disk with no network and no software, the
# floor under any replicated put here; the table is followed by its medians next to the
# 1-client p99 target (etcd's median p99 / 5).
#
# Needs what both scripts need: target/release/raftkv (cargo build --release), etcd and etcdctl
# (apt-get install etcd-server etcd-client), protoc for the first build of tools/etcd-bench
# (apt-get install protobuf-compiler). Both load 1,000 keys with 128-byte durable puts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=2
DURATION=10s
CLIENTS="1 16 64"
VARIANTS=()
ETCD_IDLE_POLL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --raftkv-flags) VARIANTS+=("$2"); shift 2 ;;
    --etcd-idle-poll) ETCD_IDLE_POLL=1; shift ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=("")
if [ "$ETCD_IDLE_POLL" = 1 ] && [ ! -w /dev/cpu_dma_latency ]; then
  echo "--etcd-idle-poll needs write access to /dev/cpu_dma_latency (root)" >&2
  exit 2
fi
OUT=$(mktemp -t compare-etcd.XXXXXX)
holder=
trap 'rm -f "$OUT" "$OUT.variants" "$OUT.held"; [ -z "$holder" ] || kill "$holder" 2>/dev/null || true' EXIT
# The disk's speed right now (both systems' figures move with it): p50 of 300 rounds of a
# 200-byte pwrite + fdatasync in a zero-filled file where the benchmarks keep their data.
disk() {
  python3 - <<'EOF'
import os, statistics, tempfile, time
fd, path = tempfile.mkstemp(prefix="compare-etcd-disk.")
try:
    os.write(fd, bytes(1 << 20)); os.fsync(fd)
    took = []
    for i in range(300):
        start = time.perf_counter()
        os.pwrite(fd, b"x" * 200, i * 512)
        os.fdatasync(fd)
        took.append(time.perf_counter() - start)
    print(f"fdatasync p50 {statistics.median(took) * 1e6:.0f} µs")
finally:
    os.close(fd); os.unlink(path)
EOF
}
# Says which run starts, with the load and the disk's speed right before it.
announce() {
  echo "round $round/$ROUNDS: $1 (load $(cut -d' ' -f1 /proc/loadavg), $(disk))" >&2
}
# Runs a benchmark command ("$3"...) and appends its JSON lines to $OUT as "LABEL {...}"; says
# so when it gave none. LABEL is "$1", WHAT (for that message) "$2".
collect() {
  local label=$1 what=$2 results
  shift 2
  results=$("$@" 2>/dev/null | grep '^{' || true)
  [ -n "$results" ] || echo "  $what gave no result this round (run $* to see why)" >&2
  [ -z "$results" ] || sed "s/^/$label /" <<<"$results" >>"$OUT"
}
for round in $(seq 1 "$ROUNDS"); do
  announce etcd
  collect etcd etcd scripts/etcd-bench.sh --duration "$DURATION" --clients "$CLIENTS" -- --json
  if [ "$ETCD_IDLE_POLL" = 1 ]; then
    announce "etcd with idle CPUs polling"
    # Holds the request (a native i32 of µs, kept while the file is open) until killed; says
    # so in $OUT.held once it holds it.
    rm -f "$OUT.held"
    python3 -c 'import os, signal, struct, sys
fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
os.write(fd, struct.pack("i", 0))
open(sys.argv[1], "w").close()
signal.pause()' "$OUT.held" &
    holder=$!
    while [ ! -e "$OUT.held" ] && kill -0 "$holder" 2>/dev/null; do sleep 0.05; done
    [ -e "$OUT.held" ] || { echo "cannot hold the CPU latency request" >&2; exit 1; }
    collect etcd-idle "etcd with idle CPUs polling" \
      scripts/etcd-bench.sh --duration "$DURATION" --clients "$CLIENTS" -- --json
    kill "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    holder=
  fi
  for variant in "${!VARIANTS[@]}"; do
    flags=${VARIANTS[$variant]}
    announce "raftkv ${flags:-(default flags)}"
    collect "raftkv$variant" "raftkv ${flags:-(default flags)}" scripts/cluster-bench.sh \
      --duration "$DURATION" --clients "$CLIENTS" --server-flags "$flags" -- --keys 1000 --json
  done
  if [[ " $CLIENTS " == *" 1 "* ]]; then
    echo "round $round/$ROUNDS: majority-commit floor of the disk (scripts/commit-floor.py)" >&2
    collect floor "the majority-commit floor" scripts/commit-floor.py --json
  fi
done
printf '%s\n' "${VARIANTS[@]}" >"$OUT.variants"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
runs, floors = {}, []
for line in open(sys.argv[1]):
    system, text = line.split(" ", 1)
    run = json.loads(text)
    if system == "floor":
        floors.append(run["majority_commit_us"])
        continue
    runs.setdefault((system, run["clients"]), []).append(run)
variants = open(sys.argv[1] + ".variants").read().split("\n")[:-1]
idle = any(system == "etcd-idle" for system, _ in runs)
extra_head = " vs etcd idle-polling: puts/s, ratio, p99 ms, p99 ratio |" if idle else ""
print("| clients | raftkv flags | raftkv puts/s | etcd puts/s | ratio | raftkv p99 ms | etcd p99 ms | p99 ratio | errors |" + extra_head)
print("|---|---|---|---|---|---|---|---|---|" + ("---|" if idle else ""))
for clients, variant in sorted({(c, v) for c in {c for _, c in runs} for v in range(len(variants))}):
    r, e = runs.get((f"raftkv{variant}", clients), []), runs.get(("etcd", clients), [])
    if not r or not e:
        continue
    ops = lambda rs: [x["ops_per_sec"] for x in rs]
    p99 = lambda rs: [x["latency_us"]["p99"] / 1000 for x in rs]
    fmt = lambda xs, f: " / ".join(f.format(x) for x in xs)
    ratio = statistics.median(ops(r)) / statistics.median(ops(e))
    p99_ratio = statistics.median(p99(r)) / statistics.median(p99(e))
    i = runs.get(("etcd-idle", clients), [])
    errors = sum(x["errors"] for x in r + e + i)
    flags = f"`{variants[variant]}`" if variants[variant] else "(default)"
    extra = ""
    if idle:
        extra = " – |"
        if i:
            extra = (f" {fmt(ops(i), '{:,.0f}')}, {statistics.median(ops(r)) / statistics.median(ops(i)):.1f}×, "
                     f"{fmt(p99(i), '{:.1f}')}, {statistics.median(p99(r)) / statistics.median(p99(i)):.2f} |")
    print(f"| {clients} | {flags} | {fmt(ops(r), '{:,.0f}')} | {fmt(ops(e), '{:,.0f}')} | {ratio:.1f}× "
          f"| {fmt(p99(r), '{:.1f}')} | {fmt(p99(e), '{:.1f}')} | {p99_ratio:.2f} | {errors} |{extra}")
etcd_one = runs.get(("etcd", 1), [])
if floors and etcd_one:
    target = statistics.median(x["latency_us"]["p99"] for x in etcd_one) / 5 / 1000
    floor = lambda q: " / ".join(f"{f[q] / 1000:.2f}" for f in floors)
    print(f"\n1 client: the p99 target (etcd's median p99 / 5) is {target:.2f} ms. This disk's "
          f"majority-commit floor (no network, no software; one per round) is p50 {floor('p50')} ms, "
          f"p99 {floor('p99')} ms.")
EOF
