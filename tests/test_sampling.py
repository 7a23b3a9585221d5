"""Sampling with clasp keeps the target's distribution exactly (issue 5).

The statistical tests sample short continuations of one prompt on a tiny random model whose exact
next-token distributions are computed with transformers, and compare counts with a chi-square
test. Two deliberately wrong rules run through the same test and must be caught, so the test can
fail. Requests carry seeds, so each run is reproducible and the test is deterministic on a machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_clasp.patches import expand_per_token

WORKER = Path(__file__).with_name("sampling_worker.py")
DEPTH, TOP_K, N = 4, 3, 2000
ALPHA = 1e-3
# One layer of six skipped: the draft is close to the target, so the wrong rules show.
SPEC = {"method": "clasp", "adaptive": False, "lookup_max": 0, "draft_exit_threshold": 0.0,
        "skip_layers": 1, "num_speculative_tokens": 3}


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's test, cells with expected count < 5 pooled; p from the regularised gamma."""
    big = expected >= 5
    o, e = observed[big], expected[big]
    if (~big).any():
        o, e = np.append(o, observed[~big].sum()), np.append(e, expected[~big].sum())
    stat = float((((o - e) ** 2) / e).sum())
    return float(torch.special.gammaincc(torch.tensor((len(o) - 1) / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_chi_square_p_sane():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    good = np.bincount(rng.choice(4, 4000, p=p), minlength=4)
    bad = np.bincount(rng.choice(4, 4000, p=[0.45, 0.35, 0.15, 0.05]), minlength=4)
    assert chi_square_p(good, p * 4000) > 0.01
    assert chi_square_p(bad, p * 4000) < 1e-4


def test_expand_per_token_matches_vllm_semantics():
    x = torch.tensor([0.5, 0.0, 0.75])
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    assert expand_per_token(x, cu, 6, 0, 1).tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 0.75]
    k = torch.tensor([3, 0], dtype=torch.int32)
    assert expand_per_token(k, torch.tensor([0, 2]), 2).tolist() == [0, 0]


def test_draft_distribution_follows_temperature_top_k_top_p():
    from types import SimpleNamespace

    from vllm_clasp.proposer import _SamplingRows

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0]])
    sps = {0: SimpleNamespace(temperature=2.0, top_k=None, top_p=None, seed=None),
           1: SimpleNamespace(temperature=1.0, top_k=2, top_p=None, seed=None),
           2: SimpleNamespace(temperature=1.0, top_k=None, top_p=0.7, seed=3)}
    rows = _SamplingRows(sps, np.array([5, 5, 5]), 4, ["a", "b", "c"], True)
    q = rows.draft_distributions([0, 1, 2], logits)
    torch.testing.assert_close(q[0], torch.softmax(logits[0] / 2, 0))
    torch.testing.assert_close(q[1], torch.tensor([0.7311, 0.2689, 0.0, 0.0]), atol=1e-4, rtol=0)
    full = torch.softmax(logits[2], 0)  # 0.64, 0.24, ...: top-p 0.7 keeps two tokens
    torch.testing.assert_close(q[2], torch.cat([full[:2] / full[:2].sum(), torch.zeros(2)]))
    # Seeded rows draw the same drafts every time.
    a = rows.sample([2, 2], [0, 1], q[[2, 2]])
    b = rows.sample([2, 2], [0, 1], q[[2, 2]])
    assert a.tolist() == b.tolist()


def test_a_sampled_rows_draft_vocabulary_leaves_out_other_rows_context_tokens():
    from vllm_clasp.drafting import foreign_context_columns

    # Draft head: 8 static columns, then the union of the drafting rows' context tokens >= 8.
    union = np.array([10, 12, 15, 20])
    assert foreign_context_columns(union, np.array([3, 12, 20, 12]), 8).tolist() == [8, 10]
    assert foreign_context_columns(union, union, 8).tolist() == []


def _exact(model: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(WORKER.parent))
    from sampling_worker import PROMPT

    m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    out: dict[str, float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == DEPTH:
            out[" ".join(map(str, prefix))] = prob
            return
        with torch.no_grad():
            logits = m(torch.tensor([PROMPT + prefix])).logits[0, -1].double()
        v, ix = torch.topk(logits, TOP_K)
        for t, pt in zip(ix.tolist(), torch.softmax(v, 0).tolist()):
            walk(prefix + [t], prob * pt)

    walk([], 1.0)
    return out


def _sample(model: str, mode: str, spec: dict = SPEC, n: int = N, depth: int = DEPTH, seeded: bool = True) -> dict:
    env = dict(os.environ, SAMPLING_WORKER_SEEDED="1" if seeded else "0")
    r = subprocess.run(
        [sys.executable, str(WORKER), model, mode, str(n), str(depth), str(TOP_K), json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def exact(tiny_model):
    return _exact(tiny_model)


def _p_value(exact: dict[str, float], counts: dict[str, int]) -> float:
    keys = sorted(exact)
    outside = sum(v for k, v in counts.items() if k not in exact)
    assert outside == 0, f"{outside} samples outside the top-{TOP_K} support"
    obs = np.array([counts.get(k, 0) for k in keys], float)
    return chi_square_p(obs, np.array([exact[k] for k in keys]) * N)


@pytest.mark.slow
def test_clasp_samples_follow_the_exact_target_distribution(tiny_model, exact):
    res = _sample(tiny_model, "clasp")
    spec = res["spec"]
    assert spec["draft_tokens"] > N, spec  # the speculative path was exercised
    assert 0 < spec["accepted"] < spec["draft_tokens"], spec  # with acceptances and rejections
    p = _p_value(exact, res["counts"])
    print(f"clasp: chi-square p = {p:.3g}, counters {spec}")
    assert p > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["wrong_flat", "wrong_residual"])
def test_wrong_rules_are_caught(tiny_model, exact, rule):
    p = _p_value(exact, _sample(tiny_model, rule)["counts"])
    print(f"{rule}: chi-square p = {p:.3g}")
    assert p < ALPHA


def two_sample_p(a: dict[str, int], b: dict[str, int]) -> float:
    """Chi-square test of homogeneity of two count tables (cells with expected < 5 pooled)."""
    keys = sorted(set(a) | set(b))
    o = np.array([[a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]], float)
    e = o.sum(1, keepdims=True) * o.sum(0, keepdims=True) / o.sum()
    big = e.min(0) >= 5
    if (~big).any():
        o = np.concatenate([o[:, big], o[:, ~big].sum(1, keepdims=True)], 1)
        e = np.concatenate([e[:, big], e[:, ~big].sum(1, keepdims=True)], 1)
    stat = float((((o - e) ** 2) / e).sum())
    df = o.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.slow
def test_default_model_default_options_match_plain_token_statistics(default_model):
    """Default clasp options (adaptive governor, context drafts, layer-skip drafts from q), no
    seeds: the joint distribution of the first three sampled tokens matches plain vLLM's."""
    n = 1500
    plain = _sample(default_model, "plain", {}, n=n, depth=3, seeded=False)
    clasp = _sample(default_model, "clasp", {"method": "clasp"}, n=n, depth=3, seeded=False)
    assert clasp["spec"]["draft_tokens"] > 0, clasp["spec"]
    p = two_sample_p(plain["counts"], clasp["counts"])
    print(f"default model, plain vs clasp first 3 tokens: p = {p:.3g}, clasp counters {clasp['spec']}")
    assert p > ALPHA


@pytest.mark.slow
def test_mixed_greedy_and_seeded_requests(default_model):
    """Greedy and seeded sampled requests in one batch: greedy ones equal plain vLLM's, sampled
    ones repeat exactly when the run is repeated, and when run without the greedy ones: nothing a
    seeded request drafts may hang on its neighbours (CI, session 22: one did not reproduce)."""
    from vllm import LLM, SamplingParams

    from vllm_clasp.compare import chat_token_ids, engine_kwargs, load_spec_bench, shutdown

    qs = load_spec_bench(per_category=1)[:8]
    prompts = [{"prompt_token_ids": p} for p in chat_token_ids(default_model, [q.text for q in qs])]
    params = [
        SamplingParams(temperature=0.0, max_tokens=48) if i % 2 == 0
        else SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=100 + i, max_tokens=48)
        for i in range(len(prompts))
    ]
    kw = engine_kwargs(default_model, max_num_seqs=8, enable_prefix_caching=False)
    llm = LLM(**kw)
    try:
        plain = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        shutdown(llm)
    llm = LLM(speculative_config={"method": "clasp"}, **kw)
    try:
        runs = [[list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)] for _ in range(2)]
        # The seeded ones by themselves: other requests no longer draft beside them.
        odd = list(range(1, len(prompts), 2))
        alone = [list(o.outputs[0].token_ids)
                 for o in llm.generate([prompts[i] for i in odd], [params[i] for i in odd], use_tqdm=False)]
    finally:
        shutdown(llm)
    for i in range(0, len(prompts), 2):
        assert runs[0][i] == plain[i] == runs[1][i], f"greedy request {i} differs from plain vLLM"
    for a, i in enumerate(odd):
        assert runs[0][i] == runs[1][i] == alone[a], f"seeded request {i} did not reproduce"
