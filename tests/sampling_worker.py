"""Samples short continuations in one in-process engine and prints their counts as JSON.

Run by test_sampling.py in a subprocess: the engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that a test can swap in a deliberately wrong rule.

    python sampling_worker.py MODEL MODE N DEPTH TOP_K [SPEC_JSON]

MODE: plain (no speculation) | clasp | wrong_flat (publish a flatter q than the drafts were drawn
from) | wrong_residual (on rejection, resample from the target without subtracting q).
"""

import collections
import json
import os
import sys

if __name__ == "__main__":  # test_sampling imports PROMPT: the setting must not leak into its process
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

PROMPT = [1, 504, 3365, 314, 253, 1789, 28, 532, 2161, 314]


def install_wrong_rule(mode: str) -> None:
    if mode == "wrong_flat":
        from vllm_clasp import proposer

        record = proposer._SamplingRows.record

        def flat_record(self, row, j, q, ids):
            record(self, row, j, (q > 0).float() / (q > 0).sum(), ids)

        proposer._SamplingRows.record = flat_record
    elif mode == "wrong_residual":
        from vllm.v1.sample import rejection_sampler as rs

        recover = rs.sample_recovered_tokens

        def no_q_recovery(max_spec_len, num_draft_tokens, cu, draft_ids, draft_probs, *a, **k):
            return recover(max_spec_len, num_draft_tokens, cu, draft_ids, None, *a, **k)

        rs.sample_recovered_tokens = no_q_recovery


def main() -> None:
    model, mode, n, depth, top_k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    spec = json.loads(sys.argv[6]) if len(sys.argv) > 6 and mode != "plain" else None
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_clasp.compare import _counters, engine_kwargs

    install_wrong_rule(mode)
    llm = LLM(speculative_config=spec, **engine_kwargs(model, max_num_seqs=256, max_num_batched_tokens=4096))
    seeded = os.environ.get("SAMPLING_WORKER_SEEDED", "1") == "1"
    sps = [
        SamplingParams(temperature=1.0, top_k=top_k, max_tokens=depth, ignore_eos=True, seed=i if seeded else None)
        for i in range(n)
    ]
    outs = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)] * n, sps, use_tqdm=False)
    counts = collections.Counter(" ".join(map(str, o.outputs[0].token_ids)) for o in outs)
    print("RESULT " + json.dumps({"counts": counts, "spec": _counters(llm)}), flush=True)


if __name__ == "__main__":
    main()
