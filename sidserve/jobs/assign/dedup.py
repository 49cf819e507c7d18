"""C. dedup: one task per SID partition: an item whose SID did not change keeps its dedup, a
reserved key (an absent item's, kind "removed") stays taken, the others take the lowest free
suffix (item_id order); the items and the reservations go to the snapshot and the task
returns its statistics."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.jobs.assign.resolve import RESOLVED_SCHEMA
from sidserve.jobs.assign.shuffle import MANIFEST_SCHEMA, read_segments
from sidserve.jobs.assign.stats import STATS_COLUMNS, partial_stats
from sidserve.snapshot import ITEMS_SCHEMA, RESERVATIONS_SCHEMA, SnapshotRoot

FINAL_SCHEMA = pa.schema([*RESOLVED_SCHEMA, ("dedup", pa.int32()), ("group_size", pa.int64())])


def assign_dedup(table: pa.Table) -> pa.Table:
    """Complete SID groups (one bucket) -> dedup making (sid, dedup) unique, rows sorted by
    (sid_str, item_id).

    An item whose sid equals its previous sid keeps its previous dedup, and so does a
    reservation (kind "removed": sid_str is its key's SID); every other item takes the
    lowest suffix not held by a kept row, in item_id order. ``group_size`` counts the
    items of the SID, not its reservations. Vectorised except for a loop over the SID
    groups with more than one row (the collisions).
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
    is_item = pc.equal(table.column("kind"), "cur").to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    group_of = np.repeat(np.arange(len(sizes)), sizes)
    items_per_group = np.bincount(group_of[is_item], minlength=len(sizes))
    dedup = np.where(kept, prev_values, 0)
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        k = kept[start:start + size]
        taken = set(prev_values[start:start + size][k].tolist())
        free = (d for d in range(size + len(taken) + 1) if d not in taken)
        for i in np.flatnonzero(~k).tolist():
            dedup[start + i] = next(free)
    return table.append_column("dedup", pa.array(dedup.astype(np.int32))) \
        .append_column("group_size", pa.array(items_per_group[group_of].astype(np.int64))) \
        .select(FINAL_SCHEMA.names).cast(FINAL_SCHEMA)


def dedup_partition(spec: dict) -> dict:
    """Reduce side of the SID grouping: dedup one SID partition, write it to the snapshot,
    and return its statistics."""
    import time

    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    staging, snap, q = SnapshotRoot(spec["staging"]), SnapshotRoot(spec["snapshot"]), spec["part"]
    segments = read_segments(staging.fs, spec["files"], MANIFEST_SCHEMA)  # where its rows lie (index_manifest)
    rows = read_segments(staging.fs, segments, RESOLVED_SCHEMA)
    read_s = time.perf_counter() - t0
    final = assign_dedup(rows)
    is_item = pc.equal(final.column("kind"), "cur")
    held = final.filter(pc.invert(is_item))
    reservations = pa.table([held.column("item_id"), held.column("sid_str"), held.column("dedup"),
                             held.column("prev_nights")], schema=RESERVATIONS_SCHEMA)
    if reservations.num_rows:
        snap.fs.create_dir(snap.join("reservations"), recursive=True)
        pq.write_table(reservations, snap.join("reservations", f"part-{q:05d}.parquet"), filesystem=snap.fs)
    final = final.filter(is_item)
    items = final.append_column("model_version", pa.array([spec["model_version"]] * final.num_rows, pa.string())) \
        .select(ITEMS_SCHEMA.names).cast(ITEMS_SCHEMA)
    if items.num_rows:
        snap.fs.create_dir(snap.join("items"), recursive=True)
        pq.write_table(items, snap.join("items", f"part-{q:05d}.parquet"), filesystem=snap.fs)
    stats = partial_stats(final.select(STATS_COLUMNS), spec["sid_length"], spec["codebook_size"])
    return {"items": items.num_rows, "reservations": reservations.num_rows, "stats": stats.column("s")[0].as_py(),
            "seconds": {"read": read_s, "total": time.perf_counter() - t0}}
