#!/usr/bin/env bash
# Install (once) LiteLLM's proxy in a venv of its own and print the path of its `litellm`
# command: the gateway people pick, measured beside sluice by bench/gateways.py. A venv of its
# own, so that its many dependencies never meet sluice's; cached outside the repo, keyed by
# version and Python. A venv cannot be moved once made, so it is made in place and counts as
# installed only once its marker is written.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VERSION=${LITELLM_VERSION:-1.108.7}
CACHE_ROOT=${SLUICE_LITELLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/litellm}
py_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
dir="$CACHE_ROOT/litellm-$VERSION-$py_tag"

if [ ! -f "$dir/.installed" ]; then
  echo "installing litellm[proxy]==$VERSION into $dir (a minute or two)" >&2
  rm -rf "$dir"
  mkdir -p "$CACHE_ROOT"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet "litellm[proxy]==$VERSION" >&2
  touch "$dir/.installed"
fi
echo "$dir/bin/litellm"
