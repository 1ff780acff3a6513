#!/usr/bin/env bash
# The test suite: lint, types, unit tests, then tests on real QEMU guests.
# Installs what it needs first (scripts/setup.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
