"""Offline study: should the draft skip attention and MLP sub-layers separately, not whole layers?

Issue 8 asked for it (lever 3). This measures it outside vLLM, in exactly the self-speculative
setting: a draft token at position t attends to the *target's* K/V at positions < t and to its own
K/V at t; skipped units are the identity on the residual stream. The plan is made once, at the
last prompt token (after prefill), from the target's states there, and judged by the first draft
token's acceptance (draft argmax == the target's greedy token) over the next 64 positions.

* ``layerM``: CLaSp's DP over whole layers, M skipped (Algorithm 1).
* ``subC``: the same DP over the 2L sub-layers (unit 2i = attention of layer i, 2i+1 its MLP),
  generalised to units of different cost (a knapsack over skipped cost): attention 1, MLP 2, so a
  whole layer is 3 and ``sub(3M)`` saves what ``layerM`` saves (MLP weights are 3x attention's, an
  attention unit also pays its kernel and K/V write). Same greedy cosine criterion as CLaSp.
* ``mlpC`` / ``attnC``: only MLPs (cost C, C/2 units) / only attention units (C/3 units).

Pure PyTorch on the default model's weights (checked against transformers' LlamaForCausalLM:
logits within 5e-5). Run from the repository root with the project's venv:

    python scripts/sublayer_study.py --per-category 2 --out docs/results/sublayer-study.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


class Llama:
    def __init__(self, path: Path):
        cfg = json.loads((path / "config.json").read_text())
        self.W = load_file(str(path / "model.safetensors"))
        self.L, self.nh, self.nkv, self.hd = (cfg["num_hidden_layers"], cfg["num_attention_heads"],
                                              cfg["num_key_value_heads"], cfg["head_dim"])
        self.eps = cfg["rms_norm_eps"]
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
        self.inv = 1.0 / (theta ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.emb = self.W["model.embed_tokens.weight"]
        self.head = self.W.get("lm_head.weight", self.emb)

    def w(self, i: int, n: str) -> torch.Tensor:
        return self.W[f"model.layers.{i}.{n}"]

    def rms(self, x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * g

    def rope(self, x, pos):
        f = pos.float()[:, None] * self.inv[None]
        c, s = torch.cos(f).repeat(1, 2)[:, None], torch.sin(f).repeat(1, 2)[:, None]
        h = self.hd // 2
        return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s

    def qkv(self, i, x, pos):
        h = self.rms(x, self.w(i, "input_layernorm.weight"))
        q = (h @ self.w(i, "self_attn.q_proj.weight").T).view(-1, self.nh, self.hd)
        k = (h @ self.w(i, "self_attn.k_proj.weight").T).view(-1, self.nkv, self.hd)
        v = (h @ self.w(i, "self_attn.v_proj.weight").T).view(-1, self.nkv, self.hd)
        return self.rope(q, pos), self.rope(k, pos), v

    def o(self, i, a):
        return a.reshape(-1, self.nh * self.hd) @ self.w(i, "self_attn.o_proj.weight").T

    def mlp(self, i, x):
        h = self.rms(x, self.w(i, "post_attention_layernorm.weight"))
        g = torch.nn.functional.silu(h @ self.w(i, "mlp.gate_proj.weight").T)
        return (g * (h @ self.w(i, "mlp.up_proj.weight").T)) @ self.w(i, "mlp.down_proj.weight").T

    def logits(self, x):
        return self.rms(x, self.W["model.norm.weight"]) @ self.head.T

    def full(self, ids: list[int]):
        """Causal forward: states S[0..2L] ([T, H]; S[2i+1] after layer i's attention) and K, V per layer."""
        T = len(ids)
        pos = torch.arange(T)
        x = self.emb[ids]
        S, K, V = [x], [], []
        mask = torch.full((T, T), float("-inf")).triu(1)
        r = self.nh // self.nkv
        for i in range(self.L):
            q, k, v = self.qkv(i, x, pos)
            K.append(k)
            V.append(v)
            a = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(r, 1)) / math.sqrt(self.hd) + mask
            x = x + self.o(i, torch.einsum("hqk,khd->qhd", a.softmax(-1), v.repeat_interleave(r, 1)))
            S.append(x)
            x = x + self.mlp(i, x)
            S.append(x)
        return S, K, V

    def unit(self, u: int, x, pos, K, V):
        """Unit u on rows x ([R, H]) at positions pos: attention over the target's K/V at < pos
        plus each row's own K/V."""
        i = u // 2
        if u % 2:
            return x + self.mlp(i, x)
        q, k, v = self.qkv(i, x, pos)
        r = self.nh // self.nkv
        Kt, Vt = K[i].repeat_interleave(r, 1), V[i].repeat_interleave(r, 1)
        T = Kt.shape[0]
        sc = torch.einsum("rhd,khd->rhk", q, Kt) / math.sqrt(self.hd)
        sc = sc.masked_fill((torch.arange(T)[None, :] >= pos[:, None])[:, None, :], float("-inf"))
        own = (q * k.repeat_interleave(r, 1)).sum(-1, keepdim=True) / math.sqrt(self.hd)
        p = torch.cat([sc, own], -1).softmax(-1)
        a = torch.einsum("rhk,khd->rhd", p[..., :T], Vt) + p[..., T:] * v.repeat_interleave(r, 1)
        return x + self.o(i, a)


def _cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a, b, 0).item()


def dp_layers(m: Llama, S, t: int, K, V, M: int) -> list[int]:
    """CLaSp's DP over whole layers at position t; returns the skipped units."""
    pos = torch.tensor([t])
    g = [S[0][t : t + 1]]
    back = []
    for i in range(m.L):
        tgt = S[2 * i + 2][t]
        P = pos.repeat(len(g))
        Y = m.unit(2 * i + 1, m.unit(2 * i, torch.cat(g), P, K, V), P, K, V)
        new, ch = [], []
        for j in range(min(i + 1, M) + 1):
            opts = ([("run", Y[j : j + 1])] if j < len(g) else []) + ([("skip", g[j - 1])] if j >= 1 else [])
            best = max(opts, key=lambda o: _cos(o[1][0], tgt))
            new.append(best[1])
            ch.append(best[0])
        g = new
        back.append(ch)
    skipped, j = [], M
    for i in range(m.L - 1, -1, -1):
        if back[i][j] == "skip":
            skipped += [2 * i, 2 * i + 1]
            j -= 1
    return sorted(skipped)


def dp_units(m: Llama, S, t: int, K, V, cost: list[int], C: int, allowed: list[bool] | None = None) -> list[int] | None:
    """The DP over units with costs: g(u, c) = best state after units < u with skipped cost c."""
    pos = torch.tensor([t])
    g = {0: S[0][t : t + 1]}
    back = []
    for u in range(len(cost)):
        tgt = S[u + 1][t]
        keys = sorted(g)
        Y = m.unit(u, torch.cat([g[c] for c in keys]), pos.repeat(len(keys)), K, V)
        cand: dict[int, list] = {}
        for j, c in enumerate(keys):
            cand.setdefault(c, []).append(("run", Y[j : j + 1], c))
            if (allowed is None or allowed[u]) and c + cost[u] <= C:
                cand.setdefault(c + cost[u], []).append(("skip", g[c], c))
        g, choice = {}, {}
        for c2, opts in cand.items():
            best = max(opts, key=lambda o: _cos(o[1][0], tgt))
            g[c2], choice[c2] = best[1], (best[0], best[2])
        back.append(choice)
    if C not in g:
        return None
    skipped, c = [], C
    for u in range(len(cost) - 1, -1, -1):
        kind, c_prev = back[u][c]
        if kind == "skip":
            skipped.append(u)
        c = c_prev
    return sorted(skipped)


def first_draft(m: Llama, S, ts: list[int], K, V, skip: list[int], ids: list[int]):
    x, pos, sk = S[0][ts], torch.tensor(ts), set(skip)
    for u in range(2 * m.L):
        if u not in sk:
            x = m.unit(u, x, pos, K, V)
    p = m.logits(x).softmax(-1)
    top, tok = p.max(-1)
    return (tok == torch.tensor([ids[t + 1] for t in ts])).float(), top


def greedy(m: Llama, prompt: list[int], n: int, eos: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        S, _, _ = m.full(ids)
        ids.append(int(m.logits(S[-1][-1:]).argmax()))
        if ids[-1] == eos:
            break
    return ids


def plan(m: Llama, name: str, S, t, K, V):
    kind, C = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")):])
    cost = [1, 2] * m.L
    if kind == "layer":
        return dp_layers(m, S, t, K, V, C)
    if kind == "sub":
        return dp_units(m, S, t, K, V, cost, C)
    if kind == "mlp":
        return dp_units(m, S, t, K, V, cost, C, [u % 2 == 1 for u in range(2 * m.L)])
    if kind == "attn":
        return dp_units(m, S, t, K, V, cost, C // 3, [u % 2 == 0 for u in range(2 * m.L)])
    raise ValueError(f"unknown configuration {name!r}: layerM, subC, mlpC or attnC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--configs", default="layer6,layer9,layer12,layer15,sub18,sub27,sub36,sub45")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="sublayer-study.json")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of earlier runs' files")
    args = ap.parse_args()
    if args.table:
        out = [r for f in args.table for r in json.loads(Path(f).read_text())]
        return table(out, list(out[0]["res"]))
    torch.set_num_threads(1)
    import jinja2
    from tokenizers import Tokenizer

    from vllm_clasp.compare import load_spec_bench
    from vllm_clasp.models import default_model_path

    path = default_model_path()
    m = Llama(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tmpl = jinja2.Template((path / "chat_template.jinja").read_text())
    cfgs = args.configs.split(",")
    out = []
    qs = load_spec_bench(per_category=args.per_category, offset=args.offset)
    for q in qs:
        t0 = time.time()
        text = tmpl.render(messages=[{"role": "user", "content": q.text}], add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False).ids[-700:]
        ids = greedy(m, prompt, args.max_tokens, eos=2)
        S, K, V = m.full(ids)
        P = len(prompt)
        rec = {"category": q.category, "prompt_tokens": P, "generated": len(ids) - P, "res": {}}
        for name in cfgs:
            skip = plan(m, name, S, P - 1, K, V)
            acc, top = first_draft(m, S, list(range(P, len(ids) - 1)), K, V, skip, ids)
            conf = top >= 0.7
            rec["res"][name] = {"skip": skip, "p1": acc.mean().item(), "attn": sum(u % 2 == 0 for u in skip),
                                "mlp": sum(u % 2 == 1 for u in skip), "confident": conf.float().mean().item(),
                                "p1_confident": (acc * conf).sum().item() / max(int(conf.sum()), 1)}
        out.append(rec)
        print(q.category, P, f"{time.time() - t0:.0f}s",
              " ".join(f"{k}:{v['p1']:.2f}({v['attn']}a{v['mlp']}m)" for k, v in rec["res"].items()), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    table(out, cfgs)


def table(out: list[dict], cfgs: list[str]) -> None:
    print(f"{len(out)} prompts")
    print("\n| plan | skipped units (attention + MLP) | first-draft acceptance | top-1 ≥ 0.7 | acceptance when ≥ 0.7 |")
    print("|---|---|---|---|---|")
    for name in cfgs:
        r = [o["res"][name] for o in out]
        mean = lambda k: sum(x[k] for x in r) / len(r)  # noqa: E731
        print(f"| {name} | {mean('attn'):.1f} + {mean('mlp'):.1f} | {mean('p1'):.3f} | {mean('confident'):.2f} | {mean('p1_confident'):.2f} |")


if __name__ == "__main__":
    main()
