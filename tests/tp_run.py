"""Helper for test_tensor_parallel.py: one engine (run as a script: spawned workers need a main guard).

Usage: python tests/tp_run.py MODEL TP SPEC_JSON|none -> prints one JSON line: token ids, spec
counters and, for clasp, every rank's ``clasp_stats`` snapshot.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_clasp.compare import SPEC_COUNTERS, _counters, engine_kwargs, shutdown

    model, tp, spec = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]) if sys.argv[3] != "none" else None
    kw = engine_kwargs(model, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024)
    kw.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    llm = LLM(speculative_config=spec, **kw)
    try:
        prompts = ["The capital of France is", "def fib(n):", "Once upon a time", "1, 2, 3, 4,"]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
        c = _counters(llm)
        stats = llm.collective_rpc("clasp_stats") if spec is not None else None
        print("TP_RESULT " + json.dumps({"ids": [list(o.outputs[0].token_ids) for o in outs],
                                         "counters": {k: c[k] for k in SPEC_COUNTERS}, "stats": stats}), flush=True)
    finally:
        shutdown(llm)


if __name__ == "__main__":
    main()
