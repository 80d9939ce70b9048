#!/usr/bin/env bash
# Chat across two server processes: one room of 1,000 members, half connected to each process,
# so every message crosses from one process to the other. Keel: two `keel chat` instances that
# list each other in --peers (the room's holder numbers, journals and fans out; the other gets
# its messages over their direct link). socket.io 4: two Node processes sharing rooms through
# the Redis adapter (socket.io's documented way to run several servers) and the Redis of this
# machine. Both servers of a system are pinned to core 1 (Keel with one runtime thread each);
# the same load client (`keel bench chat`, connections alternating between the two addresses)
# runs on core 0. Publish rates go up a ladder; the highest whose p99 (publish to receipt)
# stays under 200 ms with nothing lost is reported as deliveries per second.
#
#   bench/chat-cluster.sh [seconds]      (default 10: how long each rate publishes)
#
# Needs Redis on 127.0.0.1:6379 (REDIS_URL to change it). The last line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-10}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
# shellcheck source=bench/chat-lib.sh
. bench/chat-lib.sh
export KEEL_CHAT_SECRET="bench-chat-cluster-$$"

SERVERS=()
start_pair() { # system port (the pair listens on port and port + 1)
  local a=$2 b=$(($2 + 1))
  SERVERS=()
  for port in "$a" "$b"; do
    case $1 in
      keel)
        rm -rf "$WORK/keel-$port"
        taskset -c 1 "$BIN" chat --listen "127.0.0.1:$port" --data-dir "$WORK/keel-$port" --instance "c$port" \
          --peers "c$a=127.0.0.1:$a,c$b=127.0.0.1:$b" --threads 1 >/dev/null 2>"$WORK/keel-$port.log" &
        ;;
      sio)
        REDIS_URL="$REDIS_URL" taskset -c 1 node bench/chat/server.js "$port" >/dev/null 2>"$WORK/sio-$port.log" &
        ;;
    esac
    SERVERS+=("$!")
    PIDS+=("$!")
  done
  wait_port "$a"
  wait_port "$b"
  # The instances greet each other every second before they relay.
  sleep 2
}

stop_pair() { for p in "${SERVERS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }

RESULTS="$WORK/results.jsonl"
PORT=7660
for sys in keel sio; do
  protocol=keel
  [ "$sys" = sio ] && protocol=socketio
  for rate in 10 25 50 100 200 400 800 1600 3200 6400; do
    PORT=$((PORT + 2))
    start_pair "$sys" "$PORT"
    pids="$(IFS=,; echo "${SERVERS[*]}")"
    line="$(taskset -c 0 "$BIN" bench chat --protocol "$protocol" --addr "127.0.0.1:$PORT" --addr "127.0.0.1:$((PORT + 1))" \
      --connections 1000 --room-size 1000 --rate "$rate" --seconds "$SECS" --pids "$pids" 2>/dev/null | tail -1)"
    stop_pair
    echo "{\"name\":\"${sys}_cluster_$rate\",\"run\":$line}" >> "$RESULTS"
    ok="$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(int(d["p99_ms"] < 200 and d["lost"] == 0 and d["failed"] == 0))' "$line")"
    echo "done: $sys across two processes, $rate/s (within goal: $ok)" >&2
    [ "$ok" = 1 ] || break
  done
done

python3 - "$RESULTS" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def best(sys_):
    ok = [r["run"] for r in runs if r["name"].startswith(sys_ + "_cluster_")
          and r["run"]["p99_ms"] < 200 and r["run"]["lost"] == 0 and r["run"]["failed"] == 0]
    return max(ok, key=lambda r: r["deliveries_per_s"]) if ok else None
k, s = best("keel"), best("sio")
for r in runs:
    d = r["run"]
    print(f'{r["name"]:>22}: {d["deliveries_per_s"]:>12,.0f} deliveries/s  p50 {d["p50_ms"]:>8.2f} ms  p99 {d["p99_ms"]:>8.2f} ms  lost {d["lost"]}', file=sys.stderr)
out = {
    "keel_cluster_deliveries_per_s": k["deliveries_per_s"] if k else 0,
    "sio_cluster_deliveries_per_s": s["deliveries_per_s"] if s else 0,
    "keel_cluster_p99_ms": k["p99_ms"] if k else None,
    "sio_cluster_p99_ms": s["p99_ms"] if s else None,
    "ratio": round(k["deliveries_per_s"] / s["deliveries_per_s"], 2) if k and s and s["deliveries_per_s"] else None,
    "lost": sum(r["run"]["lost"] for r in runs),
}
print(json.dumps(out))
PY
