#!/usr/bin/env bash
# Install, then ask the embedded instruct model (SmolLM2 135M) for a short story with AntiSlop banning
# a built-in list of overused phrases: rewinds are shown struck out, a summary line ends the output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python examples/story.py "$@"
