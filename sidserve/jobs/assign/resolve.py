"""B. resolve: one task per item_id partition, with the previous snapshot's rows of the same
partition (its items and its reservations): duplicate item_ids are rejected, each item gets
its previous SID and dedup; rejects go to the snapshot; accepted rows, and the keys of items
that are gone (reservations, while younger than ``reserve_nights``), to staging split by a
hash partition of the SID."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.ids import buckets as hash_buckets
from sidserve.jobs.assign.encode import ENCODED_SCHEMA
from sidserve.jobs.assign.publish import reason_counts
from sidserve.jobs.assign.shuffle import (
    MANIFEST_SCHEMA,
    PREVIOUS_SCHEMA,
    read_segments,
    scatter,
    to_schema,
    write_manifest,
)
from sidserve.snapshot import REJECTS_SCHEMA, SnapshotRoot

RESOLVED_SCHEMA = pa.schema([
    *ENCODED_SCHEMA, ("kind", pa.string()), ("prev_sid_str", pa.string()), ("prev_dedup", pa.int32()),
    ("prev_nights", pa.int32()),  # nights the previous key's item had been absent (0: it was present)
])


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
    for name in ("prev_sid_str", "prev_dedup", "prev_nights"):
        cur = cur.set_column(cur.schema.get_field_index(name), name, prev.column(name).take(pos))
    accepted = ids.filter(pc.is_null(cur.column("reason").combine_chunks()))
    gone = prev.filter(pc.invert(pc.is_in(prev_ids, value_set=accepted)))
    return pa.concat_tables([cur.cast(RESOLVED_SCHEMA), removed_rows(gone)])


def removed_rows(prev: pa.Table) -> pa.Table:
    """Previous keys whose item is not accepted now: kind "removed", the key in sid_str /
    prev_dedup (what a reservation holds), prev_nights counting tonight."""
    n = prev.num_rows
    cols = {name: pa.nulls(n, field.type) for name, field in zip(RESOLVED_SCHEMA.names, RESOLVED_SCHEMA)}
    cols["item_id"] = prev.column("item_id")
    cols["kind"] = pa.array(["removed"] * n, pa.string())
    cols["sid_str"] = prev.column("prev_sid_str")
    cols["prev_sid_str"] = prev.column("prev_sid_str")
    cols["prev_dedup"] = prev.column("prev_dedup")
    cols["prev_nights"] = pc.add(pc.fill_null(prev.column("prev_nights"), 0), 1).cast(pa.int32())
    return pa.table(cols, schema=RESOLVED_SCHEMA)


def resolve_partition(spec: dict) -> dict:
    """Reduce side of the item_id grouping, map side of the SID grouping.

    Reads one item_id partition (current rows + previous snapshot rows), resolves it,
    writes its rejects to the snapshot and its accepted rows split by SID partition.
    """
    import time

    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    staging, snap, p, n_parts = SnapshotRoot(spec["staging"]), SnapshotRoot(spec["snapshot"]), spec["part"], \
        spec["n_parts"]
    fs = staging.fs
    cur = read_segments(fs, read_segments(fs, spec["current"], MANIFEST_SCHEMA), ENCODED_SCHEMA)
    null_id = pc.is_null(cur.column("item_id"))
    rejects = [cur.filter(null_id).select(["item_id", "reason"])]
    cur = to_schema(RESOLVED_SCHEMA, kind="cur")(cur.filter(pc.invert(null_id)))
    prev = to_schema(RESOLVED_SCHEMA, kind="prev")(read_segments(
        fs, read_segments(fs, spec["previous"], MANIFEST_SCHEMA), PREVIOUS_SCHEMA))
    read_s = time.perf_counter() - t0
    resolved = resolve_group(pa.concat_tables([cur, prev]))
    kind, reason = resolved.column("kind"), resolved.column("reason")
    rejects.append(resolved.filter(pc.and_(pc.equal(kind, "cur"), pc.is_valid(reason))).select(["item_id", "reason"]))
    rejects = pa.concat_tables(rejects).cast(REJECTS_SCHEMA)
    if rejects.num_rows:
        snap.fs.create_dir(snap.join("rejects"), recursive=True)
        pq.write_table(rejects, snap.join("rejects", f"part-{p:05d}.parquet"), filesystem=snap.fs)
    accepted = resolved.filter(pc.and_(pc.equal(kind, "cur"), pc.is_null(reason)))
    sticky = None
    if spec.get("sticky_delta") is not None:
        accepted, sticky = apply_sticky(accepted, spec["sticky_candidates"], spec["sid_length"], spec["missing_code"],
                                        spec.get("sticky_unit", "position"))
    for name in ("cand", "cand_count"):  # read here only: not carried to the dedup stage
        i = accepted.schema.get_field_index(name)
        accepted = accepted.set_column(i, name, pa.nulls(accepted.num_rows, accepted.schema.field(name).type))
    removed = resolved.filter(pc.equal(kind, "removed"))
    nights = removed.column("prev_nights")
    reserved = removed.filter(pc.less_equal(nights, spec["reserve_nights"]))  # kept for the dedup
    out = pa.concat_tables([accepted, reserved])
    manifest = scatter(out, hash_buckets(out.column("sid_str"), n_parts), n_parts, fs,
                       staging.join("resolved"), f"from-{p:05d}")  # named by partition: a retry overwrites
    manifest_path = staging.join("resolved", f"from-{p:05d}.manifest")  # (n_parts rows: not sent to the driver)
    write_manifest(manifest, fs, manifest_path)
    return {
        "rejects": rejects.num_rows, "reasons": json.loads(reason_counts(rejects).column("s")[0].as_py()),
        # items of the previous snapshot that left tonight (not the older reservations)
        "removed": int(pc.sum(pc.equal(nights, 1)).as_py() or 0),
        "expired": removed.num_rows - reserved.num_rows, "manifest": manifest_path,
        "sticky": sticky, "seconds": {"read": read_s, "total": time.perf_counter() - t0},
    }


def apply_sticky(accepted: pa.Table, k: int, length: int, missing_code: int,
                 unit: str = "position") -> tuple[pa.Table, dict]:
    """Accepted rows with their candidates within delta (of the k scored per position, or of
    the k best whole SIDs for ``unit`` "path") and previous SID -> the rows with sticky codes
    (``sticky.sticky_from_trimmed`` / ``sticky_from_paths``), and how many codes stickiness
    kept (per position) or could not score."""
    from sidserve.jobs.assign.sticky import parse_sid_str, sticky_from_paths, sticky_from_trimmed

    n = accepted.num_rows
    if not n:
        return accepted, {"kept_per_position": [0] * length, "unscored": 0}
    computed = accepted.column("sid").combine_chunks().flatten().to_numpy().reshape(n, length)
    cand = accepted.column("cand").combine_chunks().flatten().to_numpy()
    counts = accepted.column("cand_count").combine_chunks().flatten().to_numpy().reshape(n, -1)
    previous = parse_sid_str(accepted.column("prev_sid_str").combine_chunks(), length)
    if unit == "path":
        codes, kept, unscored = sticky_from_paths(computed, cand, counts, k, previous)
    else:
        codes, kept, unscored = sticky_from_trimmed(computed, cand, counts, k, previous, missing_code)
    if kept.any():
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * length)
        sid = pa.ListArray.from_arrays(offsets, pa.array(codes.ravel(), pa.int32()))
        accepted = accepted.set_column(accepted.schema.get_field_index("sid"), "sid", sid)
        accepted = accepted.set_column(accepted.schema.get_field_index("sid_str"), "sid_str",
                                       pc.binary_join(sid.cast(pa.list_(pa.string())), "-"))
    return accepted, {"kept_per_position": kept.sum(0).tolist(), "unscored": int(unscored.sum())}
