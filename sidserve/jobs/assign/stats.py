"""The snapshot's statistics: per-task partial sums (counts per position, collisions, churn
per popularity bucket, paths) reduced on the driver into summary.json."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.metrics import CodeCounter

# popularity buckets of the churn report: fixed, so that nights are comparable
POPULARITY_BUCKETS = [(0, 0, "0"), (1, 9, "1-9"), (10, 99, "10-99"), (100, 999, "100-999"),
                      (1000, float("inf"), "1000+")]


def bucket_names(popularity: np.ndarray) -> np.ndarray:
    """(n,) float popularity -> (n,) POPULARITY_BUCKETS names; "unknown" for NaN (no
    popularity column) and values outside every bucket (negative, or between buckets)."""
    names = np.full(len(popularity), "unknown", dtype=object)
    for lo, hi, name in POPULARITY_BUCKETS:
        names[(popularity >= lo) & (popularity <= hi)] = name
    return names


def share_per_bucket(flags: np.ndarray, popularity: np.ndarray) -> dict[str, tuple[int, float]]:
    """(n,) bool, (n,) popularity -> {bucket name: (items, share of them flagged)} for the
    non-empty POPULARITY_BUCKETS, in their order (churn, cold-path agreement, ...)."""
    out = {}
    for lo, hi, name in POPULARITY_BUCKETS:
        m = (popularity >= lo) & (popularity <= hi)
        if m.any():
            out[name] = (int(m.sum()), float(flags[m].mean()))
    return out


STATS_COLUMNS = ["sid", "sid_str", "prev_sid_str", "popularity", "path", "group_size"]  # what partial_stats reads


def partial_stats(table: pa.Table, sid_length: int, codebook_size: int) -> pa.Table:
    """Per-batch sums over final rows -> one JSON row (reduced on the driver)."""
    n = table.num_rows
    counter = CodeCounter(sid_length, codebook_size)
    if n:
        counter.add(np.asarray(table.column("sid").combine_chunks().flatten()).reshape(n, sid_length))
    prev = table.column("prev_sid_str")
    has_prev = pc.is_valid(prev).to_numpy(zero_copy_only=False)
    changed = has_prev & pc.fill_null(pc.not_equal(table.column("sid_str"), prev), False).to_numpy(
        zero_copy_only=False)
    names = bucket_names(pc.fill_null(table.column("popularity"), np.nan).to_numpy(zero_copy_only=False))
    buckets = {str(name): [int(has_prev[names == name].sum()), int(changed[names == name].sum())]
               for name in np.unique(names)}
    paths = pc.value_counts(table.column("path")).to_pylist() if n else []
    s = {
        "items": n,
        "colliding": int((table.column("group_size").to_numpy() > 1).sum()),
        "common": int(has_prev.sum()), "changed": int(changed.sum()), "new": int((~has_prev).sum()),
        "by_bucket": buckets, "counts": counter.counts.tolist(),
        "paths": {p["values"]: p["counts"] for p in paths},
    }
    return pa.table({"s": [json.dumps(s)]})


def reduce_stats(rows: list[dict], sid_length: int, codebook_size: int, removed: int) -> dict[str, Any]:
    tot = {"items": 0, "colliding": 0, "common": 0, "changed": 0, "new": 0}
    counter = CodeCounter(sid_length, codebook_size)
    buckets: dict[str, list[int]] = {}
    paths: dict[str, int] = {}
    for r in rows:
        s = json.loads(r["s"])
        for k in tot:
            tot[k] += s[k]
        counter.merge(CodeCounter(sid_length, codebook_size, counts=s["counts"]))
        for k, (c, ch) in s["by_bucket"].items():
            b = buckets.setdefault(k, [0, 0])
            b[0] += c
            b[1] += ch
        for k, v in s["paths"].items():
            paths[k] = paths.get(k, 0) + v
    return {
        "items": tot["items"],
        "paths": paths,
        "collision_rate": tot["colliding"] / tot["items"] if tot["items"] else 0.0,
        **counter.report(),
        "churn": {
            "common": tot["common"], "changed": tot["changed"],
            "churn": tot["changed"] / tot["common"] if tot["common"] else 0.0,
            "new": tot["new"], "removed": removed,
            "by_popularity": {k: {"common": v[0], "changed": v[1], "churn": v[1] / v[0] if v[0] else 0.0}
                              for k, v in sorted(buckets.items())},
        },
    }
