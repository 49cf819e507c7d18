"""The groupings (by item_id, then by SID) are shuffles through files instead of Ray Data's
hash shuffle, whose aggregators hold every shuffled row in memory until the input is
consumed (memory then grows with the catalog on one node).

The layout is a sort-based shuffle (as Spark's): each map call writes **one** file, its rows
sorted by hash partition, each partition's rows a self-contained Arrow IPC stream (LZ4) at a
known byte range, and returns a manifest (partition, path, offset, bytes, rows). A reduce task
reads its partition's byte range from every map file: one ranged read each, no footer to
parse. Files per run are the number of map calls (rows / ``rows_per_task`` for the encode,
the number of partitions for the SID grouping), not map calls x partitions, which grew with
the square of the catalog (about 400,000 staging files at 50M items with one PUT each on an
object store).

Each reduce task writes its output under a name derived from the partition, so a retried
task overwrites rather than duplicates. Only manifests reach the driver (as Arrow tables; a
reduce task that is also a map side, resolve, leaves its manifest in staging), and only byte
ranges named in a manifest are read: a failed attempt's files are never seen. The driver
hands each reduce task one index entry locating its segment list (``index_manifest``), so
its task specs do not grow with the number of map calls. Memory per task is one partition
(``rows_per_partition``) and its segment list, whatever the catalog size."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.ids import buckets as hash_buckets
from sidserve.snapshot import SnapshotRoot

MANIFEST_SCHEMA = pa.schema([("part", pa.int64()), ("path", pa.string()), ("offset", pa.int64()),
                             ("nbytes", pa.int64()), ("rows", pa.int64())])
SEGMENT_COMPRESSION = "lz4"  # Arrow IPC buffer compression of staging segments (fast; ~2x on SIDs + ids)
# the previous snapshot's keys: its items (prev_nights 0) and its reservations (nights absent)
PREVIOUS_SCHEMA = pa.schema([("item_id", pa.string()), ("prev_sid_str", pa.string()), ("prev_dedup", pa.int32()),
                             ("prev_nights", pa.int32())])


def scatter(table: pa.Table, parts: np.ndarray, n_parts: int, fs, directory: str, name: str) -> pa.Table:
    """Write ``table``'s rows, sorted by ``parts`` (n,), to the one file ``<directory>/<name>.arrows``:
    one Arrow IPC stream per non-empty partition, back to back.

    Returns the manifest (MANIFEST_SCHEMA): one row per partition written, with its byte range.
    Nothing is written for an empty table.
    """
    out = []
    if table.num_rows:
        order = np.argsort(parts, kind="stable")
        sorted_parts = parts[order]
        table = table.take(pa.array(order))
        bounds = np.searchsorted(sorted_parts, np.arange(n_parts + 1))
        path = f"{directory}/{name}.arrows"
        fs.create_dir(directory, recursive=True)
        options = pa.ipc.IpcWriteOptions(compression=SEGMENT_COMPRESSION)
        with fs.open_output_stream(path) as sink:
            for p in np.flatnonzero(np.diff(bounds)).tolist():
                segment = pa.BufferOutputStream()
                with pa.ipc.new_stream(segment, table.schema, options=options) as writer:
                    writer.write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]))
                data = segment.getvalue()
                offset = sink.tell()
                sink.write(data)
                out.append((p, path, offset, data.size, int(bounds[p + 1] - bounds[p])))
    return pa.table({name: [o[i] for o in out] for i, name in enumerate(MANIFEST_SCHEMA.names)},
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


def read_segments(fs, segments: list[dict] | pa.Table, schema: pa.Schema) -> pa.Table:
    """The rows of manifest entries ``segments`` (path, offset, nbytes, rows), as ``schema``.

    Raises if a segment holds a different number of rows than its manifest says (a file
    overwritten or truncated behind the job's back)."""
    if isinstance(segments, pa.Table):
        segments = segments.to_pylist()
    tables = [schema.empty_table()]
    by_path: dict[str, list[dict]] = {}
    for s in segments:
        by_path.setdefault(s["path"], []).append(s)
    for path, group in by_path.items():
        with fs.open_input_file(path) as f:
            for s in group:
                t = pa.ipc.open_stream(f.read_at(s["nbytes"], s["offset"])).read_all()
                if t.num_rows != s["rows"]:
                    raise RuntimeError(f"{path}@{s['offset']}: {t.num_rows} rows, the manifest says {s['rows']}")
                tables.append(t.cast(schema))
    # one chunk per column: Arrow kernels (take, filter, index_in) walk a chunked column chunk by
    # chunk, and a partition read from hundreds of map files would otherwise have hundreds
    return pa.concat_tables(tables).combine_chunks()


def index_manifest(manifest: pa.Table, n_parts: int, fs, directory: str, name: str) -> list[list[dict]]:
    """A grouping's whole manifest (one row per map call x partition) -> for each partition, where
    its manifest rows lie: ``manifest`` is itself scattered by partition into the one file
    ``<directory>/<name>.arrows``, so each partition's reduce task reads its own segment list
    (``read_segments(fs, index[p], MANIFEST_SCHEMA)``) and the driver hands it one small dict.

    The manifest has (map calls x partitions) rows, which grows with the square of the catalog
    (about 380,000 at 50M items with the defaults); as Arrow it costs about 50 bytes a row on
    the driver, for the time of this call, where a dict per row in every task spec cost ~10x
    that for the whole stage. Within a partition, segments stay in (path, offset) order, so a
    rerun reads the same way."""
    if not manifest.num_rows:
        return [[] for _ in range(n_parts)]
    manifest = manifest.cast(MANIFEST_SCHEMA).sort_by([("part", "ascending"), ("path", "ascending"),
                                                       ("offset", "ascending")])
    index = scatter(manifest, manifest.column("part").to_numpy(), n_parts, fs, directory, name)
    return by_part(index, n_parts)


def collect_manifest(ds) -> pa.Table:
    """Run a Ray Data pipeline whose map calls return manifests -> one Arrow table
    (MANIFEST_SCHEMA), never a Python dict per row."""
    tables = [MANIFEST_SCHEMA.empty_table()]
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(batch.cast(MANIFEST_SCHEMA) if isinstance(batch, pa.Table) else
                      pa.Table.from_batches([batch]).cast(MANIFEST_SCHEMA))
    return pa.concat_tables(tables).combine_chunks()


def write_manifest(manifest: pa.Table, fs, path: str) -> None:
    """A reduce task's own manifest, to staging (read back with ``read_manifests``)."""
    with fs.open_output_stream(path) as sink, pa.ipc.new_stream(sink, MANIFEST_SCHEMA) as writer:
        writer.write_table(manifest.cast(MANIFEST_SCHEMA))


def read_manifests(fs, paths: list[str]) -> pa.Table:
    tables = [MANIFEST_SCHEMA.empty_table()]
    for path in paths:
        with fs.open_input_stream(path) as f:
            tables.append(pa.ipc.open_stream(f).read_all())
    return pa.concat_tables(tables).combine_chunks()


def staging_files(manifest: pa.Table) -> int:
    """Distinct files a manifest names (the staging files its map calls wrote)."""
    return len(pc.unique(manifest.column("path"))) if manifest.num_rows else 0


def run_tasks(fn, specs: list[dict]) -> list[dict]:
    """``fn(spec)`` for every spec, one Ray task each (1 CPU); results in spec order.

    Plain Ray tasks rather than a Ray Data pipeline: the specs are a few hundred bytes, there is
    nothing to stream, and a Ray Data execution's start-up and per-task bookkeeping cost more
    than the work (at 10M items the two groupings took 67 s on 2 CPUs for 42 s of task CPU
    measured in process). A task that fails is retried by Ray (``max_retries``), and its
    outputs are named by partition, so a retry overwrites rather than duplicates.
    """
    import ray

    remote = ray.remote(num_cpus=1, max_retries=3)(fn)
    return ray.get([remote.remote(s) for s in specs])


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


def by_part(manifest: list[dict] | pa.Table, n_parts: int) -> list[list[dict]]:
    """Manifest entries -> each partition's segments, in a fixed order (reruns read the same way)."""
    if isinstance(manifest, pa.Table):
        manifest = manifest.to_pylist()
    segments: list[list[dict]] = [[] for _ in range(n_parts)]
    for m in sorted(manifest, key=lambda m: (m["path"], m["offset"])):
        segments[m["part"]].append({k: m[k] for k in ("path", "offset", "nbytes", "rows")})
    return segments
