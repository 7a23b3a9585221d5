"""Probe of the governor's step-cost fit at batch size 8 (issue 8, session 13).

One clasp engine runs Spec-Bench's six groups in waves of 8 (64 new tokens, greedy), as
``vllm-clasp bench --batch-size 8`` does, REPEATS times. Every step the governor observes is logged
in the worker (sequences, verified tokens, seconds, attention work), and after each wave the fit
it prices 8-row steps with (a, b, knee, c, κ, context). Per wave it prints the mean time of 8-row steps without drafts and of
those with drafts (and their verified tokens), so one sees what draft tokens really cost next to
what the fit assumed. Written for the AMX host's Summarization dip at bs 8 (docs/results/README.md,
bs8-amx). Run from the repository root with the project's venv:

    python scripts/step_cost_probe.py 3 [OUT.json]   # default out/step_cost_probe.json
"""
import json
import os
import sys
import time

os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def install(worker):
    g = worker.model_runner.drafter.governor
    if getattr(g, "_diag", None) is not None:
        return 0
    g._diag = []
    orig = g.observe

    def observe(committed, measurable, now=None, scheduled=None, rows=None, work=0.0):
        now = time.perf_counter() if now is None else now
        if g._last_end is not None:
            g._diag.append((rows, scheduled, now - g._last_end, bool(measurable), committed, work))
        return orig(committed, measurable, now, scheduled=scheduled, rows=rows, work=work)

    g.observe = observe
    return 1


def take(worker):
    g = worker.model_runner.drafter.governor
    log, g._diag = g._diag, []
    sc = g.step_cost(8)
    a, b, k, c = sc.fit()
    d = worker.model_runner.drafter.stats
    return {"log": log, "fit8": [a, b, k, c, sc.kappa, sc.context], "local8": 8 in g.by_rows and g.by_rows[8].varied,
            "lookup_tokens": d.lookup_tokens, "lookup_accepted": d.lookup_accepted}


if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm_clasp.bench import chunk_plan, questions_by_group
    from vllm_clasp.compare import chat_token_ids, engine_kwargs
    from vllm_clasp.models import default_model_path

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    model = str(default_model_path())
    qs = questions_by_group(8)
    ids = chat_token_ids(model, [q.text for q in qs])
    llm = LLM(**engine_kwargs(model, speculative_config={"method": "clasp"}, max_num_seqs=8))
    llm.collective_rpc(install)
    sp = SamplingParams(temperature=0.0, max_tokens=64)
    out = []
    for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        for g, idx in chunk_plan(qs, 8):
            ps = [ids[i] for i in idx]
            t0 = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            r = llm.collective_rpc(take)[0]
            r.update(rep=rep, group=g, seconds=dt, ctx=sum(map(len, ps)) / len(ps))
            out.append(r)
            steps8 = [s for s in r["log"] if s[0] == 8 and s[3]]
            drafted = [s for s in steps8 if s[1] > 8]
            plain = [s for s in steps8 if s[1] == 8]
            print(f"rep {rep} {g:14s} {dt:6.2f}s ctx {r['ctx']:6.0f} steps8 {len(steps8):3d} "
                  f"plain-step {1000*mean([s[2] for s in plain]):6.1f} ms  drafted-steps {len(drafted):3d} "
                  f"mean tokens {mean([s[1] for s in drafted]):5.1f} at {1000*mean([s[2] for s in drafted]):6.1f} ms  "
                  f"fit8 a={1000*r['fit8'][0]:.1f}ms b={1000*r['fit8'][1]:.2f}ms knee={r['fit8'][2]} c={1000*r['fit8'][3]:.1f}ms "
                  f"kappa={1000*r['fit8'][4]:.2f}ms/k ctx={r['fit8'][5]:.2f}k local={r['local8']}",
                  flush=True)
    path = sys.argv[2] if len(sys.argv) > 2 else "out/step_cost_probe.json"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    json.dump(out, open(path, "w"))
