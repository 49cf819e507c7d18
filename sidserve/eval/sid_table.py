"""Items' SIDs as a lookup table for the downstream models, and the prefix trie that
constrains generation to SIDs that exist.

Generative retrieval needs every item to have a distinct code sequence, so (as TIGER
does) the table appends the ``dedup`` suffix: items sharing a SID get 0, 1, 2, ... in
item-id order. Row 0 is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def dedup_suffix(sid: np.ndarray) -> np.ndarray:
    """(N, L) codes -> (N,) int64 rank of each item within its group of identical SIDs,
    in row order."""
    _, inv = np.unique(sid, axis=0, return_inverse=True)
    inv = inv.ravel()
    order = np.argsort(inv, kind="stable")
    g = inv[order]
    first = np.r_[True, g[1:] != g[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(g.size), 0))
    out = np.empty(g.size, dtype=np.int64)
    out[order] = np.arange(g.size) - start
    return out


@dataclass
class SIDTable:
    """codes: (N + 1, T) int64, row i = item id i (row 0 padding = zeros), T = L + 1
    with the dedup suffix last; weights: (N + 1, T) float32 per-position weights
    (R(e_b) at behavioral positions of ADC-SID, 1 elsewhere, 0 on the padding row);
    vocab: (T,) codes per position."""

    codes: np.ndarray
    weights: np.ndarray
    vocab: np.ndarray

    @classmethod
    def build(cls, sid: np.ndarray, weights: np.ndarray | None = None) -> "SIDTable":
        """sid: (N, L) int codes of items 1..N; weights: (N, L) or None (all 1)."""
        sid = np.asarray(sid, dtype=np.int64)
        if sid.ndim != 2 or sid.shape[0] == 0 or sid.min() < 0:
            raise ValueError(f"sid must be a non-empty (N, L) array of codes >= 0, got shape {sid.shape}")
        n, L = sid.shape
        w = np.ones((n, L), np.float32) if weights is None else np.asarray(weights, np.float32)
        if w.shape != (n, L):
            raise ValueError(f"weights must have shape {(n, L)}, got {w.shape}")
        full = np.concatenate([sid, dedup_suffix(sid)[:, None]], axis=1)
        codes = np.zeros((n + 1, L + 1), np.int64)
        codes[1:] = full
        wt = np.zeros((n + 1, L + 1), np.float32)
        wt[1:, :L] = w
        wt[1:, L] = 1.0
        return cls(codes, wt, full.max(axis=0) + 1)

    @property
    def num_items(self) -> int:
        return self.codes.shape[0] - 1

    @property
    def length(self) -> int:
        return self.codes.shape[1]

    @property
    def offsets(self) -> np.ndarray:
        """(T,) start of each position's codes in a flat token vocabulary."""
        return np.r_[0, np.cumsum(self.vocab)[:-1]]


@dataclass
class PrefixTrie:
    """Valid code sequences as per-depth transition tables.

    children[t]: (nodes at depth t, vocab[t]) int64 -> node at depth t + 1, -1 if no
    item continues that prefix with that code; leaf_item: node at depth T -> item id.
    The root is node 0 at depth 0.
    """

    children: list[np.ndarray]
    leaf_item: np.ndarray

    @classmethod
    def build(cls, table: SIDTable) -> "PrefixTrie":
        codes = table.codes[1:]
        node = np.zeros(codes.shape[0], np.int64)
        num_nodes = 1
        children = []
        for t in range(table.length):
            key = node * table.vocab[t] + codes[:, t]
            uniq, nxt = np.unique(key, return_inverse=True)
            nxt = nxt.ravel()
            child = np.full((num_nodes, table.vocab[t]), -1, np.int64)
            child[node, codes[:, t]] = nxt
            children.append(child)
            node, num_nodes = nxt, uniq.size
        if num_nodes != codes.shape[0]:
            raise ValueError("code sequences are not unique (dedup suffix missing?)")
        leaf_item = np.empty(num_nodes, np.int64)
        leaf_item[node] = np.arange(1, codes.shape[0] + 1)
        return cls(children, leaf_item)
