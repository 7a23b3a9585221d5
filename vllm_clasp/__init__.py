"""vllm-clasp: CLaSp self-speculative decoding (in-context layer skipping) as a vLLM plugin.

Parts: ``config`` (options), ``planner`` (the DP), ``drafting`` (skip-layer forwards on the
target's weights and KV cache), ``proposer`` (the vLLM drafter), ``patches`` + ``plugin`` (vLLM
integration), ``models`` (the embedded default model), ``cli`` (command line).
"""

__version__ = "0.1.0"
