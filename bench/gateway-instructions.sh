#!/usr/bin/env bash
# Instructions the gateway executes per proxied request, under valgrind's callgrind: a
# deterministic figure for comparing builds where req/s on this shared machine is too noisy.
#
#   bench/gateway-instructions.sh [keel-binary]   (default: this checkout's release build)
#
# The upstream is an nginx answering "hello"; the gateway runs under callgrind with one
# runtime thread and the configuration of bench/gateway.sh; wrk (-c8, 15 s) drives it. The
# figure is the whole process's instructions (start-up included) over the requests served.
# Installs valgrind, nginx and wrk from Debian packages if missing. The last line is JSON.
set -euo pipefail
cd "$(dirname "$0")/.."

for pkg in valgrind nginx wrk; do
  if ! command -v "$pkg" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$pkg" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind nginx wrk) >/dev/null
    break
  fi
done
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
if [ -n "${1:-}" ]; then
  KEEL="$1"
else
  cargo build --release -q -p keel
  KEEL="${CARGO_TARGET_DIR:-target}/release/keel"
fi
UP=7361; GW=7362
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

cat > "$WORK/up.conf" <<CONF
worker_processes 1;
pid $WORK/up.pid;
error_log $WORK/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 120s;
  server { listen 127.0.0.1:$UP; location / { return 200 "hello\n"; } } }
CONF
taskset -c 0 "$NGINX_BIN" -p "$WORK" -c "$WORK/up.conf" -g 'daemon off;' 2>/dev/null & PIDS+=($!)
cat > "$WORK/gateway.toml" <<CONF
[server]
listen = "127.0.0.1:$GW"
max_uri_bytes = 8192
max_body_bytes = 1048576
max_connections = 10000
[upstreams.hello]
servers = [{ address = "127.0.0.1:$UP" }]
max_inflight = 4096
queue_size = 4096
[[routes]]
path_prefix = "/"
upstream = "hello"
allow = ["127.0.0.0/8", "::1"]
deny = ["10.0.0.0/8"]
rate_limit = { per_second = 100000000.0, burst = 100000000 }
CONF
valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
  "$KEEL" gateway --config "$WORK/gateway.toml" --threads 1 >/dev/null 2>"$WORK/valgrind.err" &
VG=$!
for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$GW") 2>/dev/null && break; sleep 0.1; done
out=$(taskset -c 0 wrk -t1 -c8 -d15s "http://127.0.0.1:$GW/" 2>&1)
kill -INT "$VG"; wait "$VG" || true
requests=$(echo "$out" | awk '/requests in/ {print $1}')
instructions=$(awk '/I +refs:/ {gsub(",", "", $4); print $4}' "$WORK/valgrind.err")
echo "$requests requests, $instructions instructions"
python3 -c "import json,sys; r,i=int(sys.argv[1]),int(sys.argv[2]); print(json.dumps({'requests': r, 'instructions': i, 'instructions_per_request': round(i / r)}))" "$requests" "$instructions"
