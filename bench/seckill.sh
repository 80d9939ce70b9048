#!/usr/bin/env bash
# Flash sale: Keel (`keel up`) against the design a user would write first — one PostgreSQL
# table, each buy a transaction (SELECT ... FOR UPDATE, then UPDATE ... WHERE stock > 0, with a
# unique (user, item) index; bench/peers/src/seckill_naive.rs, 64 connections) — each behind a
# Keel gateway, driven by the same `keel bench seckill` in one run.
#
#   bench/seckill.sh [buyers]     (default 10000; a sale of 100 units and one of 10000)
#
# Each buyer is a distinct user trying twice (two request ids); 64 in flight. The bench checks
# the invariants through each system's API (oversold, lost acknowledgements, the audit). The
# last line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/keel-config.sh

BUYERS="${1:-10000}"
CONCURRENCY=64
TOKEN="bench-$RANDOM-$RANDOM"
DATABASE="${DATABASE:-postgres://postgres@127.0.0.1:5432/postgres}"

if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  echo "starting PostgreSQL" >&2
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null
  fi
  service postgresql start >/dev/null
fi

cargo build --release -q -p keel -p keel-bench-peers
BIN="$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)"
WORK="$(mktemp -d)"
PIDS=()
KEEL_UP_PID=""
# Background jobs of a script ignore SIGINT unless they handle it: keel up does (and stops its
# children); the others get SIGTERM.
cleanup() {
  [ -n "$KEEL_UP_PID" ] && kill -INT "$KEEL_UP_PID" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 2
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_line() { # file needle
  for _ in $(seq 1 300); do
    if grep -q "$2" "$1" 2>/dev/null; then grep -m1 "$2" "$1"; return 0; fi
    sleep 0.1
  done
  echo "no '$2' in $1" >&2; cat "$1" >&2; return 1
}

# Keel: the whole system (registry, two inventory shards, two orders instances, API, gateway),
# no rate limits (one load generator address).
keel_config "$WORK/keel.toml" "$TOKEN" 600000
(cd "$WORK" && exec "$BIN/keel" up > up.log 2>&1) & KEEL_UP_PID=$!
KEEL_GW=$(wait_line "$WORK/up.log" "Keel is up" | sed 's#.*http://\([^/]*\)/.*#\1#')

# The naive design behind a Keel gateway.
"$BIN/seckill-naive" --addr 127.0.0.1:0 --database "$DATABASE" > "$WORK/naive.log" 2>&1 & PIDS+=($!)
NAIVE=$(wait_line "$WORK/naive.log" "seckill-naive on" | awk '{print $3}')
cat > "$WORK/naive-gateway.toml" <<CONF
[server]
listen = "127.0.0.1:0"
[upstreams.api]
servers = [{ address = "$NAIVE" }]
[[routes]]
path_prefix = "/api/"
upstream = "api"
CONF
"$BIN/keel" gateway --config "$WORK/naive-gateway.toml" > "$WORK/naive-gw.log" 2>&1 & PIDS+=($!)
NAIVE_GW=$(wait_line "$WORK/naive-gw.log" "keel gateway on" | sed 's#.*http://\([^ ]*\) .*#\1#')

RESULTS="$WORK/results"
for stock in 100 10000; do
  for system in keel naive; do
    gw=$KEEL_GW; [ "$system" = naive ] && gw=$NAIVE_GW
    line=$(KEEL_ADMIN_TOKEN="$TOKEN" "$BIN/keel" bench seckill --gateway "$gw" --buyers "$BUYERS" --stock "$stock" \
      --concurrency "$CONCURRENCY" 2>/dev/null | tail -1) || true
    echo "{\"system\": \"$system\", \"run\": $line}" >> "$RESULTS"
    echo "done: $system, stock $stock" >&2
  done
done

# Keel again, with chaos: an inventory shard, an orders instance or the API SIGKILLed a third
# of the way in.
line=$(KEEL_ADMIN_TOKEN="$TOKEN" "$BIN/keel" bench seckill --gateway "$KEEL_GW" --buyers "$BUYERS" --stock 10000 \
  --concurrency "$CONCURRENCY" --chaos "$WORK/data/pids.json" 2>/dev/null | tail -1) || true
echo "{\"system\": \"keel-chaos\", \"run\": $line}" >> "$RESULTS"
echo "done: keel with chaos" >&2

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'system':>10} {'stock':>6} {'attempts/s':>11} {'buys/s':>8} {'bought':>7} {'p50 ms':>7} {'p99 ms':>7} {'oversold':>8} {'lost':>5} ok")
by = {}
for r in rows:
    s, d = r["system"], r["run"]
    by[(s, d["stock"])] = d
    print(f"{s:>10} {d['stock']:>6} {d['attempts_per_s']:>11.0f} {d['buys_per_s']:>8.0f} {d['bought']:>7} {d['p50_ms']:>7.2f} {d['p99_ms']:>7.2f} {d['oversold']:>8} {d['lost_acks']:>5} {d['ok']}")
big, small = 10000, 100
k, n = by[("keel", big)], by[("naive", big)]
ks, ns = by[("keel", small)], by[("naive", small)]
print(json.dumps({
    "keel_buys_per_s": k["buys_per_s"], "naive_buys_per_s": n["buys_per_s"],
    "keel_vs_naive": round(k["buys_per_s"] / max(n["buys_per_s"], 1), 2),
    "keel_p99_ms": k["p99_ms"], "naive_p99_ms": n["p99_ms"],
    "keel_sold_out_attempts_per_s": ks["attempts_per_s"], "naive_sold_out_attempts_per_s": ns["attempts_per_s"],
    "keel_sold_out_p99_ms": ks["p99_ms"], "naive_sold_out_p99_ms": ns["p99_ms"],
    "oversold": max(r["run"]["oversold"] for r in rows if r["system"] != "keel-chaos"),
    "lost_acks": max(r["run"]["lost_acks"] for r in rows if r["system"] == "keel"),
    "chaos_oversold": by[("keel-chaos", big)]["oversold"],
    "chaos_lost_acks": by[("keel-chaos", big)]["lost_acks"],
    "chaos_victim": by[("keel-chaos", big)]["chaos"],
    "keel_moved_between_shards": k["audit"].get("moved_between_shards"),
    "all_ok": all(r["run"]["ok"] for r in rows),
}))
PY
