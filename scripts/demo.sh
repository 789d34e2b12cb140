#!/usr/bin/env bash
# Install, then stream a short story from the embedded Gemma 3 270M with a backtracking strategy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python examples/story.py "$@"
