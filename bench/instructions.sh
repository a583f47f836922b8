#!/usr/bin/env bash
# Instructions per proxied request on the plain route, counted by callgrind: steady to about
# 0.5 % between runs, where wall-clock throughput on a shared machine drifts by tens of percent.
#
#   bench/instructions.sh SRC [seconds=10] [access_log=true]
#
# SRC is a source tree (a worktree, or `git archive` unpacked); the proxy runs from it with this
# repo's .venv, one worker, routes file only, in front of an nginx answering 20 bytes. The
# proxy runs under valgrind (about 50x slower): a warm-up outside instrumentation, one inside,
# then wrk -t1 -c50 for `seconds`; the count is user-space instructions of the proxy process
# divided by the requests answered. Compare two builds by running this on each: the figure is
# per build, not a ratio of one run. Not a test; needs valgrind, wrk and nginx.
set -euo pipefail

SRC=$(cd "$1" && pwd); SECS=${2:-10}; ACCESS_LOG=${3:-true}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
for tool in valgrind callgrind_control wrk nginx; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install valgrind wrk nginx)" >&2; exit 2; }
done
WORK=$(mktemp -d /tmp/edgeproxy-instr.XXXXXX)
BACKEND=18321; PORT=18322; ADMIN=18323
NGINX_PID=""; PROXY_PID=""
cleanup() {
    [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=bench/plain_backend.sh
. "$ROOT/bench/plain_backend.sh"
start_plain_backend "$WORK" "$BACKEND"

(cd "$SRC" && EDGEPROXY_LISTEN=127.0.0.1:$PORT EDGEPROXY_ADMIN_LISTEN=127.0.0.1:$ADMIN \
    EDGEPROXY_WORKERS=1 EDGEPROXY_DOCKER=false EDGEPROXY_ROUTES_FILE="$WORK/routes.toml" \
    EDGEPROXY_ACCESS_LOG=$ACCESS_LOG PYTHONPATH="$SRC" \
    exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg.out" \
    "$PY" -m edgeproxy > "$WORK/proxy.log" 2> "$WORK/valgrind.err") &
PROXY_PID=$!
for _ in $(seq 600); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT/plain" && break
    sleep 0.2
done
wrk -t1 -c50 -d3 "http://127.0.0.1:$PORT/plain/x" > /dev/null   # warm-up, not counted
callgrind_control -i on "$PROXY_PID" > /dev/null 2>&1
wrk -t1 -c50 -d3 "http://127.0.0.1:$PORT/plain/x" > /dev/null   # warm-up, instrumented
callgrind_control -z "$PROXY_PID" > /dev/null 2>&1
OUT=$(wrk -t1 -c50 -d"$SECS" --timeout 10s "http://127.0.0.1:$PORT/plain/x")
callgrind_control -d "$PROXY_PID" > /dev/null 2>&1
REQUESTS=$(echo "$OUT" | awk '/requests in/{print $1}')
sleep 1
kill "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true; PROXY_PID=""
# `callgrind_control -d` wrote the counted part (cg.out.1); the file written at exit holds only
# what came after it: the larger total is the count.
IR=$(for f in "$WORK"/cg.out*; do grep -h '^totals:\|^summary:' "$f" | awk '{print $2}'; done \
     | sort -n | tail -1)
echo "$SRC access_log=$ACCESS_LOG requests=$REQUESTS instructions=$IR" \
     "per_request=$((IR / REQUESTS)) $(echo "$OUT" | grep -i 'non-2xx\|errors' | tr '\n' ' ')"
