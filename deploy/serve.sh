#!/usr/bin/env bash
# One command: install ichnode into ./.venv and start everything on this machine
# (DICOM listener, embedded queue, workers, delivery, HTTP API and web page).
# Configuration: config/ichnode.toml, or ICHNODE_CONFIG / ICHNODE_* variables (README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
export ICHNODE_CONFIG=${ICHNODE_CONFIG:-config/ichnode.toml}
exec .venv/bin/ichnode serve "$@"
