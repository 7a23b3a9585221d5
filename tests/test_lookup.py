import numpy as np

from vllm_clasp.lookup import lookup_draft


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
