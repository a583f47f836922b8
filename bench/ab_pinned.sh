#!/usr/bin/env bash
# A/B of two edgeproxy builds on the plain route, in pairs, steadier than one bench/run.py run.
#
#   bench/ab_pinned.sh NEW_SRC OLD_SRC [pairs=8] [seconds=4] [access_log=true]
#
# NEW_SRC and OLD_SRC are source trees (a worktree, or `git archive` unpacked); each proxy runs
# from its own tree (`python -m edgeproxy` with that tree first on sys.path), with this repo's
# .venv. One worker, pinned to core 0 with taskset; wrk -t1 -c50 pinned to core 1; an nginx
# backend (answering 20 bytes) started here. Each pair runs NEW then OLD, after a 2 s warm-up
# each; it prints req/s, the proxy's CPU per request (from /proc/PID/stat) and NEW/OLD, then
# the median ratio. The machine's speed drifts by tens of percent over minutes: read the
# median of the pairs, never one run. Not a test; needs wrk, nginx and taskset.
set -euo pipefail

NEW=$(cd "$1" && pwd); OLD=$(cd "$2" && pwd)
PAIRS=${3:-8}; SECS=${4:-4}; ACCESS_LOG=${5:-true}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
WORK=$(mktemp -d /tmp/edgeproxy-ab.XXXXXX)
BACKEND=18311; PORT=18312; ADMIN=18313
NGINX_PID=""

cleanup() {
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=bench/plain_backend.sh
. "$ROOT/bench/plain_backend.sh"
start_plain_backend "$WORK" "$BACKEND"

one() {  # one build: prints "req/s cpu_ns_per_request"
    local src=$1 px c0 c1 out n
    (cd "$src" && EDGEPROXY_LISTEN=127.0.0.1:$PORT EDGEPROXY_ADMIN_LISTEN=127.0.0.1:$ADMIN \
        EDGEPROXY_WORKERS=1 EDGEPROXY_DOCKER=false EDGEPROXY_ROUTES_FILE="$WORK/routes.toml" \
        EDGEPROXY_ACCESS_LOG=$ACCESS_LOG PYTHONPATH="$src" \
        exec taskset -c 0 "$PY" -m edgeproxy > "$WORK/proxy.log" 2>&1) &
    px=$!
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$PORT/plain" && break
        sleep 0.1
    done
    taskset -c 1 wrk -t1 -c50 -d2 "http://127.0.0.1:$PORT/plain/x" > /dev/null
    c0=$(awk '{print $14 + $15}' "/proc/$px/stat")
    out=$(taskset -c 1 wrk -t1 -c50 -d"$SECS" "http://127.0.0.1:$PORT/plain/x")
    c1=$(awk '{print $14 + $15}' "/proc/$px/stat")
    kill "$px"; wait "$px" 2>/dev/null || true
    n=$(echo "$out" | awk '/requests in/{print $1}')
    # clock ticks are 10 ms: ticks * 1e7 / requests = ns per request
    echo "$((n / SECS)) $(((c1 - c0) * 10000000 / n))"
}

ratios=()
for i in $(seq "$PAIRS"); do
    read -r new_rps new_ns <<< "$(one "$NEW")"
    read -r old_rps old_ns <<< "$(one "$OLD")"
    ratio=$(awk -v a="$new_rps" -v b="$old_rps" 'BEGIN{printf "%.3f", a / b}')
    ratios+=("$ratio")
    printf 'pair %d: new %6d req/s %6d ns/req | old %6d req/s %6d ns/req | new/old %s\n' \
        "$i" "$new_rps" "$new_ns" "$old_rps" "$old_ns" "$ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END{printf "median new/old req/s over %d pairs: %s (access log %s)\n", NR, (NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2), "'"$ACCESS_LOG"'"}'
