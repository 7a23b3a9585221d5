"""CLaSp inside the real engine: greedy output token-identical to plain vLLM at several batch sizes.

Every clasp engine here runs with ``self_check``: after each plan, the planner's scratch-KV layer
runner must reproduce the verification's captured states layer by layer, or the engine fails.
"""

import pytest

from vllm_clasp.compare import SPEC_COUNTERS, _counters, chat_token_ids, engine_kwargs, generate_chunked, load_spec_bench, shutdown

pytestmark = pytest.mark.slow


def _engine(model, spec, **kw):
    from vllm import LLM

    return LLM(speculative_config=spec, **engine_kwargs(model, max_num_seqs=16, max_num_batched_tokens=512, **kw))


def _run_all(model, spec, passes, **kw):
    from vllm import SamplingParams

    llm = _engine(model, spec, **kw)
    try:
        outs = {}
        before = _counters(llm)
        for name, prompts, bs, max_tokens in passes:
            outs[name] = generate_chunked(llm, prompts, bs, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        after = _counters(llm)
        return outs, {k: after[k] - before[k] for k in SPEC_COUNTERS}
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def spec_bench_prompts(default_model):
    qs = load_spec_bench(per_category=1) + load_spec_bench(categories=["writing", "qa", "rag"], per_category=1, offset=1)
    assert len({q.category for q in qs}) == 13
    return chat_token_ids(default_model, [q.text for q in qs])


def test_greedy_identical_default_model_bs_1_4_16(default_model, spec_bench_prompts):
    p = spec_bench_prompts
    passes = [("bs1", p[:13], 1, 64), ("bs4", p, 4, 96), ("bs16", p, 16, 96)]
    plain, _ = _run_all(default_model, None, passes)
    clasp, m = _run_all(default_model, {"method": "clasp", "replan_interval": 4, "self_check": True, "adaptive": False}, passes)
    for name, *_ in passes:
        diff = [i for i, (a, b) in enumerate(zip(plain[name], clasp[name])) if a != b]
        assert not diff, f"{name}: outputs {diff} differ from plain vLLM"
    tau = (m["drafts"] + m["accepted"]) / max(m["drafts"], 1)
    print(f"clasp counters {m}, tau {tau:.2f}")
    assert m["drafts"] > 100 and m["accepted"] > 0, m
    assert tau > 1.3, f"tau {tau:.2f} too low: drafting is broken"


def test_greedy_identical_tiny_model_many_plans_and_rejections(tiny_model, default_model):
    """Random weights, a plan every round, drafts always K long (threshold 0): many rejected drafts
    whose K/V the verification must overwrite, across chunked prefills of long prompts."""
    qs = load_spec_bench(categories=["summarization", "rag", "coding", "translation"], per_category=2)
    prompts = chat_token_ids(default_model, [q.text for q in qs])
    passes = [("bs1", prompts[:3], 1, 48), ("bs8", prompts, 8, 48)]
    plain, _ = _run_all(tiny_model, None, passes)
    spec = {"method": "clasp", "skip_layers": 2, "replan_interval": 1, "draft_exit_threshold": 0.0,
            "num_speculative_tokens": 4, "max_plans_per_step": 8, "self_check": True, "adaptive": False,
            "lookup_max": 0}
    clasp, m = _run_all(tiny_model, spec, passes)
    for name, *_ in passes:
        assert plain[name] == clasp[name], name
    # Threshold 0 and no context drafts: every round drafts K = 4 with skipped layers (the
    # scheduler trims drafts only at a request's last tokens).
    assert m["draft_tokens"] >= 3.5 * m["drafts"] > 0, m


def test_greedy_identical_with_torch_compile(tiny_model, default_model):
    """vLLM's default mode (``enforce_eager`` off): the target's forward is compiled and returns
    every layer's state on every step; drafts and plans run on the same modules eagerly."""
    qs = load_spec_bench(categories=["summarization", "coding", "qa"], per_category=2)
    prompts = chat_token_ids(default_model, [q.text for q in qs])
    passes = [("bs1", prompts[:2], 1, 32), ("bs6", prompts, 6, 32)]
    plain, _ = _run_all(tiny_model, None, passes, enforce_eager=False)
    spec = {"method": "clasp", "skip_layers": 2, "replan_interval": 1, "draft_exit_threshold": 0.0,
            "num_speculative_tokens": 3, "self_check": True, "adaptive": False, "lookup_max": 0}
    clasp, m = _run_all(tiny_model, spec, passes, enforce_eager=False)
    for name, *_ in passes:
        assert plain[name] == clasp[name], name
    assert m["draft_tokens"] >= 2.5 * m["drafts"] > 0, m


def test_disable_by_batch_size_drafts_only_in_smaller_steps(tiny_model, default_model):
    """vLLM 0.32 dropped its own ``disable_by_batch_size``; clasp keeps its meaning. Four copies of
    one short prompt, limit 3: they draft only in the few steps before all four reach the engine
    core (requests arrive one by one) or after the first ones finish, so over 96 tokens the four
    together draft far less than one request alone (without the limit: about four times as much).
    Counted by the drafter itself (read synchronously): vLLM's counters reach its loggers late."""
    from vllm import SamplingParams

    prompt = chat_token_ids(default_model, [load_spec_bench(categories=["coding"], per_category=1)[0].text])[0][:24]
    spec = {"method": "clasp", "skip_layers": 2, "draft_exit_threshold": 0.0, "num_speculative_tokens": 3,
            "adaptive": False, "lookup_max": 0, "disable_by_batch_size": 3}
    llm = _engine(tiny_model, spec, enable_prefix_caching=False)
    try:
        sampling = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
        drafted = lambda: llm.collective_rpc("clasp_stats")[0]["draft_tokens"]  # noqa: E731
        d0 = drafted()
        alone = generate_chunked(llm, [prompt], 1, sampling)
        d1 = drafted()
        four = generate_chunked(llm, [prompt] * 4, 4, sampling)
        d2 = drafted()
    finally:
        shutdown(llm)
    assert d1 - d0 > 60, f"one request alone drafted only {d1 - d0} tokens"
    assert d2 - d1 < (d1 - d0) / 2, f"{d2 - d1} tokens drafted by 4 requests with disable_by_batch_size 3"
    assert four == [alone[0]] * 4
