"""CLaSp's layer planner: Algorithm 1 of the paper in its sequence-parallel form.

Given the full model's raw residual stream x_0..x_L at one token (x_0 = embedding, x_i = after i
layers), choose M layers to skip so that the skip-layer model's state stays close (cosine) to the
full model's at every depth. g(i, j) is the best state after i layers with j skipped; each layer is
called once per plan, on all candidate rows j at once. States with j < M - (L - i) can never reach
(L, M) and are not computed.

The planner knows nothing of vLLM: ``run_layer(i, states, rows)`` applies decoder layer i to the
candidate ``states`` ([R, H]) at the token's position, each row attending to the earlier positions'
full-model K/V plus only its own K/V. ``rows`` are the candidates' j values (stable ids for scratch
space).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

RunLayer = Callable[[int, torch.Tensor, Sequence[int]], torch.Tensor]


def plan_skip_layers(targets: torch.Tensor, num_skip: int, run_layer: RunLayer) -> list[int]:
    """Return the sorted indices of the ``num_skip`` layers to skip.

    targets: [L + 1, H] full-model residual states of one token (row 0 = embedding).
    """
    num_layers = targets.shape[0] - 1
    m = int(num_skip)
    if not 0 <= m <= num_layers:
        raise ValueError(f"num_skip must be in [0, {num_layers}], got {m}")
    if m == 0:
        return []
    if m == num_layers:
        return list(range(num_layers))
    t = targets.float()
    # g[j] = g(i, j) for the current depth i; only rows in the reachable band are meaningful.
    g = t[0].unsqueeze(0).repeat(m + 1, 1)
    skipped_from = torch.zeros(num_layers + 1, m + 1, dtype=torch.bool)
    for i in range(1, num_layers + 1):
        lo = max(1, m - (num_layers - i))
        hi = min(i, m)
        new = g.clone()
        new[0] = t[i]
        if lo <= hi:
            # Candidates that run layer i-1: g(i-1, j) for j in [lo, min(hi, i-1)].
            run_hi = min(hi, i - 1)
            js = list(range(lo, run_hi + 1))
            js_t = torch.arange(lo, hi + 1)
            skip_c = g[js_t - 1]
            if js:
                ran = run_layer(i - 1, g[lo : run_hi + 1].to(targets.dtype), js).float()
                if run_hi < hi:  # j == i: every layer so far skipped, running is impossible
                    ran = torch.cat([ran, skip_c[-1:]], dim=0)
                cos_skip = torch.nn.functional.cosine_similarity(skip_c, t[i].unsqueeze(0), dim=-1)
                cos_run = torch.nn.functional.cosine_similarity(ran, t[i].unsqueeze(0), dim=-1)
                take_skip = cos_skip > cos_run
                if run_hi < hi:
                    take_skip[-1] = True
            else:
                ran = skip_c
                take_skip = torch.ones(len(js_t), dtype=torch.bool)
            new[lo : hi + 1] = torch.where(take_skip.unsqueeze(-1), skip_c, ran)
            skipped_from[i, lo : hi + 1] = take_skip
        g = new
    skipped = []
    j = m
    for i in range(num_layers, 0, -1):
        if j > 0 and skipped_from[i, j]:
            skipped.append(i - 1)
            j -= 1
    assert j == 0, "backtrack did not reach g(0, 0)"
    return sorted(skipped)


def skip_mask(skipped: Sequence[int], num_layers: int) -> torch.Tensor:
    mask = torch.zeros(num_layers, dtype=torch.bool)
    if len(skipped):
        mask[torch.as_tensor(list(skipped))] = True
    return mask
