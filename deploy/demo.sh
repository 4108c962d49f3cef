#!/usr/bin/env bash
# Install everything, then run the demo: a controller with its private Mosquitto, two agents
# with real ext4 disk images, backups, a change inside a file system, an incremental backup and
# a restore compared byte for byte (as root: the demo loop-mounts the images).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install.sh
exec .venv/bin/python -m tests.demo "$@"
