#!/usr/bin/env bash
# Failover: steady load on three echo instances through a ServiceChannel (P2C, retries under
# the budget); one instance is killed with SIGKILL midway. Reports failed calls (goal: 0 for
# these idempotent calls) and how long calls kept being routed to the dead instance.
#
#   bench/failover.sh [seconds]     (default 5; kill after 2 s; median of 3 runs)
#
# Instances on core 1, the client on core 0, 64 calls in flight. The last line is one JSON
# object.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-5}"
REPS="${REPS:-3}"
PORTS=(7331 7332 7333)

cargo build --release -q -p keel
BIN="${CARGO_TARGET_DIR:-target}/release"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

RESULTS="$(mktemp)"
for rep in $(seq 1 "$REPS"); do
  PIDS=()
  for port in "${PORTS[@]}"; do
    taskset -c 1 "$BIN/keel" serve --addr "127.0.0.1:$port" --threads 1 2>/dev/null & PIDS+=($!)
  done
  for port in "${PORTS[@]}"; do
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
      sleep 0.1
    done
  done
  addrs="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
  taskset -c 0 "$BIN/keel" bench failover --addrs "$addrs" --kill-pid "${PIDS[1]}" \
    --kill-addr "127.0.0.1:${PORTS[1]}" --kill-after 2 --seconds "$SECS" | tail -1 >> "$RESULTS"
  cleanup
  wait 2>/dev/null || true
  echo "done: run $rep" >&2
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
for r in runs:
    print(f"calls {r['calls']}, failed {r['failed_calls']}, retries {r['retries']}, routed to the dead instance for {r['ms_until_unrouted']} ms after the kill")
s = {
    "calls": statistics.median(r["calls"] for r in runs),
    "failed_calls": max(r["failed_calls"] for r in runs),
    "ms_until_unrouted": statistics.median(r["ms_until_unrouted"] for r in runs),
    "ms_until_unrouted_max": max(r["ms_until_unrouted"] for r in runs),
    "retries": statistics.median(r["retries"] for r in runs),
    "runs": len(runs),
}
print(json.dumps(s))
PY
