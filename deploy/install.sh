#!/usr/bin/env bash
# Install everything Coffer needs on a Debian 12 machine, as root: Debian packages (Mosquitto,
# file system tools, FUSE 3 and what builds pyfuse3 against it, partitioning tools for the
# tests, restic and borg for the benchmark, python3-pyfuse3 for `borg mount`: the system
# borg's own FUSE binding, Chromium, the browser the web console's test drives headless, and
# for the real QEMU guest of deploy/vm: mmdebstrap to build its image, QEMU's x86 emulator)
# and a virtualenv in .venv with Coffer and its
# development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(mosquitto e2fsprogs xfsprogs util-linux iproute2 restic borgbackup
          fuse3 libfuse3-dev pkg-config gcc fdisk gdisk python3-pyfuse3 chromium
          mmdebstrap qemu-system-x86)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "==> installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package enables a system-wide broker; Coffer starts its own.
if systemctl is-enabled mosquitto >/dev/null 2>&1; then
  systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($python --version)"
  if ! "$python" -m venv .venv 2>/dev/null; then
    apt-get install -y -qq python3-venv >/dev/null
    "$python" -m venv .venv
  fi
fi
# pyfuse3 compiles against the interpreter's headers: Debian's own Python keeps them apart.
if [ ! -f "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
  apt-get install -y -qq --no-install-recommends python3-dev >/dev/null
fi
echo "==> installing Coffer into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
