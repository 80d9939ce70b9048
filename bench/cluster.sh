#!/usr/bin/env bash
# The flash sale across machines, on this one: hosts h1, h2 and h3 (each an etcd member, a NATS
# server with JetStream, and `keel node` with a gateway, an API, a process for every shard and
# an orders instance), db (PostgreSQL, initdb'd here, and a DNS server naming the shop) and
# client (the load generator), each a network namespace on a bridge this script makes, with
# no route off the machine. Faults during `keel bench seckill` sales:
#   host      every process of h1 SIGKILLed (etcd and NATS included)
#   partition h1's link down for 10 s, then up
#   engine    the etcd member and the NATS server of h2 SIGKILLed
# Every run ends with the bench's checks through the API (oversold, lost acknowledgements, the
# audit); the unavailability window of a run is the longest time a shard sold nothing from the
# fault on (for a partition, its healing included).
#
#   bench/cluster.sh                          all three faults, stock 10000 and 100, and the
#                                             no-fault figures beside keel up and the naive design
#   CLUSTER_QUICK=1 bench/cluster.sh          one host loss, stock 1000 (what CI runs)
#
# Settings: BUYERS (10000), RATE (buyers/s, 1000), LEASE_MS (shard owners' lease, 3000),
# CLUSTER_FAULTS ("host partition engine"), CLUSTER_STOCKS ("10000 100"),
# CLUSTER_CONCURRENCY (buys in flight of the closed loops that measure capacity, "64 256";
# each design's figure is its best), CAPACITY_BUYERS (buyers and units of those closed loops,
# 40000: long enough that a design's figure is its steady pace, not its first second of
# connecting and warming up; the fault runs sell to BUYERS),
# KEEL_BIN (a built keel; else cargo builds one). Needs root (network namespaces), etcd,
# nats-server, dnsmasq and PostgreSQL's server binaries; exits 77 when it cannot make
# namespaces. Everything it starts it stops by PID, and it removes its namespaces, bridge and
# veths when it ends, also on failure. The last line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK="${CLUSTER_QUICK:-0}"
BUYERS="${BUYERS:-10000}"
RATE="${RATE:-1000}"
LEASE_MS="${LEASE_MS:-3000}"
CONCURRENCY="${CLUSTER_CONCURRENCY:-64 256}"
CAPACITY_BUYERS="${CAPACITY_BUYERS:-40000}"
if [ "$QUICK" = 1 ]; then BUYERS="${BUYERS_QUICK:-2000}"; RATE="${RATE_QUICK:-500}"; fi

if [ "$(id -u)" != 0 ]; then echo "cluster.sh: needs root to make network namespaces" >&2; exit 77; fi
for tool in ip etcd nats-server dnsmasq runuser curl getent python3; do
  command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is missing" >&2; exit 77; }
done
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[ -x "$PGBIN/initdb" ] || { echo "cluster.sh: PostgreSQL's server binaries are missing" >&2; exit 77; }
if ! ip netns add "kcprobe$$" 2>/dev/null; then
  echo "cluster.sh: cannot make network namespaces here" >&2; exit 77
fi
ip netns del "kcprobe$$"

if [ -n "${KEEL_BIN:-}" ]; then
  BIN="$KEEL_BIN"
else
  cargo build --release -q -p keel -p keel-bench-peers
  BIN="$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)/keel"
fi

TAG="kc$$"                                   # names of this run's namespaces and links
NET="10.99.$(( $$ % 250 + 1 ))"              # the bridge's /24, reachable only from the namespaces
declare -A IP=([h1]="$NET.11" [h2]="$NET.12" [h3]="$NET.13" [db]="$NET.20" [client]="$NET.30")
WORK="$(mktemp -d)"
chmod 755 "$WORK"
TOKEN="cluster-$RANDOM$RANDOM$RANDOM"
PIDS=()                                      # "name:pid" of every process started here
RESULTS="$WORK/results"

ns() { echo "$TAG-$1"; }
in_ns() { local n="$1"; shift; ip netns exec "$(ns "$n")" "$@"; }

stop_all() {
  # Every process started here runs in one of the namespaces: killed there, by the PIDs the
  # kernel lists for the namespace (a recorded PID may have died and been reused meanwhile).
  for n in h1 h2 h3 db client; do
    if ip netns list | grep -q "^$(ns "$n")\b"; then
      for p in $(ip netns pids "$(ns "$n")" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    fi
  done
  PIDS=()
  sleep 0.5
}

teardown() {
  stop_all
  for n in h1 h2 h3 db client; do
    ip netns del "$(ns "$n")" 2>/dev/null || true
    ip link del "$TAG$n" 2>/dev/null || true
    rm -rf "/etc/netns/$(ns "$n")"
  done
  ip link del "${TAG}br" 2>/dev/null || true
  # The next run starts from nothing: fresh engines, a fresh sale.
  rm -rf "$WORK/h1" "$WORK/h2" "$WORK/h3" "$WORK/pg" "$WORK/pgsock" "$WORK/nodes" "$WORK/up"
}

FAULT_PID=""
RUNS=0
cleanup() {
  [ -n "$FAULT_PID" ] && kill "$FAULT_PID" 2>/dev/null || true
  teardown
  rmdir /etc/netns 2>/dev/null || true
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "cluster.sh: logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A process in namespace $1, named $2, logging to $WORK/logs/$2.log.
spawn() {
  local n="$1" name="$2"; shift 2
  ip netns exec "$(ns "$n")" "$@" > "$WORK/logs/$name.log" 2>&1 &
  PIDS+=("$name:$!")
  disown "$!"   # killed on purpose; no job report
}

pid_of() { for e in "${PIDS[@]}"; do [ "${e%%:*}" = "$1" ] && echo "${e#*:}"; done; }

wait_for() { # what, command...
  local what="$1"; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "cluster.sh: $what did not come up" >&2
  return 1
}

wait_line() { # file needle
  for _ in $(seq 1 600); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cluster.sh: no '$2' in $1" >&2; tail -20 "$1" >&2; return 1
}

network_up() {
  ip link add "${TAG}br" type bridge
  ip link set "${TAG}br" up
  for n in h1 h2 h3 db client; do
    ip netns add "$(ns "$n")"
    ip link add "$TAG$n" type veth peer name eth0 netns "$(ns "$n")"
    ip link set "$TAG$n" master "${TAG}br" up
    ip -n "$(ns "$n")" addr add "${IP[$n]}/24" dev eth0
    ip -n "$(ns "$n")" link set eth0 up
    ip -n "$(ns "$n")" link set lo up
  done
  # The client resolves names through db's DNS server (ip netns exec mounts this file over
  # /etc/resolv.conf).
  mkdir -p "/etc/netns/$(ns client)"
  echo "nameserver ${IP[db]}" > "/etc/netns/$(ns client)/resolv.conf"
}

# PostgreSQL in db, made here (initdb runs as the postgres user).
pg_up() {
  mkdir -p "$WORK/pg" "$WORK/pgsock"
  chown postgres "$WORK/pg" "$WORK/pgsock"
  runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=trust >/dev/null
  echo "host all all $NET.0/24 trust" >> "$WORK/pg/pg_hba.conf"
  spawn db postgres runuser -u postgres -- "$PGBIN/postgres" -D "$WORK/pg" \
    -c "listen_addresses=${IP[db]}" -c "unix_socket_directories=$WORK/pgsock" -c max_connections=300
  wait_for "PostgreSQL" in_ns db "$PGBIN/pg_isready" -q -h "${IP[db]}"
}

engines_up() {
  local cluster="h1=http://${IP[h1]}:2380,h2=http://${IP[h2]}:2380,h3=http://${IP[h3]}:2380"
  for h in h1 h2 h3; do
    spawn "$h" "etcd-$h" etcd --name "$h" --data-dir "$WORK/$h/etcd" \
      --listen-client-urls "http://${IP[$h]}:2379" --advertise-client-urls "http://${IP[$h]}:2379" \
      --listen-peer-urls "http://${IP[$h]}:2380" --initial-advertise-peer-urls "http://${IP[$h]}:2380" \
      --initial-cluster "$cluster" --initial-cluster-state new \
      --heartbeat-interval 100 --election-timeout 1000
    mkdir -p "$WORK/$h/nats"
    cat > "$WORK/$h/nats.conf" <<CONF
server_name: $h
listen: ${IP[$h]}:4222
http: ${IP[$h]}:8222
jetstream { store_dir: "$WORK/$h/nats" }
cluster {
  name: keel
  listen: ${IP[$h]}:6222
  routes: [nats://${IP[h1]}:6222, nats://${IP[h2]}:6222, nats://${IP[h3]}:6222]
}
CONF
    spawn "$h" "nats-$h" nats-server -c "$WORK/$h/nats.conf"
  done
  pg_up
  # The shop's name answers with the three gateways (DNS load balancing over them).
  printf '%s shop.keel\n' "${IP[h1]}" "${IP[h2]}" "${IP[h3]}" > "$WORK/shop.hosts"
  spawn db dnsmasq dnsmasq --no-daemon --no-resolv --no-hosts --addn-hosts="$WORK/shop.hosts" \
    --listen-address="${IP[db]}" --bind-interfaces --port 53 --local-ttl=1 --pid-file=
  for h in h1 h2 h3; do
    wait_for "etcd on $h" in_ns "$h" curl -sf "http://${IP[$h]}:2379/health"
    wait_for "NATS on $h" in_ns "$h" curl -sf "http://${IP[$h]}:8222/healthz?js-enabled-only=true"
  done
  in_ns db "$PGBIN/psql" -q -h "${IP[db]}" -U postgres -c "CREATE DATABASE shop" >/dev/null
  wait_for "the DNS server" in_ns client getent hosts shop.keel
}

nodes_up() {
  local host
  {
    cat <<CONF
admin_token = "$TOKEN"
data_dir = "$WORK/nodes"
[engines]
registry = "etcd://${IP[h1]}:2379,${IP[h2]}:2379,${IP[h3]}:2379"
journal = "nats://${IP[h1]}:4222,${IP[h2]}:4222,${IP[h3]}:4222?replicas=3"
streams = "keel-cluster"
database = "postgres://postgres@${IP[db]}:5432/shop"
[sale]
shards = 2
lease_ttl_ms = $LEASE_MS
[limits]
buy_per_ip_per_second = 0.0
buy_per_user_per_second = 0.0
CONF
    for host in h1 h2 h3; do
      cat <<CONF
[[hosts]]
name = "$host"
gateway = "${IP[$host]}:8080"
api = "${IP[$host]}:7400"
inventory = "${IP[$host]}:7200"
shards = ["inv-0", "inv-1"]
orders = "${IP[$host]}:7300"
CONF
    done
  } > "$WORK/cluster.toml"
  # h1 first: its processes are elected the shards' owners, the others stand by.
  for host in h1 h2 h3; do
    spawn "$host" "node-$host" "$BIN" node --config "$WORK/cluster.toml" --host "$host"
    wait_line "$WORK/logs/node-$host.log" "Keel node $host is up"
  done
}

cluster_up() {
  mkdir -p "$WORK/logs"
  network_up
  engines_up
  nodes_up
}

# The fault $1, injected $2 seconds into the sale; prints the time it struck (Unix ms).
fault() {
  local kind="$1" after="$2"
  sleep "$after"
  leaders > "$WORK/leaders" || echo '{}' > "$WORK/leaders"
  date +%s%3N
  case "$kind" in
    host)
      for p in $(ip netns pids "$(ns h1)"); do kill -9 "$p" 2>/dev/null || true; done ;;
    partition)
      ip link set "${TAG}h1" down; sleep 10; ip link set "${TAG}h1" up ;;
    engine)
      kill -9 "$(pid_of etcd-h2)" "$(pid_of nats-h2)" 2>/dev/null || true ;;
    none) ;;
  esac
}

# Who leads the engines just before a fault, as h3 (struck by no fault) sees it, as JSON: the
# etcd cluster's leader, JetStream's metadata leader and each stream's leader. Losing one
# costs the shards more than the owners' lease: a shard whose stream leader is lost waits for
# JetStream's Raft election (a follower campaigns 4-9 s after the last heartbeat it heard);
# when etcd's leader is lost, the new leader extends every lease by its full TTL, the dead
# owner's too; a replay consumer needs a metadata leader (the replay reads message by message
# without one).
leaders() {
  local etcd="http://${IP[h3]}:2379"
  python3 -c '
import json, sys
status, members, jsz = (json.loads(a) for a in sys.argv[1:4])
names = {m["ID"]: m.get("name", "") for m in members.get("members", [])}
streams = {s["name"]: s.get("cluster", {}).get("leader", "")
           for a in jsz.get("account_details", []) for s in a.get("stream_detail", [])}
print(json.dumps({"etcd": names.get(status.get("leader"), ""),
                  "meta": jsz.get("meta_cluster", {}).get("leader", ""), "streams": streams}))' \
    "$(in_ns h3 curl -sf -X POST "$etcd/v3/maintenance/status" -d '{}')" \
    "$(in_ns h3 curl -sf -X POST "$etcd/v3/cluster/member/list" -d '{}')" \
    "$(in_ns h3 curl -sf "http://${IP[h3]}:8222/jsz?accounts=true&streams=true")"
}

# One sale of $2 units to BUYERS buyers at RATE a second through shop.keel, with fault $1
# struck a fifth of the way in (without a fault: a closed loop of $3 buys in flight, as many
# buyers as units); appends {"fault", "run", "fault_at_ms"} to RESULTS.
sale() {
  local kind="$1" stock="$2" concurrency="${3:-64}" after buyers="$BUYERS"
  [ "$kind" = none ] && buyers="$stock"
  rm -f "$WORK/leaders"
  after=$(python3 -c "print(max(1.0, $BUYERS / $RATE / 5))")
  fault "$kind" "$after" > "$WORK/fault-at" &
  FAULT_PID=$!
  local line load=(--rate "$RATE")
  # Without a fault the sale measures capacity: a closed loop, as for the other designs.
  [ "$kind" = none ] && load=(--concurrency "$concurrency")
  line=$(in_ns client env KEEL_ADMIN_TOKEN="$TOKEN" "$BIN" bench seckill --gateway shop.keel:8080 \
    --buyers "$buyers" --stock "$stock" "${load[@]}" 2>"$WORK/logs/bench-$kind-$stock.log" | tail -1) || true
  wait "$FAULT_PID" || true
  FAULT_PID=""
  [ -n "$line" ] || { echo "cluster.sh: the $kind run printed nothing" >&2; tail -5 "$WORK/logs/bench-$kind-$stock.log" >&2; line='{}'; }
  echo "{\"fault\": \"$kind\", \"stock\": $stock, \"concurrency\": $concurrency, \"fault_at_unix_ms\": $(cat "$WORK/fault-at" || echo 0), \"leaders\": $(cat "$WORK/leaders" 2>/dev/null || echo '{}'), \"run\": $line}" >> "$RESULTS"
  echo "done: $kind, stock $stock" >&2
}

# Sales of CAPACITY_BUYERS units to as many buyers through the gateway $2, from db, as closed
# loops of each of CLUSTER_CONCURRENCY buys in flight; appends {"fault": $1, ...} to RESULTS.
closed_loops() {
  local design="$1" gw="$2" c line
  for c in $CONCURRENCY; do
    line=$(in_ns db env KEEL_ADMIN_TOKEN="$TOKEN" "$BIN" bench seckill --gateway "$gw" \
      --buyers "$CAPACITY_BUYERS" --stock "$CAPACITY_BUYERS" --concurrency "$c" 2>"$WORK/logs/bench-$design-$c.log" | tail -1) || true
    echo "{\"fault\": \"$design\", \"stock\": $CAPACITY_BUYERS, \"concurrency\": $c, \"fault_at_unix_ms\": 0, \"run\": ${line:-{\}}}" >> "$RESULTS"
    echo "done: $design, $c in flight" >&2
  done
}

# The same sale (closed loops, CLUSTER_CONCURRENCY in flight) on the embedded `keel up` and
# on the naive PostgreSQL design (bench/peers/src/seckill_naive.rs behind a Keel gateway), both
# in db on its own PostgreSQL; appends {"fault": "embedded" | "naive", ...} to RESULTS.
compare() {
  mkdir -p "$WORK/logs" "$WORK/up"
  network_up
  pg_up
  . bench/keel-config.sh
  keel_config "$WORK/up/keel.toml" "$TOKEN" 600000
  spawn db keel-up bash -c "cd '$WORK/up' && exec '$BIN' up"
  wait_line "$WORK/logs/keel-up.log" "Keel is up"
  local gw
  gw=$(grep -m1 "Keel is up" "$WORK/logs/keel-up.log" | sed 's#.*http://\([^/]*\)/.*#\1#')
  closed_loops embedded "$gw"
  in_ns db "$PGBIN/psql" -q -h "${IP[db]}" -U postgres -c "CREATE DATABASE naive" >/dev/null
  spawn db naive "$(dirname "$BIN")/seckill-naive" --addr 127.0.0.1:0 \
    --database "postgres://postgres@${IP[db]}:5432/naive"
  wait_line "$WORK/logs/naive.log" "seckill-naive on"
  cat > "$WORK/naive-gateway.toml" <<CONF
[server]
listen = "127.0.0.1:0"
[upstreams.api]
servers = [{ address = "$(grep -m1 "seckill-naive on" "$WORK/logs/naive.log" | awk '{print $3}')" }]
[[routes]]
path_prefix = "/api/"
upstream = "api"
CONF
  spawn db naive-gw "$BIN" gateway --config "$WORK/naive-gateway.toml"
  wait_line "$WORK/logs/naive-gw.log" "keel gateway on"
  gw=$(grep -m1 "keel gateway on" "$WORK/logs/naive-gw.log" | sed 's#.*http://\([^ ]*\) .*#\1#')
  closed_loops naive "$gw"
  teardown
}

# Each fault (and each closed loop) on a fresh cluster; its logs kept apart with KEEP_WORK=1.
run_fault() {
  cluster_up
  sale "$@"
  teardown
  RUNS=$((RUNS + 1))
  if [ "${KEEP_WORK:-0}" = 1 ]; then mv "$WORK/logs" "$WORK/logs-$RUNS-$(IFS=-; echo "$*")"; fi
}

: > "$RESULTS"
if [ "$QUICK" = 1 ]; then
  run_fault host 1000
else
  for c in $CONCURRENCY; do run_fault none "$CAPACITY_BUYERS" "$c"; done
  for stock in ${CLUSTER_STOCKS:-10000 100}; do
    for kind in ${CLUSTER_FAULTS:-host partition engine}; do run_fault "$kind" "$stock"; done
  done
  if [ -x "$(dirname "$BIN")/seckill-naive" ]; then compare; else
    echo "cluster.sh: no seckill-naive next to $BIN (cargo build --release -p keel-bench-peers); comparisons skipped" >&2
  fi
fi

python3 - "$RESULTS" "$QUICK" "$LEASE_MS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
quick, lease = sys.argv[2] == "1", int(sys.argv[3])
STRUCK = {"host": "h1", "partition": "h1", "engine": "h2"}
def shard_windows(r):
    """Per shard, the longest time it sold nothing from the fault on (its effects included:
    the healing of a partition too), and what the struck host held for it: "stream" (the
    leader of the shard's JetStream stream: JetStream elects another in 4-9 s), "etcd" (the
    etcd cluster's leader: the next leader extends the dead owner's lease by its TTL), "meta"
    (JetStream's metadata leader, which a new owner's replay consumer waits for) or "owner"
    (only the shard's owner, whose standby takes over after the lease). Without a fault no
    gap exceeds a few tens of ms; a shard whose longest gap came before the fault counts 0."""
    d = r["run"]
    at = r["fault_at_unix_ms"] - d.get("started_unix_ms", 0)
    leaders, struck = r.get("leaders", {}), STRUCK.get(r["fault"])
    out = {}
    for shard, g in d.get("shards", {}).items():
        if struck is None:
            lost = "nothing"
        elif leaders.get("streams", {}).get(f"keel-cluster-{shard}") == struck:
            lost = "stream"
        elif leaders.get("etcd") == struck:
            lost = "etcd"
        elif leaders.get("meta") == struck:
            lost = "meta"
        else:
            lost = "owner"
        out[shard] = (g["longest_gap_ms"] if g["gap_from_ms"] >= at - 1000 else 0, lost)
    return out
def window(r):
    return max((w for w, _ in shard_windows(r).values()), default=0)
print(f"{'fault':>10} {'stock':>6} {'flight':>6} {'buys/s':>8} {'bought':>7} {'p99 ms':>8} {'resent':>7} {'errors':>7} {'oversold':>8} {'lost':>5} {'window ms':>9} ok  per shard: window(what the struck host held)")
for r in rows:
    d = r["run"]
    flight = r.get("concurrency", "-") if r["fault"] in ("none", "embedded", "naive") else "open"
    print(f"{r['fault']:>10} {r['stock']:>6} {flight:>6} {d.get('buys_per_s', 0):>8.0f} {d.get('bought', 0):>7} {d.get('p99_ms', 0):>8.1f} "
          f"{d.get('resent', 0):>7} {d.get('errors', 0):>7} {d.get('oversold', -1):>8} {d.get('lost_acks', -1):>5} {window(r):>9} {d.get('ok')} "
          + " ".join(f"{k}:{w}({lost})" for k, (w, lost) in sorted(shard_windows(r).items())))
faulted = [r for r in rows if r["fault"] in ("host", "partition", "engine")]
def best(kind):
    """The closed-loop run of `kind` that sold fastest: a design's capacity is its figure at
    the load it serves best (too few buys in flight measure a round trip, not capacity)."""
    found = [r for r in rows if r["fault"] == kind and r["run"].get("buys_per_s")]
    return max(found, key=lambda r: r["run"]["buys_per_s"]) if found else None
def figure(kind, key):
    found = best(kind)
    return found["run"].get(key) if found else None
def worst(kind):
    ws = [window(r) for r in faulted if r["fault"] == kind]
    return max(ws) if ws else None
out = {
    "quick": quick,
    "lease_ttl_ms": lease,
    "cluster_buys_per_s": figure("none", "buys_per_s"),
    "embedded_buys_per_s": figure("embedded", "buys_per_s"),
    "naive_buys_per_s": figure("naive", "buys_per_s"),
    "cluster_p99_ms": figure("none", "p99_ms"),
    "embedded_p99_ms": figure("embedded", "p99_ms"),
    "naive_p99_ms": figure("naive", "p99_ms"),
    "cluster_concurrency": (best("none") or {}).get("concurrency"),
    "embedded_concurrency": (best("embedded") or {}).get("concurrency"),
    "naive_concurrency": (best("naive") or {}).get("concurrency"),
    "buys_per_s_by_concurrency": {kind: {str(r.get("concurrency")): r["run"].get("buys_per_s")
                                         for r in rows if r["fault"] == kind}
                                  for kind in ("none", "embedded", "naive")},
    "cluster_vs_naive": (round(figure("none", "buys_per_s") / max(figure("naive", "buys_per_s") or 1, 1), 2)
                         if figure("none", "buys_per_s") and figure("naive", "buys_per_s") else None),
    "oversold": sum(r["run"].get("oversold", 1) for r in rows if r["fault"] != "naive"),
    "lost_acks": sum(r["run"].get("lost_acks", 1) for r in faulted),
    "host_loss_window_ms": worst("host"),
    "partition_window_ms": worst("partition"),
    "engine_loss_window_ms": worst("engine"),
    # The same, split by what the struck host held for the shard (see shard_windows).
    "window_by_loss_ms": {lost: max((w for r in faulted for w, l in shard_windows(r).values() if l == lost), default=None)
                          for lost in ("owner", "meta", "etcd", "stream")},
    "all_ok": all(r["run"].get("ok") is True for r in rows if r["fault"] != "naive"),
}
print(json.dumps(out))
PY
