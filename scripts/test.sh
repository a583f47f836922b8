#!/usr/bin/env bash
# Set up this machine and run edgeproxy's checks and tests: the one command to
# run, as root, on a fresh Debian 12 machine (and what CI runs).  Idempotent.
#
#   bash scripts/test.sh [PYTEST ARGS...]
#
# 1. installs the Debian packages the tests use, if any is missing;
# 2. starts dockerd (--live-restore) and builds the busybox test image
#    (tests/engine.py; dockerd logs to /tmp/edgeproxy-dockerd.log);
# 3. creates .venv and installs edgeproxy with its test extras;
# 4. runs ruff, mypy --strict and pytest, all three even if one fails;
# 5. without PYTEST ARGS, then the Swarm stage (pytest tests/swarm): a second, swarm-mode
#    dockerd beside the main one (tests/swarm_engine.py; logs to
#    /tmp/edgeproxy-swarm-dockerd.log), which leaves the main daemon as it was (the stage's
#    first test checks it: docker0, published ports, same dockerd); the swarm daemon is
#    stopped afterwards (tasks and all; its data root stays for a faster next run).
# Setup failures stop the script at once; otherwise it exits with the code
# of the first check that failed.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker.io busybox-static redis-server pebble chromium debootstrap docker-compose
          apache2-utils nghttp2-client iproute2)
missing=()
for pkg in "${packages[@]}"; do
    [[ "$(dpkg -s "$pkg" 2>/dev/null)" == *$'\nStatus: install ok installed\n'* ]] || missing+=("$pkg")
done
# Debian's own python3 needs python3-venv for `python3 -m venv`.
if ! command -v python3 >/dev/null; then
    missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
if ((${#missing[@]})); then
    echo "scripts/test.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 tests/engine.py ensure

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test,fast]'

status=0
check() {
    local rc=0
    "$@" || rc=$?
    if ((rc != 0)); then
        echo "scripts/test.sh: FAILED with exit code $rc: $*" >&2
        ((status != 0)) || status=$rc
    fi
}
check .venv/bin/ruff check edgeproxy tests
check .venv/bin/mypy --strict edgeproxy
check .venv/bin/python -m pytest -q "$@"
if (($# == 0)); then
    # After the main suite: it needs the images tests/e2e builds (the base image). Never
    # skipped: a failure here (set-up included) fails the command.
    check .venv/bin/python -m pytest -q -p no:cacheprovider tests/swarm
    check python3 tests/swarm_engine.py stop
fi
exit "$status"
