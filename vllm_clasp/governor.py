"""Choose, step by step, how much to speculate — from costs and acceptance measured online.

Three arms: ``SKIP`` (layer-skip drafts, plus context drafts), ``LOOKUP`` (zero-cost context drafts
only) and ``PLAIN`` (no drafts). Rather than timing each arm at each batch size (which a short run
never amortises), the governor keeps a small cost model whose parts do not depend on batch size:

* verification: seconds of an engine step against the tokens it scheduled, ``t(T) = a + b·T``
  (least squares over every measured step, older steps decaying);
* per arm and sequence-round: tokens committed ``τ``, tokens drafted ``d``, and drafting seconds as
  a multiple ``κ`` of a plain step at the same batch size (a draft step is a forward over the
  same rows with fewer layers).

The predicted rate of an arm at ``B`` sequences is ``B·τ / (t(B·(1+d)) + κ·t(B))``; the governor
takes the best, and now and then probes an arm that comes within reach so its figures stay fresh.
Steps containing a prefill are not measured. On this CPU a step is compute-bound from a few
tokens on, so verification's marginal cost ``b`` is large and the model turns drafting off at large
batches, and on where acceptance is high; on a GPU ``b`` is near zero and drafting stays on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SKIP, LOOKUP, PLAIN = 2, 1, 0
ARMS = (SKIP, LOOKUP, PLAIN)
ARM_NAMES = {SKIP: "layer-skip", LOOKUP: "context", PLAIN: "plain"}


@dataclass
class StepCost:
    """Decayed least squares fit of step seconds against scheduled tokens."""

    decay: float = 0.99
    prior_slope: float = 0.15
    """Slope relative to the intercept while the data cannot tell (all steps one size)."""
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, tokens: float, seconds: float) -> None:
        d = self.decay
        self.w = self.w * d + 1.0
        self.sx = self.sx * d + tokens
        self.sy = self.sy * d + seconds
        self.sxx = self.sxx * d + tokens * tokens
        self.sxy = self.sxy * d + tokens * seconds

    @property
    def known(self) -> bool:
        return self.w > 0

    def coef(self) -> tuple[float, float]:
        if self.w <= 0:
            return 1.0, self.prior_slope
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > 0.25:
            b = (self.sxy / self.w - mx * my) / var
            a = my - b * mx
            if b > 0 and a > 0:
                return a, b
        # One step size seen so far (or a fit that makes no sense): keep the prior shape.
        a = my / (1.0 + self.prior_slope * mx)
        return a, self.prior_slope * a

    def __call__(self, tokens: float) -> float:
        a, b = self.coef()
        return a + b * tokens


@dataclass
class ArmStats:
    """Per sequence-round: committed tokens, drafted tokens, drafting cost in plain steps."""

    decay: float = 0.9
    w: float = 0.0
    committed: float = 0.0
    drafted: float = 0.0
    w_cost: float = 0.0
    cost: float = 0.0
    steps: int = 0

    def add(self, rows: int, committed: float, drafted: float) -> None:
        d = self.decay
        self.w = self.w * d + rows
        self.committed = self.committed * d + committed
        self.drafted = self.drafted * d + drafted
        self.steps += 1

    def add_cost(self, plain_steps: float) -> None:
        self.w_cost = self.w_cost * self.decay + 1.0
        self.cost = self.cost * self.decay + plain_steps

    @property
    def tau(self) -> float:
        return self.committed / self.w if self.w > 0 else 1.0

    @property
    def drafts(self) -> float:
        return self.drafted / self.w if self.w > 0 else 0.0

    @property
    def kappa(self) -> float:
        return self.cost / self.w_cost if self.w_cost > 0 else 0.0


@dataclass
class Governor:
    enabled: bool = True
    arms: tuple[int, ...] = ARMS
    min_steps: int = 3
    """Measured steps an arm needs (at any batch size) before the model trusts its figures."""
    probe_every: int = 40
    probe_len: int = 2
    probe_reach: float = 0.8
    """Arms predicted at least this share of the best are probed every ``probe_every`` steps."""
    verify: StepCost = field(default_factory=StepCost)
    stats: dict[int, ArmStats] = field(default_factory=dict)
    _last_end: float | None = None
    _last_arm: int | None = None
    _last_rows: int = 0
    _last_draft_s: float = 0.0
    _step: int = 0
    _probe_arm: int | None = None
    _probe_left: int = 0
    steps_by_arm: dict[int, int] = field(default_factory=dict)
    _last_chosen: dict[int, int] = field(default_factory=dict)

    def arm(self, a: int) -> ArmStats:
        return self.stats.setdefault(a, ArmStats())

    def observe(self, committed: int, measurable: bool, now: float | None = None,
                scheduled: int | None = None, rows: int | None = None) -> None:
        """Account the step that just finished: tokens committed, tokens it verified."""
        now = time.perf_counter() if now is None else now
        if self._last_end is None or self._last_arm is None or not measurable or committed <= 0:
            return
        seconds = now - self._last_end
        if seconds + self._last_draft_s > 5.0:  # the engine was idle or stalled: not decoding
            return
        rows = self._last_rows if rows is None else rows
        scheduled = rows if scheduled is None else scheduled
        st = self.arm(self._last_arm)
        st.add(rows, committed, max(scheduled - rows, 0))
        self.verify.add(scheduled, seconds)
        if self._last_arm != PLAIN:
            st.add_cost(self._last_draft_s / max(self.verify(rows), 1e-9))

    def predicted_rate(self, a: int, rows: int) -> float:
        if a == PLAIN:
            return rows / self.verify(rows)
        st = self.arm(a)
        return rows * st.tau / (self.verify(rows * (1.0 + st.drafts)) + st.kappa * self.verify(rows))

    def decide(self, num_seqs: int) -> int:
        """The arm for this step."""
        self._step += 1
        if not self.enabled:
            return self.arms[0]
        # Learn each arm once (the figures carry over between batch sizes); cheap arms first
        # once a batch is large, since a bad draft costs most there.
        order = self.arms if num_seqs <= 2 else tuple(sorted(self.arms))
        for a in order:
            # Steps holding a prefill are not measured; under constant arrivals an arm may never
            # be, so move on after a few unmeasured tries (the model then falls back to priors).
            tried = self.steps_by_arm.get(a, 0) >= 4 * self.min_steps
            if not tried and (self.arm(a).steps < self.min_steps or (a == PLAIN and not self.verify.known)):
                return a
        rates = {a: self.predicted_rate(a, num_seqs) for a in self.arms}
        best = max(self.arms, key=lambda a: rates[a])
        if self._probe_left > 0 and self._probe_arm is not None and self._probe_arm != best:
            self._probe_left -= 1
            return self._probe_arm
        if self._step % self.probe_every == 0:
            # Arms within reach every probe_every steps; the others a quarter as often, so that
            # a change of workload (say, to copying from a long context) is still seen.
            others = [a for a in self.arms if a != best]
            near = [a for a in others if rates[a] >= self.probe_reach * rates[best]]
            if self._step % (4 * self.probe_every) == 0 and others:
                near = [min(others, key=lambda a: self._last_chosen.get(a, -1))]
            if near:
                self._probe_arm = max(near, key=lambda a: rates[a])
                self._probe_left = self.probe_len - 1
                return self._probe_arm
        return best

    def finish(self, arm: int, num_seqs: int, draft_s: float, now: float | None = None) -> None:
        """Record the arm chosen this step and when our part of it ended."""
        self._last_arm = arm
        self._last_rows = num_seqs
        self._last_draft_s = draft_s
        self._last_end = time.perf_counter() if now is None else now
        self.steps_by_arm[arm] = self.steps_by_arm.get(arm, 0) + 1
        self._last_chosen[arm] = self._step
