"""Zero-cost drafts from the context (prompt lookup): when the last n tokens of a sequence occurred
earlier in it, propose what followed them then. Copy-heavy tasks (extraction, summarisation, RAG,
code edits) often continue a span of the context; where they do, these drafts cost nothing to make
and the layer-skip draft is not needed for that sequence in that round.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def lookup_draft(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Tokens following the most recent earlier occurrence of the longest suffix n-gram
    (``min_n <= n <= max_n``); at most ``k``; empty if none."""
    total = tokens.shape[0]
    if k <= 0 or min_n <= 0 or total <= min_n:
        return tokens[:0]
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[total - n :]
        windows = sliding_window_view(tokens[: total - 1], n)  # windows ending before the suffix's end
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        hits = hits[hits + n < total]  # something must follow the match
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : min(start + k, total)]
    return tokens[:0]
