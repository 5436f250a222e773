# shellcheck shell=bash
# bench/lib/stack.sh: the chat stack the app benchmarks (bench/modes, bench/presence-api) run
# each measurement on: a fresh redis-server and two `app` instances (release build) on loopback,
# started and stopped by PID. Sourced; the caller sets NAME (its name in messages) first.

# require_tools TOOL...: every TOOL is installed, or the exact line to install them is printed.
require_tools() {
    local tool
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null; then
            echo "$NAME: $tool is missing; run: apt-get install -y $*" >&2
            exit 1
        fi
    done
}

# BIN: the folder with `app` and `bench`: BENCH_BIN as given, or a release build made now.
if [ -n "${BENCH_BIN:-}" ]; then
    BIN=$BENCH_BIN
else
    cargo build --release --locked -p app -p bench >&2
    BIN=${CARGO_TARGET_DIR:-target}/release
fi

WORK=$(mktemp -d)
PIDS=()
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_line FILE TEXT: until FILE holds a line with TEXT (at most 20 s).
wait_line() {
    for _ in $(seq 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$NAME: no '$2' in $1" >&2
    return 1
}

# wait_healthy ADDR: until the app at ADDR answers /healthz with 200 (at most 20 s).
wait_healthy() {
    for _ in $(seq 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$1/healthz")" = 200 ] && return 0
        sleep 0.1
    done
    echo "$NAME: the app at $1 is not healthy after 20 s" >&2
    return 1
}

# start_stack CONFIG: a fresh redis-server and two apps with CONFIG, both healthy. Sets
# REDIS_PID, APP_PIDS and APP_ADDRS (each app's HTTP address); app I's output is
# $WORK/appI.out (its `listening` lines).
start_stack() {
    local port i
    port=$(free_port)
    # The last run's output files go first: a wait could otherwise read them before the new
    # process truncates them.
    rm -f "$WORK/redis.log" "$WORK"/app?.out "$WORK"/app?.log
    redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    wait_line "$WORK/redis.log" "Ready to accept connections"
    APP_PIDS=()
    APP_ADDRS=()
    for i in 1 2; do
        "$BIN/app" --config "$1" --listen 127.0.0.1:0 --redis "redis://127.0.0.1:$port" \
            >"$WORK/app$i.out" 2>"$WORK/app$i.log" &
        APP_PIDS+=("$!")
        PIDS+=("$!")
        wait_line "$WORK/app$i.out" "listening http"
        APP_ADDRS+=("$(sed -n 's/^listening http //p' "$WORK/app$i.out")")
        wait_healthy "${APP_ADDRS[-1]}"
    done
}
