import numpy as np
import pytest

from vllm_clasp.lookup import (LONG_MATCHES, WAVE_MAX_SCALE, LookupAcceptance, OccurrenceChoice, SeqAcceptance, agreement,
                               lookup_draft, lookup_match, lookup_matches)


def t(*xs):
    return np.array(xs, dtype=np.int32)


def test_longest_most_recent_match():
    seq = t(1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 6, 1, 2, 3)
    # suffix [1,2,3] occurred at 0 (followed by 9 9 5 ...); [2,3] also at 6 but shorter n wins
    assert lookup_draft(seq, 2, 3, 3).tolist() == [9, 9, 5]
    assert lookup_draft(seq, 2, 2, 2).tolist() == [7, 8]  # most recent [2,3] is at 6
    assert lookup_draft(seq, 4, 5, 3).tolist() == []


def test_bounds():
    assert lookup_draft(t(1, 2, 1, 2), 2, 2, 5).tolist() == [1, 2]
    assert lookup_draft(t(1, 2), 2, 2, 5).tolist() == []
    assert lookup_draft(t(5, 5, 5, 5), 1, 1, 2).tolist() == [5]
    assert lookup_draft(t(1, 2, 3, 1, 2), 2, 3, 0).tolist() == []


def test_match_length_is_reported_and_capped_at_max_n():
    seq = t(1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 6, 1, 2, 3)
    d, n = lookup_match(seq, 1, 3, 2)
    assert (d.tolist(), n) == ([9, 9], 3)
    d, n = lookup_match(seq, 1, 2, 2)
    assert (d.tolist(), n) == ([7, 8], 2)  # the most recent of the matches of length 2
    assert lookup_match(t(4, 1, 2, 3), 1, 5, 3)[1] == 0


def test_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        seq = rng.integers(0, int(rng.integers(1, 5)), size=int(rng.integers(1, 30)))
        mn = int(rng.integers(1, 4))
        mx, k = int(rng.integers(mn, 7)), int(rng.integers(1, 6))
        want, want_n = np.zeros(0, dtype=seq.dtype), 0
        for n in range(min(mx, len(seq) - 1), mn - 1, -1):
            ends = [e for e in range(n - 1, len(seq) - 1) if (seq[e - n + 1 : e + 1] == seq[len(seq) - n :]).all()]
            if ends:
                want, want_n = seq[ends[-1] + 1 : ends[-1] + 1 + k], n
                break
        got, got_n = lookup_match(seq, mn, mx, k)
        assert got.tolist() == want.tolist() and got_n == want_n


def test_latest_and_earliest_occurrences_match_a_brute_force_search():
    """lookup_matches: the longest suffix n-gram's most recent occurrence (lookup_match's) and its
    earliest, None where it occurred once; each draft's n classed as far back as it matches."""
    rng = np.random.default_rng(2)
    values = np.array([0, 1, 2, 256, 65536], dtype=np.int32)  # 256 and 65536: unaligned byte hits
    for _ in range(3000):
        seq = values[rng.integers(0, int(rng.integers(1, 6)), size=int(rng.integers(1, 40)))]
        mn = int(rng.integers(1, 4))
        mx, k = int(rng.integers(mn, 7)), int(rng.integers(1, 6))
        classes = LONG_MATCHES if rng.random() < 0.5 else ()
        latest, earliest = lookup_matches(seq, mn, mx, k, classes)
        assert latest[0].tolist() == lookup_match(seq, mn, mx, k, classes)[0].tolist()
        assert latest[1] == lookup_match(seq, mn, mx, k, classes)[1]
        ends = []
        for n in range(min(mx, len(seq) - 1), mn - 1, -1):
            ends = [e for e in range(n - 1, len(seq) - 1) if (seq[e - n + 1 : e + 1] == seq[len(seq) - n :]).all()]
            if ends:
                break
        if len(ends) < 2:
            assert earliest is None
            continue
        assert earliest is not None
        d, c = earliest
        assert d.tolist() == seq[ends[0] + 1 : ends[0] + 1 + k].tolist()
        m = 0  # how far back the earliest occurrence matches the suffix
        while m < 32 and ends[0] - m >= 0 and seq[ends[0] - m] == seq[len(seq) - 1 - m]:
            m += 1
        assert c == (max([n] + [x for x in classes if x <= m]) if classes and n == mx else n)


def test_each_sequence_copies_the_occurrence_whose_proposals_came_true():
    """Both occurrences' proposals are measured by every step's committed tokens; the earliest is
    copied only once it has been right more often (a summary following its article), and the
    choice turns back when the most recent does better again."""
    assert agreement(np.asarray([5, 6, 7]), [5, 6, 9, 1]) == 2
    assert agreement(np.asarray([5, 6, 7]), [5, 6]) == 2  # only as far as the step committed
    assert agreement(np.asarray([5, 6]), [9]) == 0
    assert agreement(np.asarray([], dtype=np.int64), [5]) == 0
    choice = OccurrenceChoice()
    assert not choice.use_earliest  # the most recent while level
    latest, earliest = np.asarray([1, 2, 3]), np.asarray([4, 5, 6])
    choice.observe(latest, earliest, [1])
    assert not choice.use_earliest
    for _ in range(3):
        choice.observe(latest, earliest, [4, 5])
    assert choice.use_earliest
    for _ in range(4):
        choice.observe(latest, earliest, [1, 2, 3])
    assert not choice.use_earliest


def test_byte_matches_inside_a_token_are_not_matches():
    # int32 256 then 0 is 00 01 00 00 00 00 00 00: token 1's bytes (01 00 00 00) sit at offset 1.
    assert lookup_match(t(256, 0, 5, 1), 1, 3, 2)[1] == 0
    assert lookup_match(t(1, 7, 256, 0, 3, 1), 1, 3, 2)[0].tolist() == [7, 256]  # the aligned one
    rng = np.random.default_rng(1)
    values = np.array([0, 1, 256, 65536, 16777216, 257], dtype=np.int32)
    for _ in range(2000):
        seq = values[rng.integers(0, len(values), size=int(rng.integers(2, 25)))]
        want_n = 0
        for n in range(min(4, len(seq) - 1), 0, -1):
            if any((seq[e - n + 1 : e + 1] == seq[len(seq) - n :]).all() for e in range(n - 1, len(seq) - 1)):
                want_n = n
                break
        assert lookup_match(seq, 1, 4, 3)[1] == want_n


def _keep(acc, sampled, n, length, price, seq=None):
    """Tokens kept at a linear price per token: the first whose chance is below the price is cut."""
    c = acc.chances(sampled, n, length, seq)
    return int((c >= price).sum()) if price > 0 else length


def _verify(acc, sampled, n, drafted, accepted, seq=None):
    """A verified context draft of ``drafted`` tokens whose first ``accepted`` were accepted; the
    step also commits the target's own token, which disagrees with the proposal there."""
    proposal = np.arange(100, 100 + drafted)
    committed = [*proposal[:accepted].tolist(), 1]
    acc.observe(sampled, n, proposal, committed, seq)


def test_chances_follow_measured_acceptance_by_ngram_length_and_position():
    acc = LookupAcceptance()
    assert _keep(acc, False, 1, 6, 0.5) == 6  # optimistic before anything is measured
    for _ in range(200):
        _verify(acc, False, 1, 6, 0)  # 1-gram drafts: first token always rejected
        _verify(acc, False, 5, 6, 6)  # 5-gram drafts: all accepted
    assert _keep(acc, False, 1, 6, 0.3) == 0
    assert _keep(acc, False, 5, 6, 0.3) == 6
    assert _keep(acc, True, 1, 6, 0.3) == 6  # sampled requests are measured apart
    assert (False, 1, 1) not in acc.trials  # a token after a rejected one is never counted
    c = acc.chances(False, 5, 6)
    assert (np.diff(c) <= 0).all() and c[0] > 0.95


def test_a_sequence_that_accepts_less_than_the_table_expects_gets_shorter_drafts():
    acc = LookupAcceptance()
    for _ in range(200):
        _verify(acc, False, 2, 4, 1)  # shared record: first token accepted, second not
    free, copying = SeqAcceptance(), SeqAcceptance()
    for _ in range(20):
        _verify(acc, False, 2, 4, 0, free)  # this sequence rejects even the first
        _verify(acc, False, 2, 4, 4, copying)  # this one accepts everything
    assert free.scale() < 0.5 and copying.scale() > 1.1
    price = 0.5
    assert _keep(acc, False, 2, 4, price, free) < _keep(acc, False, 2, 4, price) <= _keep(acc, False, 2, 4, price, copying)


def test_for_the_batchs_end_a_sequences_record_only_lowers_the_tables_chances():
    """With no request waiting, the sequences drafted for the batch's end are the ones behind,
    often behind because their context drafts fail: their own record lowers the table's chances;
    a lucky record never raises them (session 18)."""
    acc = LookupAcceptance()
    for _ in range(200):
        _verify(acc, False, 2, 4, 2)  # shared record: two tokens accepted, the third not
    free, copying = SeqAcceptance(), SeqAcceptance()
    for _ in range(20):
        _verify(acc, False, 2, 4, 0, free)
        _verify(acc, False, 2, 4, 4, copying)
    table = acc.chances(False, 2, 4)
    assert (acc.chances(False, 2, 4, free, WAVE_MAX_SCALE) < 0.5 * table).all()
    assert np.allclose(acc.chances(False, 2, 4, copying, WAVE_MAX_SCALE), table)
    assert (acc.chances(False, 2, 4, copying)[1:] > table[1:]).all()  # uncapped: raised (a waiting queue)


def test_committed_tokens_measure_the_whole_proposal_drafted_or_not():
    """Every committed token is the target's own, so it measures the proposal token at its place
    while the ones before it agreed: undrafted matches and the cut-off part of a fully accepted
    draft are measured for free; nothing after the first disagreement is."""
    acc = LookupAcceptance()
    proposal = np.asarray([5, 6, 7, 8])
    acc.observe(False, 3, proposal, [5])  # nothing drafted: the step's one token agreed
    acc.observe(False, 3, proposal, [9])  # ... and disagreed
    assert acc.trials[(False, 3, 0)] == pytest.approx(1.0 * acc.decay + 1.0)
    assert acc.accepts[(False, 3, 0)] == pytest.approx(1.0 * acc.decay)
    acc.observe(False, 4, proposal, [5, 6, 7])  # two drafted, both accepted, the target's third agreed
    assert [acc.accepts.get((False, 4, j)) for j in range(4)] == [1.0, 1.0, 1.0, None]
    acc.observe(False, 2, proposal, [5, 9, 7])  # the second disagreed: the third tells nothing
    assert [acc.trials.get((False, 2, j)) for j in range(3)] == [1.0, 1.0, None]
    assert acc.accepts[(False, 2, 1)] == 0.0
    for _ in range(100):
        acc.observe(False, 2, proposal, [9])  # other sequences: 2-token matches mostly wrong
    seq = SeqAcceptance()
    for _ in range(10):
        acc.observe(False, 2, proposal, [5], seq)  # never drafted, always right: a copying sequence
    assert seq.scale() > 2.0


def test_long_matches_are_classed_by_how_far_back_they_reach():
    """A match of lookup_max tokens is followed back: its class is the largest of LONG_MATCHES
    (or lookup_max) its whole length reaches; the draft itself is unchanged."""
    rng = np.random.default_rng(1)
    for _ in range(500):
        span = rng.integers(0, 3, size=int(rng.integers(6, 40))).astype(np.int32)
        seq = np.concatenate([rng.integers(0, 3, size=int(rng.integers(0, 10))), span,
                              rng.integers(0, 3, size=int(rng.integers(1, 5))), span]).astype(np.int32)
        d, n = lookup_match(seq, 1, 6, 4)
        d2, c = lookup_match(seq, 1, 6, 4, LONG_MATCHES)
        assert (d == d2).all()
        if n < 6:
            assert c == n
            continue
        start = len(seq) - 1 - int(np.flatnonzero([(seq[e - 5 : e + 1] == seq[-6:]).all() if e >= 5 else False
                                                   for e in range(len(seq) - 2, -1, -1)])[0])
        # the occurrence ends at start (exclusive): count how far back it matches the suffix
        m = 0
        while m < 32 and start - 1 - m >= 0 and seq[start - 1 - m] == seq[len(seq) - 1 - m]:
            m += 1
        assert c == max([6] + [x for x in LONG_MATCHES if x <= m]), (seq.tolist(), c, m)
