#!/usr/bin/env bash
# Install ichnode and its Python dependencies into ./.venv (Python 3.11).
# torch is pinned to 2.13.0: a CPU build where the machine provides one (as here), the
# PyPI build (with CUDA) elsewhere. Set ICHNODE_EXTRAS=test for the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "ichnode needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "ichnode: installing python3-venv" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
echo "ichnode: installing into $(pwd)/.venv (a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".${ICHNODE_EXTRAS:+[$ICHNODE_EXTRAS]}"
