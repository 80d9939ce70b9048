# What bench/chat.sh and bench/chat-cluster.sh share (sourced, not run): the release build and
# the socket.io server's packages, a work directory whose processes are stopped on exit, and
# waiting for a port.

cargo build --release -q -p keel
BIN="${CARGO_TARGET_DIR:-target}/release/keel"
if [ ! -d bench/chat/node_modules/@socket.io/redis-adapter ]; then
  (cd bench/chat && npm ci --no-audit --no-fund >&2)
fi

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  exit 1
}
