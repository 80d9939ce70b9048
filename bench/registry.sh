#!/usr/bin/env bash
# Registry: Keel's registry vs etcd, same client code (keel bench registry, through the one
# NamingBackend interface), in one run.
#
#   bench/registry.sh [seconds-per-run]      (default 3; each point is the median of 3 runs)
#
# Both servers are pinned to core 1 (keel registry with one runtime thread; etcd as packaged,
# GOMAXPROCS=1), the client to core 0 with 4 connections. Both sync writes to disk before
# acknowledging them (keel --sync always; etcd fsyncs its WAL). Operations: durable writes
# (re-register an instance), heartbeats (renew a lease), reads (list 10 instances; etcd reads
# are linearizable, its default), watch delay (write sent -> event received) with 1 and 64
# writers, and lease-expiry precision (2 s TTL). The last line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-3}"
REPS="${REPS:-3}"
KEEL_PORT=7311
ETCD_PORT=7312
ETCD_PEER=7313

if ! command -v etcd >/dev/null 2>&1; then
  echo "installing etcd-server" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server) >/dev/null
fi

cargo build --release -q -p keel
BIN="${CARGO_TARGET_DIR:-target}/release"
DATA="$(mktemp -d)"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DATA"; }
trap cleanup EXIT

taskset -c 1 "$BIN/keel" registry --addr "127.0.0.1:$KEEL_PORT" --data-dir "$DATA/keel" --threads 1 >/dev/null 2>&1 & PIDS+=($!)
GOMAXPROCS=1 taskset -c 1 etcd --name bench --data-dir "$DATA/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER" >/dev/null 2>&1 & PIDS+=($!)

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server on port $1 did not start" >&2
  exit 1
}
wait_port $KEEL_PORT; wait_port $ETCD_PORT

RESULTS="$(mktemp)"
run() { # backend op concurrency [extra args...]
  local be=$1 op=$2 conc=$3; shift 3
  local endpoint="127.0.0.1:$KEEL_PORT"
  [ "$be" = etcd ] && endpoint="http://127.0.0.1:$ETCD_PORT"
  taskset -c 0 "$BIN/keel" bench registry --backend "$be" --endpoint "$endpoint" --op "$op" \
    --concurrency "$conc" --connections 4 --seconds "$SECS" --warmup 1 "$@" | tail -1 >> "$RESULTS"
}

for op in write heartbeat read; do
  for conc in 1 64 256; do
    for rep in $(seq 1 "$REPS"); do
      for be in keel etcd; do run $be $op $conc; done
    done
    echo "done: $op, $conc clients" >&2
  done
done
for writers in 1 64; do
  for rep in $(seq 1 "$REPS"); do
    for be in keel etcd; do run $be watch 1 --writers $writers; done
  done
  echo "done: watch, $writers writers" >&2
done
for be in keel etcd; do run $be expiry 1 --ttl-ms 2000 --leases 5; done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(be, op, key, **match):
    vals = [r[key] for r in rows if r["backend"] == be and r["op"] == op
            and all(r.get(k) == v for k, v in match.items())]
    return statistics.median(vals) if vals else None
table = {}
print(f"{'op':>9} {'clients':>7} {'backend':>7} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
for op in ("write", "heartbeat", "read"):
    for conc in (1, 64, 256):
        for be in ("keel", "etcd"):
            q, p50, p99 = (med(be, op, k, concurrency=conc) for k in ("qps", "p50_ms", "p99_ms"))
            table[f"{be}_{op}_c{conc}"] = {"ops": q, "p50_ms": p50, "p99_ms": p99}
            print(f"{op:>9} {conc:>7} {be:>7} {q:>10.0f} {p50:>8.3f} {p99:>8.3f}")
print(f"{'watch':>9} {'writers':>7} {'backend':>7} {'events':>10} {'p50 ms':>8} {'p99 ms':>8}")
for writers in (1, 64):
    for be in ("keel", "etcd"):
        ev, p50, p99 = (med(be, "watch", k, writers=writers) for k in ("events", "watch_p50_ms", "watch_p99_ms"))
        table[f"{be}_watch_w{writers}"] = {"events": ev, "p50_ms": p50, "p99_ms": p99}
        print(f"{'watch':>9} {writers:>7} {be:>7} {ev:>10.0f} {p50:>8.3f} {p99:>8.3f}")
for be in ("keel", "etcd"):
    mean, mx = med(be, "expiry", "expiry_ratio_mean"), med(be, "expiry", "expiry_ratio_max")
    table[f"{be}_expiry"] = {"ratio_mean": mean, "ratio_max": mx}
    print(f"expiry of a 2 s TTL, {be}: {mean:.3f} x TTL on average, {mx:.3f} at most")
t = table
summary = {
    "keel_write_ops": t["keel_write_c64"]["ops"], "etcd_write_ops": t["etcd_write_c64"]["ops"],
    "keel_write_p99_ms": t["keel_write_c64"]["p99_ms"], "etcd_write_p99_ms": t["etcd_write_c64"]["p99_ms"],
    "keel_heartbeat_ops": t["keel_heartbeat_c64"]["ops"], "etcd_heartbeat_ops": t["etcd_heartbeat_c64"]["ops"],
    "keel_read_ops": t["keel_read_c64"]["ops"], "etcd_read_ops": t["etcd_read_c64"]["ops"],
    "keel_watch_p99_ms": t["keel_watch_w64"]["p99_ms"], "etcd_watch_p99_ms": t["etcd_watch_w64"]["p99_ms"],
    "keel_watch_p99_ms_1writer": t["keel_watch_w1"]["p99_ms"], "etcd_watch_p99_ms_1writer": t["etcd_watch_w1"]["p99_ms"],
    "keel_expiry_ratio": t["keel_expiry"]["ratio_max"], "etcd_expiry_ratio": t["etcd_expiry"]["ratio_max"],
    "write_ratio": round(t["keel_write_c64"]["ops"] / t["etcd_write_c64"]["ops"], 2),
    "read_ratio": round(t["keel_read_c64"]["ops"] / t["etcd_read_c64"]["ops"], 2),
    "all": table,
}
print(json.dumps(summary))
PY
