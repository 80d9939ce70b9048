#!/usr/bin/env bash
# Unary echo: Keel RPC vs tonic (gRPC) vs a raw-TCP pipelined echo (the ceiling), in one run.
#
#   bench/rpc.sh [seconds-per-run]        (default 5; each point is the median of 3 runs)
#   BASELINE_BIN=/path/to/old/keel bench/rpc.sh 5   (adds that build's server and client as a
#                                                   fourth contender, "base", in the same run)
#
# Servers are pinned to core 1 with one runtime thread, clients to core 0 with a
# current-thread runtime; 4 connections; payloads 1 KiB and 64 B; concurrency 1, 64, 256.
# The last line is one JSON object; its top-level keys are the 1 KiB, concurrency-64 figures.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-5}"
REPS="${REPS:-3}"
CONNS=4
KEEL_PORT=7301
TONIC_PORT=7302
RAW_PORT=7303
BASE_PORT=7304
BASELINE_BIN="${BASELINE_BIN:-}"
SYSTEMS="keel tonic raw"

cargo build --release -q -p keel -p keel-bench-peers
BIN="${CARGO_TARGET_DIR:-target}/release"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

taskset -c 1 "$BIN/keel" serve --addr "127.0.0.1:$KEEL_PORT" --threads 1 2>/dev/null & PIDS+=($!)
taskset -c 1 "$BIN/rpc-peers" tonic-server --addr "127.0.0.1:$TONIC_PORT" --threads 1 & PIDS+=($!)
taskset -c 1 "$BIN/rpc-peers" raw-server --addr "127.0.0.1:$RAW_PORT" --threads 1 & PIDS+=($!)
if [ -n "$BASELINE_BIN" ]; then
  taskset -c 1 "$BASELINE_BIN" serve --addr "127.0.0.1:$BASE_PORT" --threads 1 2>/dev/null & PIDS+=($!)
  SYSTEMS="keel base tonic raw"
fi

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server on port $1 did not start" >&2
  exit 1
}
wait_port $KEEL_PORT; wait_port $TONIC_PORT; wait_port $RAW_PORT
if [ -n "$BASELINE_BIN" ]; then wait_port $BASE_PORT; fi

RESULTS="$(mktemp)"
run() { # system payload concurrency
  local sys=$1 payload=$2 conc=$3 line
  local common=(--concurrency "$conc" --connections $CONNS --payload "$payload" --seconds "$SECS" --warmup 1)
  case $sys in
    keel)  line=$(taskset -c 0 "$BIN/keel" bench rpc --addr "127.0.0.1:$KEEL_PORT" --json "${common[@]}" | tail -1) ;;
    base)  line=$(taskset -c 0 "$BASELINE_BIN" bench rpc --addr "127.0.0.1:$BASE_PORT" --json "${common[@]}" | tail -1) ;;
    tonic) line=$(taskset -c 0 "$BIN/rpc-peers" tonic-client --addr "127.0.0.1:$TONIC_PORT" "${common[@]}" | tail -1) ;;
    raw)   line=$(taskset -c 0 "$BIN/rpc-peers" raw-client --addr "127.0.0.1:$RAW_PORT" "${common[@]}" | tail -1) ;;
  esac
  echo "{\"system\":\"$sys\",\"run\":$line}" >> "$RESULTS"
}

for payload in 1024 64; do
  for conc in 1 64 256; do
    for rep in $(seq 1 "$REPS"); do
      # Interleave the contenders so machine noise hits all of them alike.
      for sys in $SYSTEMS; do
        run $sys $payload $conc
      done
    done
    echo "done: payload $payload B, concurrency $conc" >&2
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(sys_, payload, conc, key):
    vals = [r["run"][key] for r in rows if r["system"] == sys_ and r["run"]["payload"] == payload and r["run"]["concurrency"] == conc]
    return statistics.median(vals) if vals else None
print(f"{'payload':>7} {'conc':>5} {'system':>6} {'QPS':>10} {'p50 ms':>8} {'p99 ms':>8} {'p999 ms':>8}")
table = {}
for payload in (1024, 64):
    for conc in (1, 64, 256):
        for s in ("keel", "base", "tonic", "raw"):
            if med(s, payload, conc, "qps") is None:
                continue
            q, p50, p99, p999 = (med(s, payload, conc, k) for k in ("qps", "p50_ms", "p99_ms", "p999_ms"))
            table[f"{s}_{payload}b_c{conc}"] = {"qps": q, "p50_ms": p50, "p99_ms": p99, "p999_ms": p999}
            print(f"{payload:>7} {conc:>5} {s:>6} {q:>10.0f} {p50:>8.3f} {p99:>8.3f} {p999:>8.3f}")
k, t, r = (table[f"{s}_1024b_c64"] for s in ("keel", "tonic", "raw"))
summary = {
    "keel_qps": k["qps"], "tonic_qps": t["qps"], "raw_qps": r["qps"],
    "keel_p99_ms": k["p99_ms"], "tonic_p99_ms": t["p99_ms"], "raw_p99_ms": r["p99_ms"],
    "keel_vs_tonic": round(k["qps"] / t["qps"], 2), "keel_vs_raw": round(k["qps"] / r["qps"], 2),
    "all": table,
}
b = table.get("base_1024b_c64")
if b:
    summary["base_qps"] = b["qps"]
    summary["keel_vs_base"] = round(k["qps"] / b["qps"], 2)
    summary["base_vs_raw"] = round(b["qps"] / r["qps"], 2)
print(json.dumps(summary))
PY
