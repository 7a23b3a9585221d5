"""``vllm-clasp breakdown``: where the time of decoding goes, per committed token, plain vLLM
against CLaSp as published and CLaSp with this project's governor.

Each engine runs in this process so that the step's parts can be timed where they run
(``patches.STEP_TIMING_PATCHES``, applied only by this command): the target forward, input
preparation, the sampler (vLLM's rejection sampler in speculative steps), the runner's bookkeeping,
clasp's drafting (context lookups and layer-skip draft forwards) and planning (its own counters),
and the rest of the engine step (scheduler, output processing). Prompts go in waves of the
batch size (one ``generate`` per wave), so a batch size is a batch size throughout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

PARTS = ("forward", "prepare", "sampler", "bookkeeping", "drafting", "planning", "scheduler & rest")
METHODS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "clasp as published": {"method": "clasp", "adaptive": False, "lookup_max": 0},
    "clasp": {"method": "clasp"},
}


def split_step_time(times: dict[str, float], clasp: dict[str, float]) -> dict[str, float]:
    """Seconds by part from the timers and clasp's counters. Drafting and planning run inside
    the runner's sampling call, after the sampler and bookkeeping, so they are only subtracted
    from the engine step's total."""
    parts = {
        "forward": times.get("forward", 0.0),
        "prepare": times.get("prepare", 0.0),
        "sampler": times.get("sampler", 0.0),
        "bookkeeping": times.get("bookkeeping", 0.0),
        "drafting": clasp.get("draft_s", 0.0),
        "planning": clasp.get("plan_s", 0.0),
    }
    parts["scheduler & rest"] = max(0.0, times.get("step", 0.0) - sum(parts.values()))
    return parts


def run_breakdown(model: str, questions: Sequence[Any], batch_sizes: Sequence[int], max_tokens: int,
                  methods: dict[str, dict[str, Any] | None] = METHODS, progress: bool = True) -> list[dict[str, Any]]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the timers must see the engine's calls
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_clasp.compare import chat_token_ids, engine_kwargs
    from vllm_clasp.patches import STEP_TIMES, STEP_TIMING_PATCHES
    from vllm_clasp.plugin import register

    register()  # the plugin's own patches first: the timers go on top of them
    for p in STEP_TIMING_PATCHES:
        p.apply()
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in chat_token_ids(model, [q.text for q in questions])]
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    rows: list[dict[str, Any]] = []
    try:
        for name, spec in methods.items():
            if progress:
                print(f"breakdown: {name}", flush=True)
            llm = LLM(**engine_kwargs(model, speculative_config=spec, max_num_seqs=max(batch_sizes),
                                      gpu_memory_utilization=0.3))
            clasp_stats = (lambda: llm.collective_rpc("clasp_stats")[0] or {}) if spec else (lambda: {})
            llm.generate(prompts[:1], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
            for bs in batch_sizes:
                waves = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
                for w in waves:  # untimed pass: new shapes, prefix cache
                    llm.generate(w, sampling, use_tqdm=False)
                STEP_TIMES.clear()
                before = clasp_stats()
                tokens = 0
                for w in waves:
                    outs = llm.generate(w, sampling, use_tqdm=False)
                    tokens += sum(len(o.outputs[0].token_ids) for o in outs)
                after = clasp_stats()
                delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("draft_s", "plan_s")}
                parts = split_step_time(dict(STEP_TIMES), delta)
                rows.append({"method": name, "batch_size": bs, "tokens": tokens,
                             "ms_per_token": {k: 1e3 * v / max(tokens, 1) for k, v in parts.items()}})
            del llm
    finally:
        for p in STEP_TIMING_PATCHES:
            p.revert()
    return rows


def markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    lines = [header, "", "Milliseconds per committed token, by part of the engine step:", "",
             "| method | batch size | " + " | ".join(PARTS) + " | total |", "|---|---|" + "---|" * (len(PARTS) + 1)]
    for r in rows:
        ms = r["ms_per_token"]
        lines.append(f"| {r['method']} | {r['batch_size']} | " + " | ".join(f"{ms[p]:.2f}" for p in PARTS)
                     + f" | {sum(ms.values()):.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bss = sorted({r["batch_size"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(bss), figsize=(4.2 * len(bss), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bs in zip(axes[0], bss):
        for x, n in enumerate(names):
            r = next((r for r in rows if r["method"] == n and r["batch_size"] == bs), None)
            if r is None:
                continue
            bottom = 0.0
            for k, part in enumerate(PARTS):
                v = r["ms_per_token"][part]
                ax.bar(x, v, 0.6, bottom=bottom, color=colors[k % len(colors)], label=part if x == 0 else None)
                bottom += v
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_title(f"batch size {bs}", fontsize=9)
        ax.set_ylabel("ms per committed token")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: Any) -> None:
    p.add_argument("--model", default=None, help="model path or an embedded model (default, gemma3)")
    p.add_argument("--groups", default="MT-bench,Summarization,QA", help="Spec-Bench groups, comma-separated")
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default="bench-results/breakdown")


def main(args: Any) -> int:
    from vllm_clasp.bench import questions_by_group
    from vllm_clasp.models import MODELS

    try:
        bss = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        if not bss or min(bss) < 1:
            raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
        if args.per_group < 1 or args.max_tokens < 1:
            raise ValueError("--per-group and --max-tokens must be >= 1")
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
        questions = questions_by_group(args.per_group, groups)
    except ValueError as e:
        raise SystemExit(f"vllm-clasp breakdown: {e}") from None
    model = str(MODELS[args.model or "default"]()) if (args.model or "default") in MODELS else args.model
    rows = run_breakdown(model, questions, bss, args.max_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = (f"{Path(model).name}, float32, {len(questions)} Spec-Bench questions ({', '.join(groups)}), "
               f"{args.max_tokens} new tokens, greedy")
    (out / "breakdown.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=1))
    md = markdown(rows, f"Engine-step breakdown: {setting}.")
    (out / "breakdown.md").write_text(md)
    plot(rows, out / "breakdown.png", setting)
    print(md)
    print(f"wrote {out}/breakdown.md, breakdown.json, breakdown.png")
    return 0
