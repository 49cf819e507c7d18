"""Batch SID assignment to a versioned snapshot (``jobs/assign.py``), on Ray Data.

    A. encode    read_parquet -> map_batches(EncodeAndScatter actor pool: model loaded
                 once per actor): every input row with its SID or its reject reason,
                 written to staging split by a hash partition of item_id
    B. resolve   one task per item_id partition, with the previous snapshot's rows of
                 the same partition: duplicate item_ids are rejected, each item gets its
                 previous SID and dedup; rejects go to the snapshot, accepted rows to
                 staging split by a hash partition of the SID
    C. dedup     one task per SID partition: an item whose SID did not change keeps its
                 dedup, the others take the lowest free suffix (item_id order); the rows
                 go to the snapshot and the task returns its statistics
    D. publish   verification (row counts, schema), summary (counts, collisions,
                 utilisation, entropy, churn), then LATEST.

No stage collects rows on the driver, and no stage holds more than one partition
(``rows_per_partition`` rows) per task: the groupings are shuffles through files (see
"the job" below), so memory does not grow with the catalog. A partition holds many
complete groups, handled with vectorised Arrow/numpy code.
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

from sidserve.artifact import resolve, write_bytes
from sidserve.base import BaseTokenizer, load_tokenizer
from sidserve.catalog import check_schema
from sidserve.items import ITEM_ID, POPULARITY, check_items, column_name
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
    cpus_per_worker: float = 1.0  # logical CPUs per encoder actor (CPU runs)
    batch_size: int = 8192  # rows per encode call
    version: str | None = None  # snapshot version (default: time + random suffix)
    rows_per_task: int = 65536  # rows per encoder call: each call writes one file per partition
    rows_per_partition: int = 100_000  # rows one grouping task holds: bounds its memory
    read_block_mib: int = 32  # target size of the blocks read from the catalog
    read_ahead_mib: int = 256  # object store budget of the encode stage (raised to hold 2 calls' input per
    #                            actor for wide embeddings): without it, reads run ahead
    #                            of the encoders and buffer up to ~1/2 of the object store (1 GiB at 1M rows)
    fail_before_publish: bool = False  # test hook: die after writing, before LATEST
    # modality -> input column (--column); None: the mapping the model was fitted with, for the
    # columns the input has under those names
    columns: dict[str, str] | None = None


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


# the job: a shuffle through files ----------------------------------------------------
#
# The two groupings (by item_id, then by SID) go through files instead of Ray Data's hash
# shuffle, whose aggregators hold every shuffled row in memory until the input is consumed
# (memory then grows with the catalog on one node). Each map task writes its rows split by
# hash partition and returns a manifest (partition, path, rows); each reduce task reads one
# partition's files, handles its complete groups and writes its output under a name derived
# from the partition, so a retried task overwrites rather than duplicates. Only manifests
# reach the driver, and only files named in a manifest are read: a failed attempt's files
# are never seen. Memory per task is one partition (``rows_per_partition``), whatever the
# catalog size.

MANIFEST_SCHEMA = pa.schema([("part", pa.int64()), ("path", pa.string()), ("rows", pa.int64())])
PREVIOUS_SCHEMA = pa.schema([("item_id", pa.string()), ("prev_sid_str", pa.string()), ("prev_dedup", pa.int32())])


def scatter(table: pa.Table, parts: np.ndarray, n_parts: int, fs, directory: str, name: str) -> pa.Table:
    """Write ``table``'s rows split by ``parts`` (n,) to ``<directory>/<part>/<name>.parquet``.

    Returns the manifest (MANIFEST_SCHEMA): one row per file written, empty parts skipped.
    """
    import pyarrow.parquet as pq

    out = []
    if table.num_rows:
        order = np.argsort(parts, kind="stable")
        sorted_parts = parts[order]
        table = table.take(pa.array(order))
        bounds = np.searchsorted(sorted_parts, np.arange(n_parts + 1))
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            path = f"{directory}/{p:05d}/{name}.parquet"
            fs.create_dir(f"{directory}/{p:05d}", recursive=True)
            pq.write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]), path, filesystem=fs)
            out.append((p, path, int(bounds[p + 1] - bounds[p])))
    return pa.table({"part": [o[0] for o in out], "path": [o[1] for o in out], "rows": [o[2] for o in out]},
                    schema=MANIFEST_SCHEMA)


def item_parts(item_ids: pa.Array, n_parts: int) -> np.ndarray:
    """Partition of each row by item_id; null item_ids go to partition 0 (they are rejects)."""
    valid = pc.is_valid(item_ids).to_numpy(zero_copy_only=False)
    parts = np.zeros(len(item_ids), np.int64)
    if valid.any():
        parts[valid] = bucket_of(item_ids.filter(pa.array(valid)), n_parts)
    return parts


class EncodeAndScatter(Encoder):
    """Map side of the item_id grouping: encode a batch, write it split by item_id partition."""

    def __init__(self, model_uri: str, use_gpu: bool, batch_size: int, staging: str, n_parts: int):
        super().__init__(model_uri, use_gpu, batch_size)
        self.root = SnapshotRoot(staging)
        self.n_parts = n_parts

    def __call__(self, table: pa.Table) -> pa.Table:
        import uuid

        enc = encode_table(self.tok, table, self.batch_size)
        return scatter(enc, item_parts(enc.column("item_id"), self.n_parts), self.n_parts, self.root.fs,
                       self.root.join("encoded"), uuid.uuid4().hex)


def _scatter_previous(staging: str, n_parts: int):
    def fn(table: pa.Table) -> pa.Table:
        import uuid

        root = SnapshotRoot(staging)
        t = table.rename_columns(["item_id", "prev_sid_str", "prev_dedup"])
        return scatter(t, item_parts(t.column("item_id"), n_parts), n_parts, root.fs, root.join("previous"),
                       uuid.uuid4().hex)

    return fn


def _read(fs, paths: list[str], schema: pa.Schema) -> pa.Table:
    import pyarrow.dataset as pads

    if not paths:
        return schema.empty_table()
    return pads.dataset(paths, schema=schema, filesystem=fs, format="parquet").to_table()


def _run_tasks(fn, specs: list[dict]) -> list[dict]:
    """``fn(spec)`` for every spec, one Ray Data task each (1 CPU); results in spec order.

    Specs and results travel as JSON strings: small, and free of Arrow's type inference.
    """
    import ray.data

    def task(row: dict) -> dict:
        return {"i": row["i"], "result": json.dumps(fn(json.loads(row["spec"])))}

    rows = ray.data.from_items([{"i": i, "spec": json.dumps(s)} for i, s in enumerate(specs)],
                               override_num_blocks=max(1, len(specs))).map(task, num_cpus=1).take_all()
    return [json.loads(r["result"]) for r in sorted(rows, key=lambda r: r["i"])]


def resolve_partition(spec: dict) -> dict:
    """Reduce side of the item_id grouping, map side of the SID grouping.

    Reads one item_id partition (current rows + previous snapshot rows), resolves it,
    writes its rejects to the snapshot and its accepted rows split by SID partition.
    """
    import pyarrow.parquet as pq

    staging, snap, p, n_parts = SnapshotRoot(spec["staging"]), SnapshotRoot(spec["snapshot"]), spec["part"], \
        spec["n_parts"]
    fs = staging.fs
    cur = _read(fs, spec["current"], ENCODED_SCHEMA)
    null_id = pc.is_null(cur.column("item_id"))
    rejects = [cur.filter(null_id).select(["item_id", "reason"])]
    cur = _to_schema(RESOLVED_SCHEMA, kind="cur")(cur.filter(pc.invert(null_id)))
    prev = _to_schema(RESOLVED_SCHEMA, kind="prev")(_read(fs, spec["previous"], PREVIOUS_SCHEMA))
    resolved = resolve_group(pa.concat_tables([cur, prev]))
    kind, reason = resolved.column("kind"), resolved.column("reason")
    rejects.append(resolved.filter(pc.and_(pc.equal(kind, "cur"), pc.is_valid(reason))).select(["item_id", "reason"]))
    rejects = pa.concat_tables(rejects).cast(REJECTS_SCHEMA)
    if rejects.num_rows:
        snap.fs.create_dir(snap.join("rejects"), recursive=True)
        pq.write_table(rejects, snap.join("rejects", f"part-{p:05d}.parquet"), filesystem=snap.fs)
    accepted = resolved.filter(pc.and_(pc.equal(kind, "cur"), pc.is_null(reason)))
    manifest = scatter(accepted, bucket_of(accepted.column("sid_str"), n_parts), n_parts, fs,
                       staging.join("resolved"), f"from-{p:05d}")  # named by partition: a retry overwrites
    return {
        "rejects": rejects.num_rows, "reasons": json.loads(_reason_counts(rejects).column("s")[0].as_py()),
        "removed": int(pc.sum(pc.equal(kind, "removed")).as_py() or 0), "manifest": manifest.to_pylist(),
    }


def dedup_partition(spec: dict) -> dict:
    """Reduce side of the SID grouping: dedup one SID partition, write it to the snapshot,
    and return its statistics."""
    import pyarrow.parquet as pq

    staging, snap, q = SnapshotRoot(spec["staging"]), SnapshotRoot(spec["snapshot"]), spec["part"]
    final = assign_dedup(_read(staging.fs, spec["files"], RESOLVED_SCHEMA))
    items = final.append_column("model_version", pa.array([spec["model_version"]] * final.num_rows, pa.string())) \
        .select(ITEMS_SCHEMA.names).cast(ITEMS_SCHEMA)
    if items.num_rows:
        snap.fs.create_dir(snap.join("items"), recursive=True)
        pq.write_table(items, snap.join("items", f"part-{q:05d}.parquet"), filesystem=snap.fs)
    stats = partial_stats(final.select(STATS_COLUMNS), spec["sid_length"], spec["codebook_size"])
    return {"items": items.num_rows, "stats": stats.column("s")[0].as_py()}


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


def _by_part(manifest: list[dict], n_parts: int) -> list[list[str]]:
    files: list[list[str]] = [[] for _ in range(n_parts)]
    for m in sorted(manifest, key=lambda m: m["path"]):  # a fixed order: reruns read the same way
        files[m["part"]].append(m["path"])
    return files


def encode_budget(job: AssignJobConfig, row_bytes: int) -> int:
    """Object-store bytes the encode stage may fill: ``read_ahead_mib``, or two calls' input
    per actor when the embeddings are wider than that allows (else the actors would wait)."""
    return max(job.read_ahead_mib * 2**20, 2 * job.num_workers * job.rows_per_task * row_bytes)


def _encode_and_scatter(ds, keep: list[str], job: AssignJobConfig, staging: str, n_parts: int,
                        row_bytes: int) -> list[dict]:
    """Stage A. ``row_bytes``: the input's size per row, to size the object-store budget."""
    import ray.data

    out = ds.select_columns(keep).map_batches(
        EncodeAndScatter, fn_constructor_kwargs={
            "model_uri": job.model, "use_gpu": job.use_gpu, "batch_size": job.batch_size,
            "staging": staging, "n_parts": n_parts},
        batch_size=job.rows_per_task, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=job.num_workers),
        num_gpus=1 if job.use_gpu else None, num_cpus=None if job.use_gpu else job.cpus_per_worker,
    )
    options = out.context.execution_options  # this dataset's own copy of the context
    options.resource_limits = options.resource_limits.copy(object_store_memory=encode_budget(job, row_bytes))
    return out.take_all()


def _read_catalog(uri: str, block_mib: int):
    """``read_parquet`` with read units and blocks of about ``block_mib`` MiB.

    Ray 2.60 packs up to 128 MiB of Parquet (uncompressed) into one read task, read as one
    block. A read task's heap grows with that (about 950 MiB for 128 MiB of list<float>
    columns, and the worker keeps it for its later tasks), and a few large blocks balance
    badly over the encoder actors. The packing size is only settable through an environment
    variable that ``read_parquet`` reads on the driver, so it is set around that call.
    """
    import os

    import ray.data

    name = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"
    saved = os.environ.get(name)
    os.environ[name] = str(block_mib * 2**20)
    try:
        ds = ray.data.read_parquet(uri)
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
    ds.context.target_max_block_size = block_mib * 2**20  # this dataset's own context
    return ds


def input_renames(columns: dict[str, str] | None, tok: BaseTokenizer, names: list[str]) -> dict[str, str]:
    """Column renames for this input: the ``columns`` given (each must exist), else the model's
    own mapping (``config.json`` "inputs") wherever the input has those columns."""
    from sidserve.inputs import renames

    if columns:
        return renames(columns, names)
    fitted = ((getattr(tok, "inputs_", None) or {}).get("columns")) or {}
    usable = {m: c for m, c in fitted.items() if c in names and column_name(m) not in names}
    return renames(usable, names) if usable else {}


def run_assignment(job: AssignJobConfig) -> dict[str, Any]:
    """Encode, dedup, write and publish a snapshot. Returns its summary."""
    import pyarrow.dataset as pads
    import ray
    import ray.data

    if job.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {job.num_workers}")
    for name in ("rows_per_partition", "rows_per_task", "batch_size", "read_block_mib", "read_ahead_mib"):
        if getattr(job, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(job, name)}")
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
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = time.perf_counter() - t0 - sum(stages.values())

    ds = _read_catalog(job.items, job.read_block_mib)
    schema = ds.schema()
    if schema is None:
        raise ValueError(f"{job.items}: the input has no rows")
    names = list(schema.names)
    mapping = input_renames(job.columns, tok, names)
    if mapping:
        ds = ds.rename_columns(mapping)
        names = list(ds.schema().names)
    check_schema(names, tok.config)
    if ITEM_ID not in names:
        raise ValueError(f"input is missing required column 'item_id'; it has {sorted(names)}")
    keep = [c for c in names if c == ITEM_ID or c == POPULARITY or c.endswith("_emb")]
    fs, path = resolve(job.items)
    n_input = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").count_rows()  # footers only
    n_parts = max(1, -(-n_input // job.rows_per_partition))

    # A. encode, each batch written split by item_id partition
    row_bytes = 4 * (sum(tok.config.modality_dims.values()) + (tok.config.behavior_dim or 0)) + 64  # float32s + id
    enc_manifest = _encode_and_scatter(ds, keep, job, staging, n_parts, row_bytes)
    encoded_rows = sum(m["rows"] for m in enc_manifest)
    if encoded_rows != n_input:
        raise RuntimeError(f"encoded {encoded_rows} rows, the input has {n_input}")
    prev_manifest: list[dict] = []
    if previous is not None:
        prev_manifest = ray.data.read_parquet(
            f"{root.snapshot_dir(previous)}/items", columns=["item_id", "sid_str", "dedup"],
        ).map_batches(_scatter_previous(staging, n_parts), batch_format="pyarrow", num_cpus=0.5).take_all()
    lap("encode")
    log.info("encoded %d rows into %d partitions in %.1f s", n_input, n_parts, stages["encode"])

    # B. resolve duplicates and previous assignments, one item_id partition per task
    common = {"staging": staging, "snapshot": snap, "n_parts": n_parts}
    cur_files, prev_files = _by_part(enc_manifest, n_parts), _by_part(prev_manifest, n_parts)
    specs = [{**common, "part": p, "current": cur_files[p], "previous": prev_files[p]} for p in range(n_parts)]
    resolved = _run_tasks(resolve_partition, specs)
    lap("resolve")

    # C. dedup, one SID partition per task, written straight to the snapshot with its statistics
    sid_files = _by_part([m for r in resolved for m in r["manifest"]], n_parts)
    L, K = len(tok.sid_layout), tok.codebook_size
    specs = [{**common, "part": q, "files": sid_files[q], "model_version": model_version, "sid_length": L,
              "codebook_size": K} for q in range(n_parts)]
    deduped = _run_tasks(dedup_partition, specs)
    removed = sum(r["removed"] for r in resolved)
    stats = reduce_stats([{"s": r["stats"]} for r in deduped], L, K, removed)
    lap("dedup+write")

    # D. verify what was written, then publish
    for sub, schema in (("items", ITEMS_SCHEMA), ("rejects", REJECTS_SCHEMA)):
        _ensure_nonempty_dir(root, version, sub, schema)  # an empty side has no part file
    items_ds = pads.dataset(root.join("snapshots", version, "items"), filesystem=root.fs, format="parquet")
    n_items = items_ds.count_rows()
    n_rejects = pads.dataset(root.join("snapshots", version, "rejects"), filesystem=root.fs,
                             format="parquet").count_rows()
    reasons: dict[str, int] = {}
    for r in resolved:
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    if n_items + n_rejects != n_input:
        raise RuntimeError(f"row counts do not reconcile: {n_input} input != {n_items} items + {n_rejects} rejects")
    if n_items != sum(r["items"] for r in deduped) or n_rejects != sum(r["rejects"] for r in resolved):
        raise RuntimeError(f"the snapshot holds {n_items} items and {n_rejects} rejects, the tasks wrote "
                           f"{sum(r['items'] for r in deduped)} and {sum(r['rejects'] for r in resolved)}")
    if not items_ds.schema.remove_metadata().equals(ITEMS_SCHEMA):
        raise RuntimeError(f"written schema {items_ds.schema} != expected {ITEMS_SCHEMA}")
    if stats["items"] != n_items:
        raise RuntimeError(f"statistics saw {stats['items']} items, the snapshot has {n_items}")
    lap("verify")

    summary = {
        "version": version, "previous_version": previous, "model_version": model_version,
        "model": job.model, "items_uri": job.items, "input_rows": n_input, "items": n_items,
        "rejects": n_rejects, "rejects_by_reason": reasons, "sid_layout": tok.sid_layout,
        **{k: v for k, v in stats.items() if k != "items"},
        "partitions": n_parts,
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
    """``sidserve assign`` / jobs/assign.py: run the assignment (exit code 2 on bad input)."""
    from sidserve.cli import run_job
    from sidserve.inputs import parse_columns

    def body():
        s = run_assignment(AssignJobConfig(
            items=args.items, model=args.model, output=args.output, num_workers=args.num_workers,
            use_gpu=args.use_gpu, batch_size=args.batch_size, rows_per_partition=args.rows_per_partition,
            columns=parse_columns(args.column) or None))
        print(f"[sidserve] snapshot {s['version']} published at {args.output}: {s['items']} items, "
              f"{s['rejects']} rejects, collision rate {s['collision_rate']:.4f}, "
              f"churn {s['churn']['churn']:.4f} ({s['duration_s']:.1f} s)")

    return run_job(body)
