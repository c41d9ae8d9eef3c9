#!/usr/bin/env bash
# One command: install the real peers the tests talk to (DCMTK, dicom3tools, Redis, Chromium, Orthanc
# with its DICOMweb plugin, iproute2 for Orthanc's private network namespace), start Redis when none
# answers on 127.0.0.1:6379, install ichnode with its test dependencies into ./.venv, and run the
# whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for pair in /usr/bin/storescu:dcmtk /usr/bin/dciodvfy:dicom3tools /usr/bin/redis-server:redis-server \
            /usr/bin/chromium:chromium /usr/sbin/Orthanc:orthanc \
            /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb /usr/bin/ip:iproute2; do
    [ -e "${pair%%:*}" ] || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    # no package may start its service: orthanc's would listen on all interfaces (the tests run their own)
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        own_policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$own_policy" && chmod 755 "$own_policy"
    fi
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || rc=$?
    [ -z "$own_policy" ] || rm -f "$own_policy"
    [ "$rc" -eq 0 ] || exit "$rc"
    if [[ " ${missing[*]} " == *" orthanc "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now orthanc >/dev/null 2>&1 || true  # nor start at the next boot
    fi
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting redis-server on 127.0.0.1:6379" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
ICHNODE_EXTRAS=test bash deploy/install.sh
exec .venv/bin/python -m pytest "$@"
