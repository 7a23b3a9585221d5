"""Choose, step by step, how much to speculate — by measurement, not assumption.

Three arms: ``SKIP`` (layer-skip drafts, plus context drafts), ``LOOKUP`` (zero-cost context
drafts only) and ``PLAIN`` (no drafts: plain decoding). The proposer sees one engine step per call;
a step's committed tokens and wall time (the verification step plus our own drafting before it)
are attributed to the arm chosen when its drafts were made. Rates are kept per batch-size bucket,
since a step's cost depends on how many sequences share it. The governor exploits the fastest arm
and keeps probing the others for a few steps every ``probe_every`` steps, so a change in the
workload (say from free-form chat to copying from a long context) is followed. Steps that contain
a prefill are not measured (their time says nothing about decoding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SKIP, LOOKUP, PLAIN = 2, 1, 0
ARMS = (SKIP, LOOKUP, PLAIN)


def batch_bucket(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


@dataclass
class _Rate:
    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def add(self, tokens: float, seconds: float, decay: float) -> None:
        self.tokens = self.tokens * decay + tokens
        self.seconds = self.seconds * decay + seconds
        self.steps += 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Governor:
    enabled: bool = True
    arms: tuple[int, ...] = ARMS
    min_steps: int = 4
    """Measured steps each arm needs in a bucket before the governor compares them."""
    probe_every: int = 48
    probe_len: int = 4
    decay: float = 0.97
    _rates: dict[tuple[int, int], _Rate] = field(default_factory=dict)
    _last_end: float | None = None
    _last_arm: int | None = None
    _last_bucket: int = 1
    _last_draft_s: float = 0.0
    _step: int = 0
    _probe_arm: int | None = None
    _probe_left: int = 0
    _probe_turn: int = 0
    steps_by_arm: dict[int, int] = field(default_factory=dict)

    def observe(self, committed: int, measurable: bool, now: float | None = None) -> None:
        """Account the step that just finished (the tokens it committed)."""
        now = time.perf_counter() if now is None else now
        if self._last_end is None or self._last_arm is None or not measurable or committed <= 0:
            return
        seconds = (now - self._last_end) + self._last_draft_s
        if seconds > 5.0:  # the engine was idle or stalled: not a decoding step
            return
        self._rates.setdefault((self._last_bucket, self._last_arm), _Rate()).add(committed, seconds, self.decay)

    def rate(self, bucket: int, arm: int) -> _Rate:
        return self._rates.get((bucket, arm), _Rate())

    def decide(self, num_seqs: int) -> int:
        """The arm for this step."""
        self._step += 1
        if not self.enabled:
            return self.arms[0]
        b = batch_bucket(num_seqs)
        for arm in self.arms:  # explore in order of preference
            if self.rate(b, arm).steps < self.min_steps:
                return arm
        best = max(self.arms, key=lambda a: self.rate(b, a).rate)
        if self._probe_left > 0 and self._probe_arm is not None and self._probe_arm != best:
            self._probe_left -= 1
            return self._probe_arm
        if self._step % self.probe_every == 0:
            others = [a for a in self.arms if a != best]
            self._probe_arm = others[self._probe_turn % len(others)]
            self._probe_turn += 1
            self._probe_left = self.probe_len - 1
            return self._probe_arm
        return best

    def finish(self, arm: int, num_seqs: int, draft_s: float, now: float | None = None) -> None:
        """Record the arm chosen this step and when our part of it ended."""
        self._last_arm = arm
        self._last_bucket = batch_bucket(num_seqs)
        self._last_draft_s = draft_s
        self._last_end = time.perf_counter() if now is None else now
        self.steps_by_arm[arm] = self.steps_by_arm.get(arm, 0) + 1
