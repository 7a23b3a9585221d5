"""Zero-cost drafts from the context (prompt lookup): when the last n tokens of a sequence occurred
earlier in it, propose what followed them then. Copy-heavy tasks (extraction, summarisation, RAG,
code edits) often continue a span of the context; where they do, these drafts cost nothing to make
and the layer-skip draft is not needed for that sequence in that round.

Short matches are often wrong (a 1-gram continuation is right about a quarter of the time on
Spec-Bench), long ones rarely (5-grams: ~90 %). Whether a draft token is worth verifying depends on
the batch: verifying it costs next to nothing at batch size 1 on this CPU and a good share of a
step at 16. So every match is taken, ``LookupAcceptance`` gives each token its measured chance of
acceptance, and the governor verifies the tokens that make the step most productive
(``governor.best_draft_lengths``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def lookup_match(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> tuple[np.ndarray, int]:
    """(draft, n): at most ``k`` tokens following the most recent earlier occurrence of the
    longest suffix n-gram (``min_n <= n <= max_n``), and that n; empty and 0 if none."""
    total = tokens.shape[0]
    if k <= 0 or min_n <= 0 or max_n < min_n or total <= min_n:
        return tokens[:0], 0
    # Candidate match ends: earlier positions holding the last token, with something after them.
    cand = np.flatnonzero(tokens[: total - 1] == tokens[total - 1])
    if cand.size == 0:
        return tokens[:0], 0
    length = np.ones(cand.size, dtype=np.int64)
    alive = np.ones(cand.size, dtype=bool)
    for m in range(1, min(max_n, total - 1)):
        prev = cand - m
        alive &= prev >= 0
        alive &= tokens[np.maximum(prev, 0)] == tokens[total - 1 - m]
        if not alive.any():
            break
        length += alive
    best = int(length.max())
    if best < min_n:
        return tokens[:0], 0
    start = int(cand[np.flatnonzero(length == best)[-1]]) + 1
    return tokens[start : min(start + k, total)], best


def lookup_draft(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The draft of ``lookup_match`` alone."""
    return lookup_match(tokens, min_n, max_n, k)[0]


@dataclass
class LookupAcceptance:
    """How often context-draft token j is accepted, given the ones before it were, by match length n.

    Decayed counts per (sampled?, n, j) with an optimistic prior, so that a class is tried before
    it is judged; every ``explore_every``-th draft keeps one token past its cut, so classes cut off
    keep being measured (the workload may change) at the price of one token.
    """

    prior_accepts: float = 1.8
    prior_trials: float = 2.0
    decay: float = 0.998
    explore_every: int = 16
    max_scale: float = 4.0
    """Cap on a sequence's calibration factor."""
    trials: dict[tuple[bool, int, int], float] = field(default_factory=dict)
    accepts: dict[tuple[bool, int, int], float] = field(default_factory=dict)
    _drafts: int = 0

    def rate(self, sampled: bool, n: int, j: int) -> float:
        key = (sampled, n, j)
        return (self.accepts.get(key, 0.0) + self.prior_accepts) / (self.trials.get(key, 0.0) + self.prior_trials)

    def chances(self, sampled: bool, n: int, length: int, seq: "SeqAcceptance | None" = None) -> np.ndarray:
        """For a ``length``-token draft from an n-gram match: the chance that tokens 0..j are all
        accepted, for each j. ``seq`` scales the table's chances by how this sequence's context
        drafts have fared against them (free text vs copying)."""
        scale = min(seq.scale(), self.max_scale) if seq is not None else 1.0
        r = [min(1.0, self.rate(sampled, n, j) * scale) for j in range(length)]
        return np.cumprod(np.asarray(r, dtype=np.float64))

    def explore(self) -> bool:
        """Should this draft keep one token past its cut? True for every ``explore_every``-th."""
        self._drafts += 1
        return self._drafts % self.explore_every == 0

    def update(self, sampled: bool, n: int, verified: int, accepted: int, seq: "SeqAcceptance | None" = None) -> None:
        """A draft of ``verified`` tokens from an n-gram match had its first ``accepted`` accepted."""
        for j in range(min(accepted + 1, verified)):
            key = (sampled, n, j)
            if seq is not None:
                seq.add(self.rate(sampled, n, j), 1.0 if j < accepted else 0.0)
            self.trials[key] = self.trials.get(key, 0.0) * self.decay + 1.0
            self.accepts[key] = self.accepts.get(key, 0.0) * self.decay + (1.0 if j < accepted else 0.0)


@dataclass
class SeqAcceptance:
    """One sequence's context-draft record: accepted tokens against what the shared table expected.
    A sequence writing free text accepts less than the average, one copying from its context more;
    the ratio (shrunk towards 1 while there is little data) scales the table's chances for it."""

    prior: float = 2.0
    decay: float = 0.9
    expected: float = 0.0
    accepted: float = 0.0

    def add(self, expected: float, accepted: float) -> None:
        self.expected = self.expected * self.decay + expected
        self.accepted = self.accepted * self.decay + accepted

    def scale(self) -> float:
        return min(4.0, max(0.25, (self.accepted + self.prior) / (self.expected + self.prior)))
