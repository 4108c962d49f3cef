#!/usr/bin/env bash
# Install everything, then check the code and run the whole test suite (as root: the tests
# loop-mount file systems). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "==> ruff";          ruff check .
echo "==> mypy";          mypy
echo "==> import rules";  lint-imports
echo "==> generated code is current"; python proto/generate.py --check
echo "==> tests";         python -m pytest "$@"
