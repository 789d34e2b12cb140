#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests and real-model tests on both backends).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1  # nothing may download weights
exec .venv/bin/python -m pytest -q -ra "$@"
