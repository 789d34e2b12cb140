#!/usr/bin/env bash
# Install (the first time), then ask the embedded instruct model (SmolLM2 135M) for a short story with
# AntiSlop banning a built-in list of overused phrases and RepetitionStrategy cutting loops: rewinds are
# shown struck out, a summary line ends the output. Reproducible: seed 1 unless --seed N is given.
#   bash scripts/demo.sh [--seed N] [--max-new-tokens N] ["Write a story about ..."]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import backtrack_sampler, llama_cpp; from backtrack_sampler.provider.models import MODELS; MODELS['smollm2-135m-instruct'].path()" 2>/dev/null; then
  bash scripts/install.sh
fi
exec .venv/bin/python examples/story.py "$@"
