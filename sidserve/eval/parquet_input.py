"""A user's catalog and interaction log (Parquet) -> the evaluation's dataset layout, so that
``sidserve select`` runs the evaluation's own pipeline on them (issue 48: one code path).

Inputs:

    CATALOG   the Parquet ``sidserve train`` reads: ``item_id``, ``<modality>_emb`` per content
              modality (``--column`` renames as in train), optional ``behavior_emb``
    LOG       Parquet with ``user_id``, ``item_id`` and an order column (``timestamp`` by
              default: any sortable type; ties keep the file order)

Output (``out``), the layout ``sidserve.eval.data.load_dataset`` reads plus the content the
catalog carries, which the evaluation then reads instead of embedding item text:

    sequences.txt          one line per kept user, 1-based item ids, chronological
    items.jsonl            item_id (1..N) and "id", the catalog's item id
    embeddings/<m>.npy     (N, d_m) float32 per content modality, in catalog column order
    behavior.npy           (N, d_b) float32, the catalog's behavior_emb (NaN rows: none), if any
    prepare.json           what was read, dropped and why (counts), the split

Items are those of the catalog that the kept log touches (an item no kept user touched cannot
be judged). Split ``loo`` (the evaluation's): per user, last interaction = test, the one before
= validation. Split ``time``: two global cuts at the ``valid_quantile`` / ``test_quantile`` of the
log's order column; a user's sequence is their interactions before the first cut, then their
first one between the cuts (validation), then their first one after the second (test); later
ones are dropped (they would be trained on by nobody and predicted by nobody). Either way the
result is a sequence per user whose last two items are the targets, as the harness expects.

Bad input: an item id of the log missing from the catalog is dropped and counted, an error
above ``max_unknown_share`` of the log (a log and catalog of different id spaces); users left
with fewer than 3 interactions (``loo``) or without a training item, validation and test
(``time``) are dropped and counted; a log sharing no item with the catalog, a catalog row with
an embedding of the wrong length or a non-finite value, a duplicate catalog id, or nothing left
is an error naming it. Nothing is written until every check passed (written to a temporary
directory, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from sidserve.eval.data import ITEMS_FILE, MIN_SEQUENCE, SEQUENCES_FILE
from sidserve.inputs import PEEK_ROWS, infer_inputs, renames
from sidserve.items import ITEM_ID, arrow_list_to_dense, column_name
from sidserve.tokenizers.config import BEHAVIOR

SPLITS = ("loo", "time")
MAX_UNKNOWN_SHARE = 0.05  # default: above 5% of the log naming items the catalog lacks, the ids disagree
PREPARE_FILE = "prepare.json"
BEHAVIOR_FILE = "behavior.npy"


def _dataset(uri: str, what: str):
    from sidserve.artifact import resolve

    fs, path = resolve(uri)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    except (FileNotFoundError, pa.ArrowInvalid) as err:
        raise ValueError(f"{what} {uri!r}: not a readable Parquet file or directory ({err})") from None


def read_log(uri: str, order_column: str = "timestamp") -> pa.Table:
    """LOG -> (user_id string, item_id string, order) rows, file order kept."""
    ds = _dataset(uri, "--interactions")
    need = ["user_id", ITEM_ID, order_column]
    missing = [c for c in need if c not in ds.schema.names]
    if missing:
        raise ValueError(f"--interactions {uri!r} has no column(s) {missing} (it has {ds.schema.names}); "
                         f"it needs user_id, item_id and an order column (--order-column, default 'timestamp')")
    t = ds.to_table(columns=need)
    if t.num_rows == 0:
        raise ValueError(f"--interactions {uri!r} has no rows")
    nulls = {c: t.column(c).null_count for c in need if t.column(c).null_count}
    if nulls:
        raise ValueError(f"--interactions {uri!r}: null values in {nulls}; every interaction needs a user, an item "
                         "and an order")
    return pa.table({"user_id": pc.cast(t.column("user_id"), pa.string()),
                     ITEM_ID: pc.cast(t.column(ITEM_ID), pa.string()), "order": t.column(order_column)})


def catalog_has_behavior(uri: str, columns: dict[str, str] | None = None) -> bool:
    """Whether CATALOG has a behavior_emb column (after the ``columns`` renames), from its schema."""
    names = _dataset(uri, "--items").schema.names
    target = column_name(BEHAVIOR)
    return target in names or target in renames(columns or {}, names).values()


def read_catalog(uri: str, columns: dict[str, str] | None = None) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """CATALOG -> (ids (N,) str, {modality: (N, d) float32}, behavior (N, d_b) float32 with NaN
    rows where absent, or None). Errors name the column and the first bad item."""
    ds = _dataset(uri, "--items")
    names = ds.schema.names
    rename = renames(columns or {}, names)
    if ITEM_ID not in names:
        raise ValueError(f"--items {uri!r} has no item_id column (it has {names})")
    schema = pa.schema([f.with_name(rename.get(f.name, f.name)) for f in ds.schema])
    peek = ds.head(PEEK_ROWS)
    peek = peek.rename_columns([rename.get(n, n) for n in peek.column_names])
    spec = infer_inputs(schema, peek)
    if spec.undetermined:
        raise ValueError("; ".join(spec.undetermined.values()))
    source = {v: k for k, v in rename.items()}  # standard name -> source column
    wanted = [column_name(m) for m in spec.modality_dims] + ([column_name(BEHAVIOR)] if spec.behavior_dim else [])
    t = ds.to_table(columns=[ITEM_ID] + [source.get(c, c) for c in wanted])
    ids = pc.cast(t.column(ITEM_ID), pa.string())
    if ids.null_count:
        raise ValueError(f"--items {uri!r}: {ids.null_count} rows without an item_id")
    ids = np.asarray(ids.to_pylist(), dtype=object)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"--items {uri!r}: item_id {uniq[counts > 1][0]!r} appears {counts.max()} times; ids must "
                         "be unique")

    def dense(name, dim, allow_null):
        col = arrow_list_to_dense(t.column(source.get(name, name)), dim, name)
        for mask, what in ((col.null if not allow_null else np.zeros(len(ids), bool), "is null"),
                           (col.wrong_dim, f"has a length other than {dim}"), (col.nonfinite, "holds NaN or inf")):
            if mask.any():
                raise ValueError(f"--items {uri!r}: column {name!r} {what} for {int(mask.sum())} items "
                                 f"(first: item_id {ids[np.flatnonzero(mask)[0]]!r})")
        return col

    content = {m: dense(column_name(m), d, False).values for m, d in spec.modality_dims.items()}
    behavior = None
    if spec.behavior_dim:
        col = dense(column_name(BEHAVIOR), spec.behavior_dim, True)
        behavior = col.values.copy()
        behavior[col.null] = np.nan
    return ids, content, behavior


def _sequences_loo(users: np.ndarray, items: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Rows sorted by (user, order) -> per user the item indices; users under MIN_SEQUENCE dropped."""
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    bounds = np.r_[starts, len(users)]
    seqs, dropped = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < MIN_SEQUENCE:
            dropped += 1
            continue
        seqs.append(items[a:b])
    return seqs, dropped


def _sequences_time(users, items, order, cuts) -> tuple[list[np.ndarray], int]:
    """Per user: interactions before cuts[0], the first in [cuts[0], cuts[1]), the first >= cuts[1]."""
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    bounds = np.r_[starts, len(users)]
    seqs, dropped = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, it = order[a:b], items[a:b]
        train = it[o < cuts[0]]
        valid = it[(o >= cuts[0]) & (o < cuts[1])]
        test = it[o >= cuts[1]]
        if not (train.size and valid.size and test.size):
            dropped += 1
            continue
        seqs.append(np.concatenate([train, valid[:1], test[:1]]))
    return seqs, dropped


def prepare(items_uri: str, log_uri: str, out: str, *, split: str = "loo", order_column: str = "timestamp",
            columns: dict[str, str] | None = None, sample_users: int | None = None, seed: int = 0,
            max_unknown_share: float = MAX_UNKNOWN_SHARE, valid_quantile: float = 0.9,
            test_quantile: float = 0.95) -> dict:
    """Write the dataset for ``items_uri`` + ``log_uri`` under ``out`` (see the module doc);
    returns prepare.json's content. A finished ``out`` is reused (its inputs must match)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if sample_users is not None and sample_users < 1:
        raise ValueError(f"sample_users must be >= 1, got {sample_users}")
    if not 0 <= max_unknown_share < 1:
        raise ValueError(f"max_unknown_share must be in [0, 1), got {max_unknown_share}")
    if not 0 < valid_quantile < test_quantile < 1:
        raise ValueError(f"need 0 < valid_quantile < test_quantile < 1, got {valid_quantile}, {test_quantile}")
    key = {"items": items_uri, "interactions": log_uri, "split": split, "order_column": order_column,
           "columns": dict(columns or {}), "sample_users": sample_users, "seed": seed,
           "max_unknown_share": max_unknown_share,
           **({"valid_quantile": valid_quantile, "test_quantile": test_quantile} if split == "time" else {})}
    done = os.path.join(out, PREPARE_FILE)
    if os.path.exists(done):
        with open(done) as f:
            summary = json.load(f)
        if summary["inputs"] != key:
            raise ValueError(f"{out} was prepared from {summary['inputs']}, not {key}: use another --output")
        return summary

    ids, content, behavior = read_catalog(items_uri, columns)
    log = read_log(log_uri, order_column)
    n_log = log.num_rows
    index = {v: i for i, v in enumerate(ids)}
    log_items = log.column(ITEM_ID).to_pylist()
    item_idx = np.fromiter((index.get(v, -1) for v in log_items), np.int64, len(log_items))
    unknown = int((item_idx < 0).sum())
    if unknown == n_log:
        raise ValueError(f"no interaction of --interactions {log_uri!r} names an item of --items {items_uri!r} "
                         f"(e.g. log item_id {log_items[0]!r}; catalog item_id {ids[0]!r}): are they the same id "
                         "space?")
    if unknown / n_log > max_unknown_share:
        raise ValueError(f"{unknown} of {n_log} interactions ({unknown / n_log:.1%}) name items missing from --items, "
                         f"above --max-unknown-share {max_unknown_share:.1%} (e.g. "
                         f"{next(v for v, i in zip(log_items, item_idx) if i < 0)!r}): the log and the catalog "
                         "disagree on item ids")
    keep = item_idx >= 0
    users = np.asarray(log.column("user_id").to_pylist(), dtype=object)[keep]
    order_col = log.column("order").filter(pa.array(keep))
    item_idx = item_idx[keep]
    # sort by (user, order), stable: ties keep the file order
    user_codes = np.unique(users, return_inverse=True)[1]
    order_rank = pc.rank(order_col, sort_keys="ascending", tiebreaker="first").to_numpy().astype(np.int64)
    perm = np.lexsort((order_rank, user_codes))
    users_s, items_s, order_s = user_codes[perm], item_idx[perm], order_rank[perm]
    if split == "loo":
        seqs, short = _sequences_loo(users_s, items_s)
        cuts = None
    else:
        cuts = (np.quantile(order_rank, valid_quantile), np.quantile(order_rank, test_quantile))
        seqs, short = _sequences_time(users_s, items_s, order_s, cuts)
    n_users = len(seqs) + short
    if sample_users is not None and len(seqs) > sample_users:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(seqs), size=sample_users, replace=False))
        seqs = [seqs[i] for i in pick]
    if not seqs:
        raise ValueError(f"no user of --interactions {log_uri!r} has enough interactions for the split "
                         f"({'>= 3 each' if split == 'loo' else 'a training item, one between the cuts, one after'}): "
                         "nothing to evaluate on")
    used = np.unique(np.concatenate(seqs))  # catalog rows the kept users touch, in catalog order
    remap = np.full(len(ids), 0, np.int64)
    remap[used] = np.arange(1, used.size + 1)
    summary = {
        "inputs": key,
        "log_rows": n_log, "unknown_item_rows": unknown,
        "users": n_users, "users_dropped_too_short": short, "users_kept": len(seqs),
        "catalog_items": len(ids), "items": int(used.size),
        "modalities": {m: int(v.shape[1]) for m, v in content.items()},
        "behavior_dim": None if behavior is None else int(behavior.shape[1]),
        "catalog_behavior_items": None if behavior is None else int((~np.isnan(behavior[used, 0])).sum()),
        "interactions": int(sum(len(s) for s in seqs)),
        "split": split,
    }
    if cuts is not None:
        summary["time_cuts_rank"] = [float(c) for c in cuts]
    tmp = out.rstrip("/") + ".tmp-prepare"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "embeddings"))
    with open(os.path.join(tmp, SEQUENCES_FILE), "w") as f:
        for u, s in enumerate(seqs, start=1):
            f.write(" ".join(map(str, [u, *remap[s].tolist()])) + "\n")
    with open(os.path.join(tmp, ITEMS_FILE), "w") as f:
        for i, row in enumerate(used, start=1):
            f.write(json.dumps({"item_id": i, "id": str(ids[row])}, ensure_ascii=False) + "\n")
    for m, v in content.items():
        np.save(os.path.join(tmp, "embeddings", f"{m}.npy"), v[used])
    if behavior is not None:
        np.save(os.path.join(tmp, BEHAVIOR_FILE), behavior[used])
    with open(os.path.join(tmp, PREPARE_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    return summary
