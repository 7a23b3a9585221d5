import numpy as np

from vllm_clasp.lookup import LookupAcceptance, SeqAcceptance, lookup_draft, lookup_match


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


def test_drafts_are_cut_where_acceptance_falls_below_the_price():
    acc = LookupAcceptance(explore_every=10**9)
    assert acc.keep(False, 1, 6, 0.5) == 6  # optimistic before anything is measured
    for _ in range(200):
        acc.update(False, 1, 6, 0)  # 1-gram drafts: first token always rejected
        acc.update(False, 5, 6, 6)  # 5-gram drafts: all accepted
    assert acc.keep(False, 1, 6, 0.3) == 0
    assert acc.keep(False, 1, 6, 0.0) == 6  # free verification: propose everything
    assert acc.keep(False, 5, 6, 0.3) == 6
    assert acc.keep(True, 1, 6, 0.3) == 6  # sampled requests are measured apart
    assert (False, 1, 1) not in acc.trials  # a token after a rejected one is never counted


def test_cut_classes_are_still_explored_now_and_then():
    acc = LookupAcceptance(explore_every=4)
    for _ in range(50):
        acc.update(False, 1, 3, 0)
    kept = [acc.keep(False, 1, 3, 0.3) for _ in range(8)]
    assert kept.count(1) == 2 and kept.count(0) == 6  # one token past the cut, now and then


def test_a_sequence_that_accepts_less_than_the_table_expects_gets_shorter_drafts():
    acc = LookupAcceptance(explore_every=10**9)
    for _ in range(200):
        acc.update(False, 2, 4, 1)  # shared record: first token accepted, second not
    free, copying = SeqAcceptance(), SeqAcceptance()
    for _ in range(20):
        acc.update(False, 2, 4, 0, free)  # this sequence rejects even the first
        acc.update(False, 2, 4, 4, copying)  # this one accepts everything
    assert free.scale() < 0.5 and copying.scale() > 1.1
    price = 0.5
    assert acc.keep(False, 2, 4, price, free) < acc.keep(False, 2, 4, price) <= acc.keep(False, 2, 4, price, copying)
