"""Catalog-wide collision detection: which items share a SID, or nearly (issue 8).

An *overlap* is a pair of items whose SIDs differ in at most ``hamming`` positions
(0 = identical SIDs, the collisions that need a dedup suffix). Detection is a group-by,
not an all-pairs scan: for every set of ``hamming`` positions, mask those positions and
group the items whose remaining codes are equal; every pair inside a group is within
Hamming distance ``hamming``. Cost O(N log N * C(L, hamming)) plus the pairs themselves.

Shapes: N items, L SID positions, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np


@dataclass
class Overlaps:
    """pairs: (P, 2) int64 item indices, i < j, sorted; distance: (P,) Hamming distance
    of each pair; group_sizes: sizes of the groups of identical SIDs with > 1 item."""

    pairs: np.ndarray
    distance: np.ndarray
    group_sizes: np.ndarray
    num_items: int

    @property
    def exact_collision_rate(self) -> float:
        """Share of items whose SID is not unique (``sidserve.metrics.collision_rate``)."""
        return float(self.group_sizes.sum() / self.num_items) if self.num_items else 0.0

    @property
    def overlap_rate(self) -> float:
        """Share of items with at least one other item within the Hamming radius."""
        if not self.num_items:
            return 0.0
        return float(np.unique(self.pairs).size / self.num_items)


def _group_pairs(keys: np.ndarray) -> np.ndarray:
    """(N, k) rows -> (P, 2) index pairs i < j of identical rows."""
    if keys.shape[0] < 2:
        return np.zeros((0, 2), np.int64)
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    multi = np.flatnonzero(counts > 1)
    if multi.size == 0:
        return np.zeros((0, 2), np.int64)
    order = np.argsort(inv, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    out = []
    for g in multi:
        members = order[starts[g]:starts[g] + counts[g]]  # ascending item index (stable sort)
        a, b = np.triu_indices(members.size, k=1)
        out.append(np.stack([members[a], members[b]], axis=1))
    return np.concatenate(out).astype(np.int64)


def find_overlaps(codes: np.ndarray, hamming: int = 0) -> Overlaps:
    """codes: (N, L) int SIDs -> every pair of items within Hamming distance ``hamming``."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, L), got shape {codes.shape}")
    n, L = codes.shape
    if not isinstance(hamming, int | np.integer) or not 0 <= hamming < L:
        raise ValueError(f"hamming must be an int in [0, {L - 1}] for SIDs of length {L}, got {hamming!r}")
    _, counts = np.unique(codes, axis=0, return_counts=True) if n else (None, np.zeros(0, int))
    group_sizes = counts[counts > 1].astype(np.int64)
    found = []
    for masked in combinations(range(L), hamming):
        keep = [p for p in range(L) if p not in masked]
        found.append(_group_pairs(codes[:, keep]))
    pairs = np.unique(np.concatenate(found), axis=0) if found and sum(len(f) for f in found) \
        else np.zeros((0, 2), np.int64)
    distance = (codes[pairs[:, 0]] != codes[pairs[:, 1]]).sum(1).astype(np.int64)
    return Overlaps(pairs, distance, group_sizes, n)
