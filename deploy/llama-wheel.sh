#!/usr/bin/env bash
# Build (once) and print the path of a portable llama-cpp-python wheel.
#
# Why from source with these flags: llama.cpp's native build (-march=native) crashes on
# these CPUs for prompt batches > 1, and PyPI serves only the sdist. pip's own wheel cache
# ignores CMAKE_ARGS, so we keep our own cache, keyed by version, flags and Python tag, outside
# the repo: repeated `make test` runs and CI reuse it, a fresh machine builds it.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CMAKE_ARGS=${SLUICE_LLAMA_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}
CACHE_ROOT=${SLUICE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/wheels}

py_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
flags_key=$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)
dir="$CACHE_ROOT/llama_cpp_python-$VERSION-$py_tag-$flags_key"

wheel=$(ls "$dir"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION from source (portable flags; minutes on 2 cores) into $dir" >&2
  mkdir -p "$CACHE_ROOT"
  tmp=$(mktemp -d "$CACHE_ROOT/.building.XXXXXX")  # moved into place only once complete
  CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PYTHON" -m pip wheel --no-deps --no-binary llama-cpp-python --no-cache-dir \
    -w "$tmp" "llama-cpp-python==$VERSION" >&2
  mkdir -p "$dir"
  mv "$tmp"/llama_cpp_python-*.whl "$dir"/
  printf '%s\n' "$CMAKE_ARGS" >"$dir/CMAKE_ARGS"
  rm -rf "$tmp"
  wheel=$(ls "$dir"/llama_cpp_python-*.whl | head -n1)
fi
echo "$wheel"
