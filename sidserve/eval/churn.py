"""The two-night stability simulation's pieces (sidserve/eval/stability.py runs them), each a
pure function of its inputs: night 1's sequences, Procrustes, which e_b rows a SASRec trains,
churn tables, per-seed summaries and the cold -> warm agreement."""

from __future__ import annotations

import numpy as np


def split_nights(train: list[np.ndarray], holdout: int) -> tuple[list[np.ndarray], float]:
    """Night 1's sequences (each without its last ``holdout`` items) and the share of night 2's
    interactions that are new."""
    night1 = [s[:-holdout] if s.size > holdout else s[:0] for s in train]
    total = sum(s.size for s in train)
    return night1, (total - sum(s.size for s in night1)) / max(total, 1)


def procrustes(source: np.ndarray, target: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The orthogonal R minimising ||source[rows] R - target[rows]||_F (d, d): source @ R lies in
    target's space with every norm kept."""
    u, _, vt = np.linalg.svd(source[rows].astype(np.float64).T @ target[rows].astype(np.float64))
    return (u @ vt).astype(np.float32)


def input_rows_trained(seqs: list[np.ndarray], num_items: int, max_len: int, tied: bool = False) -> np.ndarray:
    """(num_items,) bool: whether a SASRec trained on ``seqs`` learns item i+1's e_b row from
    the item's own interactions. Untied (the input table): the item is an input somewhere (not
    only a sequence's last item, and among the ``max_len`` most recent inputs); the other rows
    keep their random init, so a tokenizer reads noise as their e_b. Tied (one table for inputs
    and targets): the item is an input or a target there; a row of neither moves only as
    every target's softmax negative."""
    out = np.zeros(num_items + 1, bool)
    for q in seqs:
        if q.size >= 2:
            out[q[-(max_len + 1):] if tied else q[:-1][-max_len:]] = True
    return out[1:]


def churn_table(before: np.ndarray, after: np.ndarray, popularity: np.ndarray,
                both_nights: np.ndarray | None = None) -> dict:
    """SIDs (N, L) of the same items on two nights -> churn overall, per position and per
    popularity bucket (``popularity`` (N,): night 2's training interactions); with
    ``both_nights`` (N,) bool, the same three figures over the items that have interactions on
    both nights (the issue's measure: an item new on night 2 gains behavioral codes and always
    changes, which would inflate the lowest popularity bucket; one without interactions keeps
    its content-only SID)."""
    from sidserve.jobs.assign.stats import share_per_bucket

    changed = (before != after).any(1)
    out = {"items": int(changed.size), "changed": int(changed.sum()), "churn": float(changed.mean()),
           "per_position": (before != after).mean(0).round(6).tolist(),
           "by_popularity": {name: {"items": n, "churn": share}
                             for name, (n, share) in share_per_bucket(changed, popularity).items()}}
    if both_nights is not None:  # the same figures over those items alone: the ones that can stay stable
        b = both_nights
        out["both_nights"] = {
            "items": int(b.sum()), "changed": int(changed[b].sum()),
            "churn": float(changed[b].mean()) if b.any() else 0.0,
            "per_position": ((before[b] != after[b]).mean(0) if b.any() else np.zeros(before.shape[1])).round(6).tolist(),
            "by_popularity": {name: {"items": n, "churn": share}
                              for name, (n, share) in share_per_bucket(changed[b], popularity[b]).items()}}
    return out


def mean_tree(trees: list):
    """The element-wise mean of equally shaped JSON trees (dicts / lists of numbers); ints that
    agree everywhere (item counts) are kept as they are."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: mean_tree([t[k] for t in trees]) for k in first}
    if isinstance(first, list):
        return [mean_tree(list(v)) for v in zip(*trees)]
    if first is None or isinstance(first, str):
        return first
    if isinstance(first, int) and all(t == first for t in trees):
        return first
    return float(np.mean(trees))


def cold_to_warm(tok, items, deltas: list[float], candidates: int) -> dict:
    """Issue 20.6: an item is tokenized on the content-only path until its first interactions
    arrive, then on the full path. For every item with behavior, the share whose shared
    positions keep the code the cold path gave them, per popularity bucket, with plain
    assignment and with sticky assignment at each delta (the previous snapshot held the cold
    SID; the behavioral positions had no code then, so only the shared ones can be kept)."""
    from sidserve.items import ItemArrays
    from sidserve.jobs.assign.stats import share_per_bucket
    from sidserve.jobs.assign.sticky import sticky_codes, sticky_from_paths, trim_paths
    from sidserve.tokenizers.config import BEHAVIOR

    warm_items = items.take(np.flatnonzero(items.has_behavior))
    cold_items = ItemArrays(warm_items.content, warm_items.behavior, np.zeros(len(warm_items), bool),
                            warm_items.item_ids, warm_items.popularity)
    # the positions the cold path codes from content: ADC-SID's shared ones, rq-evidence's content prefix
    shared = [q["position"] for q in tok.sid_layout if q["group"] in ("shared", "content")]
    if not shared:  # no position is coded from content alone (rq-kmeans): nothing to agree on
        return {}
    behavior = [q["position"] for q in tok.sid_layout if q["group"] == BEHAVIOR]
    cold = tok.encode(cold_items).sid
    warm = tok.encode(warm_items, candidates=candidates)
    previous = cold.astype(np.int64)
    by_path = tok.sticky_unit == "path"
    if not by_path:
        previous[:, behavior] = tok.codebook_size  # no behavioral code on the cold path
    out = {}
    for delta in [None, *deltas]:
        if delta is None:
            codes = warm.sid
        elif by_path:  # the whole cold SID is kept or not (residual codes)
            codes = sticky_from_paths(warm.sid, *trim_paths(warm.paths, warm.path_scores, delta), candidates,
                                      previous)[0]
        else:
            codes = sticky_codes(warm.sid, warm.candidates, warm.candidate_scores, previous, delta,
                                 tok.codebook_size)[0]
        agree = (codes[:, shared] == cold[:, shared]).all(1)
        row = {"all": float(agree.mean())}
        row.update({name: share for name, (_, share) in share_per_bucket(agree, warm_items.popularity).items()})
        out["plain" if delta is None else f"sticky {delta:g}"] = row
    return out


def summarize_seeds(per_seed: dict[int, dict]) -> dict:
    """{seed: {"valid": {metric: v}, "test": {...}, "gauc": {"valid": v, "test": v}}} -> the
    same tree of means, plus ``std`` (the same tree of sample standard deviations over the
    seeds, ddof 1 as the evaluation's; 0 for one seed) and ``per_seed`` (the input, keyed by
    str(seed))."""
    runs = list(per_seed.values())

    def tree(fn):
        return {part: {k: fn([r[part][k] for r in runs]) for k in runs[0][part] if k != "seconds"}
                for part in ("valid", "test", "gauc")}
    out = tree(lambda v: float(np.mean(v)))
    out["std"] = tree(lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    out["per_seed"] = {str(k): v for k, v in per_seed.items()}
    return out
