#!/usr/bin/env bash
# Install everything, then run the demo on the lab (as root: it builds namespaces, a bridge and
# loop devices): three VMs with an agent each, a controller with its private Mosquitto on the
# bridge, and the vault workflow from discovery to restores checked with e2fsck, and a single
# file recovered from a recovery point.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install.sh
exec .venv/bin/python -m tests.demo "$@"
