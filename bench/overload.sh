#!/usr/bin/env bash
# Overload: a service with bounded capacity offered 3x what it can do, with Keel's adaptive
# concurrency limiter and without it, in one run.
#
#   bench/overload.sh [seconds-per-run]     (default 3; medians of 3 runs)
#
# The server (`keel serve --work-slots 8 --work-ms 2`, one runtime thread, core 1) runs
# keel.bench.Work: 8 workers, 2 ms of work per call (a thread pool or connection pool in front
# of slow work). The client (core 0) first measures the peak: a closed loop of 8 callers, one
# per worker, so nothing queues; its p99 is the unloaded p99. Then it offers 3x that peak as
# an open loop (arrivals on a schedule, 1 s deadline per call) to the same server without a
# limit and with --adaptive-limit. The last line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-3}"
REPS="${REPS:-3}"
PORT=7321
SLOTS=8
WORK_MS=2

cargo build --release -q -p keel
BIN="${CARGO_TARGET_DIR:-target}/release"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT

start_server() { # extra flags
  taskset -c 1 "$BIN/keel" serve --addr "127.0.0.1:$PORT" --threads 1 \
    --work-slots $SLOTS --work-ms $WORK_MS "$@" 2>/dev/null & PID=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server did not start" >&2; exit 1
}
stop_server() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""; }
client() { taskset -c 0 "$BIN/keel" bench work --addr "127.0.0.1:$PORT" --seconds "$SECS" --warmup 1 "$@" | tail -1; }

RESULTS="$(mktemp)"
for rep in $(seq 1 "$REPS"); do
  start_server
  peak=$(client --concurrency $SLOTS)
  rate=$(python3 -c "import json,sys; print(3 * json.loads(sys.argv[1])['goodput'])" "$peak")
  nolimit=$(client --rate "$rate")
  stop_server
  start_server --adaptive-limit
  limited=$(client --rate "$rate")
  stop_server
  echo "{\"peak\":$peak,\"nolimit\":$nolimit,\"limited\":$limited}" >> "$RESULTS"
  echo "done: run $rep (offered $rate calls/s)" >&2
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = lambda part, key: statistics.median(r[part][key] for r in runs)
peak = med("peak", "goodput")
s = {
    "peak_goodput": peak,
    "offered_rate": med("nolimit", "rate"),
    "unloaded_p99_ms": med("peak", "p99_ms"),
    "admitted_p99_ms": med("limited", "p99_ms"),
    "goodput_ratio": round(med("limited", "goodput") / peak, 3),
    "refusal_p99_ms": med("limited", "refusal_p99_ms"),
    "refused": med("limited", "refused"),
    "nolimit_p99_ms": med("nolimit", "p99_ms"),
    "nolimit_goodput_ratio": round(med("nolimit", "goodput") / peak, 3),
    "nolimit_timed_out": med("nolimit", "timed_out"),
}
print(f"peak goodput {peak:.0f} calls/s, unloaded p99 {s['unloaded_p99_ms']} ms; offered {s['offered_rate']:.0f} calls/s")
print(f"  adaptive limit: goodput {s['goodput_ratio']*100:.1f}% of peak, admitted p99 {s['admitted_p99_ms']} ms, refusals p99 {s['refusal_p99_ms']} ms")
print(f"  no limit:       goodput {s['nolimit_goodput_ratio']*100:.1f}% of peak, p99 {s['nolimit_p99_ms']} ms, {s['nolimit_timed_out']:.0f} calls timed out")
print(json.dumps(s))
PY
