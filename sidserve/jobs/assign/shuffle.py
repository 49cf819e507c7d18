"""The groupings (by item_id, then by SID) are shuffles through files instead of Ray Data's
hash shuffle, whose aggregators hold every shuffled row in memory until the input is
consumed (memory then grows with the catalog on one node). Each map task writes its rows
split by hash partition and returns a manifest (partition, path, rows); each reduce task
reads one partition's files, handles its complete groups and writes its output under a name
derived from the partition, so a retried task overwrites rather than duplicates. Only
manifests reach the driver, and only files named in a manifest are read: a failed attempt's
files are never seen. Memory per task is one partition (``rows_per_partition``), whatever
the catalog size."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.ids import buckets as hash_buckets
from sidserve.snapshot import SnapshotRoot

MANIFEST_SCHEMA = pa.schema([("part", pa.int64()), ("path", pa.string()), ("rows", pa.int64())])
# the previous snapshot's keys: its items (prev_nights 0) and its reservations (nights absent)
PREVIOUS_SCHEMA = pa.schema([("item_id", pa.string()), ("prev_sid_str", pa.string()), ("prev_dedup", pa.int32()),
                             ("prev_nights", pa.int32())])


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
        parts[valid] = hash_buckets(item_ids.filter(pa.array(valid)), n_parts)
    return parts


def scatter_previous(staging: str, n_parts: int):
    def fn(table: pa.Table) -> pa.Table:
        import uuid

        root = SnapshotRoot(staging)
        if "nights_absent" not in table.column_names:  # an item of the snapshot: present, 0 nights absent
            table = table.append_column("nights_absent", pa.array(np.zeros(table.num_rows, np.int32)))
        t = table.select(["item_id", "sid_str", "dedup", "nights_absent"]) \
            .rename_columns(PREVIOUS_SCHEMA.names).cast(PREVIOUS_SCHEMA)
        return scatter(t, item_parts(t.column("item_id"), n_parts), n_parts, root.fs, root.join("previous"),
                       uuid.uuid4().hex)

    return fn


def read_files(fs, paths: list[str], schema: pa.Schema) -> pa.Table:
    import pyarrow.dataset as pads

    if not paths:
        return schema.empty_table()
    return pads.dataset(paths, schema=schema, filesystem=fs, format="parquet").to_table()


def run_tasks(fn, specs: list[dict]) -> list[dict]:
    """``fn(spec)`` for every spec, one Ray Data task each (1 CPU); results in spec order.

    Specs and results travel as JSON strings: small, and free of Arrow's type inference.
    """
    import ray.data

    def task(row: dict) -> dict:
        return {"i": row["i"], "result": json.dumps(fn(json.loads(row["spec"])))}

    rows = ray.data.from_items([{"i": i, "spec": json.dumps(s)} for i, s in enumerate(specs)],
                               override_num_blocks=max(1, len(specs))).map(task, num_cpus=1).take_all()
    return [json.loads(r["result"]) for r in sorted(rows, key=lambda r: r["i"])]


def to_schema(schema: pa.Schema, **constants):
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


def by_part(manifest: list[dict], n_parts: int) -> list[list[str]]:
    files: list[list[str]] = [[] for _ in range(n_parts)]
    for m in sorted(manifest, key=lambda m: m["path"]):  # a fixed order: reruns read the same way
        files[m["part"]].append(m["path"])
    return files
