"""Batch SID assignment to a versioned snapshot (``jobs/assign.py``), on Ray Data.

    A. encode    read_parquet -> map_batches(Encoder actor pool: model loaded once per
                 actor) -> every input row with its SID or its reject reason  [staging]
    B. resolve   union with the previous snapshot, hash-grouped by item_id: duplicate
                 item_ids are rejected, each item gets its previous SID and dedup  [staging]
    C. dedup     accepted rows hash-grouped by SID: an item whose SID did not change keeps
                 its dedup, the others take the lowest free suffix (item_id order)  [staging]
    D. write     snapshot items and rejects, summary (counts, collisions, utilisation,
                 entropy, churn), verification (row counts, schema), then LATEST.

Every stage streams (no stage collects rows on the driver; the shuffles are Ray Data's
hash shuffles). Groups are formed by a hash bucket of the key, so one call handles many
complete groups with vectorised code instead of one Python call per item.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.artifact import write_bytes
from sidserve.base import BaseTokenizer, load_tokenizer
from sidserve.catalog import check_schema
from sidserve.items import ITEM_ID, POPULARITY, check_items
from sidserve.snapshot import ITEMS_SCHEMA, REJECTS_SCHEMA, SUMMARY, SnapshotRoot, new_version

log = logging.getLogger(__name__)

# popularity buckets of the churn report: fixed, so that nights are comparable
POPULARITY_BUCKETS = [(0, 0, "0"), (1, 9, "1-9"), (10, 99, "10-99"), (100, 999, "100-999"),
                      (1000, float("inf"), "1000+")]

ENCODED_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("sid", pa.list_(pa.int32())), ("sid_str", pa.string()),
    ("behavior_weights", pa.list_(pa.float32())), ("path", pa.string()),
    ("popularity", pa.float64()), ("reason", pa.string()),
])
RESOLVED_SCHEMA = pa.schema([
    *ENCODED_SCHEMA, ("kind", pa.string()), ("prev_sid_str", pa.string()), ("prev_dedup", pa.int32()),
])
FINAL_SCHEMA = pa.schema([*RESOLVED_SCHEMA, ("dedup", pa.int32()), ("group_size", pa.int64())])


@dataclass
class AssignJobConfig:
    items: str  # Parquet file/dir/URI of the catalog
    model: str  # tokenizer artifact dir/URI
    output: str  # snapshot root dir/URI
    num_workers: int = 2  # encoder actors
    use_gpu: bool = False  # one GPU per encoder actor
    batch_size: int = 8192  # rows per encode call
    version: str | None = None  # snapshot version (default: time + random suffix)
    rows_per_bucket: int = 4096  # target rows per hash bucket in the grouping stages
    fail_before_publish: bool = False  # test hook: die after writing, before LATEST


# A. encode --------------------------------------------------------------------------


class Encoder:
    """Ray Data actor: loads the tokenizer once, then encodes batches (pyarrow Tables)."""

    def __init__(self, model_uri: str, use_gpu: bool, batch_size: int):
        self.tok: BaseTokenizer = load_tokenizer(model_uri)
        if use_gpu:
            self.tok.to("cuda")
        self.batch_size = batch_size
        self.version = self.tok.version

    def __call__(self, table: pa.Table) -> pa.Table:
        return encode_table(self.tok, table, self.batch_size)


def encode_table(tok: BaseTokenizer, table: pa.Table, batch_size: int = 8192) -> pa.Table:
    """Raw input rows -> ENCODED_SCHEMA rows (a reason instead of a SID for bad rows)."""
    checked = check_items(table, tok.config, require_item_id=True)
    n = table.num_rows
    ok = checked.ok
    ids = checked.arrays.item_ids
    item_id = pa.array([None if v is None else str(v) for v in ids], pa.string())
    L = len(tok.sid_layout)
    sid = np.zeros((n, L), np.int32)
    weights = None
    path = np.full(n, None, dtype=object)
    good = np.flatnonzero(ok)
    if good.size:
        enc = tok.encode(checked.arrays.take(good), batch_size=batch_size)
        sid[good] = enc.sid
        weights = np.zeros((n, enc.behavior_weights.shape[1]), np.float32)
        weights[good] = enc.behavior_weights
        path[good] = enc.path
    mask = ~ok
    sid_col = list_column(sid, mask)
    w_col = list_column(weights if weights is not None else np.zeros((n, 0), np.float32), mask)
    sid_str = pc.binary_join(sid_col.cast(pa.list_(pa.string())), "-")  # "3-17-0-...", null for bad rows
    pop = checked.arrays.popularity
    return pa.table({
        "item_id": item_id, "sid": sid_col, "sid_str": sid_str, "behavior_weights": w_col,
        "path": pa.array(path.tolist(), pa.string()),
        "popularity": pa.array(pop if pop is not None else np.full(n, np.nan), pa.float64()).fill_null(np.nan),
        "reason": pa.array(checked.reasons, pa.string()),
    }, schema=ENCODED_SCHEMA)


def list_column(values: np.ndarray, null: np.ndarray) -> pa.ListArray:
    """(n, d) array -> list<dtype> Arrow column, null where ``null`` (n,) is True."""
    n, d = values.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * d)
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel()), mask=pa.array(null))


# B. resolve: duplicates + previous snapshot ------------------------------------------


def bucket_of(keys: pa.Array, n_buckets: int) -> np.ndarray:
    """Stable hash bucket (crc32) of string keys: (n,) int64."""
    return np.fromiter((zlib.crc32(k.encode()) % n_buckets for k in keys.to_pylist()),
                       dtype=np.int64, count=len(keys))


def resolve_group(table: pa.Table) -> pa.Table:
    """All current rows and previous-snapshot rows of a set of item_ids (one bucket).

    Arrow and numpy only: no per-row Python and no pandas round trip of the list
    columns (that cost 40 s of CPU per million rows).
    """
    kind = table.column("kind")
    cur = table.filter(pc.equal(kind, "cur"))
    prev = table.filter(pc.equal(kind, "prev"))
    ids = cur.column("item_id").combine_chunks()
    counts = pc.value_counts(ids)
    per_row = counts.field("counts").to_numpy()[pc.index_in(ids, value_set=counts.field("values")).to_numpy()]
    reason = cur.column("reason")
    dup = (per_row > 1) & pc.is_null(reason).to_numpy(zero_copy_only=False)
    if dup.any():
        reasons = np.array(reason.to_pylist(), dtype=object)
        reasons[dup] = [f"item_id: duplicate ({c} rows)" for c in per_row[dup]]
        cur = cur.set_column(cur.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    prev_ids = prev.column("item_id").combine_chunks()
    pos = pc.index_in(ids, value_set=prev_ids)  # previous snapshots hold each item_id once
    for name in ("prev_sid_str", "prev_dedup"):
        cur = cur.set_column(cur.schema.get_field_index(name), name, prev.column(name).take(pos))
    accepted = ids.filter(pc.is_null(cur.column("reason").combine_chunks()))
    gone = prev.filter(pc.invert(pc.is_in(prev_ids, value_set=accepted)))
    return pa.concat_tables([cur.cast(RESOLVED_SCHEMA), _removed_rows(gone)])


def _removed_rows(prev: pa.Table) -> pa.Table:
    n = prev.num_rows
    cols = {name: pa.nulls(n, field.type) for name, field in zip(RESOLVED_SCHEMA.names, RESOLVED_SCHEMA)}
    cols["item_id"] = prev.column("item_id")
    cols["kind"] = pa.array(["removed"] * n, pa.string())
    cols["prev_sid_str"] = prev.column("prev_sid_str")
    cols["prev_dedup"] = prev.column("prev_dedup")
    return pa.table(cols, schema=RESOLVED_SCHEMA)


# C. dedup ------------------------------------------------------------------------------


def assign_dedup(table: pa.Table) -> pa.Table:
    """Complete SID groups (one bucket) -> dedup making (sid, dedup) unique, rows sorted by
    (sid_str, item_id).

    An item whose sid equals its previous sid keeps its previous dedup; every other item
    takes the lowest suffix not held by a kept item, in item_id order. Vectorised except
    for a loop over the SID groups with more than one item (the collisions).
    """
    table = table.take(pc.sort_indices(table, [("sid_str", "ascending"), ("item_id", "ascending")]))
    n = table.num_rows
    sid_str = table.column("sid_str")
    prev_dedup = table.column("prev_dedup")
    kept = pc.fill_null(pc.equal(table.column("prev_sid_str"), sid_str), False).to_numpy(zero_copy_only=False) \
        & pc.is_valid(prev_dedup).to_numpy(zero_copy_only=False)
    prev_values = pc.fill_null(prev_dedup, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    codes = pc.dictionary_encode(sid_str.combine_chunks()).indices.to_numpy() if n else np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])  # rows sorted by sid_str: each group is one run
    dedup = np.where(kept, prev_values, 0)
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        k = kept[start:start + size]
        taken = set(prev_values[start:start + size][k].tolist())
        free = (d for d in range(size + len(taken) + 1) if d not in taken)
        for i in np.flatnonzero(~k).tolist():
            dedup[start + i] = next(free)
    return table.append_column("dedup", pa.array(dedup.astype(np.int32))) \
        .append_column("group_size", pa.array(np.repeat(sizes, sizes).astype(np.int64))) \
        .select(FINAL_SCHEMA.names).cast(FINAL_SCHEMA)


# D. statistics -----------------------------------------------------------------------


def bucket_names(popularity: np.ndarray) -> np.ndarray:
    """(n,) float popularity -> (n,) POPULARITY_BUCKETS names; "unknown" for NaN (no
    popularity column) and values outside every bucket (negative, or between buckets)."""
    names = np.full(len(popularity), "unknown", dtype=object)
    for lo, hi, name in POPULARITY_BUCKETS:
        names[(popularity >= lo) & (popularity <= hi)] = name
    return names


STATS_COLUMNS = ["sid", "sid_str", "prev_sid_str", "popularity", "path", "group_size"]  # what partial_stats reads


def partial_stats(table: pa.Table, sid_length: int, codebook_size: int) -> pa.Table:
    """Per-batch sums over final rows -> one JSON row (reduced on the driver)."""
    n = table.num_rows
    counts = np.zeros((sid_length, codebook_size + 1), np.int64)
    if n:
        sid = np.asarray(table.column("sid").combine_chunks().flatten()).reshape(n, sid_length)
        for j in range(sid_length):
            counts[j] += np.bincount(sid[:, j], minlength=codebook_size + 1)[: codebook_size + 1]
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
        "by_bucket": buckets, "counts": counts.tolist(),
        "paths": {p["values"]: p["counts"] for p in paths},
    }
    return pa.table({"s": [json.dumps(s)]})


def reduce_stats(rows: list[dict], sid_length: int, codebook_size: int, removed: int) -> dict[str, Any]:
    tot = {"items": 0, "colliding": 0, "common": 0, "changed": 0, "new": 0}
    counts = np.zeros((sid_length, codebook_size + 1), np.int64)
    buckets: dict[str, list[int]] = {}
    paths: dict[str, int] = {}
    for r in rows:
        s = json.loads(r["s"])
        for k in tot:
            tot[k] += s[k]
        counts += np.asarray(s["counts"], np.int64)
        for k, (c, ch) in s["by_bucket"].items():
            b = buckets.setdefault(k, [0, 0])
            b[0] += c
            b[1] += ch
        for k, v in s["paths"].items():
            paths[k] = paths.get(k, 0) + v
    c = counts[:, :codebook_size]
    ent, util = [], []
    for row in c:
        p = row[row > 0] / max(row.sum(), 1)
        ent.append(float(-(p * np.log(p)).sum()))
        util.append(float((row > 0).mean()))
    return {
        "items": tot["items"],
        "paths": paths,
        "collision_rate": tot["colliding"] / tot["items"] if tot["items"] else 0.0,
        "entropy_per_position": ent, "entropy_mean": float(np.mean(ent)) if ent else 0.0,
        "utilisation_per_position": util, "utilisation_mean": float(np.mean(util)) if util else 0.0,
        "churn": {
            "common": tot["common"], "changed": tot["changed"],
            "churn": tot["changed"] / tot["common"] if tot["common"] else 0.0,
            "new": tot["new"], "removed": removed,
            "by_popularity": {k: {"common": v[0], "changed": v[1], "churn": v[1] / v[0] if v[0] else 0.0}
                              for k, v in sorted(buckets.items())},
        },
    }


def _ensure_nonempty_dir(root: SnapshotRoot, version: str, sub: str, schema: pa.Schema) -> None:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    path = root.join("snapshots", version, sub)
    if root.fs.get_file_info(path).type != pafs.FileType.Directory or not root.fs.get_file_info(
            pafs.FileSelector(path)):
        root.fs.create_dir(path, recursive=True)
        with root.fs.open_output_stream(f"{path}/empty.parquet") as f:
            pq.write_table(schema.empty_table(), f)


def _reason_counts(table: pa.Table) -> pa.Table:
    """Rejects per reason kind ('text_emb: NaN or inf value', 'item_id: duplicate', ...)."""
    kinds = [r.split(" (")[0] for r in table.column("reason").to_pylist()]
    values, counts = np.unique(np.array(kinds, dtype=object), return_counts=True) if kinds else ([], [])
    return pa.table({"s": [json.dumps({str(k): int(c) for k, c in zip(values, counts)})]})


# the job -------------------------------------------------------------------------------


def _to_schema(schema: pa.Schema, **constants):
    def fn(table: pa.Table) -> pa.Table:
        cols = {}
        for name, field in zip(schema.names, schema):
            if name in table.column_names:
                cols[name] = table.column(name).cast(field.type)
            elif name in constants:
                cols[name] = pa.array([constants[name]] * table.num_rows, field.type)
            else:
                cols[name] = pa.nulls(table.num_rows, field.type)
        return pa.table(cols, schema=schema)

    return fn


def _with_bucket(key: str, n_buckets: int):
    def fn(table: pa.Table) -> pa.Table:
        return table.append_column("_bucket", pa.array(bucket_of(table.column(key), n_buckets)))

    return fn


def _drop_bucket(fn):
    def wrapped(table: pa.Table) -> pa.Table:
        return fn(table.drop_columns(["_bucket"]))

    return wrapped


def run_assignment(job: AssignJobConfig) -> dict[str, Any]:
    """Encode, dedup, write and publish a snapshot. Returns its summary."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if job.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {job.num_workers}")
    t0 = time.perf_counter()
    tok = load_tokenizer(job.model)  # verifies the manifest before any work (and before Ray starts)
    if not ray.is_initialized():
        ray.init()
    model_version = tok.version
    root = SnapshotRoot(job.output)
    version = job.version or new_version()
    previous = root.latest()
    staging = root.staging_dir(version)
    snap = root.snapshot_dir(version)
    cpu = 0.25  # fractional CPUs: the stages share a small machine with the encoder actors

    ds = ray.data.read_parquet(job.items)
    schema = ds.schema()
    if schema is None:
        raise ValueError(f"{job.items}: the input has no rows")
    names = list(schema.names)
    check_schema(names, tok.config)
    if ITEM_ID not in names:
        raise ValueError(f"input is missing required column 'item_id'; it has {sorted(names)}")
    keep = [c for c in names if c == ITEM_ID or c == POPULARITY or c.endswith("_emb")]

    # A. encode
    encoded = ds.select_columns(keep).map_batches(
        Encoder, fn_constructor_kwargs={"model_uri": job.model, "use_gpu": job.use_gpu,
                                        "batch_size": job.batch_size},
        batch_size=job.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=job.num_workers),
        num_gpus=1 if job.use_gpu else None, num_cpus=None if job.use_gpu else 1,
    )
    encoded.write_parquet(f"{staging}/encoded")
    enc_ds = ray.data.read_parquet(f"{staging}/encoded")
    n_input = enc_ds.count()
    stages = {"encode": time.perf_counter() - t0}
    log.info("encoded %d rows in %.1f s", n_input, stages["encode"])

    # B. resolve duplicates and previous assignments, grouped by a hash bucket of item_id
    n_buckets = max(1, n_input // job.rows_per_bucket)
    n_partitions = max(2, min(200, n_input // 100_000))  # shuffle partitions: ~100k rows each
    cur = enc_ds.map_batches(lambda t: t.filter(pc.is_valid(t.column("item_id"))), batch_format="pyarrow",
                             num_cpus=cpu)
    cur = cur.map_batches(_to_schema(RESOLVED_SCHEMA, kind="cur"), batch_format="pyarrow", num_cpus=cpu)
    parts = [cur]
    if previous is not None:
        prev = ray.data.read_parquet(f"{root.snapshot_dir(previous)}/items", columns=["item_id", "sid_str", "dedup"])
        prev = prev.map_batches(
            lambda t: t.rename_columns(["item_id", "prev_sid_str", "prev_dedup"]), batch_format="pyarrow",
            num_cpus=cpu).map_batches(_to_schema(RESOLVED_SCHEMA, kind="prev"), batch_format="pyarrow",
                                      num_cpus=cpu)
        parts.append(prev)
    union = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    resolved = union.map_batches(_with_bucket("item_id", n_buckets), batch_format="pyarrow", num_cpus=cpu) \
        .groupby("_bucket", num_partitions=n_partitions).map_groups(_drop_bucket(resolve_group), batch_format="pyarrow", num_cpus=cpu)
    resolved.write_parquet(f"{staging}/resolved")
    res_ds = ray.data.read_parquet(f"{staging}/resolved")
    stages["resolve"] = time.perf_counter() - t0 - sum(stages.values())

    # rejects: bad rows from A (incl. null item_id) and duplicates from B
    # the rejects, statistics and counts below read only the columns they use
    null_id = ray.data.read_parquet(f"{staging}/encoded", columns=["item_id", "reason"]).map_batches(lambda t: t.filter(pc.is_null(t.column("item_id"))), batch_format="pyarrow",
                                 num_cpus=cpu)
    rejected = ray.data.read_parquet(f"{staging}/resolved", columns=["item_id", "reason", "kind"]).map_batches(
        lambda t: t.filter(pc.and_(pc.equal(t.column("kind"), "cur"), pc.is_valid(t.column("reason")))),
                                  batch_format="pyarrow", num_cpus=cpu)
    rejects = null_id.select_columns(["item_id", "reason"]).union(rejected.select_columns(["item_id", "reason"]))
    rejects.map_batches(lambda t: t.cast(REJECTS_SCHEMA), batch_format="pyarrow", num_cpus=cpu) \
        .write_parquet(f"{snap}/rejects")

    # C. dedup over complete SID groups
    accepted = res_ds.map_batches(lambda t: t.filter(pc.and_(pc.equal(t.column("kind"), "cur"),
                                                           pc.is_null(t.column("reason")))),
                                  batch_format="pyarrow", num_cpus=cpu)
    final = accepted.map_batches(_with_bucket("sid_str", n_buckets), batch_format="pyarrow", num_cpus=cpu) \
        .groupby("_bucket", num_partitions=n_partitions).map_groups(_drop_bucket(assign_dedup), batch_format="pyarrow", num_cpus=cpu)
    stages["rejects"] = time.perf_counter() - t0 - sum(stages.values())
    final.write_parquet(f"{staging}/final")
    fin_ds = ray.data.read_parquet(f"{staging}/final")
    stages["dedup"] = time.perf_counter() - t0 - sum(stages.values())

    # D. write the snapshot, then its statistics and verification
    fin_ds.map_batches(
        lambda t: t.append_column("model_version", pa.array([model_version] * t.num_rows, pa.string()))
        .select(ITEMS_SCHEMA.names).cast(ITEMS_SCHEMA),
        batch_format="pyarrow", num_cpus=cpu,
    ).write_parquet(f"{snap}/items")
    L, K = len(tok.sid_layout), tok.codebook_size
    stat_rows = ray.data.read_parquet(f"{staging}/final", columns=STATS_COLUMNS).map_batches(
        lambda t: partial_stats(t, L, K), batch_format="pyarrow", num_cpus=cpu).take_all()
    removed = ray.data.read_parquet(f"{staging}/resolved", columns=["kind"]).map_batches(lambda t: t.filter(pc.equal(t.column("kind"), "removed")),
                                 batch_format="pyarrow", num_cpus=cpu).count()
    stats = reduce_stats(stat_rows, L, K, removed)
    stages["write+stats"] = time.perf_counter() - t0 - sum(stages.values())

    for sub, schema in (("items", ITEMS_SCHEMA), ("rejects", REJECTS_SCHEMA)):
        _ensure_nonempty_dir(root, version, sub, schema)  # Ray writes no file for 0 rows
    n_items = ray.data.read_parquet(f"{snap}/items").count()
    rej_ds = ray.data.read_parquet(f"{snap}/rejects")
    n_rejects = rej_ds.count()
    reasons: dict[str, int] = {}
    for row in rej_ds.map_batches(_reason_counts, batch_format="pyarrow", num_cpus=cpu).take_all():
        for k, v in json.loads(row["s"]).items():
            reasons[k] = reasons.get(k, 0) + v
    written_schema = ray.data.read_parquet(f"{snap}/items").schema().base_schema
    if n_items + n_rejects != n_input:
        raise RuntimeError(f"row counts do not reconcile: {n_input} input != {n_items} items + {n_rejects} rejects")
    if not written_schema.equals(ITEMS_SCHEMA):
        raise RuntimeError(f"written schema {written_schema} != expected {ITEMS_SCHEMA}")
    if stats["items"] != n_items:
        raise RuntimeError(f"statistics saw {stats['items']} items, the snapshot has {n_items}")

    summary = {
        "version": version, "previous_version": previous, "model_version": model_version,
        "model": job.model, "items_uri": job.items, "input_rows": n_input, "items": n_items,
        "rejects": n_rejects, "rejects_by_reason": reasons, "sid_layout": tok.sid_layout,
        **{k: v for k, v in stats.items() if k != "items"},
        "duration_s": time.perf_counter() - t0,
        "stage_seconds": stages,
    }
    write_bytes(root.fs, root.join("snapshots", version, SUMMARY), json.dumps(summary, indent=2).encode())
    if job.fail_before_publish:
        raise RuntimeError("fail_before_publish: test hook, LATEST not updated")
    root.publish(version)
    try:
        root.fs.delete_dir(root.join("_staging", version))
    except OSError:  # leftovers are harmless: nothing reads _staging
        log.warning("could not delete %s", staging)
    summary["duration_s"] = time.perf_counter() - t0
    return summary


def run_cli(args) -> int:
    """jobs/assign.py: run the assignment (exit code 2 on bad input)."""
    from sidserve.cli import run_job

    def body():
        s = run_assignment(AssignJobConfig(
            items=args.items, model=args.model, output=args.output, num_workers=args.num_workers,
            use_gpu=args.use_gpu, batch_size=args.batch_size))
        print(f"[sidserve] snapshot {s['version']} published at {args.output}: {s['items']} items, "
              f"{s['rejects']} rejects, collision rate {s['collision_rate']:.4f}, "
              f"churn {s['churn']['churn']:.4f} ({s['duration_s']:.1f} s)")

    return run_job(body)
