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


LONG_MATCHES = (8, 12, 20, 32)
"""Acceptance classes past ``lookup_max``: how long the match behind a draft really is. On the
default model's Spec-Bench outputs a draft behind a 6-7 token match had its first token accepted
77 % of the time and 3.3 tokens of 8 on average, behind 12-19 tokens 88 % and 4.8, behind 20 or
more 96 % and 5.9: the one class ``lookup_max`` made of them mixed drafts worth verifying at any
batch size with ones that are not."""


def lookup_match(tokens: np.ndarray, min_n: int, max_n: int, k: int,
                 long_classes: tuple[int, ...] = ()) -> tuple[np.ndarray, int]:
    """(draft, n): at most ``k`` tokens following the most recent earlier occurrence of the
    longest suffix n-gram (``min_n <= n <= max_n``), and that n; empty and 0 if none. With
    ``long_classes``, a match of ``max_n`` tokens is followed back further, and n is the largest
    class the whole match reaches (``LONG_MATCHES``)."""
    return lookup_matches(tokens, min_n, max_n, k, long_classes)[0]


def lookup_matches(tokens: np.ndarray, min_n: int, max_n: int, k: int, long_classes: tuple[int, ...] = ()
                   ) -> tuple[tuple[np.ndarray, int], tuple[np.ndarray, int] | None]:
    """(latest, earliest): ``lookup_match`` at the most recent and at the earliest earlier
    occurrence of the longest suffix n-gram; earliest is None where that n-gram occurred once
    (or not at all). Which of the two a sequence copies is its own (``OccurrenceChoice``).

    Runs every step for every sequence, so it searches the context's bytes with ``bytes.rfind``
    and ``bytes.find`` (C speed, ~5x faster than a numpy scan over candidate positions at batch
    8–16), longest n first; a hit at a byte offset inside a token is skipped."""
    total = tokens.shape[0]
    none = (tokens[:0], 0)
    if k <= 0 or min_n <= 0 or max_n < min_n or total <= min_n:
        return none, None
    width = tokens.itemsize
    earlier = tokens[: total - 1].tobytes()  # an occurrence must end before the last token
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[total - n :].tobytes()
        last = earlier.rfind(suffix)
        while last > 0 and last % width:
            last = earlier.rfind(suffix, 0, last + len(suffix) - 1)
        if last < 0:
            continue
        first = earlier.find(suffix)
        while first % width:
            first = earlier.find(suffix, first + 1)
        latest = _draft_at(tokens, last // width + n, n, k, long_classes, max_n)
        if first == last:
            return latest, None
        return latest, _draft_at(tokens, first // width + n, n, k, long_classes, max_n)
    return none, None


def _draft_at(tokens: np.ndarray, start: int, n: int, k: int, classes: tuple[int, ...], max_n: int) -> tuple[np.ndarray, int]:
    if classes and n == max_n:
        n = _long_class(tokens, start, n, classes)
    return tokens[start : min(start + k, tokens.shape[0])], n


def _long_class(tokens: np.ndarray, end: int, n: int, classes: tuple[int, ...]) -> int:
    """The largest of ``classes`` (or n) that the match ending at ``end`` (exclusive) with the
    sequence's last n tokens reaches when followed back, as far as the largest class."""
    total = tokens.shape[0]
    reach = min(classes[-1], end)  # the earlier occurrence cannot start before token 0
    if reach <= n:
        return n
    a = tokens[end - reach : end - n][::-1]
    b = tokens[total - reach : total - n][::-1]
    diff = np.flatnonzero(a != b)
    m = n + (int(diff[0]) if diff.size else a.size)
    return max([n] + [c for c in classes if c <= m])


def lookup_draft(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The draft of ``lookup_match`` alone."""
    return lookup_match(tokens, min_n, max_n, k)[0]


def agreement(proposal: np.ndarray, committed: list[int]) -> int:
    """How many of ``committed`` (a step's tokens, the target's own) ``proposal`` has right, in order."""
    m = min(len(committed), int(proposal.size))
    if m == 0:
        return 0
    diff = np.flatnonzero(proposal[:m] != np.asarray(committed[:m]))
    return int(diff[0]) if diff.size else m


@dataclass
class OccurrenceChoice:
    """Which earlier occurrence of its suffix a sequence copies: the most recent, or the earliest.

    Neither is right for every task. On Spec-Bench's greedy outputs (16 prompts a group, 64
    tokens), where the longest suffix match occurred more than once, a draft from the earliest
    occurrence went on for 1.35 tokens of 8 on Summarization against 0.88 from the most recent
    (a summary follows its article, not what it has already said), and the most recent won
    elsewhere (RAG 1.07 against 0.76, MT-bench 0.47 against 0.29). So each sequence keeps, for
    both, a decayed count of the tokens their proposals had right (each step's committed tokens
    measure both, drafted or not) and copies the one ahead, the most recent while level.
    """

    decay: float = 0.9
    latest: float = 0.0
    earliest: float = 0.0

    @property
    def use_earliest(self) -> bool:
        return self.earliest > self.latest

    def observe(self, latest: np.ndarray, earliest: np.ndarray, committed: list[int]) -> None:
        self.latest = self.latest * self.decay + agreement(latest, committed)
        self.earliest = self.earliest * self.decay + agreement(earliest, committed)


WAVE_MAX_SCALE = 1.0
"""Cap on a sequence's calibration factor (``SeqAcceptance.scale``) for the batch's end, with no
request waiting: there its own record only lowers the table's chances (proposer, session 21)."""


@dataclass
class LookupAcceptance:
    """How often context-draft token j is accepted, given the ones before it were, by match length n.

    Decayed counts per (sampled?, n, j) with an optimistic prior, so that a class is tried before
    it is judged. Classes the governor cuts keep being measured (the workload may change) without
    verifying them: each step's committed tokens measure every match proposed before it
    (``observe``), drafted or not.
    """

    prior_accepts: float = 1.8
    prior_trials: float = 2.0
    decay: float = 0.998
    max_scale: float = 4.0
    """Cap on a sequence's calibration factor."""
    trials: dict[tuple[bool, int, int], float] = field(default_factory=dict)
    accepts: dict[tuple[bool, int, int], float] = field(default_factory=dict)
    _rates: dict[tuple[bool, int], np.ndarray] = field(default_factory=dict)
    """Per (sampled, n): ``rate`` by position, kept until that class is updated (asked for every
    sequence with a match, every step)."""

    def rate(self, sampled: bool, n: int, j: int) -> float:
        key = (sampled, n, j)
        return (self.accepts.get(key, 0.0) + self.prior_accepts) / (self.trials.get(key, 0.0) + self.prior_trials)

    def chances(self, sampled: bool, n: int, length: int, seq: "SeqAcceptance | None" = None,
                cap: float | None = None) -> np.ndarray:
        """For a ``length``-token draft from an n-gram match: the chance that tokens 0..j are all
        accepted, for each j. ``seq`` scales the table's chances by how this sequence's context
        drafts have fared against them (free text vs copying), at most by ``cap`` (default
        ``max_scale``)."""
        scale = min(seq.scale(), self.max_scale if cap is None else cap) if seq is not None else 1.0
        rates = self._rates.get((sampled, n))
        if rates is None or rates.size < length:
            rates = np.asarray([self.rate(sampled, n, j) for j in range(max(length, 8))], dtype=np.float64)
            self._rates[(sampled, n)] = rates
        return np.cumprod(np.minimum(rates[:length] * scale, 1.0))

    def observe(self, sampled: bool, n: int, proposal: np.ndarray, committed: list[int],
                seq: "SeqAcceptance | None" = None) -> None:
        """A match's whole ``proposal`` against the tokens the next step ``committed``, drafted or not.

        Every committed token is the target's own (under sampling too: an accepted point-mass
        draft and a sampled token both equal proposal token j with the target's probability of
        it), so it tells whether proposal token j would have been accepted, as long as the ones
        before it were. Undrafted matches (their first token) and the cut-off part of a fully
        accepted draft are measured for free, so a class the governor stopped verifying is still
        measured: on Translation at 16 sequences short matches were never verified, and the table
        never learnt that there a 2-6 token match went on for 4.7-5.8 tokens of 8."""
        self._rates.pop((sampled, n), None)
        for j in range(min(len(committed), len(proposal))):
            ok = int(committed[j]) == int(proposal[j])
            key = (sampled, n, j)
            if seq is not None:
                seq.add(self.rate(sampled, n, j), 1.0 if ok else 0.0)
            self.trials[key] = self.trials.get(key, 0.0) * self.decay + 1.0
            self.accepts[key] = self.accepts.get(key, 0.0) * self.decay + (1.0 if ok else 0.0)
            if not ok:
                break


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
