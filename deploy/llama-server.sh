#!/usr/bin/env bash
# Build (once) and print the path of llama.cpp's own `llama-server`, the benchmark's anchor.
#
# Built from the llama.cpp source inside the llama-cpp-python sdist of the version we pin, with
# the same portable flags as our wheel (deploy/llama-wheel.sh says why), so the anchor runs the
# same kernels as our worker. The server is off when llama.cpp is built as llama-cpp-python's
# subproject, hence this separate build. Cached outside the repo, keyed by version and flags; built
# into a temporary directory and moved into place only once complete. Tests never need it;
# `make bench` (bench/batching.py) does. About 8 minutes on 2 cores.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CMAKE_ARGS=${SLUICE_LLAMA_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}
# A self-contained binary with no web UI (its assets would be downloaded) and no HTTPS.
SERVER_ARGS="-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release"
CACHE_ROOT=${SLUICE_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/llama-server}

flags_key=$(printf '%s %s' "$CMAKE_ARGS" "$SERVER_ARGS" | sha256sum | cut -c1-12)
dir="$CACHE_ROOT/llama-server-$VERSION-$flags_key"

if [ ! -x "$dir/llama-server" ]; then
  echo "building llama-server from llama-cpp-python $VERSION's llama.cpp (portable flags; minutes on 2 cores) into $dir" >&2
  mkdir -p "$CACHE_ROOT"
  tmp=$(mktemp -d "$CACHE_ROOT/.building.XXXXXX")  # moved into place only once complete
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps --no-cache-dir \
    -d "$tmp" "llama-cpp-python==$VERSION" >&2
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  src="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
  # shellcheck disable=SC2086  # the flags are words
  cmake -S "$src" -B "$tmp/build" $CMAKE_ARGS $SERVER_ARGS >&2
  cmake --build "$tmp/build" --target llama-server \
    --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
  mkdir -p "$tmp/out"
  cp "$tmp/build/bin/llama-server" "$tmp/out/"
  printf '%s\n%s\n' "$CMAKE_ARGS" "$SERVER_ARGS" >"$tmp/out/CMAKE_ARGS"
  rm -rf "$dir"
  mv "$tmp/out" "$dir"
fi
echo "$dir/llama-server"
