# Sourced by the scripts: the project's virtual environment and vLLM's CPU settings.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_CLASP_VENV:-$ROOT/.venv}"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# vLLM's CPU backend wants Intel OpenMP preloaded (it warns and runs slower without it).
if [ -f "$VENV/lib/libiomp5.so" ]; then
  case ":${LD_PRELOAD:-}:" in *libiomp5*) ;; *) export LD_PRELOAD="$VENV/lib/libiomp5.so${LD_PRELOAD:+:$LD_PRELOAD}" ;; esac
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
export TOKENIZERS_PARALLELISM=false
