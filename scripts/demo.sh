#!/usr/bin/env bash
# The demo: one host, one guest from an xm config file, the seed's verbs on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sanvisor demo "$@"
