"""Quantization metrics (paper §4.1.2) plus collision rate and churn.

All functions take SIDs as an int array (N, L) and ignore nothing silently: a code equal
to ``missing_code`` (behavioral positions of content-only items) is excluded from that
position's entropy/utilisation, and reported as such.
"""

from __future__ import annotations

import numpy as np


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, L), got shape {codes.shape}")
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    return codes


class CodeCounter:
    """Streaming counts of the codes at each SID position: ``add`` batch by batch, ``merge``
    counters of other workers or tasks, then entropy and utilisation. The one place these
    statistics are computed (fit, the Ray Train job, the assignment job, regulation).

    counts: (L, K) int64; codes outside [0, K) (``missing_code`` at behavioral positions of
    content-only items) are not counted.
    """

    def __init__(self, sid_length: int, codebook_size: int, counts: np.ndarray | None = None):
        self.codebook_size = int(codebook_size)
        self.counts = np.zeros((sid_length, codebook_size), np.int64) if counts is None else \
            np.asarray(counts, dtype=np.int64).reshape(sid_length, codebook_size)

    def add(self, codes: np.ndarray) -> "CodeCounter":
        codes = _check_codes(codes)
        if codes.shape[1] != self.counts.shape[0]:
            raise ValueError(f"codes have {codes.shape[1]} positions, the counter {self.counts.shape[0]}")
        K = self.codebook_size
        for j in range(codes.shape[1]):
            col = codes[:, j]
            self.counts[j] += np.bincount(col[(col >= 0) & (col < K)], minlength=K)[:K]
        return self

    def merge(self, other: "CodeCounter") -> "CodeCounter":
        self.counts += other.counts
        return self

    def entropy_per_position(self) -> np.ndarray:
        """(L,) token-distribution entropy, natural log; max ln(K)."""
        out = []
        for c in self.counts:
            p = c[c > 0] / max(c.sum(), 1)
            out.append(float(-(p * np.log(p)).sum()) if p.size else 0.0)
        return np.array(out)

    def utilisation_per_position(self) -> np.ndarray:
        """(L,) share of the K codewords used at least once."""
        return (self.counts > 0).sum(axis=1) / self.codebook_size

    def report(self) -> dict:
        ent, util = self.entropy_per_position(), self.utilisation_per_position()
        return {"entropy_per_position": ent.tolist(), "entropy_mean": float(ent.mean()) if ent.size else 0.0,
                "utilisation_per_position": util.tolist(),
                "utilisation_mean": float(util.mean()) if util.size else 0.0}


def entropy_per_position(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """(N, L) -> (L,) token-distribution entropy, natural log; max ln(K)."""
    codes = _check_codes(codes)
    return CodeCounter(codes.shape[1], codebook_size).add(codes).entropy_per_position()


def utilisation_per_position(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """(N, L) -> (L,) share of the K codewords used at least once."""
    codes = _check_codes(codes)
    return CodeCounter(codes.shape[1], codebook_size).add(codes).utilisation_per_position()


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose full SID is shared with at least one other item."""
    codes = _check_codes(codes)
    if codes.shape[0] == 0:
        return 0.0
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.ravel()] > 1).mean())


def churn(ids_a, codes_a: np.ndarray, ids_b, codes_b: np.ndarray) -> dict[str, float | int]:
    """Between two assignments (ids (N,), codes (N, L)): share of common items whose SID
    changed, plus counts of common, new (only in b) and removed (only in a) items."""
    codes_a, codes_b = _check_codes(codes_a), _check_codes(codes_b)
    ia = {k: i for i, k in enumerate(ids_a)}
    ib = {k: i for i, k in enumerate(ids_b)}
    if len(ia) != len(ids_a) or len(ib) != len(ids_b):
        raise ValueError("item ids must be unique within an assignment")
    common = [k for k in ib if k in ia]
    changed = sum(1 for k in common if not np.array_equal(codes_a[ia[k]], codes_b[ib[k]]))
    return {
        "common": len(common),
        "changed": changed,
        "churn": changed / len(common) if common else 0.0,
        "new": len(ib) - len(common),
        "removed": len(ia) - len(common),
    }


def quantization_report(codes: np.ndarray, codebook_size: int, recon: np.ndarray | None = None) -> dict:
    """One dict of the paper's quantization metrics for an assignment."""
    ent = entropy_per_position(codes, codebook_size)
    util = utilisation_per_position(codes, codebook_size)
    report = {
        "num_items": int(codes.shape[0]),
        "entropy_mean": float(ent.mean()),
        "entropy_per_position": ent.round(6).tolist(),
        "entropy_max": float(np.log(codebook_size)),
        "utilisation_mean": float(util.mean()),
        "utilisation_per_position": util.round(6).tolist(),
        "collision_rate": collision_rate(codes),
    }
    if recon is not None:
        report["recon"] = float(np.mean(recon))
    return report
