#!/usr/bin/env bash
# Soak: `keel up` under a steady mixed load for a long time, every process's memory and open
# files sampled, to find what grows.
#
#   bench/soak.sh [seconds]     (default 1800: 30 minutes)
#
# The load, from four client threads on keep-alive connections, all through the documented
# interfaces: buys of a sold-out item (after its 500 units went in the first seconds) by ever
# new users, item reads (list and one item), static files of the storefront, and registry
# watches (an NDJSON watch on a config prefix, re-opened every 20 s, while a writer puts a key
# under it twice a second). Each process (`keel up` and its seven parts) is sampled every 10 s:
# RSS (VmRSS) and open file descriptors. After a warm-up of the first fifth of the run, the
# RSS slope (KiB per minute, least squares) and the fd growth are computed per process. The last
# line is one JSON object; "flat" is true when no process's RSS grew by more than 1 MiB over the
# measured window and none gained more than 4 fds. With SOAK_SAMPLES=FILE, every sample is also
# written to FILE as CSV (seconds, process, RSS in KiB, fds, anonymous huge pages in KiB).
#
# Transparent huge pages are off for the measured processes unless SOAK_THP=1: Keel's allocator
# (mimalloc) asks the kernel for huge pages on its segments, so with them a process's RSS moves
# in steps of 2 MiB (a huge page faulted in, or split and partly returned), which is more than the
# 1 MiB the verdict allows. With SOAK_THP=0 (MIMALLOC_ALLOW_THP=0, inherited by every part) RSS
# moves in 4 KiB pages and a slope is growth, not a page boundary.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/keel-config.sh

SECONDS_TOTAL="${1:-1800}"
SOAK_THP="${SOAK_THP:-0}"
TOKEN="soak-$RANDOM-$RANDOM"

cargo build --release -q -p keel
BIN="$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)"
WORK="$(mktemp -d)"
KEEL_UP_PID=""
cleanup() {
  [ -n "$KEEL_UP_PID" ] && kill -INT "$KEEL_UP_PID" 2>/dev/null || true
  sleep 3
  rm -rf "$WORK"
}
trap cleanup EXIT

keel_config "$WORK/keel.toml" "$TOKEN" 86400000
(cd "$WORK" && MIMALLOC_ALLOW_THP="$SOAK_THP" exec "$BIN/keel" up --seconds $((SECONDS_TOTAL + 120))) > "$WORK/up.log" 2>&1 &
KEEL_UP_PID=$!
for _ in $(seq 1 600); do grep -q "Keel is up" "$WORK/up.log" && break; sleep 0.1; done
grep -q "Keel is up" "$WORK/up.log" || { cat "$WORK/up.log" >&2; exit 1; }

python3 - "$WORK" "$KEEL_UP_PID" "$SECONDS_TOTAL" "$TOKEN" "$SOAK_THP" <<'PY'
import http.client, json, os, re, sys, threading, time

work, up_pid, total, token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
thp = sys.argv[5] != "0"
log = open(os.path.join(work, "up.log")).read()
gateway = re.search(r"Keel is up: http://([^/ ]+)/", log).group(1)
registry = re.search(r"registry\s+(\S+:\d+)", log).group(1)
pids = json.load(open(os.path.join(work, "data", "pids.json")))
pids["keel-up"] = up_pid
end = time.time() + total
counts = {"buy": 0, "read": 0, "static": 0, "watch_events": 0, "config_puts": 0, "errors": 0}
lock = threading.Lock()

def count(kind, n=1):
    with lock:
        counts[kind] += n

def connection(addr):
    host, port = addr.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=10)

def request(conn, method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, data

admin = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
conn = connection(gateway)
status, body = request(conn, "POST", "/api/admin/items",
                       json.dumps({"name": "soak item", "price_cents": 100, "stock": 500}), admin)
assert status == 201, (status, body)
item = json.loads(body)["item_id"]

def loop(kind, make):
    conn = connection(gateway)
    n = 0
    while time.time() < end:
        method, path, body, headers, ok = make(n)
        n += 1
        try:
            status, _ = request(conn, method, path, body, headers)
            count(kind if status in ok else "errors")
        except Exception:
            count("errors")
            conn.close()
            conn = connection(gateway)
            time.sleep(0.1)

def buy(n):
    user = f"soak-user-{n}-{threading.get_ident()}"
    return ("POST", f"/api/items/{item}/buy", json.dumps({"user_id": user}),
            {"Content-Type": "application/json", "X-User-Id": user}, (200, 409))

def read(n):
    path = "/api/items" if n % 2 else f"/api/items/{item}"
    return ("GET", path, None, {}, (200,))

def static(n):
    path = ["/", "/store.js", "/style.css", "/admin.html"][n % 4]
    return ("GET", path, None, {}, (200,))

def watch():
    while time.time() < end:
        try:
            conn = connection(registry)
            conn.request("POST", "/keel.registry.v1.Registry/Watch",
                         json.dumps({"namespace": "soak", "configPrefix": "soak/"}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            opened = time.time()
            while time.time() - opened < 20 and time.time() < end:
                line = resp.fp.readline()
                if not line:
                    break
                count("watch_events")
            conn.close()
        except Exception:
            count("errors")
            time.sleep(0.5)

def put():
    conn = connection(registry)
    n = 0
    while time.time() < end:
        n += 1
        try:
            status, _ = request(conn, "POST", "/keel.registry.v1.Registry/PutConfig",
                                json.dumps({"namespace": "soak", "key": f"soak/k{n % 50}",
                                            "value": "dmFsdWU="}),
                                {"Content-Type": "application/json"})
            count("config_puts" if status == 200 else "errors")
        except Exception:
            count("errors")
            conn = connection(registry)
        time.sleep(0.5)

threads = [threading.Thread(target=loop, args=("buy", buy)),
           threading.Thread(target=loop, args=("read", read)),
           threading.Thread(target=loop, args=("static", static)),
           threading.Thread(target=watch), threading.Thread(target=put)]
for t in threads:
    t.daemon = True
    t.start()

def sample(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        with open(f"/proc/{pid}/smaps_rollup") as f:
            huge = int(re.search(r"AnonHugePages:\s+(\d+)", f.read()).group(1))
        return rss, len(os.listdir(f"/proc/{pid}/fd")), huge
    except (OSError, AttributeError):
        return None

samples = {name: [] for name in pids}
started = time.time()
while True:
    now = time.time() - started
    for name, pid in pids.items():
        s = sample(pid)
        if s:
            samples[name].append((now, s[0], s[1], s[2]))
    with lock:
        snapshot = dict(counts)
    print(f"{int(now)} s: {snapshot}", file=sys.stderr, flush=True)
    if time.time() >= end:
        break
    time.sleep(max(0.0, min(10.0, end - time.time())))

def slope(points):
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return 0.0 if var == 0 else sum((p[0] - mx) * (p[1] - my) for p in points) / var

warm_up = total / 5
report, flat = {}, True
for name, points in samples.items():
    measured = [p for p in points if p[0] >= warm_up] or points
    if not measured:
        report[name] = {"error": "no samples (the process was gone)"}
        flat = False
        continue
    per_min = slope([(t / 60.0, rss) for t, rss, _, _ in measured])
    grown = per_min * (measured[-1][0] - measured[0][0]) / 60.0
    fd_growth = measured[-1][2] - measured[0][2]
    report[name] = {
        "rss_start_kib": measured[0][1], "rss_end_kib": measured[-1][1],
        "rss_max_kib": max(p[1] for p in points),
        "rss_slope_kib_per_min": round(per_min, 2),
        "fds_start": measured[0][2], "fds_end": measured[-1][2], "fd_growth": fd_growth,
        "anon_huge_end_kib": measured[-1][3], "samples": len(points),
    }
    if grown > 1024 or fd_growth > 4:
        flat = False
series = os.environ.get("SOAK_SAMPLES")
if series:
    with open(series, "w") as f:
        f.write("seconds,process,rss_kib,fds,anon_huge_kib\n")
        for name, points in samples.items():
            for t, rss, fds, huge in points:
                f.write(f"{t:.0f},{name},{rss},{fds},{huge}\n")
with lock:
    final = dict(counts)
print(json.dumps({"duration_s": total, "warm_up_s": round(warm_up), "sample_every_s": 10,
                  "transparent_huge_pages": thp,
                  "load": final, "processes": report, "flat": flat}))
PY
