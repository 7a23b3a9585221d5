"""Offline batch generation with CLaSp; checks the text against plain vLLM.

    python examples/offline_greedy.py [MODEL]
"""

import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from vllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    if model is None:
        from vllm_clasp.models import default_model_path

        model = str(default_model_path())
    prompts = ["Write a haiku about the sea.", "List three uses of a paperclip."]
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    sp = SamplingParams(temperature=0.0, max_tokens=64)
    common = dict(model=model, dtype="float32", gpu_memory_utilization=0.5, max_model_len=2048, enforce_eager=True)
    clasp = LLM(speculative_config={"method": "clasp", "num_speculative_tokens": 4, "skip_layers": 0.4}, **common)
    fast = [o.outputs[0].text for o in clasp.chat(msgs, sp)]
    del clasp
    plain = LLM(**common)
    ref = [o.outputs[0].text for o in plain.chat(msgs, sp)]
    for p, a, b in zip(prompts, fast, ref):
        print(f"--- {p}\n{a}\n(identical to plain vLLM: {a == b})")


if __name__ == "__main__":
    main()
