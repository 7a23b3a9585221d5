"""``vllm-clasp bench``: Spec-Bench, plain vLLM against speculative methods, in one run.

Every method gets its own engine and all engines stay up for the whole run, so that the prompts
can be interleaved: each chunk of ``batch_size`` prompts of one Spec-Bench group runs through every
method in turn (who goes first shifts by one from chunk to chunk and from repeat to repeat), and a
repeat does it all again. A slow moment on a shared machine then hits all methods alike, and the
repeats show the spread. An untimed pass over every chunk comes first (``--no-warmup`` leaves it out): the first run of a
prompt batch pays one-off costs (new kernel shapes, KV-cache growth) that fall on whichever method
met it first, and with it every timed repeat finds the prompts in vLLM's prefix cache alike. On
CPU an untimed engine is made before the timed ones: the first engine made in a process ran
4-18 % slower than the rest all run long (five runs on one host, always plain's, flattering every
method against it); with the untimed one first, plain and a second plain engine ran level.

Metrics follow Spec-Bench (its SOURCE.md): speedup = mean tokens/s of a method / that of plain
vLLM over the same questions; τ = tokens committed per decoding step, bonus included
(``tokens / (tokens - accepted)``, with vLLM's own accepted-token counter); draft acceptance =
accepted / drafted tokens. For clasp the worker's own counters add layers skipped, plans, and the
time spent drafting and planning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vllm_clasp.compare import (
    SPEC_COUNTERS,
    Question,
    _counters,
    prefix_cache_counters,
    chat_token_ids,
    engine_kwargs,
    load_spec_bench,
    read_questions,
    shutdown,
)

GROUPS = ("MT-bench", "Translation", "Summarization", "QA", "Math", "RAG")
NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
"""vLLM's ngram method as its documentation shows it."""
CONTROL = "plain-2"
"""A second plain engine (``--control``): what its ratios to ``plain`` show is the run's own noise,
engine to engine and moment to moment, for a method that changes nothing."""


@dataclass
class Method:
    name: str
    spec: dict[str, Any] | None

    @property
    def is_clasp(self) -> bool:
        return bool(self.spec) and self.spec.get("method") == "clasp"


@dataclass
class Chunk:
    """One chunk of prompts through one method: what the engine reported around it."""

    method: str
    repeat: int
    group: str
    prompt_ids: list[int]
    seconds: float
    tokens: int
    outputs: list[list[int]]
    counters: dict[str, float]
    clasp: dict[str, float] = field(default_factory=dict)


def questions_by_group(per_group: int, groups: Sequence[str] | None = None, offset: int = 0,
                       path: str | Path | None = None) -> list[Question]:
    """``per_group`` questions from each group; a group of several categories (MT-bench's eight)
    takes them in turn. ``path``: a question file of one's own instead of Spec-Bench
    (:func:`~vllm_clasp.compare.read_questions`), its categories grouped as Spec-Bench's are."""
    rows = read_questions(path) if path is not None else load_spec_bench()
    known = list(dict.fromkeys(q.group for q in rows)) if path is not None else list(GROUPS)
    wanted = list(groups or known)
    unknown = [g for g in wanted if g not in known]
    if unknown:
        what = f"groups in {path}" if path is not None else "Spec-Bench groups"
        raise ValueError(f"unknown {what} {unknown}; known: {known}")
    out: list[Question] = []
    for g in wanted:
        cats = list(dict.fromkeys(q.category for q in rows if q.group == g))
        per_cat = {c: [q for q in rows if q.category == c] for c in cats}
        picked: list[Question] = []
        i = offset
        while len(picked) < per_group and any(i < len(v) for v in per_cat.values()):
            for c in cats:
                if i < len(per_cat[c]) and len(picked) < per_group:
                    picked.append(per_cat[c][i])
            i += 1
        if not picked:  # a group silently left out would change what "Overall" means
            raise ValueError(f"no {g} questions left after --offset {offset} (its categories hold "
                             f"{', '.join(str(len(v)) for v in per_cat.values())})")
        out += picked
    return out


def _clasp_counters(worker: Any) -> dict[str, float]:
    """Runs in the worker: the clasp proposer's counters since start."""
    d = getattr(worker.model_runner, "drafter", None)
    stats = getattr(d, "stats", None)
    if stats is None:
        return {}
    out = {k: float(v) for k, v in dataclasses.asdict(stats).items() if isinstance(v, (int, float))}
    out["num_layers"] = float(d.stack.num_layers) if d.stack is not None else 0.0
    out["num_skip"] = float(d.num_skip)
    return out


_GAUGES = ("num_layers", "num_skip")


def _diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] if k in _GAUGES else b[k] - a.get(k, 0.0) for k in b}


UNTIMED_ENGINE = "untimed-engine"
"""The group of the chunk that records an untimed first engine (``Engines.untimed``)."""


class Engines:
    """All methods' engines, up at once."""

    def __init__(self, model: str, methods: Sequence[Method], batch_size: int, max_model_len: int, dtype: str,
                 kv_cache_gib: int = 2, compiled: bool = False, untimed_first: bool = True):
        from vllm import LLM

        from vllm.platforms import current_platform

        if current_platform.is_cpu():  # several engines in one process: each a modest KV cache
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        # collective_rpc with a function (the clasp counters) needs pickling in the engine.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        self.methods = list(methods)
        self.llms: dict[str, Any] = {}
        self.untimed: Any = None
        try:
            kw = engine_kwargs(model, max_num_seqs=max(batch_size, 1), max_model_len=max_model_len, dtype=dtype,
                               enforce_eager=not compiled)
            if untimed_first and current_platform.is_cpu():
                # The first engine made takes the slow place (module docstring); a small KV cache.
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
                self.untimed = LLM(**kw)
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
            for m in self.methods:
                self.llms[m.name] = LLM(speculative_config=m.spec, **kw)
        except BaseException:
            self.close()
            raise

    def clasp_counters(self, m: Method) -> dict[str, float]:
        if not m.is_clasp:
            return {}
        return self.llms[m.name].collective_rpc(_clasp_counters)[0]

    def close(self) -> None:
        for llm in [*self.llms.values(), *([self.untimed] if self.untimed is not None else [])]:
            shutdown(llm)
        self.llms.clear()
        self.untimed = None


def chunk_plan(questions: Sequence[Question], chunk_size: int) -> list[tuple[str, list[int]]]:
    """Question indices per ``generate`` call: each group in turn, ``chunk_size`` at a time."""
    plan = []
    for g in dict.fromkeys(q.group for q in questions):
        idx = [i for i, q in enumerate(questions) if q.group == g]
        plan += [(g, idx[s : s + chunk_size]) for s in range(0, len(idx), chunk_size)]
    return plan


def run_chunk(engines: Engines, m: Method, prompts: list[list[int]], sampling: Any) -> tuple[float, list[list[int]], dict, dict]:
    from vllm.inputs import TokensPrompt

    llm = engines.llms[m.name]
    c0, s0 = {**_counters(llm), **prefix_cache_counters(llm)}, engines.clasp_counters(m)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
    dt = time.perf_counter() - t0
    c1, s1 = {**_counters(llm), **prefix_cache_counters(llm)}, engines.clasp_counters(m)
    return dt, [list(o.outputs[0].token_ids) for o in outs], _diff(c0, c1), _diff(s0, s1)


def run_bench(
    model: str,
    methods: Sequence[Method],
    questions: Sequence[Question],
    *,
    max_tokens: int,
    batch_size: int,
    temperature: float,
    repeats: int,
    dtype: str = "float32",
    max_model_len: int = 2048,
    progress: bool = True,
    warmup: bool = True,
    chunk_size: int | None = None,
    compiled: bool = False,
    untimed_first: bool = True,
) -> list[Chunk]:
    """``chunk_size`` prompts go to one ``generate`` call (default: ``batch_size``); with more than
    ``batch_size`` of them the rest wait for a slot, as on a busy server. ``compiled``: every engine
    with vLLM's default torch.compile (``enforce_eager`` off), as users run it; the default here
    is eager, which starts in seconds instead of minutes."""
    from vllm import SamplingParams

    prompts = chat_token_ids(model, [q.text for q in questions])
    sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=None)
    engines = Engines(model, methods, batch_size, max_model_len, dtype, compiled=compiled, untimed_first=untimed_first)
    chunks: list[Chunk] = []
    if engines.untimed is not None:
        chunks.append(Chunk("untimed", -1, UNTIMED_ENGINE, [], 0.0, 0, [], {}))
    try:
        for m in methods:  # warm-up outside the timing
            run_chunk(engines, m, prompts[:1], SamplingParams(max_tokens=8))
        plan = chunk_plan(questions, chunk_size or batch_size)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=(repeats + warmup) * len(plan) * len(methods), desc="bench", unit="chunk")
        for r in range(-1 if warmup else 0, repeats):  # -1: the untimed pass
            for ci, (g, idx) in enumerate(plan):
                # Who goes first shifts by chunk and by repeat: with a running count it stayed the
                # same for a chunk in every repeat whenever len(plan) was a multiple of the
                # number of methods, so a first-in-line penalty fell on one method per group.
                turn = (ci + r) % len(methods)
                order = methods[turn:] + methods[:turn]
                for m in order:
                    dt, outs, ctr, cl = run_chunk(engines, m, [prompts[i] for i in idx], sampling)
                    if r >= 0:
                        chunks.append(Chunk(m.name, r, g, idx, dt, sum(map(len, outs)), outs, ctr, cl))
                    if bar is not None:
                        bar.set_postfix_str(f"repeat {r + 1}/{repeats} {g} {m.name}" if r >= 0 else f"warm-up {g} {m.name}")
                        bar.update(1)
        if bar is not None:
            bar.close()
        for m in methods:
            if m.is_clasp:
                chunks.append(Chunk(m.name, -1, "draft-cost", [], 0.0, 0, [], {}, _draft_cost(engines.llms[m.name])))
    finally:
        engines.close()
    return chunks


def _draft_cost_in_worker(worker: Any, reps: int) -> dict[str, float]:
    from vllm_clasp.compare import _draft_step_cost

    d = worker.model_runner.drafter
    res = _draft_step_cost(worker, [0, d.num_skip], reps)
    return {
        "full_step_ms": res["M=0 full_head"],
        "draft_step_ms": res[f"M={d.num_skip} draft_head"],
    }


def _draft_cost(llm: Any, reps: int = 20) -> dict[str, float]:
    return llm.collective_rpc(functools.partial(_draft_cost_in_worker, reps=reps))[0]


# Aggregation ------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
        2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04)
"""Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (1.96 beyond)."""


def paired_interval(ratios: Sequence[float]) -> tuple[float, float, float] | None:
    """Geometric mean of chunk-paired ratios (a method and plain on the same prompts, run next to
    each other) and its 95 % t-interval: a shared machine's slow moments hit both sides of a
    pair, so the pairs' spread is the noise a verdict has to beat. None with fewer than 2 pairs."""
    import math

    logs = [math.log(r) for r in ratios if r > 0]
    n = len(logs)
    if n < 2:
        return None
    m = sum(logs) / n
    sd = (sum((x - m) ** 2 for x in logs) / (n - 1)) ** 0.5
    h = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / n**0.5
    return math.exp(m), math.exp(m - h), math.exp(m + h)


def verdict(ci: Sequence[float] | None) -> str:
    """'faster' / 'slower' when the whole 95 % interval lies above / below plain, else '='."""
    if not ci:
        return "?"
    return "faster" if ci[1] > 1.0 else "slower" if ci[2] < 1.0 else "="


def summarize(chunks: Sequence[Chunk], methods: Sequence[Method], baseline: str = "plain",
              greedy: bool = True) -> dict[str, Any]:
    """Per method and group (and Overall): tokens/s, speedup (mean and range over repeats), τ,
    acceptance, identical share (greedy runs only), and clasp's own counters."""
    runs = [c for c in chunks if c.repeat >= 0]
    repeats = sorted({c.repeat for c in runs})
    groups = list(dict.fromkeys(c.group for c in runs)) + ["Overall"]
    base_out = {(c.repeat, tuple(c.prompt_ids)): c.outputs for c in runs if c.method == baseline}
    base_tps = {(c.repeat, tuple(c.prompt_ids)): c.tokens / c.seconds for c in runs if c.method == baseline}
    table: dict[str, dict[str, Any]] = {}
    for m in methods:
        table[m.name] = {}
        for g in groups:
            sel = [c for c in runs if c.method == m.name and (g == "Overall" or c.group == g)]
            if not sel:
                continue
            # Spec-Bench: mean over questions of tokens/s; a chunk's questions share its time.
            tps_by_rep = {r: _mean([c.tokens / c.seconds for c in sel if c.repeat == r]) for r in repeats}
            tokens = sum(c.tokens for c in sel)
            ctr = {k: sum(c.counters.get(k, 0.0) for c in sel) for k in SPEC_COUNTERS}
            row: dict[str, Any] = {
                "tokens_per_s": _mean(list(tps_by_rep.values())),
                "tokens_per_s_by_repeat": [tps_by_rep[r] for r in repeats],
                "tokens": tokens,
                "seconds": sum(c.seconds for c in sel),
                "tau": tokens / max(tokens - ctr["accepted"], 1),
                "acceptance": ctr["accepted"] / ctr["draft_tokens"] if ctr["draft_tokens"] else None,
                **{f"vllm_{k}": v for k, v in ctr.items()},
            }
            if baseline in table and g in table[baseline]:
                b = table[baseline][g]["tokens_per_s_by_repeat"]
                sp = [x / y for x, y in zip(row["tokens_per_s_by_repeat"], b)]
                row.update(speedup=_mean(sp), speedup_min=min(sp), speedup_max=max(sp))
                pairs = [c.tokens / c.seconds / base_tps[k] for c in sel
                         if (k := (c.repeat, tuple(c.prompt_ids))) in base_tps and c.seconds > 0]
                row.update(paired=paired_interval(pairs), pairs=len(pairs))
                same = total = 0
                for c in sel:
                    ref = base_out.get((c.repeat, tuple(c.prompt_ids)))
                    if ref is not None:
                        same += sum(a == b for a, b in zip(c.outputs, ref))
                        total += len(c.outputs)
                row["identical"] = same / total if total and greedy else None
            if m.is_clasp:
                row["clasp"] = _clasp_summary(sel, tokens, row["seconds"])
            table[m.name][g] = row
    cost = {c.method: c.clasp for c in chunks if c.group == "draft-cost"}
    for name, cst in cost.items():
        if cst:
            table[name]["Overall"].setdefault("clasp", {})["draft_step_rel"] = cst["draft_step_ms"] / cst["full_step_ms"]
            table[name]["Overall"]["clasp"].update(cst)
    return {"groups": groups, "repeats": len(repeats), "table": table}


def _clasp_summary(sel: Sequence[Chunk], tokens: int, seconds: float) -> dict[str, float]:
    s: dict[str, float] = {}
    for c in sel:
        for k, v in c.clasp.items():
            s[k] = v if k in _GAUGES else s.get(k, 0.0) + v
    L = s.get("num_layers", 0.0)
    rows = s.get("draft_rows", 0.0)
    return {
        "layers_skipped": (L - s.get("layers_run", 0.0) / rows) if rows else 0.0,
        "layers": L,
        "plans_per_100_tokens": 100.0 * s.get("plans", 0.0) / max(tokens, 1),
        "draft_share": s.get("draft_s", 0.0) / seconds if seconds else 0.0,
        "plan_share": s.get("plan_s", 0.0) / seconds if seconds else 0.0,
        "verify_share": max(0.0, 1.0 - (s.get("draft_s", 0.0) + s.get("plan_s", 0.0)) / seconds) if seconds else 0.0,
        "context_draft_share": s.get("lookup_rounds", 0.0) / max(s.get("rounds", 0.0), 1.0),
    }


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(summary: dict[str, Any], header: str) -> str:
    t, groups = summary["table"], summary["groups"]
    lines = [header, ""]
    def table(title: str, cell) -> list[str]:
        out = [title, "", "| method | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, rows in t.items():
            out.append(f"| {name} | " + " | ".join("-" if rows.get(g) is None else cell(rows[g]) for g in groups) + " |")
        return out + [""]

    lines += table(
        "Speedup over plain vLLM (mean of repeats, range in brackets):",
        lambda r: f"{r['speedup']:.2f} [{r['speedup_min']:.2f}–{r['speedup_max']:.2f}]" if "speedup" in r else "-",
    )
    lines += table(
        "Chunk by chunk (each chunk's prompts through a method and through plain, next to each other): "
        "geometric mean of the ratios, its 95 % interval, and the verdict (faster / slower: the whole "
        "interval above / below 1; =: not told apart from plain at this run's noise):",
        lambda r: (f"{r['paired'][0]:.2f} [{r['paired'][1]:.2f}–{r['paired'][2]:.2f}] {verdict(r['paired'])}"
                   if r.get("paired") else "-"),
    )
    lines += table(
        "Tokens/s, τ (tokens per step) and draft acceptance:",
        lambda r: f"{r['tokens_per_s']:.1f} tok/s, τ {r['tau']:.2f}, acc {_fmt(r['acceptance'])}",
    )
    if CONTROL in t:
        lines += [f"{CONTROL} is a second plain engine, interleaved like the others: its ratios are this run's "
                  "noise floor (engine to engine, moment to moment).", ""]
    ident = [(n, rows["Overall"].get("identical")) for n, rows in t.items() if rows.get("Overall", {}).get("identical") is not None]
    if ident:
        lines += ["Outputs token-identical to plain vLLM: " + ", ".join(f"{n} {100 * v:.0f} %" for n, v in ident)]
    for name, rows in t.items():
        c = rows.get("Overall", {}).get("clasp")
        if not c:
            continue
        lines += ["", f"{name}: mean layers skipped {c['layers_skipped']:.1f} of {c['layers']:.0f}, "
                  f"plans per 100 tokens {c['plans_per_100_tokens']:.2f}, time shares: drafting "
                  f"{100 * c['draft_share']:.1f} %, planning {100 * c['plan_share']:.1f} %, verification and "
                  f"the rest {100 * c['verify_share']:.1f} %; context drafts in "
                  f"{100 * c['context_draft_share']:.0f} % of sequence-rounds"
                  + (f"; one draft step costs {c['draft_step_rel']:.2f} of a full step "
                     f"({c['draft_step_ms']:.1f} / {c['full_step_ms']:.1f} ms, bs 1)" if "draft_step_rel" in c else "")]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, groups = summary["table"], summary["groups"]
    names = [n for n in t if any("speedup" in r for r in t[n].values())]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    w = 0.8 / max(len(names), 1)
    for k, n in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * w for i in range(len(groups))]
        sp = [t[n].get(g, {}).get("speedup", float("nan")) for g in groups]
        lo = [s - t[n].get(g, {}).get("speedup_min", s) for s, g in zip(sp, groups)]
        hi = [t[n].get(g, {}).get("speedup_max", s) - s for s, g in zip(sp, groups)]
        axes[0].bar(xs, sp, w, yerr=[lo, hi], capsize=2, label=n)
        axes[1].bar(xs, [t[n].get(g, {}).get("tau", float("nan")) for g in groups], w, label=n)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("speedup over plain vLLM (range over repeats)")
    axes[1].set_ylabel("τ: tokens per decoding step")
    for ax in axes:
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Sweep ------------------------------------------------------------------------------------------


def run_sweep(
    model: str,
    base: dict[str, Any],
    skips: Sequence[float],
    ks: Sequence[int],
    questions: Sequence[Question],
    *,
    max_tokens: int,
    batch_size: int,
    temperature: float,
    dtype: str = "float32",
    progress: bool = True,
    chunk_size: int | None = None,
    compiled: bool = False,
) -> list[dict[str, Any]]:
    """Each (skip_layers, K) cell: a clasp engine beside a plain one, the prompts interleaved."""
    cells = []
    total = len(skips) * len(ks)
    for n, (s, k) in enumerate((s, k) for s in skips for k in ks):
        spec = {**base, "method": "clasp", "skip_layers": s, "num_speculative_tokens": k}
        methods = [Method("plain", None), Method("clasp", spec)]
        if progress:
            print(f"sweep cell {n + 1}/{total}: skip_layers={s}, K={k}", flush=True)
        chunks = run_bench(model, methods, questions, max_tokens=max_tokens, batch_size=batch_size,
                           temperature=temperature, repeats=1, dtype=dtype, progress=progress,
                           chunk_size=chunk_size, compiled=compiled)
        row = summarize(chunks, methods, greedy=temperature == 0)["table"]["clasp"]["Overall"]
        cells.append({"skip_layers": s, "k": k, "speedup": row["speedup"], "tau": row["tau"],
                      "acceptance": row["acceptance"], "identical": row.get("identical")})
    return cells


def plot_sweep(cells: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skips = sorted({c["skip_layers"] for c in cells})
    ks = sorted({c["k"] for c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "speedup", "speedup over plain"), (axes[1], "tau", "τ (tokens per step)")):
        grid = [[next((c[key] for c in cells if c["skip_layers"] == s and c["k"] == k), float("nan")) for k in ks] for s in skips]
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels(ks)
        ax.set_yticks(range(len(skips)))
        ax.set_yticklabels(skips)
        ax.set_xlabel("K (num_speculative_tokens)")
        ax.set_ylabel("skip_layers")
        ax.set_title(label)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Command ----------------------------------------------------------------------------------------


def parse_methods(names: str, extra: Sequence[str], clasp_config: dict[str, Any]) -> list[Method]:
    known = {"plain": None, "ngram": NGRAM, "clasp": {"method": "clasp", **clasp_config}}
    methods = []
    for n in [x.strip() for x in names.split(",") if x.strip()]:
        if n not in known:
            raise ValueError(f"--methods: unknown method {n!r}; known: {', '.join(known)} (others via --spec)")
        methods.append(Method(n, known[n]))
    for s in extra:
        name, sep, js = s.partition("=")
        if not sep:
            raise ValueError(f"--spec must be NAME=JSON (a vLLM speculative_config), got {s!r}")
        try:
            spec = json.loads(js)
        except json.JSONDecodeError as e:
            raise ValueError(f"--spec {name}: not valid JSON ({e})") from None
        if not isinstance(spec, dict) or "method" not in spec:
            raise ValueError(f"--spec {name}: a JSON object with a 'method' key is needed")
        methods.append(Method(name, spec))
    from vllm_clasp.config import parse_clasp_config

    for m in methods:
        if m.is_clasp:
            parse_clasp_config(m.spec)  # bad options fail here, before any engine starts
    names_seen = [m.name for m in methods]
    if len(set(names_seen)) != len(names_seen):
        raise ValueError(f"method names must differ: {names_seen}")
    if "plain" not in names_seen:
        methods.insert(0, Method("plain", None))  # speedups need the baseline
    return methods


def cpu_isa(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The widest vector unit, as ' (AVX-512)', for the setting line: it sets what a verified token
    costs on a CPU (a bs-1 step of the default model: ~30 ms with AVX-512, ~55 ms with AVX2)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in open(cpuinfo) if ln.startswith("flags")), [])
    except OSError:
        return ""
    for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            return f" ({name})"
    return ""


def add_arguments(p: Any) -> None:
    p.add_argument("--model", default=None,
                   help="model path, or an embedded model: default (SmolLM2-135M-Instruct) or gemma3 (Gemma 3 270M)")
    p.add_argument("--methods", default="plain,ngram,clasp", help="comma-separated from plain, ngram, clasp")
    p.add_argument("--spec", action="append", default=[], metavar="NAME=JSON",
                   help="an extra method: any vLLM speculative_config, e.g. 'ngram3={\"method\":\"ngram\",...}'")
    p.add_argument("--clasp-config", default="{}", help="clasp options for the 'clasp' method, JSON")
    p.add_argument("--questions", default=None, metavar="FILE",
                   help="prompts of your own instead of Spec-Bench: JSON lines, each "
                        "{\"category\": ..., \"prompt\": ...} or Spec-Bench's {\"category\": ..., \"turns\": [...]}")
    p.add_argument("--groups", default=None,
                   help=f"groups, comma-separated (default: all; Spec-Bench's: {','.join(GROUPS)})")
    p.add_argument("--per-group", type=int, default=4, help="questions per group (MT-bench: its 8 categories in turn)")
    p.add_argument("--offset", type=int, default=0, help="skip this many questions per category first")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=1, help="the engine's max_num_seqs")
    p.add_argument("--queue", type=int, default=None, metavar="N",
                   help="prompts per generate call (default: the batch size); more than the batch "
                        "size and the rest wait for a slot, as on a busy server")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (the spread in the tables)")
    p.add_argument("--no-warmup", action="store_true", help="leave out the untimed first pass over every chunk")
    p.add_argument("--no-untimed-engine", action="store_true",
                   help="on CPU, do not make the untimed first engine (saves ~2.5 GB; the first engine "
                        "made, plain's, then tends to run slow all run long)")
    p.add_argument("--compile", action="store_true",
                   help="run every engine with torch.compile (enforce_eager off, vLLM's default; "
                        "each engine then takes a minute or more to start); default: eager")
    p.add_argument("--control", action="store_true",
                   help=f"add {CONTROL!r}, a second plain engine: its ratios to plain are this run's noise floor")
    p.add_argument("--out", default=None, help="output folder (default: bench-results/<time>)")
    p.add_argument("--sweep-skip", default=None, help="sweep mode: skip_layers values, e.g. 0.2,0.3,0.4,0.5")
    p.add_argument("--sweep-k", default="2,3,4,5", help="sweep mode: K values")
    p.add_argument("--no-progress", action="store_true")


def main(args: Any) -> int:
    from vllm_clasp.config import parse_clasp_config

    for name in ("per_group", "max_tokens", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.offset < 0:
        raise SystemExit(f"--offset must be >= 0, got {args.offset}")
    if args.queue is not None and args.queue < args.batch_size:
        raise SystemExit(f"--queue must be >= --batch-size ({args.batch_size}), got {args.queue}")
    if args.temperature < 0:
        raise SystemExit(f"--temperature must be >= 0, got {args.temperature}")
    try:
        clasp_config = json.loads(args.clasp_config)
        methods = parse_methods(args.methods, args.spec, clasp_config)
        if args.control:
            if CONTROL in {m.name for m in methods}:
                raise ValueError(f"--control adds a method named {CONTROL!r}; another method has that name")
            methods.insert(1, Method(CONTROL, None))
        groups = [g.strip() for g in (args.groups or "").split(",") if g.strip()] or None
        questions = questions_by_group(args.per_group, groups, args.offset, args.questions)
    except (ValueError, json.JSONDecodeError) as e:
        raise SystemExit(f"vllm-clasp bench: {e}") from None
    from vllm_clasp.models import MODELS

    model = str(MODELS[args.model or "default"]()) if (args.model or "default") in MODELS else args.model
    out = Path(args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    import platform

    source = f"questions from {Path(args.questions).name}" if args.questions else "Spec-Bench questions"
    setting = (f"{Path(model).name}, {args.dtype}, {len(questions)} {source} "
               f"({args.per_group} per group), {args.max_tokens} new tokens, batch size {args.batch_size}, "
               + (f"{args.queue} prompts per call (the rest queue), " if args.queue else "")
               + f"temperature {args.temperature}, "
               + ("torch.compile" if args.compile else "eager") + f", {platform.machine()} CPU x{os.cpu_count()}{cpu_isa()}")
    if args.sweep_skip:
        try:  # skip_layers: a count ("12") or a fraction ("0.4")
            skips = [int(x) if x.strip().isdigit() else float(x) for x in args.sweep_skip.split(",")]
            ks = [int(x) for x in args.sweep_k.split(",")]
            for s in skips:
                parse_clasp_config({**clasp_config, "method": "clasp", "skip_layers": s})
        except ValueError as e:
            raise SystemExit(f"vllm-clasp bench: --sweep-skip/--sweep-k: {e}") from None
        cells = run_sweep(model, clasp_config, skips, ks, questions, max_tokens=args.max_tokens,
                          batch_size=args.batch_size, temperature=args.temperature, dtype=args.dtype,
                          progress=not args.no_progress, chunk_size=args.queue, compiled=args.compile)
        (out / "sweep.json").write_text(json.dumps({"setting": setting, "cells": cells}, indent=1))
        plot_sweep(cells, out / "sweep.png", f"clasp sweep — {setting}")
        print(f"\n| skip_layers | K | speedup | τ | acceptance |\n|---|---|---|---|---|")
        for c in cells:
            print(f"| {c['skip_layers']} | {c['k']} | {c['speedup']:.2f} | {c['tau']:.2f} | {_fmt(c['acceptance'])} |")
        print(f"\nwrote {out / 'sweep.json'}, {out / 'sweep.png'}")
        return 0
    chunks = run_bench(model, methods, questions, max_tokens=args.max_tokens, batch_size=args.batch_size,
                       temperature=args.temperature, repeats=args.repeats, dtype=args.dtype,
                       progress=not args.no_progress, warmup=not args.no_warmup, chunk_size=args.queue,
                       compiled=args.compile, untimed_first=not args.no_untimed_engine)
    summary = summarize(chunks, methods, greedy=args.temperature == 0)
    summary.update(setting=setting, methods={m.name: m.spec for m in methods},
                   untimed_first_engine=any(c.group == UNTIMED_ENGINE for c in chunks))
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "chunks.json").write_text(json.dumps([dataclasses.asdict(c) for c in chunks]))
    md = markdown(summary, ("" if args.questions else "Spec-Bench: ") + f"{setting}; {args.repeats} interleaved repeats"
                  + (" after an untimed pass" if not args.no_warmup else " (no warm-up pass)")
                  + ("; an untimed engine made first." if summary["untimed_first_engine"] else "."))
    (out / "results.md").write_text(md)
    plot(summary, out / "speedup.png", setting)
    print("\n" + md)
    print(f"wrote {out}/results.md, results.json, chunks.json, speedup.png")
    return 0
