"""Sticky assignment: an item keeps the previous snapshot's code at a position unless the new
best code is better by more than a margin.

A re-fit moves codewords a little, and every item whose latent sits near the border between
two codewords may then flip between them from night to night with no real change: churn that
every downstream model and cache keyed by SID pays for. With margin delta (in the codebook's
similarity: cosine for ADC-SID, 2 x.c - ||c||^2 for OPQ), the previous code is kept when

    score(best) - score(previous) <= delta

and the best code is taken otherwise. delta = 0 keeps a code only when it ties the best,
which is today's assignment. Only the encoder's k best codes per position come with a score
(``encode(candidates=k)``): a previous code outside them scores below the k-th, and is
replaced (counted as ``unscored``) even when the k-th is within delta, since nothing shows
that the previous code is. Positions are independent (ADC-SID's experts, OPQ's subspaces);
residual tokenizers cannot offer per-position alternatives and are refused upstream.
"""

from __future__ import annotations

import numpy as np


def sticky_codes(computed: np.ndarray, candidates: np.ndarray, scores: np.ndarray, previous: np.ndarray,
                 delta: float, missing_code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """computed (n, L) int: the best codes; candidates (n, L, k) int and scores (n, L, k) float:
    the k best codes per position, best first, and their similarity; previous (n, L) int: the
    previous snapshot's codes, -1 where an item has none; delta >= 0.

    -> (codes (n, L) int32, kept (n, L) bool: a previous code kept although another was best,
    unscored (n, L) bool: the previous code was not among the k candidates and was replaced).
    A position without a code now or before (``missing_code``: behavior absent) is left alone.
    """
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if candidates.shape != scores.shape or candidates.shape[:2] != computed.shape or previous.shape != computed.shape:
        raise ValueError(f"shapes disagree: computed {computed.shape}, candidates {candidates.shape}, "
                         f"scores {scores.shape}, previous {previous.shape}")
    eligible = (previous >= 0) & (previous != missing_code) & (computed != missing_code) & (previous != computed)
    match = candidates == previous[:, :, None]  # (n, L, k)
    found = match.any(-1)
    j = match.argmax(-1)  # the previous code's rank among the candidates (0 when absent)
    prev_score = np.take_along_axis(scores, j[:, :, None], -1)[:, :, 0]
    kept = eligible & found & (scores[:, :, 0] - prev_score <= delta)
    codes = np.where(kept, previous, computed).astype(np.int32)
    return codes, kept, eligible & ~found


def parse_sid_str(sid_str, length: int) -> np.ndarray:
    """'3-17-0' strings (an Arrow string array or a list; null: no previous SID) -> (n, length)
    int64, -1 rows for a null or for a SID of another length (another layout: nothing to keep)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.array(sid_str, pa.string()) if not isinstance(sid_str, (pa.Array, pa.ChunkedArray)) else sid_str
    lists = pc.split_pattern(arr, "-")
    ok = pc.fill_null(pc.equal(pc.list_value_length(lists), length), False).to_numpy(zero_copy_only=False)
    out = np.full((len(arr), length), -1, np.int64)
    if ok.any():
        flat = pc.list_flatten(lists.filter(pa.array(ok))).cast(pa.int64()).to_numpy(zero_copy_only=False)
        out[ok] = flat.reshape(-1, length)
    return out
