"""The planner against a straightforward implementation of the same recurrence, on a tiny model."""

import math

import pytest
import torch

from vllm_clasp.planner import plan_skip_layers, skip_mask


class TinyDecoder:
    """Pre-norm attention+MLP layers over a residual stream, with a per-layer K/V prefix cache."""

    def __init__(self, num_layers=8, hidden=16, prefix=7, seed=0, quiet_layer=None):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[0])  # noqa: E731
        self.L, self.H = num_layers, hidden
        self.w = [dict(q=r(hidden, hidden), k=r(hidden, hidden), v=r(hidden, hidden), o=r(hidden, hidden),
                       up=r(hidden, 2 * hidden), down=r(2 * hidden, hidden)) for _ in range(num_layers)]
        if quiet_layer is not None:
            for key in ("o", "down"):
                self.w[quiet_layer][key] = self.w[quiet_layer][key] * 1e-6
        embs = torch.randn(prefix + 1, hidden, generator=g, dtype=torch.float64)
        # Full model over the prefix (causal) to fill the cache, then the token's states x_0..x_L.
        self.K = [None] * num_layers
        self.V = [None] * num_layers
        x = embs
        states = [x[-1]]
        for i, w in enumerate(self.w):
            h = self._norm(x)
            k, v = h @ w["k"], h @ w["v"]
            self.K[i], self.V[i] = k[:-1], v[:-1]  # earlier positions only
            q = h @ w["q"]
            s = (q @ k.T) / math.sqrt(hidden)
            s = s.masked_fill(torch.triu(torch.ones_like(s, dtype=torch.bool), 1), float("-inf"))
            x = x + torch.softmax(s, -1) @ v @ w["o"]
            x = x + torch.relu(self._norm(x) @ w["up"]) @ w["down"]
            states.append(x[-1])
        self.targets = torch.stack(states)
        self.calls = []

    @staticmethod
    def _norm(x):
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    def layer(self, i, x):
        """Layer i on rows x at the token's position: prefix K/V plus each row's own K/V only."""
        w = self.w[i]
        h = self._norm(x)
        q, k, v = h @ w["q"], h @ w["k"], h @ w["v"]
        s_prefix = q @ self.K[i].T / math.sqrt(self.H)  # [R, P]
        s_own = (q * k).sum(-1, keepdim=True) / math.sqrt(self.H)  # [R, 1]
        p = torch.softmax(torch.cat([s_prefix, s_own], -1), -1)
        attn = p[:, :-1] @ self.V[i] + p[:, -1:] * v
        x = x + attn @ w["o"]
        return x + torch.relu(self._norm(x) @ w["up"]) @ w["down"]

    def run_layer(self, i, states, rows):
        self.calls.append((i, list(rows), states.shape[0]))
        return self.layer(i, states)


def reference_plan(model: TinyDecoder, m: int) -> list[int]:
    """CLASP.md's recurrence, literally: every (i, j), one candidate at a time, no pruning."""
    L, t = model.L, model.targets
    g = {(0, 0): t[0]}
    came_from_skip = {}
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()  # noqa: E731
    for i in range(1, L + 1):
        g[(i, 0)] = t[i]
        for j in range(1, min(i, m) + 1):
            if j == i:
                g[(i, j)] = g[(i - 1, j - 1)]
                came_from_skip[(i, j)] = True
                continue
            skip = g[(i - 1, j - 1)]
            run = model.layer(i - 1, g[(i - 1, j)].unsqueeze(0))[0]
            take_skip = cos(skip, t[i]) > cos(run, t[i])
            g[(i, j)] = skip if take_skip else run
            came_from_skip[(i, j)] = take_skip
    out, j = [], m
    for i in range(L, 0, -1):
        if j > 0 and came_from_skip[(i, j)]:
            out.append(i - 1)
            j -= 1
    return sorted(out)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m", [1, 2, 4, 6, 7])
def test_planner_matches_reference(seed, m):
    model = TinyDecoder(num_layers=8, seed=seed)
    got = plan_skip_layers(model.targets, m, model.run_layer)
    assert got == reference_plan(model, m)
    assert len(got) == m and len(set(got)) == m and all(0 <= x < 8 for x in got)


@pytest.mark.parametrize("m", [1, 3, 5])
def test_planner_calls_each_layer_once_on_reachable_rows(m):
    model = TinyDecoder(num_layers=8, seed=3)
    plan_skip_layers(model.targets, m, model.run_layer)
    layers = [c[0] for c in model.calls]
    assert layers == sorted(set(layers)), "each layer called at most once, in order"
    L = model.L
    for i, rows, n in model.calls:
        # Layer i runs on g(i, j), 1 <= j <= min(i, m), giving g(i + 1, j), which can still
        # reach (L, m) only if j >= m - (L - i - 1).
        assert rows == list(range(max(1, m - (L - i - 1)), min(i, m) + 1)) and n == len(rows) <= m


def test_planner_edges():
    model = TinyDecoder(num_layers=5, seed=1)
    assert plan_skip_layers(model.targets, 0, model.run_layer) == []
    assert plan_skip_layers(model.targets, 5, model.run_layer) == [0, 1, 2, 3, 4]
    assert model.calls == []
    with pytest.raises(ValueError, match="num_skip"):
        plan_skip_layers(model.targets, 6, model.run_layer)
    assert skip_mask([1, 3], 5).tolist() == [False, True, False, True, False]


def test_planner_skips_a_near_identity_layer_first():
    """With one layer made (nearly) the identity, a one-layer plan must skip exactly that layer."""
    for k in (1, 3, 4):
        model = TinyDecoder(num_layers=6, seed=2, quiet_layer=k)
        assert plan_skip_layers(model.targets, 1, model.run_layer) == [k]


def test_a_plan_has_drifted_only_when_its_drafts_fall_off_beyond_chance():
    import numpy as np

    from vllm_clasp.proposer import PlanFit

    steady = PlanFit()
    rng = np.random.default_rng(0)
    flagged = 0
    for _ in range(640):  # 2 drafted tokens a round, each accepted 70 % of the time, for ever
        steady.add(2, int((rng.random(2) < 0.7).cumprod().sum()))
        if steady.drifted():
            flagged += 1
            steady = PlanFit()  # re-planned
    assert flagged <= 4  # noise alone: far fewer plans than the clock's 20 in 640 rounds

    fell = PlanFit()
    for _ in range(4):
        fell.add(2, 2)  # the plan fits: both drafts accepted
    fell.add(2, 0)
    assert not fell.drifted()  # one bad round says little
    rounds = 1
    while not fell.drifted():
        fell.add(2, 0)  # the text moved on: nothing accepted
        rounds += 1
    assert rounds <= 10  # well before the clock's 32
    assert not PlanFit().drifted()  # nothing measured since the plan: nothing to say


def test_a_sequence_is_due_a_plan_when_never_planned_overdue_or_drifted():
    import torch

    from vllm_clasp.proposer import PlanFit, _SeqState, plan_due

    st = _SeqState()
    assert plan_due(st, 32) == 0
    st.keep = torch.ones(4, dtype=torch.bool)
    st.rounds_since_plan = 10
    assert plan_due(st, 32) is None
    st.rounds_since_plan = 33
    assert plan_due(st, 32) == 1  # the clock
    st.rounds_since_plan = 10
    for _ in range(4):
        st.fit.add(2, 2)
    for _ in range(10):
        st.fit.add(2, 0)
    assert plan_due(st, 32) == 1  # drifted long before the clock
    st.fit = PlanFit()  # what a new plan does
    assert plan_due(st, 32) is None
