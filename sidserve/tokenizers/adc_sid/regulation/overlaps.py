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
    of each pair; region_size: (P,) size of the largest group that produced the pair
    (items sharing the pair's unmasked positions: how crowded its region of the code
    space is); group_sizes: sizes of the groups of identical SIDs with > 1 item;
    complete: False when groups above ``max_group_pairs`` were sampled."""

    pairs: np.ndarray
    distance: np.ndarray
    group_sizes: np.ndarray
    num_items: int
    region_size: np.ndarray | None = None
    complete: bool = True

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


def _group_pairs(keys: np.ndarray, max_group_pairs: int | None, rng) -> tuple[np.ndarray, np.ndarray, bool]:
    """(N, k) rows -> (P, 2) index pairs i < j of identical rows, (P,) their group's size,
    and whether every pair was listed. A group with more than ``max_group_pairs`` pairs
    gives a sample: each member paired with its next r members along a random cycle, r
    chosen to stay under the cap (every member still appears)."""
    empty = np.zeros((0, 2), np.int64), np.zeros(0, np.int64), True
    if keys.shape[0] < 2:
        return empty
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    multi = np.flatnonzero(counts > 1)
    if multi.size == 0:
        return empty
    order = np.argsort(inv, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    out, sizes, complete = [], [], True
    for g in multi:
        members = order[starts[g]:starts[g] + counts[g]]  # ascending item index (stable sort)
        s = members.size
        if max_group_pairs is None or s * (s - 1) // 2 <= max_group_pairs:
            a, b = np.triu_indices(s, k=1)
            pair = np.stack([members[a], members[b]], axis=1)
        else:
            complete = False
            cycle = members[rng.permutation(s)]
            r = max(1, min((s - 1) // 2, max_group_pairs // s))
            pair = np.concatenate([np.stack([cycle, np.roll(cycle, -k)], axis=1) for k in range(1, r + 1)])
            pair = np.sort(pair, axis=1)
        out.append(pair)
        sizes.append(np.full(pair.shape[0], s, np.int64))
    return np.concatenate(out).astype(np.int64), np.concatenate(sizes), complete


def find_overlaps(codes: np.ndarray, hamming: int = 0, *, max_group_pairs: int | None = None,
                  seed: int = 0) -> Overlaps:
    """codes: (N, L) int SIDs -> every pair of items within Hamming distance ``hamming``
    (groups with more than ``max_group_pairs`` pairs are sampled, see ``_group_pairs``)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, L), got shape {codes.shape}")
    n, L = codes.shape
    if not isinstance(hamming, int | np.integer) or not 0 <= hamming < L:
        raise ValueError(f"hamming must be an int in [0, {L - 1}] for SIDs of length {L}, got {hamming!r}")
    _, counts = np.unique(codes, axis=0, return_counts=True) if n else (None, np.zeros(0, int))
    group_sizes = counts[counts > 1].astype(np.int64)
    if max_group_pairs is not None and max_group_pairs < 1:
        raise ValueError(f"max_group_pairs must be >= 1 or None, got {max_group_pairs}")
    rng = np.random.default_rng(seed)
    found, sizes, complete = [], [], True
    for masked in combinations(range(L), hamming):
        keep = [p for p in range(L) if p not in masked]
        pair, size, full = _group_pairs(codes[:, keep], max_group_pairs, rng)
        found.append(pair)
        sizes.append(size)
        complete &= full
    if found and sum(len(f) for f in found):
        all_pairs, all_sizes = np.concatenate(found), np.concatenate(sizes)
        key = all_pairs[:, 0] * max(n, 1) + all_pairs[:, 1]
        order = np.lexsort((-all_sizes, key))  # by pair, largest region first
        key, all_pairs, all_sizes = key[order], all_pairs[order], all_sizes[order]
        first = np.r_[True, key[1:] != key[:-1]]
        pairs, region = all_pairs[first], all_sizes[first]
    else:
        pairs, region = np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    distance = (codes[pairs[:, 0]] != codes[pairs[:, 1]]).sum(1).astype(np.int64)
    return Overlaps(pairs, distance, group_sizes, n, region, complete)
