"""Sticky assignment: an item keeps the previous snapshot's code at a position unless the new
best code is better by more than a margin.

A re-fit moves codewords a little, and every item whose latent sits near the border between
two codewords may then flip between them from night to night with no real change: churn that
every downstream model and cache keyed by SID pays for. With margin delta (in the codebook's
similarity: cosine for ADC-SID, 2 x.c - ||c||^2 for OPQ), the previous code is kept when

    score(best) - score(previous) <= delta

and the best code is taken otherwise; delta = 0 is the plain assignment, ties included (an
exact float tie between the previous code and the best goes to the best, the lower index, as
in the plain assignment: float32 scores tie now and then, ADC-SID's float32 encode,
sidserve/tokenizers/adc_sid/model/invariant_encode.py). Positions are independent (ADC-SID's experts, OPQ's
subspaces). A residual tokenizer cannot keep a code alone (a level codes what the levels before
it left), so residual k-means (rq-kmeans, rq-evidence; ``sticky_unit`` "path") keeps a whole
SID instead: its ``encode(candidates=k)`` gives the k best whole SIDs of a beam search with
their score, minus the share of the item's input energy the SID leaves unexplained, and the
previous SID is kept when it is among them and

    score(best) - score(previous) <= delta

(``trim_paths``, ``sticky_from_paths``): the same rule with the whole SID as the unit and
relative distortion as the similarity. One difference: tonight's SID is the greedy one (level
by level), and the beam can find a previous SID that reconstructs the item *better*; that one is
always kept (no churn and less distortion), so delta 0 is not quite the plain assignment for
whole SIDs (the assignment job runs ``--sticky-delta 0`` as the plain assignment anyway). Other residual models (rq-vae, ADC-SID with residual
behavioral codes) are refused upstream (``sticky_unit`` None).

Only the encoder's k best codes per position come with a score (``encode(candidates=k)``), and
of those only the ones within delta of the best can be kept, so the assignment job stages just
those (``trim_candidates``: codes, no scores; about 12 of 32 on Beauty at delta 0.3, docs/
operations.md) and decides from them (``sticky_from_trimmed``). A previous code among them is
kept. One not among them is replaced; it is counted ``unscored`` when all k candidates were
within delta (then the previous code, ranked below the k-th, might have been within delta too,
and a larger k could have kept it), and is simply beyond delta otherwise.
"""

from __future__ import annotations

import numpy as np


def trim_candidates(candidates: np.ndarray, scores: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """candidates (n, L, k) int and scores (n, L, k) float: each position's k best codes, best
    first, and their similarity (NaN where the position has no code) -> (codes (m,) int32: per
    row and position, in that order, the candidates whose score is within ``delta`` of the
    best, best first; counts (n, L) int32: how many each position has, 0 without a code).

    The gap is computed as ``sticky_codes`` always did, score(best) - score, in float64."""
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if candidates.shape != scores.shape or candidates.ndim != 3:
        raise ValueError(f"candidates {candidates.shape} and scores {scores.shape} must be the same (n, L, k)")
    s = scores.astype(np.float64, copy=False)
    if delta == 0:  # the plain assignment: the best code alone, even where another ties it
        within = np.zeros(s.shape, dtype=bool)
        within[:, :, 0] = ~np.isnan(s[:, :, 0])
    else:
        within = (s[:, :, :1] - s) <= delta  # (n, L, k): a prefix of each row (scores are best first)
    return candidates[within].astype(np.int32), within.sum(-1).astype(np.int32)


def sticky_from_trimmed(computed: np.ndarray, codes: np.ndarray, counts: np.ndarray, k: int, previous: np.ndarray,
                        missing_code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """computed (n, L) int: the best codes; codes (m,) and counts (n, L): ``trim_candidates``
    of the k best codes per position; previous (n, L) int: the previous snapshot's codes, -1
    where an item has none.

    -> (sid (n, L) int32, kept (n, L) bool: a previous code kept although another was best,
    unscored (n, L) bool: the previous code was replaced and a larger k might have kept it).
    A position without a code now or before (``missing_code``: behavior absent) is left alone.
    """
    if counts.shape != computed.shape or previous.shape != computed.shape:
        raise ValueError(f"shapes disagree: computed {computed.shape}, counts {counts.shape}, "
                         f"previous {previous.shape}")
    if codes.shape != (int(counts.sum()),):
        raise ValueError(f"codes has {codes.shape} entries, counts sum to {int(counts.sum())}")
    if k < 1 or int(counts.max(initial=0)) > k:
        raise ValueError(f"k={k}: need k >= 1 and no position with more than k candidates")
    flat = counts.ravel()
    parent = np.repeat(np.arange(flat.size), flat)  # (m,) the (row, position) of each code
    found = np.zeros(flat.size, bool)
    found[parent[codes == previous.ravel()[parent]]] = True
    found = found.reshape(computed.shape)
    eligible = (previous >= 0) & (previous != missing_code) & (computed != missing_code) & (previous != computed)
    kept = eligible & found
    sid = np.where(kept, previous, computed).astype(np.int32)
    return sid, kept, eligible & ~found & (counts == k)


def sticky_codes(computed: np.ndarray, candidates: np.ndarray, scores: np.ndarray, previous: np.ndarray,
                 delta: float, missing_code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sticky_from_trimmed`` of ``trim_candidates(candidates, scores, delta)``: the same
    decision from the k best codes per position (n, L, k) and their scores, when they are at
    hand (the stability simulation)."""
    if candidates.shape[:2] != computed.shape:
        raise ValueError(f"shapes disagree: computed {computed.shape}, candidates {candidates.shape}")
    codes, counts = trim_candidates(candidates, scores, delta)
    return sticky_from_trimmed(computed, codes, counts, candidates.shape[-1], previous, missing_code)


def trim_paths(paths: np.ndarray, scores: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """paths (n, k, L) int and scores (n, k) float: each row's k best whole SIDs, its own SID
    first (``Encoding.paths``), NaN scores for paths that do not exist -> (codes (m * L,)
    int32: per row, the paths whose score is within ``delta`` of the first one's, in order,
    flattened; counts (n, 1) int32: how many paths each row has)."""
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if paths.ndim != 3 or scores.shape != paths.shape[:2]:
        raise ValueError(f"paths {paths.shape} must be (n, k, L) and scores {scores.shape} (n, k)")
    s = scores.astype(np.float64, copy=False)
    within = (s[:, :1] - s) <= delta  # NaN compares False: a missing path is never within
    within[:, 0] = True
    return paths[within].reshape(-1).astype(np.int32), within.sum(1, keepdims=True).astype(np.int32)


def sticky_from_paths(computed: np.ndarray, codes: np.ndarray, counts: np.ndarray, k: int,
                      previous: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """computed (n, L) int: the SIDs; codes and counts (n, 1): ``trim_paths`` of the k best
    paths; previous (n, L) int: the previous snapshot's SIDs, -1 rows where an item has none.

    -> (sid (n, L) int32: the previous SID where it is among the row's paths, else the
    computed one; kept (n, L) bool: positions where a kept previous SID differs from the
    computed one; unscored (n, L) bool: the positions of a replaced previous SID that a larger
    k might have kept, all k paths being within delta)."""
    n, length = computed.shape
    if counts.shape != (n, 1) or previous.shape != computed.shape:
        raise ValueError(f"shapes disagree: computed {computed.shape}, counts {counts.shape} (need (n, 1)), "
                         f"previous {previous.shape}")
    if codes.shape != (int(counts.sum()) * length,):
        raise ValueError(f"codes has {codes.shape} entries, counts sum to {int(counts.sum())} paths of {length}")
    if k < 1 or int(counts.max(initial=0)) > k:
        raise ValueError(f"k={k}: need k >= 1 and no row with more than k paths")
    flat = counts[:, 0]
    parent = np.repeat(np.arange(n), flat)  # (m,) the row of each path
    match = (codes.reshape(-1, length) == previous[parent]).all(1)
    found = np.zeros(n, bool)
    found[parent[match]] = True
    differs = previous != computed
    eligible = (previous >= 0).all(1) & differs.any(1)
    kept_rows = eligible & found
    sid = np.where(kept_rows[:, None], previous, computed).astype(np.int32)
    unscored_rows = eligible & ~found & (flat == k)
    return sid, kept_rows[:, None] & differs, unscored_rows[:, None] & differs


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
