#!/usr/bin/env bash
# One command: install the real peers the tests talk to (DCMTK, dicom3tools, Redis, Chromium),
# start Redis when none answers on 127.0.0.1:6379, install ichnode with its test dependencies
# into ./.venv, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for pair in storescu:dcmtk dciodvfy:dicom3tools redis-server:redis-server chromium:chromium; do
    [ -x "/usr/bin/${pair%%:*}" ] || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting redis-server on 127.0.0.1:6379" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
ICHNODE_EXTRAS=test bash deploy/install.sh
exec .venv/bin/python -m pytest "$@"
