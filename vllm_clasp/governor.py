"""Decide, step by step, how much to speculate — from costs and acceptance measured online.

Every draft token is priced in the same unit, tokens of output:

* verifying one more token adds ``b`` seconds to a step (the step cost model below); at the rate
  the engine makes tokens now, that is ``price = b · rate`` tokens. A token is worth proposing
  only if its chance of being accepted is above that price.
* context drafts (lookup.py) cost nothing to make; each is cut where its measured acceptance, by
  n-gram length and position, falls below the price (``token_price``).
* layer-skip drafts cost draft forwards and plans. They are used for the sequences that have no
  paying context draft while, measured on exactly those rows,
  ``accepted tokens > price · drafted tokens + drafting seconds · rate`` (``use_skip``). While they
  do not pay, a couple of steps re-measure them now and then, less often each time they still do
  not (the workload may change).

Step cost: ``t(T) = a + b·T`` for a step that verified ``T`` tokens, by decayed least squares over
measured steps (those without a prefill); ``b = 0`` where steps of every size took as long (batch
size 1 on this CPU, up to ~7 tokens). Nothing depends on batch size except through ``T``, so
nothing is re-learned when it changes. On this CPU ``b`` is a good share of a step from a few
sequences on, so drafting narrows to the surest tokens at large batches; on a GPU ``b`` is near
zero and drafting stays wide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SKIP, LOOKUP, PLAIN = 2, 1, 0
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

    @property
    def varied(self) -> bool:
        """Enough steps of different sizes to tell a slope."""
        return self.w >= 8 and self.sxx / self.w - (self.sx / self.w) ** 2 > 0.25

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
            if b <= 0 < my:
                # Steps of every size took as long: verified tokens are free here.
                return my, 0.0
        # One step size seen so far (or a fit that makes no sense): keep the prior shape.
        a = my / (1.0 + self.prior_slope * mx)
        return a, self.prior_slope * a

    def __call__(self, tokens: float) -> float:
        a, b = self.coef()
        return a + b * tokens


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
    """Layer-skip drafts, per row that got them: tokens accepted, drafted, seconds spent making them."""

    decay: float = 0.9
    rows: float = 0.0
    accepted: float = 0.0
    drafted: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def add(self, rows: int, drafted: int, accepted: int, seconds: float) -> None:
        d = self.decay
        self.rows = self.rows * d + rows
        self.drafted = self.drafted * d + drafted
        self.accepted = self.accepted * d + accepted
        self.seconds = self.seconds * d + seconds
        self.steps += 1

    def forget(self, keep: float) -> None:
        """Weigh what was measured before by ``keep``: it is stale after a long pause."""
        self.rows *= keep
        self.drafted *= keep
        self.accepted *= keep
        self.seconds *= keep

    def value(self, price: float, rate: float) -> float:
        """Tokens gained per drafted row, net of verifying the drafts and of the engine's time."""
        if self.rows <= 0:
            return 0.0
        return (self.accepted - price * self.drafted - self.seconds * rate) / self.rows


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
    _last_own_s: float = 0.0
    _step: int = 0
    _tries: int = 0
    _probe_left: int = 0
    _backoff: int = 40
    _next_probe: int = 0
    _last_arm: int | None = None

    # -- measuring ------------------------------------------------------------------------
    def observe(self, committed: int, measurable: bool, now: float | None = None,
                scheduled: int | None = None, rows: int | None = None) -> None:
        """Account the step that just finished: tokens committed, tokens it verified."""
        now = time.perf_counter() if now is None else now
        if self._last_end is None or not measurable or committed <= 0 or not rows:
            return
        seconds = now - self._last_end
        if seconds + self._last_own_s > 5.0:  # the engine was idle or stalled: not decoding
            return
        scheduled = rows if scheduled is None else scheduled
        self.verify.add(scheduled, seconds)
        self.by_rows.setdefault(rows_bucket(rows), StepCost()).add(scheduled, seconds)
        self.recent.add(rows, committed, max(scheduled - rows, 0))

    def observe_skip(self, rows: int, drafted: int, accepted: int) -> None:
        """Layer-skip drafts of the last step, verified: ``rows`` rows, ``drafted`` tokens of which
        ``accepted`` were accepted."""
        if rows > 0:
            self.skip.add(rows, drafted, accepted, self._last_skip_s)

    # -- pricing --------------------------------------------------------------------------
    def step_cost(self, rows: int) -> StepCost:
        local = self.by_rows.get(rows_bucket(rows))
        return local if local is not None and local.varied else self.verify

    def rate(self, rows: int) -> float:
        """Tokens per second the engine makes now at ``rows`` sequences."""
        r = self.recent
        return rows * r.tau / max(self.step_cost(rows)(rows * (1.0 + r.drafts)), 1e-9)

    def token_price(self, rows: int) -> float:
        """What verifying one more draft token costs, in tokens (0 with the governor off)."""
        if not self.enabled:
            return 0.0
        _, b = self.step_cost(rows).coef()
        return b * self.rate(rows)

    # -- deciding -------------------------------------------------------------------------
    def use_skip(self, rows: int) -> bool:
        """Layer-skip drafts this step, for the rows without a paying context draft?"""
        self._step += 1
        if not self.enabled:
            return True
        if self.skip.steps < self.min_steps and self._tries < 4 * self.min_steps:
            # Learn first. Unmeasured tries (no row left for layer-skip, prefills) are capped.
            self._tries += 1
            return True
        if self.skip.value(self.token_price(rows), self.rate(rows)) > 0:
            self._backoff = self.probe_every
            self._next_probe = self._step + self._backoff
            return True
        if self._probe_left > 0:
            self._probe_left -= 1
            return True
        if self._step >= self._next_probe:
            self.skip.forget(self.probe_forget)
            self._probe_left = self.probe_len - 1
            self._next_probe = self._step + self._backoff
            self._backoff = min(2 * self._backoff, self.max_probe_every)
            return True
        return False

    def finish(self, arm: int, skip_s: float, own_s: float, now: float | None = None) -> None:
        """The step's arm (what it drafted), seconds spent on layer-skip drafts and plans, and on
        our whole part of the step; when our part ended."""
        self._last_arm = arm
        self._last_skip_s = skip_s
        self._last_own_s = own_s
        self._last_end = time.perf_counter() if now is None else now
        self.steps_by_arm[arm] = self.steps_by_arm.get(arm, 0) + 1
