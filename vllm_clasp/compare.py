"""Run the same prompts through plain vLLM and speculative configs, side by side.

Shared by the demo command, the benchmark and the end-to-end tests: Spec-Bench loading, chat
prompts as token ids (so every method sees identical inputs), one engine per method, and vLLM's
own spec-decode counters read around each run.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

SPEC_BENCH_GROUPS = {
    "writing": "MT-bench",
    "roleplay": "MT-bench",
    "reasoning": "MT-bench",
    "math": "MT-bench",
    "coding": "MT-bench",
    "extraction": "MT-bench",
    "stem": "MT-bench",
    "humanities": "MT-bench",
    "translation": "Translation",
    "summarization": "Summarization",
    "qa": "QA",
    "math_reasoning": "Math",
    "rag": "RAG",
}


def spec_bench_path() -> Path:
    env = os.environ.get("VLLM_CLASP_SPEC_BENCH")
    if env:
        return Path(env)
    return Path(__file__).parent / "data" / "spec_bench" / "question.jsonl"


@dataclass
class Question:
    question_id: int
    category: str
    text: str

    @property
    def group(self) -> str:
        return SPEC_BENCH_GROUPS.get(self.category, self.category)


def load_spec_bench(
    path: str | Path | None = None,
    categories: Iterable[str] | None = None,
    per_category: int | None = None,
    offset: int = 0,
) -> list[Question]:
    """First-turn questions, ``per_category`` from each category (after skipping ``offset``)."""
    rows = read_questions(path or spec_bench_path())
    cats = list(dict.fromkeys(r.category for r in rows))
    if categories is not None:
        wanted = list(categories)
        unknown = [c for c in wanted if c not in cats]
        if unknown:
            raise ValueError(f"unknown Spec-Bench categories {unknown}; known: {cats}")
        cats = wanted
    out = []
    for c in cats:
        qs = [r for r in rows if r.category == c][offset:]
        out += qs[:per_category] if per_category is not None else qs
    return out


def read_questions(path: str | Path) -> list[Question]:
    """Every row of a JSON-lines question file: Spec-Bench's format (``category``, ``turns``, whose
    first turn is the prompt; ``question_id``) or the shorter ``{"category": ..., "prompt": ...}``,
    so that anyone can benchmark on prompts of their own. Bad rows are named by line."""
    out: list[Question] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read question file {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object")
        turns = r.get("turns")
        text = turns[0] if isinstance(turns, list) and turns else r.get("prompt")
        if not isinstance(r.get("category"), str) or not r["category"]:
            raise ValueError(f"{where}: needs a non-empty string 'category'")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: needs 'turns' (a list of strings, the first one the prompt) or 'prompt'")
        qid = r.get("question_id", n)
        out.append(Question(qid if isinstance(qid, int) else n, r["category"], text))
    if not out:
        raise ValueError(f"question file {path} holds no questions")
    return out


def chat_token_ids(model: str, texts: Sequence[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "accepted": "vllm:spec_decode_num_accepted_tokens",
}


_SPEC_PROM_ATTRS = {
    "drafts": "counter_spec_decode_num_drafts",
    "draft_tokens": "counter_spec_decode_num_draft_tokens",
    "accepted": "counter_spec_decode_num_accepted_tokens",
}


_PREFIX_PROM_ATTRS = {
    "prefix_queries": "counter_prefix_cache_queries",
    "prefix_hits": "counter_prefix_cache_hits",
}


def _engine_counters(llm: Any, attrs: dict[str, str], holder: str | None = None) -> dict[str, float] | None:
    """Sums of this engine's own Prometheus counters (``attrs``: our key -> the logger's counter
    attribute, on the logger or on its ``holder`` attribute); None when no logger has them. Read
    from the engine's logger: the global registry (``get_metrics``) holds only the most recently
    started engine's metrics when one process runs several."""
    mgr = getattr(getattr(llm, "llm_engine", None), "logger_manager", None)
    for lg in getattr(mgr, "stat_loggers", []):
        src = lg if holder is None else getattr(lg, holder, None)
        try:
            return {k: sum(float(c._value.get()) for c in getattr(src, a).values()) for k, a in attrs.items()}
        except AttributeError:
            continue
    return None


def prefix_cache_counters(llm: Any) -> dict[str, float]:
    """Prompt tokens looked up in this engine's prefix cache, and found (0s when not kept)."""
    return _engine_counters(llm, _PREFIX_PROM_ATTRS) or {k: 0.0 for k in _PREFIX_PROM_ATTRS}


def _counters(llm: Any) -> dict[str, float]:
    """vLLM's spec-decode counters of this engine (the global registry as a last resort)."""
    vals = _engine_counters(llm, _SPEC_PROM_ATTRS, "spec_decoding_prom")
    if vals is not None:
        return vals
    vals = {k: 0.0 for k in SPEC_COUNTERS}
    for m in llm.get_metrics():
        for k, name in SPEC_COUNTERS.items():
            if m.name == name:
                vals[k] += float(getattr(m, "value", 0) or 0)
    return vals


@dataclass
class RunResult:
    name: str
    outputs: list[list[int]]
    seconds: list[float]
    gen_tokens: list[int]
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.gen_tokens) / max(sum(self.seconds), 1e-9)

    @property
    def tau(self) -> float:
        """Tokens per verification round (bonus included): Spec-Bench's mean accepted tokens."""
        if self.drafts <= 0:
            return 1.0
        # Rounds without drafts are plain steps (1 token); vLLM counts only rounds with drafts.
        return (self.drafts + self.accepted) / self.drafts

    @property
    def acceptance(self) -> float:
        return self.accepted / self.draft_tokens if self.draft_tokens else 0.0


def engine_kwargs(model: str, **overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        model=model,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.5,
        max_model_len=2048,
        disable_log_stats=False,
        seed=0,
    )
    kw.update(overrides)
    return kw


def run_method(
    name: str,
    model: str,
    spec: dict[str, Any] | None,
    prompts: Sequence[list[int]],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = 1,
    engine_overrides: dict[str, Any] | None = None,
    progress: Any = None,
    keep_engine: bool = False,
) -> RunResult:
    """One engine; prompts submitted ``batch_size`` at a time; per-batch wall time."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = engine_kwargs(model, **(engine_overrides or {}))
    kw.setdefault("max_num_seqs", max(batch_size, 1))
    llm = LLM(speculative_config=spec, **kw)
    sp = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0 if temperature > 0 else None)
    # Warm-up outside the timing (first-call allocations, metadata builders).
    llm.generate([TokensPrompt(prompt_token_ids=list(prompts[0]))], SamplingParams(max_tokens=4), use_tqdm=False)
    before = _counters(llm)
    res = RunResult(name, [], [], [])
    for s in range(0, len(prompts), batch_size):
        chunk = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts[s : s + batch_size]]
        t0 = time.perf_counter()
        outs = llm.generate(chunk, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        for o in outs:
            res.outputs.append(list(o.outputs[0].token_ids))
            res.gen_tokens.append(len(o.outputs[0].token_ids))
        res.seconds += [dt * len(o.outputs[0].token_ids) / max(1, sum(len(x.outputs[0].token_ids) for x in outs)) for o in outs]
        if progress is not None:
            progress.update(len(chunk))
    after = _counters(llm)
    for k in SPEC_COUNTERS:
        setattr(res, k, after[k] - before[k])
    if keep_engine:
        res.extra["llm"] = llm
    else:
        shutdown(llm)
    return res


def generate_chunked(llm: Any, prompts: Sequence[list[int]], batch_size: int, sampling: Any) -> list[list[int]]:
    """Token ids of each output, prompts submitted ``batch_size`` at a time."""
    from vllm.inputs import TokensPrompt

    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts[s : s + batch_size]]
        out += [list(o.outputs[0].token_ids) for o in llm.generate(chunk, sampling, use_tqdm=False)]
    return out


def shutdown(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def _draft_step_cost(worker: Any, skip_counts: Sequence[int], reps: int) -> dict[str, float]:
    """Runs in the worker: ms per one-token draft step at each skip count (full head and draft head)."""
    import torch

    from vllm_clasp.drafting import draft_step

    d = worker.model_runner.drafter
    stack, kv = d.stack, d.kv
    L = stack.num_layers
    bt = (torch.arange(16, dtype=torch.int32) + 1).unsqueeze(0)
    tok, pos = torch.tensor([100]), torch.tensor([300])
    ctx = torch.arange(d.head.size, d.head.size + 300) if d.head.enabled else None
    out: dict[str, float] = {"layers": float(L)}
    with torch.inference_mode():
        for m in skip_counts:
            keep = torch.ones(1, L, dtype=torch.bool)
            keep[0, torch.linspace(0, L - 1, m).round().long() if m else []] = False
            for label, head in (("full_head", None), ("draft_head", d.head)):
                for _ in range(3):
                    draft_step(stack, kv, d.vllm_config, tok, pos, bt, keep, head, ctx)
                t0 = time.perf_counter()
                for _ in range(reps):
                    draft_step(stack, kv, d.vllm_config, tok, pos, bt, keep, head, ctx)
                out[f"M={m} {label}"] = 1000 * (time.perf_counter() - t0) / reps
    return out


def measure_draft_step_cost(model: str, skip_counts: Sequence[int], reps: int = 30) -> dict[str, float]:
    """Draft-step cost by layers skipped, measured inside a clasp engine's worker (bs 1)."""
    import functools

    from vllm import LLM, SamplingParams

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    llm = LLM(speculative_config={"method": "clasp"}, **engine_kwargs(model))
    try:
        llm.generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)  # binds the drafter
        return llm.collective_rpc(functools.partial(_draft_step_cost, skip_counts=list(skip_counts), reps=reps))[0]
    finally:
        shutdown(llm)


def _install_plan_recorder(worker: Any) -> int:
    """Runs in the worker: record every skip set the planner returns (for ``plan_report``)."""
    import vllm_clasp.proposer as proposer_mod

    plan = proposer_mod.plan_skip_layers
    if getattr(plan, "__clasp_recorder__", None) is None:
        recorded: list[list[int]] = []

        def recording_plan(*args: Any, **kwargs: Any):
            skipped = plan(*args, **kwargs)
            recorded.append(sorted(int(i) for i in skipped))
            return skipped

        recording_plan.__clasp_recorder__ = recorded  # type: ignore[attr-defined]
        proposer_mod.plan_skip_layers = recording_plan
    return worker.model_runner.drafter.stack.num_layers


def _recorded_plans(worker: Any) -> list[list[int]]:
    import vllm_clasp.proposer as proposer_mod

    return list(getattr(proposer_mod.plan_skip_layers, "__clasp_recorder__", []))


def plan_report(
    model: str, spec: dict[str, Any], prompts: Sequence[list[int]], max_tokens: int, batch_size: int
) -> dict[str, Any]:
    """Run clasp on ``prompts`` (greedy) and return every plan's skip set, the decoder layer
    count and vLLM's spec-decode counters for the run (after a warm-up request)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    llm = LLM(speculative_config=spec, **engine_kwargs(model, max_num_seqs=max(batch_size, 1)))
    try:
        llm.generate([TokensPrompt(prompt_token_ids=list(prompts[0]))], SamplingParams(max_tokens=4), use_tqdm=False)
        num_layers = llm.collective_rpc(_install_plan_recorder)[0]
        before = _counters(llm)
        t0 = time.perf_counter()
        outs = generate_chunked(llm, prompts, batch_size, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        seconds = time.perf_counter() - t0
        after = _counters(llm)
        plans = llm.collective_rpc(_recorded_plans)[0]
    finally:
        shutdown(llm)
    counters = {k: after[k] - before[k] for k in SPEC_COUNTERS}
    return dict(num_layers=num_layers, plans=plans, counters=counters, outputs=outs, seconds=seconds)
