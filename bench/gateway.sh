#!/usr/bin/env bash
# Gateway: Keel vs nginx vs HAProxy proxying to the same upstream, in one run; and Keel with
# JWT auth and rate limiting on (keel_auth), and Keel over hyper's client leg (keel_hyper).
#
#   bench/gateway.sh [seconds]      (default 10; medians of 3 interleaved runs)
#   BASELINE_BIN=/path/to/old/keel bench/gateway.sh   (adds keel_baseline: another build of
#                                                      keel, same configuration, same run)
#
# The upstream is an nginx answering a fixed "hello" body. Each proxy runs alone on core 1
# (nginx: 1 worker; HAProxy: 1 thread; Keel: 1 runtime thread) with keep-alive on both legs;
# wrk (-t1 -c64 --latency) and the upstream share core 0. Reports req/s, p50/p99, the proxy's
# CPU seconds, CPU per request and RSS. Installs nginx, haproxy and wrk from Debian packages
# if missing. The last line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-10}"
REPS="${REPS:-3}"
UP=7341; KEEL=7342; NGINX=7343; HAPROXY=7344; KEEL_AUTH=7345; KEEL_HYPER=7346; KEEL_BASE=7347

for pkg in nginx haproxy wrk; do
  if ! command -v "$pkg" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$pkg" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy wrk) >/dev/null
    break
  fi
done
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY_BIN=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --release -q -p keel
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

nginx_conf() { # port body-of-server-block
  cat <<CONF
worker_processes 1;
pid $WORK/nginx-$1.pid;
error_log $WORK/nginx-$1.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  upstream hello { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$1;
    $2
  }
}
CONF
}

# The upstream: nginx answering "hello", on core 0.
nginx_conf $UP 'location / { return 200 "hello\n"; }' > "$WORK/up.conf"
taskset -c 0 "$NGINX_BIN" -p "$WORK" -c "$WORK/up.conf" -g 'daemon off;' 2>/dev/null & PIDS+=($!)

# nginx as the proxy.
nginx_conf $NGINX 'location / { proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection ""; }' > "$WORK/proxy.conf"
taskset -c 1 "$NGINX_BIN" -p "$WORK" -c "$WORK/proxy.conf" -g 'daemon off;' 2>/dev/null & PIDS+=($!)
NGINX_PID=$!

# HAProxy as the proxy.
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:$HAPROXY
  default_backend hello
backend hello
  server up 127.0.0.1:$UP
CONF
taskset -c 1 "$HAPROXY_BIN" -f "$WORK/haproxy.cfg" -db 2>/dev/null & PIDS+=($!)
HAPROXY_PID=$!

# Keel's gateway, with every filter configured but none triggered: address allow/deny lists,
# a per-IP rate limit far above the load, the size limits, a bounded upstream queue.
keel_conf() { # port extra-route-lines [extra-server-lines]
  cat <<CONF
[server]
listen = "127.0.0.1:$1"
max_uri_bytes = 8192
max_body_bytes = 1048576
max_connections = 10000
${3:-}
[upstreams.hello]
servers = [{ address = "127.0.0.1:$UP" }]
max_inflight = 4096
queue_size = 4096
[[routes]]
path_prefix = "/"
upstream = "hello"
allow = ["127.0.0.0/8", "::1"]
deny = ["10.0.0.0/8"]
$2
CONF
}
keel_conf $KEEL 'rate_limit = { per_second = 100000000.0, burst = 100000000 }' > "$WORK/gateway.toml"
taskset -c 1 "$BIN/keel" gateway --config "$WORK/gateway.toml" --threads 1 >/dev/null 2>&1 & PIDS+=($!)
KEEL_PID=$!
# The same over hyper's client leg instead of Keel's own (keel_hyper): what Keel's HTTP/1.1 leg
# is worth.
keel_conf $KEEL_HYPER 'rate_limit = { per_second = 100000000.0, burst = 100000000 }' 'upstream_leg = "hyper"' > "$WORK/gateway-hyper.toml"
taskset -c 1 "$BIN/keel" gateway --config "$WORK/gateway-hyper.toml" --threads 1 >/dev/null 2>&1 & PIDS+=($!)
KEEL_HYPER_PID=$!
PORTS="$UP $KEEL $NGINX $HAPROXY $KEEL_AUTH $KEEL_HYPER"
if [ -n "${BASELINE_BIN:-}" ]; then
  keel_conf $KEEL_BASE 'rate_limit = { per_second = 100000000.0, burst = 100000000 }' > "$WORK/gateway-base.toml"
  taskset -c 1 "$BASELINE_BIN" gateway --config "$WORK/gateway-base.toml" --threads 1 >/dev/null 2>&1 & PIDS+=($!)
  KEEL_BASE_PID=$!
  PORTS="$PORTS $KEEL_BASE"
fi

# The second figure: the same with a rate limit that is checked on every request and JWT
# (HS256) auth with a claim forwarded upstream; wrk sends a valid token.
SECRET="bench-secret-$RANDOM"
keel_conf $KEEL_AUTH "rate_limit = { per_second = 100000000.0, burst = 100000000 }
[routes.auth.jwt]
algorithm = \"HS256\"
secret = \"$SECRET\"
issuer = \"keel-bench\"
forward_claims = { sub = \"x-user-id\" }" > "$WORK/gateway-auth.toml"
taskset -c 1 "$BIN/keel" gateway --config "$WORK/gateway-auth.toml" --threads 1 >/dev/null 2>&1 & PIDS+=($!)
KEEL_AUTH_PID=$!
TOKEN=$(python3 - "$SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "user-1", "iss": "keel-bench", "exp": int(time.time()) + 3600}).encode())
sig = b64(hmac.new(sys.argv[1].encode(), head + b"." + body, hashlib.sha256).digest())
print((head + b"." + body + b"." + sig).decode())
PY
)

for port in $PORTS; do
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
done

# CPU ticks (utime + stime) of a process and its children, and their RSS in KiB.
cpu_ticks() {
  local t=0 v
  for p in $1 $(pgrep -P "$1" || true); do
    v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0); t=$((t + ${v:-0}))
  done
  echo $t
}
rss_kib() {
  local r=0 v
  for p in $1 $(pgrep -P "$1" || true); do
    v=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0); r=$((r + ${v:-0}))
  done
  echo $r
}

RESULTS="$(mktemp)"
run() { # name port pid [wrk header]
  local before after out
  before=$(cpu_ticks "$3")
  out=$(taskset -c 0 wrk -t1 -c64 -d"${SECS}s" --latency ${4:+-H "$4"} "http://127.0.0.1:$2/" 2>&1)
  after=$(cpu_ticks "$3")
  python3 - "$1" "$out" "$before" "$after" "$(rss_kib "$3")" "$(getconf CLK_TCK)" "$SECS" >> "$RESULTS" <<'PY'
import json, re, sys
name, out, before, after, rss, hz, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
def ms(v, unit):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s))$", out, re.M))
def parse(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    return ms(m.group(1), m.group(2))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
print(json.dumps({"proxy": name, "rps": rps, "p50_ms": parse(lat["50"]), "p99_ms": parse(lat["99"]),
                  "cpu_s": (after - before) / hz, "rss_kib": rss, "non_2xx": int(errors.group(1)) if errors else 0,
                  # The proxy's CPU per request (its kernel time included): what it costs, when both cores
                  # are busy and req/s meets the ceiling of the set-up.
                  "cpu_us_per_req": round((after - before) / hz * 1e6 / (rps * secs), 2)}))
PY
}

# Each rep starts one contender later than the one before: whichever slot of a rep this
# machine's noise favours or hurts, it does not always fall on the same proxy.
CONTENDERS=(keel nginx haproxy keel_auth keel_hyper)
if [ -n "${BASELINE_BIN:-}" ]; then CONTENDERS+=(keel_baseline); fi
run_one() {
  case $1 in
    keel) run keel $KEEL $KEEL_PID ;;
    nginx) run nginx $NGINX $NGINX_PID ;;
    haproxy) run haproxy $HAPROXY $HAPROXY_PID ;;
    keel_auth) run keel_auth $KEEL_AUTH $KEEL_AUTH_PID "Authorization: Bearer $TOKEN" ;;
    keel_hyper) run keel_hyper $KEEL_HYPER $KEEL_HYPER_PID ;;
    keel_baseline) run keel_baseline $KEEL_BASE $KEEL_BASE_PID ;;
  esac
}
for rep in $(seq 1 "$REPS"); do
  n=${#CONTENDERS[@]}
  for i in $(seq 0 $((n - 1))); do
    run_one "${CONTENDERS[$(( (i + rep - 1) % n ))]}"
  done
  echo "done: run $rep" >&2
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda p, k: statistics.median(r[k] for r in rows if r["proxy"] == p)
bad = [r for r in rows if r["non_2xx"] > 0]
if bad:
    sys.exit(f"non-2xx answers in a run, so its figures would not be proxied requests: {bad}")
print(f"{'proxy':>9} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU s':>7} {'CPU us/req':>10} {'RSS MiB':>8}")
t = {}
for p in ("keel", "nginx", "haproxy", "keel_auth", "keel_hyper", "keel_baseline"):
    if not any(r["proxy"] == p for r in rows):
        continue
    t[p] = {k: med(p, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_s", "rss_kib", "non_2xx", "cpu_us_per_req")}
    print(f"{p:>9} {t[p]['rps']:>10.0f} {t[p]['p50_ms']:>8.3f} {t[p]['p99_ms']:>8.3f} {t[p]['cpu_s']:>7.2f} {t[p]['cpu_us_per_req']:>10.2f} {t[p]['rss_kib']/1024:>8.1f}")
print(json.dumps({
    "keel_rps": t["keel"]["rps"], "nginx_rps": t["nginx"]["rps"], "haproxy_rps": t["haproxy"]["rps"],
    "keel_p99_ms": t["keel"]["p99_ms"], "nginx_p99_ms": t["nginx"]["p99_ms"], "haproxy_p99_ms": t["haproxy"]["p99_ms"],
    "keel_vs_nginx": round(t["keel"]["rps"] / t["nginx"]["rps"], 2),
    "keel_vs_haproxy": round(t["keel"]["rps"] / t["haproxy"]["rps"], 2),
    "keel_auth_rps": t["keel_auth"]["rps"], "keel_auth_p99_ms": t["keel_auth"]["p99_ms"],
    "keel_auth_vs_nginx": round(t["keel_auth"]["rps"] / t["nginx"]["rps"], 2),
    "keel_cpu_us_per_req": t["keel"]["cpu_us_per_req"], "nginx_cpu_us_per_req": t["nginx"]["cpu_us_per_req"],
    "haproxy_cpu_us_per_req": t["haproxy"]["cpu_us_per_req"],
    "keel_cpu_vs_nginx": round(t["keel"]["cpu_us_per_req"] / t["nginx"]["cpu_us_per_req"], 2),
    "keel_hyper_leg_rps": t["keel_hyper"]["rps"],
    "keel_hyper_leg_cpu_us_per_req": t["keel_hyper"]["cpu_us_per_req"],
    **({"keel_vs_baseline_rps": round(t["keel"]["rps"] / t["keel_baseline"]["rps"], 2),
        "keel_vs_baseline_cpu": round(t["keel"]["cpu_us_per_req"] / t["keel_baseline"]["cpu_us_per_req"], 2)}
       if "keel_baseline" in t else {}),
    "all": t,
}))
PY
