"""Downstream metrics: Recall/NDCG@K of ranked lists, AUC, GAUC, Spearman correlation.

One relevant item per user (leave-one-out), so Recall@K = hit@K and
NDCG@K = 1 / log2(rank + 2) for a hit at 0-based ``rank`` < K, else 0.
"""

from __future__ import annotations

import numpy as np


def recall_ndcg(ranked: np.ndarray, target: np.ndarray, ks=(5, 10, 50)) -> dict[str, np.ndarray]:
    """ranked: (U, B) item ids best first (-1 = no item); target: (U,) -> per-user
    ``recall@k`` and ``ndcg@k`` arrays (U,) for each k (k may exceed B: hits stop at B)."""
    ranked, target = np.asarray(ranked), np.asarray(target)
    if ranked.ndim != 2 or target.shape != (ranked.shape[0],):
        raise ValueError(f"ranked must be (U, B) and target (U,), got {ranked.shape} and {target.shape}")
    hit = ranked == target[:, None]
    rank = np.where(hit.any(1), hit.argmax(1), np.iinfo(np.int64).max)  # (U,)
    out = {}
    for k in ks:
        found = rank < k
        out[f"recall@{k}"] = found.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(found, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0)
    return out


def grouped_means(per_user: dict[str, np.ndarray], targets: np.ndarray, groups: dict[str, np.ndarray]) -> dict:
    """Per-user metric arrays (U,) -> their means over all users and over the users whose
    target item is in each group (``users`` = how many); an empty group's means are 0."""
    out = {"all": {k: float(np.mean(v)) for k, v in per_user.items()}}
    out["all"]["users"] = int(targets.size)
    for g, items in groups.items():
        sel = np.isin(targets, items)
        out[g] = {k: float(v[sel].mean()) if sel.any() else 0.0 for k, v in per_user.items()}
        out[g]["users"] = int(sel.sum())
    return out


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1..end
    ranks = np.empty(x.size)
    ranks[order] = avg[group]
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > a random negative), ties count 1/2."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs positives and negatives, got {n_pos} and {n_neg}")
    r = rankdata(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-group AUC averaged with weights = group size; groups with only
    one class are skipped (they have no AUC)."""
    groups, labels, scores = map(np.asarray, (groups, labels, scores))
    order = np.argsort(groups, kind="mergesort")
    g, y, s = groups[order], labels[order].astype(bool), scores[order]
    bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
    total, weight = 0.0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        yy = y[a:b]
        if yy.all() or not yy.any():
            continue
        total += auc(yy, s[a:b]) * (b - a)
        weight += b - a
    if weight == 0:
        raise ValueError("GAUC needs at least one group with both classes")
    return total / weight


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


def mean_std(values) -> dict[str, float | None]:
    """Mean and sample standard deviation; std is None for one value (no spread measured, not 0)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, num_samples: int = 2000, seed: int = 0,
                     ci: float = 0.95) -> dict[str, float]:
    """Paired bootstrap over users of mean(a) - mean(b).

    a, b: (U,) per-user metric values of two systems on the same users (e.g. NDCG@10 of
    tokenizer A and B, each averaged over seeds). Users are resampled with replacement
    ``num_samples`` times; returns the observed difference, the ``ci`` percentile interval
    of the resampled differences and a two-sided p-value (twice the share of resampled
    differences on the other side of 0, capped at 1; the floor is 1 / num_samples).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be non-empty (U,) arrays of the same users, got {a.shape} and {b.shape}")
    if num_samples < 100:
        raise ValueError(f"num_samples must be >= 100, got {num_samples}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(num_samples)
    for i in range(0, num_samples, 256):  # (chunk, U) index draws keep memory bounded
        n = min(256, num_samples - i)
        means[i:i + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(1)
    observed = float(diff.mean())
    lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    if observed == 0 and np.all(means == 0):
        p = 1.0
    else:
        other_side = (means <= 0).mean() if observed > 0 else (means >= 0).mean()
        p = float(min(1.0, max(2 * other_side, 1.0 / num_samples)))
    return {"diff": observed, "ci_low": float(lo), "ci_high": float(hi), "p_value": p,
            "users": int(diff.size), "num_samples": num_samples}


def per_user_auc(scores: np.ndarray) -> np.ndarray:
    """scores (U, 1 + n_neg), column 0 the positive -> (U,) per-user AUC (ties 1/2).
    With one positive and the same number of negatives per user, GAUC is their mean."""
    scores = np.asarray(scores, np.float64)
    pos, neg = scores[:, :1], scores[:, 1:]
    return ((pos > neg).sum(1) + 0.5 * (pos == neg).sum(1)) / neg.shape[1]
