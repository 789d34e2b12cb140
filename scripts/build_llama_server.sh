#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp sources vendored in the pinned llama-cpp-python
# sdist (scripts/constraints.txt), with the same CPU flags as scripts/install.sh, and cache the binary.
# The engine tests (tests/test_engine_llama_server.py) and bench/engine_bench.py run it.
#
#   bash scripts/build_llama_server.sh        # prints the path of the binary on its last line
#
# Safe to run again: when the cached binary exists it only prints its path.
# Environment: PYTHON (a python with pip; default .venv/bin/python, else python3),
#              BACKTRACK_SAMPLER_CACHE (default ~/.cache/backtrack_sampler).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "build_llama_server.sh: error: $*" >&2; exit 1; }

pin=$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' scripts/constraints.txt)
[ -n "$pin" ] || die "no llama-cpp-python==<version> pin in scripts/constraints.txt"
cache="${BACKTRACK_SAMPLER_CACHE:-$HOME/.cache/backtrack_sampler}/llama-server-$pin"
bin="$cache/llama-server"
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  echo "==> llama-server $pin is cached: $bin" >&2
  echo "$bin"
  exit 0
fi

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
command -v cmake >/dev/null || die "cmake is not installed (apt-get install cmake)"
command -v c++ >/dev/null || die "no C++ compiler (apt-get install g++)"

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "==> downloading the llama-cpp-python $pin sdist (llama.cpp sources are vendored in it)" >&2
"$python" -m pip download --disable-pip-version-check -q --no-deps --no-binary llama-cpp-python \
  -d "$work" "llama-cpp-python==$pin" >&2 || die "pip download of llama-cpp-python==$pin failed"
sdist=$(ls "$work"/llama_cpp_python-*.tar.gz 2>/dev/null | head -1)
[ -n "$sdist" ] || die "pip download produced no sdist in $work"
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -1)
[ -n "$src" ] && [ -f "$src/CMakeLists.txt" ] || die "no vendor/llama.cpp in $sdist"

# Same CPU flags as scripts/install.sh: portable AVX2, no AMX (native AMX kernels segfault on these Xeons).
flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF)
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
echo "==> configuring llama.cpp ($src)" >&2
cmake -S "$src" -B "$work/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  "${flags[@]}" >&2 || die "cmake configure failed"
echo "==> building llama-server (about 5-10 minutes on 2 cores, once)" >&2
cmake --build "$work/build" --config Release --target llama-server -j "$(nproc)" >&2 || die "cmake build failed"
built=$(find "$work/build" -type f -name llama-server -perm -u+x | head -1)
[ -n "$built" ] || die "the build produced no llama-server binary"
"$built" --version >&2 || die "the built llama-server does not run"
mkdir -p "$cache"
cp "$built" "$bin.tmp.$$" && mv "$bin.tmp.$$" "$bin"
echo "==> cached $bin" >&2
echo "$bin"
