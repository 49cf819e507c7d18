"""The hashes sidserve uses, each defined once: item ids (the serving index, the assignment
job's partitions) and SIDs (collision counting across training workers). All are pure
functions of the value, the same in every process and on every run.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_PRIME = np.uint64(1099511628211)  # FNV-1 64-bit prime


def hash_strings(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) Arrow strings -> (N,) uint64 polynomial hashes of their UTF-8 bytes, vectorised.

    h(s) = sum_j (s_j + 1) * P^(len - 1 - j) + len * P^len  (mod 2^64); the length term
    keeps "" and strings of zero bytes apart. Equal strings hash equal, which is all the
    index needs: candidates are always checked against the stored id.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    if ids.type not in (pa.string(), pa.large_string()):
        ids = ids.cast(pa.large_string())
    n = len(ids)
    if ids.null_count:
        raise ValueError("item ids to hash contain nulls")
    width = np.int32 if ids.type == pa.string() else np.int64  # offsets read in place, never copied
    offsets = np.frombuffer(ids.buffers()[1], dtype=width)[ids.offset:ids.offset + n + 1].astype(np.int64)
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if ids.buffers()[2] is not None \
        else np.zeros(0, np.uint8)
    start = offsets[:-1]
    lengths = offsets[1:] - start
    max_len = int(lengths.max()) if n else 0
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.concatenate([[np.uint64(1)], np.full(max_len, _PRIME, np.uint64)]))
        out = np.zeros(n, dtype=np.uint64)
        # Horner's rule one byte position at a time: O(n) temporaries, not O(bytes)
        for j in range(max_len):
            active = np.flatnonzero(lengths > j)  # (A,) rows with a byte at position j
            if active.size < n:
                out[active] = out[active] * _PRIME + (data[start[active] + j].astype(np.uint64) + np.uint64(1))
            else:
                out = out * _PRIME + (data[start + j].astype(np.uint64) + np.uint64(1))
        out += lengths.astype(np.uint64) * powers[lengths]
    return out


def mix64(h: np.ndarray) -> np.ndarray:
    """(N,) uint64 -> (N,) uint64, splitmix64's finaliser: every input bit reaches the low
    bits, so ``mix64(h) % n`` spreads keys evenly over n buckets."""
    h = np.asarray(h, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def buckets(keys: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """(N,) non-null Arrow strings -> (N,) int64 bucket in [0, n_buckets), stable across runs."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    return (mix64(hash_strings(keys)) % np.uint64(n_buckets)).astype(np.int64)


def hash_codes(codes: np.ndarray) -> np.ndarray:
    """(N, L) int codes -> (N,) int64 hash (collision counting across workers)."""
    h = np.full(codes.shape[0], 1469598103934665603, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(codes.shape[1]):
            h ^= codes[:, j].astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
            h *= np.uint64(1099511628211)
            h ^= h >> np.uint64(29)
    return h.view(np.int64)
