"""Replay context-draft policies for a wave of sequences (no request waiting) over real greedy outputs.

A wave ends with its last sequence, and on this CPU a step of 8-16 sequences is compute-bound, so
whether a context-draft token pays depends on which sequence it belongs to: this script replays
Spec-Bench's greedy outputs step by step under a step-cost model and several draft policies, to
compare policies in seconds where a benchmark run takes half an hour. Its figures are a model's,
not measurements: it guided the choice of ``governor.last_shares`` (session 19); the benchmark
decides.

    python scripts/wave_sim.py --generate /tmp/greedy.json   # plain engine, greedy outputs (~1 min)
    python scripts/wave_sim.py /tmp/greedy.json --batch-size 16

Each step every unfinished sequence has its context match (``lookup_matches``, at the occurrence
its ``OccurrenceChoice`` picks, as the proposer looks it up); a policy picks how many of its tokens to verify; the step costs
``a + ρ·rows + b·max(0, T - knee) + κ·W + c·[any draft]`` (``governor.StepCost``'s shape) and
each sequence advances by one plus its accepted tokens. Chances come from a table learnt online
from every match, drafted or not (``LookupAcceptance.observe``), lowered for a sequence whose own
context drafts fared worse (``SeqAcceptance``, at most ``WAVE_MAX_SCALE``), as the proposer does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from vllm_clasp.governor import critical_rows, joint_shares, last_shares, wave_draft_lengths
from vllm_clasp.lookup import (LONG_MATCHES, WAVE_MAX_SCALE, LookupAcceptance, OccurrenceChoice, SeqAcceptance, agreement,
                               lookup_matches)


def generate(path: str, per_group: int, max_tokens: int, offset: int) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_clasp.bench import GROUPS, questions_by_group
    from vllm_clasp.compare import chat_token_ids, engine_kwargs
    from vllm_clasp.models import default_model_path

    model = str(default_model_path())
    llm = LLM(**engine_kwargs(model, max_num_seqs=16))
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out = {"max_tokens": max_tokens, "groups": {}}
    for g in GROUPS:
        qs = questions_by_group(per_group, [g], offset=offset if g != "MT-bench" else 0)
        prompts = chat_token_ids(model, [q.text for q in qs])
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        out["groups"][g] = [[p, list(r.outputs[0].token_ids)] for p, r in zip(prompts, res)]
    with open(path, "w") as f:
        json.dump(out, f)


class Row:
    def __init__(self, prompt: list[int], output: list[int]):
        self.prompt, self.out = len(prompt), output
        seq = np.asarray(prompt + output, dtype=np.int32)
        self.rivals = []  # per position: the matches at the latest and the earliest occurrence (or None)
        self.ngram = []  # vLLM's ngram method as the bench runs it: 4-gram matches, 5 tokens
        for t in range(len(output)):
            self.rivals.append(lookup_matches(seq[: self.prompt + t], 1, 6, 8, LONG_MATCHES))
            d = _ngram(seq[: self.prompt + t], 4, 5)
            self.ngram.append((d.size, 4, _right(d, output[t:])))
        self.choice = OccurrenceChoice()
        self.seq = SeqAcceptance()  # its context drafts against the table (chances for the batch's end)
        self.matches = [(0, 0, 0)] * len(output)  # per position reached: (draft, n, tokens the output confirms), as chosen

    def match(self, t: int) -> tuple[int, int, int]:
        """The context match at ``t`` as the proposer picks it (``OccurrenceChoice``)."""
        latest, earliest = self.rivals[t]
        d, n = earliest if earliest is not None and self.choice.use_earliest else latest
        self.matches[t] = (d.size, n, _right(d, self.out[t:]))
        return self.matches[t]

    def observe(self, t: int, committed: list[int]) -> None:
        latest, earliest = self.rivals[t]
        if earliest is not None:
            self.choice.observe(latest[0], earliest[0], committed)


def _right(draft: np.ndarray, output: list[int]) -> int:
    return agreement(draft, output[: draft.size])


def _ngram(seq: np.ndarray, n: int, k: int) -> np.ndarray:
    """vLLM's ngram draft: the tokens after the earliest occurrence of the last n tokens."""
    for s in range(seq.size - n):
        if (seq[s : s + n] == seq[seq.size - n :]).all():
            return seq[s + n : s + n + k]
    return seq[:0]


class Cost:
    def __init__(self, a: float, rho: float, b: float, knee: int, kappa: float, c: float):
        self.a, self.rho, self.b, self.knee, self.kappa, self.c = a, rho, b, knee, kappa, c

    def step(self, rows: int, tokens: int, work: float, drafted: bool) -> float:
        return self.a + self.rho * rows + self.b * max(0, tokens - self.knee) + self.kappa * work + self.c * drafted


class CostAt:
    """The model's step cost at one batch size, read as the governor reads a fitted ``StepCostAt``
    (so the package's own ``wave_draft_lengths`` decides the drafts)."""

    def __init__(self, cost: Cost, rows: int):
        self.cost, self.rows = cost, rows
        self.kappa, self.per_row, self.context = cost.kappa, cost.rho, 0.0

    def fit(self) -> tuple[float, float, int, float]:
        return self.cost.a + self.cost.rho * self.rows, self.cost.b, self.cost.knee, self.cost.c

    def __call__(self, tokens: float, drafted: bool = False) -> float:
        return self.cost.step(self.rows, int(tokens), 0.0, drafted)


def policy_plain(rows, live, pos, left, acc, cost):
    return {}


def policy_ngram(rows, live, pos, left, acc, cost):
    return {i: rows[i].ngram[pos[i]][0] for i in live}


def _wave(rows, live, pos, left, acc, cost, share_of):
    """``wave_draft_lengths`` over the sequences with a match, each priced at ``share_of(i)``."""
    crit = dict(zip(live, critical_rows([left[i] for i in live], waiting=0) or [True] * len(live)))
    free = [i for i in live if rows[i].matches[pos[i]][0]]
    if not free:
        return {}
    chances = [acc.chances(False, rows[i].matches[pos[i]][1], rows[i].matches[pos[i]][0], rows[i].seq, WAVE_MAX_SCALE)
               for i in free]
    blocked = any(crit[i] and not rows[i].matches[pos[i]][0] for i in live)
    lengths = wave_draft_lengths(chances, [crit[i] for i in free], blocked, len(live), CostAt(cost, len(live)),
                                 [(rows[i].prompt + pos[i]) / 1000.0 for i in free], [share_of(i) for i in free])
    return dict(zip(free, lengths))


def _first_chance(row, t, acc):
    size, n, _ = row.matches[t]
    return float(acc.chances(False, n, size, row.seq, WAVE_MAX_SCALE)[0]) if size else 0.0


def policy_shares(rows, live, pos, left, acc, cost):
    """Every sequence's tokens priced at its chance of ending the wave last times the chance that
    the others level with it move on too (``joint_shares``), as the proposer does."""
    first = [_first_chance(rows[i], pos[i], acc) for i in live]
    share = dict(zip(live, joint_shares(last_shares([left[i] for i in live]), first)))
    return _wave(rows, live, pos, left, acc, cost, lambda i: float(share[i]))


def policy_linear(rows, live, pos, left, acc, cost):
    """Session 19-20's rule: every sequence's tokens priced at its chance of ending the wave last
    (``last_shares``) alone."""
    share = dict(zip(live, last_shares([left[i] for i in live])))
    return _wave(rows, live, pos, left, acc, cost, lambda i: float(share[i]))


def policy_long(rows, live, pos, left, acc, cost):
    """Session 17's rule: only 8+-token matches, at 1/m of a step (m: critical sequences with a match)."""
    top = max(left[i] for i in live)
    m = max(1, sum(left[i] >= top - 2 for i in live if rows[i].matches[pos[i]][0]))
    return _wave(rows, live, pos, left, acc, cost,
                 lambda i: 1.0 / m if rows[i].matches[pos[i]][1] >= LONG_MATCHES[0] else 0.0)


POLICIES = {"ngram": policy_ngram, "shares": policy_shares, "linear": policy_linear, "long-only": policy_long}


def simulate(rows: list[Row], max_tokens: int, policy, acc: LookupAcceptance, cost: Cost) -> float:
    pos = [0] * len(rows)
    for r in rows:
        r.choice, r.seq, r.matches = OccurrenceChoice(), SeqAcceptance(), [(0, 0, 0)] * len(r.out)
    seconds = 0.0
    while True:
        live = [i for i in range(len(rows)) if pos[i] < len(rows[i].out)]
        if not live:
            return seconds
        for i in live:
            rows[i].match(pos[i])
        left = {i: max_tokens - pos[i] for i in live}
        drafts = policy(rows, live, pos, left, acc, cost)
        tokens = len(live) + sum(drafts.values())
        work = sum((rows[i].prompt + pos[i]) / 1000.0 * (1 + drafts.get(i, 0)) for i in live)
        seconds += cost.step(len(live), tokens, work, any(drafts.values()))
        for i in live:
            r, t = rows[i], pos[i]
            size, n, ok = r.matches[t]
            if policy is policy_ngram:
                ok = r.ngram[t][2]
            elif size:
                # the proposal against what the step commits, drafted or not: the accepted draft
                # tokens, then the target's own, which agrees with the match if that went on
                a = min(ok, drafts.get(i, 0))
                acc.observe(False, n, np.arange(size), list(range(a)) + [a if ok > a else -1], r.seq)
            pos[i] += 1 + min(ok, drafts.get(i, 0))
            r.observe(t, r.out[t : pos[i]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outputs", nargs="?", help="greedy outputs written by --generate")
    p.add_argument("--generate", metavar="PATH", help="run a plain engine and write greedy outputs to PATH")
    p.add_argument("--per-group", type=int, default=16)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--a", type=float, default=0.040, help="step seconds at zero rows (default from bs-16 fits, AMX host)")
    p.add_argument("--rho", type=float, default=0.0013, help="seconds per sequence in a step")
    p.add_argument("--b", type=float, default=0.001, help="seconds per verified token past the knee")
    p.add_argument("--knee", type=int, default=12)
    p.add_argument("--kappa", type=float, default=0.001, help="seconds per verified token per 1000 tokens of context")
    p.add_argument("--c", type=float, default=0.0015, help="seconds a step with any draft pays once")
    args = p.parse_args(argv)
    if args.generate:
        generate(args.generate, args.per_group, args.max_tokens, args.offset)
        return
    if not args.outputs:
        p.error("give the outputs file (or --generate PATH)")
    with open(args.outputs) as f:
        data = json.load(f)
    mt = data["max_tokens"]
    groups = {g: [Row(pr, o) for pr, o in rows] for g, rows in data["groups"].items()}
    cost = Cost(args.a, args.rho, args.b, args.knee, args.kappa, args.c)
    bs = args.batch_size
    base = {g: sum(simulate(r[s:s + bs], mt, policy_plain, LookupAcceptance(), cost) for s in range(0, len(r), bs))
            for g, r in groups.items()}
    print("| policy | " + " | ".join(groups) + " | Overall |")
    print("|---" * (len(groups) + 2) + "|")
    for name, pol in POLICIES.items():
        acc = LookupAcceptance()
        for _ in range(2):  # the first pass learns the table, as the bench's untimed pass does
            t = {g: sum(simulate(r[s:s + bs], mt, pol, acc, cost) for s in range(0, len(r), bs)) for g, r in groups.items()}
        cells = [f"{base[g] / t[g]:.3f}" for g in groups] + [f"{sum(base.values()) / sum(t.values()):.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
