"""Turn layer-skip drafting off when it does not pay, and back on when it might: measured, not assumed.

The proposer sees one engine step per call. A step's committed tokens and wall time (the
verification step plus our own drafting before it) are attributed to the mode chosen when the
drafts were made: ``spec`` (layer-skip drafts) or ``plain`` (none; zero-cost context drafts are
made in both modes). Rates are kept per batch-size
bucket, since a step's cost depends on how many sequences share it. The governor exploits the
faster mode and keeps probing the other for a few steps every ``probe_every`` steps, so a change in
the workload (say from free-form chat to copying from a long context) turns speculation back on.
Steps that contain a prefill are not measured (their time says nothing about decoding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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
    min_steps: int = 6
    """Measured steps each mode needs in a bucket before the governor compares them."""
    probe_every: int = 48
    probe_len: int = 6
    decay: float = 0.97
    margin: float = 1.0
    """Speculate only if its measured rate exceeds plain's times this."""
    _rates: dict[tuple[int, bool], _Rate] = field(default_factory=dict)
    _last_end: float | None = None
    _last_mode: bool | None = None
    _last_bucket: int = 1
    _last_draft_s: float = 0.0
    _step: int = 0
    _probe_left: int = 0
    spec_steps: int = 0
    plain_steps: int = 0

    def observe(self, committed: int, measurable: bool, now: float | None = None) -> None:
        """Account the step that just finished (the tokens it committed)."""
        now = time.perf_counter() if now is None else now
        if self._last_end is not None and self._last_mode is not None and measurable and committed > 0:
            seconds = (now - self._last_end) + self._last_draft_s
            if seconds > 5.0:  # the engine was idle or stalled: not a decoding step
                return
            self._rates.setdefault((self._last_bucket, self._last_mode), _Rate()).add(
                committed, seconds, self.decay
            )

    def rate(self, bucket: int, spec: bool) -> _Rate:
        return self._rates.get((bucket, spec), _Rate())

    def decide(self, num_seqs: int) -> bool:
        """Whether to draft this step."""
        self._step += 1
        if not self.enabled:
            return True
        b = batch_bucket(num_seqs)
        spec, plain = self.rate(b, True), self.rate(b, False)
        if spec.steps < self.min_steps:
            return True
        if plain.steps < self.min_steps:
            return False
        best = spec.rate > plain.rate * self.margin
        if self._probe_left > 0:
            self._probe_left -= 1
            return not best
        if self._step % self.probe_every == 0:
            self._probe_left = self.probe_len - 1
            return not best
        return best

    def finish(self, spec: bool, num_seqs: int, draft_s: float, now: float | None = None) -> None:
        """Record the mode chosen this step and when our part of it ended."""
        self._last_mode = spec
        self._last_bucket = batch_bucket(num_seqs)
        self._last_draft_s = draft_s
        self._last_end = time.perf_counter() if now is None else now
        if spec:
            self.spec_steps += 1
        else:
            self.plain_steps += 1
