#!/usr/bin/env bash
# The main job: set up, then CLaSp against plain vLLM on Spec-Bench prompts (greedy).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
exec vllm-clasp demo "$@"
