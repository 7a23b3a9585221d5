"""Decide, step by step, how much to speculate — from costs and acceptance measured online.

Every draft token is priced in the same unit, tokens of output:

* verifying one more token adds ``b`` seconds to a step (the step cost model below); at the rate
  the engine makes tokens now, that is ``price = b · rate`` tokens. A token is worth proposing
  only if its chance of being accepted is above that price.
* context drafts (lookup.py) cost nothing to make; their tokens, each with its measured chance
  of acceptance by n-gram length and position, are verified surest first while the step's
  tokens per second rise (``best_draft_lengths``).
* layer-skip drafts cost draft forwards and plans. They are used for the sequences that have no
  paying context draft while, measured on exactly those rows,
  ``accepted tokens > price · drafted tokens + drafting seconds · rate`` (``use_skip``). While they
  do not pay, a couple of steps re-measure them on one sequence now and then, less often each time
  they still do not (the workload may change), never more than 0.5 % of the time, and not at all
  where even drafts that were all accepted could not pay (``SkipValue.could_pay``).

Step cost: ``t(T) = a + ρ·rows + κ·W + c·[drafts] + b·max(0, T − knee)`` for a step that
verified ``T`` tokens with attention work ``W`` (``StepCost``), fitted per batch-size bucket over
measured steps (those without a prefill). On this CPU the weights cost the same up to ~8–12
tokens, then ~2 ms per token; attention costs ~6 µs per verified token per token of its context,
so at ~760-token contexts a draft token costs ~4.5 ms even below the knee, and at 16 rows every
draft token costs ~0.66 tokens of output. Context drafts are then chosen for the whole step at
once (``best_draft_lengths``): the surest tokens first, as long as the step's tokens per second
rise. With no request waiting, the batch ends with its last sequence: a sequence's accepted
token is worth its chance of being that one times a step, times the chance that the sequences
level with it move on too (``last_shares``, ``joint_shares``, ``wave_draft_lengths``).
On a GPU the knee lies far out and drafting stays wide.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

SKIP, LOOKUP, PLAIN = 2, 1, 0
ARM_NAMES = {SKIP: "layer-skip", LOOKUP: "context", PLAIN: "plain"}


KNEES = (0, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256)
"""Candidate knees of the step-cost hinge, in verified tokens per step."""
_KNEES = np.asarray(KNEES, dtype=np.float64)


@dataclass
class StepCost:
    """Step seconds against verified tokens ``T``:
    ``t = a + ρ·rows + κ·W + c·[drafts] + b·max(0, T − knee)``.

    A forward over a few tokens costs what one token costs (the weights are read once either way),
    then each token adds about the same: on this CPU flat up to ~8–12 tokens, then ~2 ms per token
    for the default model. A step with any draft also pays ``c`` once (vLLM's rejection sampler
    and spec-decode bookkeeping, ~0.5–1.5 ms at batch 16 here). Each sequence in the step adds
    ``ρ`` (its sampling, its bookkeeping): without that term the rows of a shrinking batch pass
    for verified tokens and the knee is placed far too low. Each verified token attends over its
    sequence's context: ``W`` sums, over the step's tokens, their context in thousands of tokens,
    and costs ``κ`` per unit. Without that term, same-size steps took 78 ms over short contexts and
    110 ms over long ones (bs 8, AMX host), slope and knee swung with the mix of contexts, and
    18-token steps at ~760-token contexts passed for free (they cost 3.4 ms per draft token). Decayed least
    squares for every candidate knee; the knee kept is the one that fits best among those whose
    slope the data shows (t-statistic > 2), the mildest slope among knees that fit about as well
    (two sizes seen cannot place a knee). With no slope shown within the sizes seen, verified
    tokens are free up to a quarter past the largest size seen lately and cost the prior slope
    beyond: drafts grow step by step until steps of a size that costs more are measured.
    One size seen so far: the prior shape (``prior_slope`` × a per token from the first).
    ``fit(rows, work)`` gives ``a`` for that many sequences and that much attention work (the
    means seen when not given); ``kappa`` is κ.
    """

    decay: float = 0.99
    prior_slope: float = 0.15
    """Slope relative to the intercept while the data cannot tell (all steps one size)."""
    _m: np.ndarray = field(default_factory=lambda: np.zeros((len(KNEES), 6, 6)))
    refit_every: int = 32
    """Steps between two fits once 32 are in (a fit is ~0.4 ms of Python; the sums decay by 1 %
    a step, so they move little in 32)."""
    w: float = 0.0
    st: float = 0.0
    stt: float = 0.0
    _fit: tuple[float, float, int, float, float, float, float, float] | None = None
    _since_fit: int = 0
    _pending: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    _recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=128))
    """Verified tokens of the last steps (the sizes a flat fit has actually seen)."""

    def add(self, tokens: float, seconds: float, drafted: bool | None = None, rows: float = 0.0,
            work: float = 0.0) -> None:
        d = self.decay
        self.w = self.w * d + 1.0
        self.st = self.st * d + tokens
        self.stt = self.stt * d + tokens * tokens
        # Folded into the moments when a fit needs them (every step costs ~2 µs, not ~60).
        self._pending.append((tokens, 0.0 if drafted is None else float(drafted), rows, work, seconds))
        self._recent.append(tokens)
        self._since_fit += 1
        if self.w < 32 or self._since_fit >= self.refit_every:
            self._fit = None

    @property
    def m(self) -> np.ndarray:
        """Per knee, decayed sums of v·vᵀ with v = (1, max(0, T − knee), [drafts], rows, W, seconds)."""
        self._fold()
        return self._m

    def _fold(self) -> None:
        """Adds the pending steps to the decayed moments ``m``, oldest first."""
        p = len(self._pending)
        if not p:
            return
        x = np.asarray(self._pending, dtype=np.float64)  # [p, (T, z, rows, W, y)]
        self._pending.clear()
        v = np.empty((p, len(KNEES), 6))
        v[:, :, 0] = 1.0
        v[:, :, 1] = np.maximum(x[:, :1] - _KNEES, 0.0)
        v[:, :, 2:] = x[:, None, 1:]
        weight = self.decay ** np.arange(p - 1, -1, -1, dtype=np.float64)
        self._m *= self.decay**p
        self._m += np.einsum("p,pki,pkj->kij", weight, v, v)

    @property
    def known(self) -> bool:
        return self.w > 0

    @property
    def varied(self) -> bool:
        """Enough steps of different sizes to tell a slope."""
        return self.w >= 8 and self.stt / self.w - (self.st / self.w) ** 2 > 0.25

    def coef(self) -> tuple[float, float, int]:
        """(a, b, knee)."""
        return self.fit()[:3]

    @property
    def draft_step_extra(self) -> float:
        """``c``: seconds a step pays once for having any draft."""
        return self.fit()[3]

    def _fitted(self) -> tuple[float, float, int, float, float, float, float, float]:
        if self._fit is None:
            self._fit, self._since_fit = self._solve(), 0
        return self._fit

    @property
    def per_row(self) -> float:
        """``ρ``: seconds each sequence adds to a step."""
        return self._fitted()[4]

    @property
    def kappa(self) -> float:
        """``κ``: seconds per unit of attention work (a verified token over 1000 tokens of context)."""
        return self._fitted()[5]

    @property
    def context(self) -> float:
        """Mean context per verified token seen, in thousands of tokens (``W / T``)."""
        return self._fitted()[7] / max(self.st / self.w, 1e-9) if self.w > 0 else 0.0

    def fit(self, rows: float | None = None, work: float | None = None) -> tuple[float, float, int, float]:
        """(a, b, knee, c), ``a`` for ``rows`` sequences and attention work ``work``."""
        a, b, k, c, rho, kappa, mean_rows, mean_work = self._fitted()
        return a + rho * (mean_rows if rows is None else rows) + kappa * (mean_work if work is None else work), b, k, c

    def at(self, rows: float, context: float | None = None) -> "StepCostAt":
        return StepCostAt(self, rows, self.context if context is None else context)

    def _solve(self) -> tuple[float, float, int, float, float, float, float, float]:
        """(a at 0 rows and no work, b, knee, c, ρ, κ, mean rows, mean work)."""
        if self.w <= 0:
            return 1.0, self.prior_slope, 0, 0.0, 0.0, 0.0, 0.0, 0.0
        w, m = self.w, self.m
        mean_all = m[0, 0] / w  # E[v]
        mt, my, mr, mw = self.st / w, mean_all[5], mean_all[3], mean_all[4]
        if not self.varied:
            a = my / (1.0 + self.prior_slope * mt)
            return a, self.prior_slope * a, 0, 0.0, 0.0, 0.0, mr, 0.0
        use_z = 0.02 < mean_all[2] < 0.98  # steps with and without drafts both seen: c can be told
        vy = max(m[0, 5, 5] / w - my * my, 0.0)
        cov0 = m[0, 1:, 1:] / w - np.outer(mean_all[1:], mean_all[1:])  # over (x, z, rows, W, y)
        use_w = cov0[3, 3] > 1e-4  # contexts (or sizes) varied enough to tell attention's cost
        fits: list[tuple[float, float, float, int, float, float, float]] = []  # (res. var., a0, b, knee, c, ρ, κ)
        for i, k in enumerate(KNEES):
            E = m[i, 0] / w
            cov = m[i, 1:, 1:] / w - np.outer(E[1:], E[1:])
            if cov[0, 0] <= 0.25:
                continue  # (almost) every step at or below this knee: it says nothing
            # With the per-sequence term first; if the slope then shows nothing, without it: in a
            # shrinking batch with few drafts, tokens and sequences rise together and a token
            # costs what a sequence does (at batch 16 here ~1.5 ms), not nothing.
            for with_rows in ((True, False) if cov[2, 2] > 0.25 else (False,)):
                active = [0] + ([1] if use_z else []) + ([3] if use_w else []) + ([2] if with_rows else [])
                got = _knee_fit(cov, vy, w, active)
                if got is not None:
                    res, b, c, rho, kappa = got
                    fits.append((res, my - b * E[1] - c * E[2] - rho * E[3] - kappa * E[4], b, k, c, rho, kappa))
                    break
        if not fits:
            # Steps of every size seen took as long, but for their attention: free up to a quarter
            # past the largest size seen lately (then the prior slope), so drafts grow step by step
            # until sizes that cost more are measured. (Free without limit, one batch-16 step seen
            # only 15–17 tokens and then verified 120, at 4x a step's time.) Attention is priced
            # all the same where the data shows it.
            knee = int(np.ceil(1.25 * max(self._recent, default=mt)))
            kappa = _work_slope(cov0, w) if use_w else 0.0
            a0 = my - kappa * mw
            return a0, self.prior_slope * my, knee, 0.0, 0.0, kappa, mr, mw
        # Knees the data cannot tell apart (few sizes seen) fit about as well: take the mildest.
        least = min(f[0] for f in fits)
        _, a0, b, k, c, rho, kappa = min((f for f in fits if f[0] <= 1.05 * least + 1e-15), key=lambda f: f[2])
        return a0, b, k, c, rho, kappa, mr, mw

    def __call__(self, tokens: float, drafted: bool = False, rows: float | None = None,
                 work: float | None = None) -> float:
        a, b, k, c = self.fit(rows, work)
        return a + b * max(0.0, tokens - k) + (c if drafted else 0.0)

    def marginal(self, tokens: float, context: float | None = None) -> float:
        """Seconds one more verified token (over ``context`` thousand tokens) adds to a step of
        ``tokens`` tokens."""
        a, b, k, c = self.fit()
        ctx = self.context if context is None else context
        return (b if tokens + 1 > k else 0.0) + self.kappa * ctx


def _work_slope(cov: np.ndarray, w: float) -> float:
    """κ from seconds on attention work alone (covariance over x, z, rows, W, y), 0 unless it
    shows (positive, t-statistic > 2)."""
    vw, r, vy = cov[3, 3], cov[3, 4], cov[4, 4]
    if vw <= 0 or r <= 0:
        return 0.0
    k = r / vw
    res = max(vy - k * r, 0.0)
    return k if k * k * vw * max(w - 3.0, 1.0) > 4.0 * res else 0.0


def _knee_fit(cov: np.ndarray, vy: float, w: float, active: list[int]) -> tuple[float, float, float, float, float] | None:
    """Least squares of seconds on the ``active`` terms of (x, z, rows, W) given their covariance
    (over x, z, rows, W, y): (residual variance, b, c, ρ, κ), or None where the slope b does not
    show (t-statistic ≤ 2 over an effective ``w`` steps). Terms the data cannot tell apart from x
    (e.g. every drafted step the same size: z and x collinear), or that come out negative
    (noise), are dropped, and so is W where its own t-statistic is ≤ 2."""
    while True:
        C, r = cov[np.ix_(active, active)], cov[active, 4]
        try:
            inv = np.linalg.inv(C)
        except np.linalg.LinAlgError:
            inv = None
        told = inv is not None and inv[0, 0] > 0 and 1.0 / inv[0, 0] > 0.25
        beta = inv @ r if told else None
        bad = [] if beta is None else [j for j, v in zip(active[1:], beta[1:]) if v < 0]
        if beta is not None and not bad and 3 in active:
            # attention's cost only where the data shows it (t-statistic > 2), as for b
            j = active.index(3)
            if beta[j] ** 2 / inv[j, j] * max(w - 4.0, 1.0) <= 4.0 * max(vy - float(beta @ r), 0.0):
                bad = [3]
        if beta is not None and not bad:
            break
        if len(active) == 1:
            return None
        active = active[:-1] if beta is None else [j for j in active if j not in bad]
    vb = 1.0 / inv[0, 0]  # x's variance the other terms do not explain
    res = max(vy - float(beta @ r), 0.0)
    b = float(beta[0])
    if b <= 0 or b * b * vb * max(w - 4.0, 1.0) <= 4.0 * res:
        return None
    coef = dict(zip(active, beta))
    return res, b, float(coef.get(1, 0.0)), float(coef.get(2, 0.0)), float(coef.get(3, 0.0))


@dataclass
class StepCostAt:
    """A ``StepCost`` read at a number of sequences whose verified tokens attend over ``context``
    thousand tokens each (the last step's mean)."""

    cost: StepCost
    rows: float
    context: float = 0.0

    @property
    def kappa(self) -> float:
        return self.cost.kappa

    @property
    def per_row(self) -> float:
        return self.cost.per_row

    def fit(self) -> tuple[float, float, int, float]:
        """(a, b, knee, c), ``a`` with one token per sequence."""
        return self.cost.fit(self.rows, self.rows * self.context)

    def coef(self) -> tuple[float, float, int]:
        return self.fit()[:3]

    def __call__(self, tokens: float, drafted: bool = False) -> float:
        return self.cost(tokens, drafted, self.rows, tokens * self.context)

    def marginal(self, tokens: float) -> float:
        return self.cost.marginal(tokens, self.context)


def _token_seconds(cost: StepCost | StepCostAt, contexts: list[float] | None, sizes: list[int]) -> np.ndarray:
    """Attention seconds of each draft token (by draft), ``κ`` times its sequence's context."""
    kappa = cost.kappa
    if kappa <= 0:
        return np.zeros(sum(sizes))
    ctx = [cost.context] * len(sizes) if contexts is None else contexts
    return np.repeat(kappa * np.asarray(ctx, dtype=np.float64), sizes)


def best_draft_lengths(chances: list[np.ndarray], base_tokens: int, base_committed: float,
                       cost: StepCost | StepCostAt, contexts: list[float] | None = None) -> list[int]:
    """How many tokens of each draft to verify so that the step makes the most tokens per second.

    ``chances[r][j]``: the chance that tokens 0..j of draft r are all accepted (non-increasing in
    j). A step that verifies ``base_tokens`` plus the chosen draft tokens commits ``base_committed``
    plus the sum of their chances, and takes ``cost(T)`` plus each token's attention over its
    sequence's context (``contexts[r]``, thousands of tokens). Marginal costs only grow with T
    and the chances of one draft only fall, so (contexts aside) the best set is a prefix of all
    draft tokens by chance.
    """
    sizes = [int(c.size) for c in chances]
    total = sum(sizes)
    if total == 0:
        return sizes
    p = np.concatenate(chances)
    row = np.repeat(np.arange(len(chances)), sizes)
    order = np.argsort(-p, kind="stable")  # ties keep each draft's own order
    gain = base_committed + np.concatenate(([0.0], np.cumsum(p[order])))
    a, b, k, c = cost.fit()
    attn = np.concatenate(([0.0], np.cumsum(_token_seconds(cost, contexts, sizes)[order])))
    t = a + b * np.maximum(0.0, base_tokens + np.arange(total + 1) - k) + c + attn
    t[0] -= c  # no draft at all: no spec-decode step
    n = int(np.argmax(gain / np.maximum(t, 1e-12)))
    return np.bincount(row[order[:n]], minlength=len(chances)).tolist()


def critical_rows(remaining: list[int], waiting: int | None, slack: int = 2) -> list[bool] | None:
    """Which sequences decide when the batch ends; ``None`` while requests wait for a slot.

    With requests waiting (or the queue unknown), a token committed anywhere brings the next
    request forward: throughput is what counts (``best_draft_lengths``). With none waiting, the
    batch ends when its longest sequence does: only the sequences with the most tokens left
    (``remaining``, within ``slack``) decide that (``wave_draft_lengths``).
    """
    if waiting is None or waiting > 0 or len(remaining) <= 1:
        return None
    top = max(remaining)
    return [r >= top - slack for r in remaining]


WAVE_MIN_CHANCE = 0.5
"""Below this chance a context-draft token is not verified for the batch's end, whatever its
share of a step (``wave_draft_lengths``). An accepted token's worth there (``last_shares``) is an
estimate, and the tokens of middling chance are the ones it misprices most: without a floor (bs 8,
long matches, one chunk each) the tokens verified were accepted as expected where sequences copy
a source (Translation: 110 expected, 114 accepted) but half as often elsewhere (QA: 39 and 18,
0.95x that chunk; Summarization: 56 and 31)."""

LAST_SPREAD = 2.0
"""Tokens: how many more tokens left make a sequence clearly the likelier last (``last_shares``)."""


def last_shares(remaining: list[int], spread: float = LAST_SPREAD) -> np.ndarray:
    """The chance that each sequence is the batch's last to end, with no request waiting.

    The batch ends with the sequence that has the most tokens left, give or take what drafts and
    EOS change from here: the chance falls off smoothly (softmax, ``spread`` tokens) with how
    many fewer a sequence has left. An accepted token of sequence r brings the batch's end about
    ``share[r]`` of a step closer. So the sequences level with the longest share a step between
    them: where they copy their contexts alike (Translation) each one's sure tokens pay; one that
    has drafted its way ahead gets less, and the others catch up. Weighting instead by how fast
    each was expected to go (its context matches' chances) put the whole share on the sequences
    whose matches were weakest (Translation at 16: τ 1.16 where ngram made 1.67), since a
    sequence not drafted goes no faster however good its matches."""
    s = np.asarray(remaining, dtype=np.float64)
    w = np.exp((s - s.max()) / spread)
    return w / w.sum()


def joint_shares(shares: np.ndarray | list[float], first: np.ndarray | list[float]) -> np.ndarray:
    """Each sequence's share of the batch's end (``last_shares``), times the chance that the others
    that could end last move on with it.

    An accepted token of one sequence brings the end closer only as far as the sequences level
    with it move too: the linear share prices it as if they always did (16 level sequences, 1/16
    of a step each), but the end moves by the least any of them accepts. Where they copy their
    contexts alike (Translation) they do move together; where one copies and the rest write free
    text (Summarization, Math), they do not. ``first[r]``: the chance that sequence r's next draft
    token is accepted (0 without a draft); each share is scaled by the others' chances, weighted
    by their shares. Replayed with the AVX-512 host's costs at 16 (``scripts/wave_sim.py``,
    session 21): 1.001x where the linear shares made 0.977x (Summarization 0.993x against
    0.942x), and within 0.5 % of them at 8 and on the AMX host's costs, every group's worst
    case better."""
    s = np.asarray(shares, dtype=np.float64)
    p = np.asarray(first, dtype=np.float64)
    rest = s.sum() - s
    others = np.divide(float(s @ p) - s * p, rest, out=np.ones_like(s), where=rest > 1e-12)
    return s * others


def wave_draft_lengths(chances: list[np.ndarray], critical: list[bool], blocked: bool, base_tokens: int,
                       cost: StepCost | StepCostAt, contexts: list[float] | None = None,
                       shares: list[float] | None = None) -> list[int]:
    """Draft lengths when no request waits: the batch ends with its slowest sequences.

    The critical sequences move the end only together: a step brings it ``1 + min(accepted)``
    closer, and ``P(min ≥ j) = Π_r chances[r][j-1]``. So they get one common depth, the one
    with the most expected progress per second; none if a critical sequence has nothing to draft
    (``blocked``). The others (and, where the critical ones get no depth, they too) only get
    tokens below the step-cost knee, and only where a token's attention costs less than what it
    saves if accepted: that sequence ends a step sooner, and the batch's last steps are a sequence
    (``ρ``) and its attention lighter; in a step that would not draft otherwise, only if what
    they save covers the once-per-step cost of drafting. (Measured at bs 8 on Translation, whose
    outputs end at EOS long before ``max_tokens``: the critical set was the whole batch, one
    sequence without a draft blocked it, and nothing was drafted, τ 1.04 against ngram's 1.55.)

    ``shares[r]``: the chance that draft r's sequence is the batch's last to end (``last_shares``),
    so an accepted token of it is worth that share of a step at the batch's end (and ``ρ``). Each
    draft gets its tokens beyond those, past the knee too, while that pays for their verification
    and their chance stays at least ``WAVE_MIN_CHANCE``: tokens of sequences that copy alike all
    count, whether they hold the end now or not (the rule above gave Translation 1.00-1.02x at bs
    8, where ngram drafting every match gave 1.21x; sequences copy in bursts of a few steps, and a
    burst skipped while a sequence is a little ahead is lost for good, the end then waits for it).
    """
    a, b, k, c = cost.fit()
    sizes = [int(x.size) for x in chances]
    attn = _token_seconds(cost, contexts, sizes)
    starts = np.concatenate(([0], np.cumsum(sizes)))
    out = [0] * len(chances)
    crit = [r for r, f in enumerate(critical) if f and sizes[r] > 0]
    depth = 0
    if crit and not blocked:
        reach = min(sizes[r] for r in crit)
        ahead = np.prod(np.stack([chances[r][:reach] for r in crit]), axis=0)
        gain = 1.0 + np.concatenate(([0.0], np.cumsum(ahead)))
        js = np.arange(reach + 1)
        per_depth = sum(float(attn[starts[r]]) for r in crit)
        t = a + b * np.maximum(0.0, base_tokens + len(crit) * js - k) + c * (js > 0) + per_depth * js
        depth = int(np.argmax(gain / np.maximum(t, 1e-12)))
        for r in crit:
            out[r] = depth
    used = base_tokens + len(crit) * depth
    extra = list(out)
    saved = 0.0  # seconds the tokens beyond the common depth save, net of their attention
    others = [r for r, f in enumerate(critical) if (not f or depth == 0) and sizes[r] > 0]
    room = total = sum(sizes[r] for r in others)
    if b > 0:
        room = min(total, max(0, int(k - used)))
    if room > 0:
        p = np.concatenate([chances[r] for r in others])
        e = np.concatenate([attn[starts[r]:starts[r + 1]] for r in others])
        row = np.repeat(np.asarray(others), [sizes[r] for r in others])
        net = p * (cost.per_row + e) - e  # seconds a token saves, net of its attention (p·ρ where that is free)
        order = [j for j in np.argsort(-p, kind="stable") if net[j] >= 0][:room]
        saved = float(net[order].sum())
        # Only if they pay the once-per-step cost of drafting themselves: tokens below a fitted
        # knee that ride along with long-match ones cost more than it says (bs 16 QA, one chunk:
        # 493 verified, 112 accepted, 0.90x; none of them without long-match ones).
        if depth > 0 or c <= 0 or saved >= c:
            for r, n in zip(*np.unique(row[order], return_counts=True)):
                extra[int(r)] = int(n)
            used += len(order)
        else:
            saved = 0.0
    if shares is not None:
        step = cost(base_tokens)
        for r, share in enumerate(shares):
            worth = share * step + cost.per_row  # an accepted token's share of a step at the end, with ρ
            for j in range(extra[r], sizes[r]):
                e_j = float(attn[starts[r] + j])
                gain = float(chances[r][j]) * (worth + e_j) - e_j - (b if used + 1 > k else 0.0)
                if gain < 0 or chances[r][j] < WAVE_MIN_CHANCE:
                    break
                extra[r], used, saved = j + 1, used + 1, saved + gain
    if depth == 0 and c > 0 and saved < c:
        return out  # the step would pay the once-per-step cost of drafting for them alone
    return extra


def rows_bucket(rows: int) -> int:
    """1, 2, 3, 4, then powers of two (5-8 -> 8, 9-16 -> 16, ...)."""
    return rows if rows <= 4 else 1 << (rows - 1).bit_length()


@dataclass
class RoundStats:
    """Decayed per-row-round means: tokens committed, tokens drafted."""

    decay: float = 0.95
    w: float = 0.0
    committed: float = 0.0
    drafted: float = 0.0

    def add(self, rows: int, committed: float, drafted: float) -> None:
        d = self.decay
        self.w = self.w * d + rows
        self.committed = self.committed * d + committed
        self.drafted = self.drafted * d + drafted

    @property
    def tau(self) -> float:
        return self.committed / self.w if self.w > 0 else 1.0

    @property
    def drafts(self) -> float:
        return self.drafted / self.w if self.w > 0 else 0.0


@dataclass
class SkipValue:
    """Layer-skip drafts, per row that got them: tokens accepted, drafted, seconds spent making them
    (plans included), and of those the draft forwards alone."""

    decay: float = 0.9
    rows: float = 0.0
    accepted: float = 0.0
    drafted: float = 0.0
    seconds: float = 0.0
    draft_seconds: float = 0.0
    steps: int = 0

    def add(self, rows: int, drafted: int, accepted: int, seconds: float, draft_seconds: float | None = None) -> None:
        d = self.decay
        self.rows = self.rows * d + rows
        self.drafted = self.drafted * d + drafted
        self.accepted = self.accepted * d + accepted
        self.seconds = self.seconds * d + seconds
        self.draft_seconds = self.draft_seconds * d + (seconds if draft_seconds is None else draft_seconds)
        self.steps += 1

    def forget(self, keep: float) -> None:
        """Weigh what was measured before by ``keep``: it is stale after a long pause."""
        self.rows *= keep
        self.drafted *= keep
        self.accepted *= keep
        self.seconds *= keep
        self.draft_seconds *= keep

    def value(self, price: float, rate: float) -> float:
        """Tokens gained per drafted row, net of verifying the drafts and of the engine's time."""
        if self.rows <= 0:
            return 0.0
        return (self.accepted - price * self.drafted - self.seconds * rate) / self.rows

    def could_pay(self, price: float, rate: float) -> bool:
        """Would the drafts pay if every token were accepted and no plan were needed? If not, a
        probe cannot find them paying (at batch 16 on this CPU a draft token costs more engine
        time than a token is worth), so none is made. True while nothing is measured."""
        return self.drafted <= 0 or self.drafted * (1.0 - price) > self.draft_seconds * rate


@dataclass
class Governor:
    enabled: bool = True
    min_steps: int = 3
    """Measured layer-skip steps before their value is trusted."""
    probe_every: int = 40
    max_probe_every: int = 640
    probe_len: int = 3
    probe_forget: float = 0.2
    """A probe weighs the layer-skip figures measured before it by this much."""
    probe_budget: float = 0.005
    """Most of the time since start that probes (plans and draft forwards that did not pay)
    may take: a probe on a large batch costs several full steps."""
    verify: StepCost = field(default_factory=StepCost)
    by_rows: dict[int, StepCost] = field(default_factory=dict)
    """The same fit per batch-size bucket: the marginal cost of a token is not the same at every
    batch size (flat up to ~7 tokens, then linear, on this CPU), so the price uses the local slope
    once there is one, the global fit until then."""
    recent: RoundStats = field(default_factory=RoundStats)
    skip: SkipValue = field(default_factory=SkipValue)
    steps_by_arm: dict[int, int] = field(default_factory=dict)
    _last_end: float | None = None
    _last_skip_s: float = 0.0
    _last_plan_s: float = 0.0
    _last_own_s: float = 0.0
    _step: int = 0
    _tries: int = 0
    _probe_left: int = 0
    _probe_rows: int = 0
    """The rows bucket the running probe measures."""
    probing: bool = False
    """This step's layer-skip drafts are a probe (one row)."""
    _probe_s: float = 0.0
    _busy_s: float = 0.0
    _backoff: int = 40
    _next_probe: int = 0
    _last_arm: int | None = None
    stall_factor: float = 10.0
    """A step that took this many times the typical step (and over a quarter second) was not
    decoding all that time: the engine waited for requests, or the machine stalled."""
    _typical_s: float = 0.0
    """Running mean of the measured steps' seconds."""
    share_decay: float = 0.99
    """Per step, for the recent time shares by batch size (the last few hundred steps)."""
    _recent_s: dict[int, float] = field(default_factory=dict)
    """Decayed seconds of recent steps by rows bucket."""
    _payable: float = 1.0
    _payable_at: int = 0
    context: float = 0.0
    """Mean context of the last measured step's verified tokens, thousands of tokens: the next
    step's attention is priced at it."""

    # -- measuring ------------------------------------------------------------------------
    def observe(self, committed: int, measurable: bool, now: float | None = None,
                scheduled: int | None = None, rows: int | None = None, work: float = 0.0) -> None:
        """Account the step that just finished: tokens committed, tokens it verified, and their
        attention ``work`` (verified tokens times their context, thousands of tokens)."""
        now = time.perf_counter() if now is None else now
        if self._last_end is None:
            return
        seconds = now - self._last_end
        if seconds + self._last_own_s > 5.0 or self._stalled(seconds):
            # The engine was idle or stalled, not decoding. Under 5 s such a gap once passed for
            # a one-sequence step (an idle engine between two batches, and the first step of the
            # next had one sampled row): one-row steps then cost ~4 s, a token was worth nothing,
            # and layer-skip "paid" at one row: a plan and a draft in every batch of 8.
            self._probe_left = 0  # nor does a probe go on across it, into other requests
            return
        self._busy_s += seconds
        if rows:
            for b in self._recent_s:
                self._recent_s[b] *= self.share_decay
            b = rows_bucket(rows)
            self._recent_s[b] = self._recent_s.get(b, 0.0) + seconds
        if not measurable or committed <= 0 or not rows:
            return
        self._typical_s = seconds if self._typical_s <= 0 else 0.9 * self._typical_s + 0.1 * seconds
        scheduled = rows if scheduled is None else scheduled
        drafted = scheduled > rows
        self.context = work / max(scheduled, 1)
        self.verify.add(scheduled, seconds, drafted, rows, work)
        self.by_rows.setdefault(rows_bucket(rows), StepCost()).add(scheduled, seconds, drafted, rows, work)
        self.recent.add(rows, committed, max(scheduled - rows, 0))

    def _stalled(self, seconds: float) -> bool:
        return self._typical_s > 0 and seconds > max(0.25, self.stall_factor * self._typical_s)

    def observe_skip(self, rows: int, drafted: int, accepted: int) -> None:
        """Layer-skip drafts of the last step, verified: ``rows`` rows, ``drafted`` tokens of which
        ``accepted`` were accepted."""
        if rows > 0:
            self.skip.add(rows, drafted, accepted, self._last_skip_s, self._last_skip_s - self._last_plan_s)

    # -- pricing --------------------------------------------------------------------------
    def step_cost(self, rows: int) -> StepCostAt:
        local = self.by_rows.get(rows_bucket(rows))
        return (local if local is not None and local.varied else self.verify).at(rows, self.context)

    def rate(self, rows: int) -> float:
        """Tokens per second the engine makes now at ``rows`` sequences."""
        r = self.recent
        return rows * r.tau / max(self.step_cost(rows)(rows * (1.0 + r.drafts)), 1e-9)

    def token_price(self, rows: int) -> float:
        """What verifying one more draft token costs now, in tokens (0 with the governor off)."""
        if not self.enabled:
            return 0.0
        return self.step_cost(rows).marginal(rows * (1.0 + self.recent.drafts)) * self.rate(rows)

    # -- deciding -------------------------------------------------------------------------
    def draft_lengths(self, chances: list[np.ndarray], base_tokens: int, rows: int,
                      critical: list[bool] | None = None, blocked: bool = False,
                      contexts: list[float] | None = None, shares: list[float] | None = None) -> list[int]:
        """Tokens of each draft worth verifying this step (all of them with the governor off):
        for throughput while requests wait (``critical`` None), else for the batch's end.
        ``contexts``: each draft's sequence length, thousands of tokens; ``shares``: each
        draft's sequence's chance of being the batch's last (``last_shares``)."""
        if not self.enabled:
            return [int(c.size) for c in chances]
        if critical is None:
            return best_draft_lengths(chances, base_tokens, rows, self.step_cost(rows), contexts)
        return wave_draft_lengths(chances, critical, blocked, base_tokens, self.step_cost(rows), contexts, shares)

    def use_skip(self, rows: int) -> bool:
        """Layer-skip drafts this step, for the rows without a paying context draft? While they
        are being learnt or re-measured (``probing``), on one row only: a probe over a whole large
        batch costs several full steps."""
        self._step += 1
        self.probing = False
        if not self.enabled:
            return True
        if self._learning():
            # Learn first. Unmeasured tries (no row left for layer-skip, prefills) are capped.
            self._tries += 1
            self.probing = True
            return True
        price, rate = self.token_price(rows), self.rate(rows)
        if self.skip.value(price, rate) > 0:
            self._backoff = self.probe_every
            self._next_probe = self._step + self._backoff
            return True
        self.probing = True
        if self._probe_goes_on(rows):
            self._probe_left -= 1
            return True
        # Nothing left of a probe, or the batch changed under it (a bs-8 batch began after the
        # one-row tail of the last): its rest would plan and draft where it was not meant to measure.
        self._probe_left = 0
        if self._step >= self._next_probe and self.skip.could_pay(price, rate) and self._within_budget():
            self.skip.forget(self.probe_forget)
            self._probe_left = self.probe_len - 1
            self._probe_rows = rows_bucket(rows)
            self._next_probe = self._step + self._backoff
            self._backoff = min(2 * self._backoff, self.max_probe_every)
            return True
        self.probing = False
        return False

    def may_use_skip(self, rows: int) -> bool:
        """Could the next ``use_skip`` say yes? Asked before the step's forward (which then
        captures every layer's hidden states for plans only if so); changes nothing."""
        if not self.enabled or self._learning():
            return True
        price, rate = self.token_price(rows), self.rate(rows)
        if self.skip.value(price, rate) > 0 or self._probe_goes_on(rows):
            return True
        return self._step + 1 >= self._next_probe and self.skip.could_pay(price, rate) and self._within_budget()

    def _probe_goes_on(self, rows: int) -> bool:
        return self._probe_left > 0 and rows_bucket(rows) == self._probe_rows

    def _learning(self) -> bool:
        return self.skip.steps < self.min_steps and self._tries < 4 * self.min_steps

    def _within_budget(self) -> bool:
        """Probes may take ``probe_budget`` of the time since start, times the share of recent
        time spent at batch sizes where layer-skip drafts could pay at all: in a bs-8 workload
        whose batches end in a few one-row steps, a probe (a plan and a few draft steps, 2-3 %
        of a 4 s batch) is worth making only as often as those steps take time."""
        if self._step >= self._payable_at:
            self._payable_at = self._step + 16  # prices and rates move slowly; 6 buckets cost ~0.15 ms
            total = sum(self._recent_s.values())
            payable = sum(
                s for b, s in self._recent_s.items() if self.skip.could_pay(self.token_price(b), self.rate(b))
            )
            self._payable = payable / total if total > 0 else 1.0
        return self._probe_s <= self.probe_budget * self._busy_s * self._payable

    def finish(self, arm: int, skip_s: float, own_s: float, now: float | None = None, plan_s: float = 0.0) -> None:
        """The step's arm (what it drafted), seconds spent on layer-skip drafts and plans, and on
        our whole part of the step; when our part ended."""
        self._last_arm = arm
        self._last_skip_s = skip_s
        self._last_plan_s = plan_s
        self._last_own_s = own_s
        self._last_end = time.perf_counter() if now is None else now
        self._busy_s += own_s
        if self.probing:
            self._probe_s += skip_s
        self.steps_by_arm[arm] = self.steps_by_arm.get(arm, 0) + 1
