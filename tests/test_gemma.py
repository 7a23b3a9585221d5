"""CLaSp on Gemma 3 270M (Gemma3ForCausalLM: scaled embedding, four norms per layer, tied head,
sliding-window and global attention layers in six KV cache groups): greedy output token-identical
to plain vLLM at batch sizes 1 and 8 on Spec-Bench prompts of all 13 categories.

Drafts come from skipped layers only (context drafts off, no governor), plans every 4 rounds with
the planner's self-check on: after each plan the scratch-KV layer runner must reproduce the
verification's captured states layer by layer, in every KV cache group, or the engine fails.
Two of the prompts are longer than the 512-token sliding window.
"""

import os

import pytest

from vllm_clasp.compare import SPEC_COUNTERS, _counters, chat_token_ids, engine_kwargs, generate_chunked, load_spec_bench, shutdown

pytestmark = pytest.mark.slow

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def gemma_model() -> str:
    from vllm_clasp.models import gemma3_model_path

    return str(gemma3_model_path())


@pytest.fixture(scope="module")
def gemma_prompts(gemma_model):
    qs = load_spec_bench(per_category=1)
    assert len({q.category for q in qs}) == 13
    prompts = chat_token_ids(gemma_model, [q.text for q in qs])
    assert max(len(p) for p in prompts) > 512  # past the sliding window
    return prompts


def _drafter_layout(worker):
    d = worker.model_runner.drafter
    return type(d.stack).__name__, list(d.kv.group_ids), list(d.kv.layer_group)


def _run(model, spec, prompts):
    from vllm import LLM, SamplingParams

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    llm = LLM(speculative_config=spec, **engine_kwargs(model, max_num_seqs=8, max_num_batched_tokens=512))
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        before = _counters(llm)
        outs = {"bs1": generate_chunked(llm, prompts, 1, sp), "bs8": generate_chunked(llm, prompts, 8, sp)}
        after = _counters(llm)
        layout = llm.collective_rpc(_drafter_layout)[0] if spec else None
        return outs, {k: after[k] - before[k] for k in SPEC_COUNTERS}, layout
    finally:
        shutdown(llm)


def test_gemma3_greedy_identical_bs_1_8(gemma_model, gemma_prompts):
    plain, _, _ = _run(gemma_model, None, gemma_prompts)
    spec = {"method": "clasp", "replan_interval": 4, "self_check": True, "adaptive": False, "lookup_max": 0}
    clasp, m, layout = _run(gemma_model, spec, gemma_prompts)
    for name in ("bs1", "bs8"):
        diff = [i for i, (a, b) in enumerate(zip(plain[name], clasp[name])) if a != b]
        assert not diff, f"{name}: outputs {diff} differ from plain vLLM"
    stack, group_ids, layer_group = layout
    assert stack == "Gemma3Stack"
    assert len(group_ids) == 6, group_ids  # five sliding-window groups and one global
    assert layer_group[5] == layer_group[11] == layer_group[17] != layer_group[0]
    tau = (m["drafts"] + m["accepted"]) / max(m["drafts"], 1)
    print(f"gemma3 clasp counters {m}, tau {tau:.2f}")
    assert m["drafts"] > 50 and m["accepted"] > 0, m
