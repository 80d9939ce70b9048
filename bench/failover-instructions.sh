#!/usr/bin/env bash
# Instructions the failover client executes per call, under valgrind's callgrind: a
# deterministic figure for comparing builds where bench/failover.sh's call count on this shared
# machine is too noisy.
#
#   bench/failover-instructions.sh [keel-binary]   (default: this checkout's release build)
#
# Three `keel serve --threads 1` on core 1; `keel bench failover` (a ServiceChannel over the
# three, 64 calls in flight) runs under callgrind on core 0 for 8 s and SIGKILLs the second
# server after 4 s. The figure is the client process's instructions (start-up, and its 1 ms
# sampling of where calls go, included) over the calls it made: far steadier than a call count,
# though not exact, since how many calls fit in 8 s still varies. Installs valgrind from Debian
# packages if missing. The last line is JSON.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind) >/dev/null
fi
if [ -n "${1:-}" ]; then
  KEEL="$1"
else
  cargo build --release -q -p keel
  KEEL="${CARGO_TARGET_DIR:-target}/release/keel"
fi
PORTS=(7391 7392 7393)
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

for port in "${PORTS[@]}"; do
  taskset -c 1 "$KEEL" serve --addr "127.0.0.1:$port" --threads 1 2>/dev/null & PIDS+=($!)
done
for port in "${PORTS[@]}"; do
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done
addrs="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
out=$(taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
  "$KEEL" bench failover --addrs "$addrs" --kill-pid "${PIDS[1]}" --kill-addr "127.0.0.1:${PORTS[1]}" \
  --kill-after 4 --seconds 8 2>"$WORK/valgrind.err" | tail -1)
instructions=$(awk '/I +refs:/ {gsub(",", "", $4); print $4}' "$WORK/valgrind.err")
if [ -z "$out" ] || [ -z "$instructions" ]; then
  echo "the client under callgrind reported nothing; its stderr:" >&2
  tail -20 "$WORK/valgrind.err" >&2
  exit 1
fi
python3 -c "import json,sys; r=json.loads(sys.argv[1]); i=int(sys.argv[2]); r['calls'] > 0 or sys.exit('no calls were made'); print(f\"{r['calls']} calls, {r['failed_calls']} failed, {i} instructions\"); print(json.dumps({'calls': r['calls'], 'failed_calls': r['failed_calls'], 'instructions': i, 'instructions_per_call': round(i / r['calls'])}))" "$out" "$instructions"
