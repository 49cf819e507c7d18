"""A. encode: every input row with its SID, or its reject reason (Ray Data actors that load
the tokenizer once), written to staging split by a hash partition of item_id.

The actors read their own input: the driver plans read units (runs of a Parquet file's row
groups, about ``rows_per_task`` rows each) from the footers, and each actor reads, encodes and
scatters one unit at a time, as the one-process bound does. No input row passes through the
object store, and no read task competes with the encoders for CPUs: with Ray Data's own
Parquet read, the read tasks (and its file listing, one CPU) held the CPU a second encoder
needed, so on 2 CPUs the pool never grew past one actor, and every read task's worker
process added its heap to the job's memory (docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.items import check_items, column_name
from sidserve.jobs.assign.shuffle import MANIFEST_SCHEMA, item_parts, scatter
from sidserve.snapshot import SnapshotRoot
from sidserve.tokenizers.base import BaseTokenizer
from sidserve.tokenizers.registry import load_tokenizer

ENCODED_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("sid", pa.list_(pa.int32())), ("sid_str", pa.string()),
    ("behavior_weights", pa.list_(pa.float32())), ("path", pa.string()),
    ("popularity", pa.float64()), ("reason", pa.string()),
    # sticky assignment only (null otherwise): of the k best codes per position, those within
    # delta of the best (sticky.trim_candidates), positions concatenated, and how many each
    # position has (L), for the resolve stage to match against the previous SID; for a
    # residual tokenizer (sticky_unit "path") the whole SIDs within delta (sticky.trim_paths),
    # concatenated, and their number (one entry)
    ("cand", pa.list_(pa.int32())), ("cand_count", pa.list_(pa.int32())),
])


class Encoder:
    """Ray Data actor: loads the tokenizer once, then encodes batches (pyarrow Tables)."""

    def __init__(self, model_uri: str, use_gpu: bool, batch_size: int, candidates: int = 0,
                 delta: float | None = None):
        self.tok: BaseTokenizer = load_tokenizer(model_uri)
        if use_gpu:
            self.tok.to("cuda")
        self.batch_size = batch_size
        self.candidates = candidates
        self.delta = delta
        self.version = self.tok.version

    def __call__(self, table: pa.Table) -> pa.Table:
        return encode_table(self.tok, table, self.batch_size, self.candidates, self.delta)


def encode_table(tok: BaseTokenizer, table: pa.Table, batch_size: int = 8192, candidates: int = 0,
                 delta: float | None = None) -> pa.Table:
    """Raw input rows -> ENCODED_SCHEMA rows (a reason instead of a SID for bad rows); with
    ``candidates=k`` also, of each row's k best codes per position, those within ``delta`` of
    the best (sticky assignment's margin; None: all k)."""
    from sidserve.jobs.assign.sticky import trim_candidates, trim_paths

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
    by_path = bool(candidates) and tok.sticky_unit == "path"
    cand, cand_count = np.zeros(0, np.int32), np.zeros((n, 1 if by_path else L), np.int32)
    if good.size:
        kw = {"candidates": candidates} if candidates else {}
        enc = tok.encode(checked.arrays.take(good), batch_size=batch_size, **kw)
        sid[good] = enc.sid
        if by_path:
            cand, cand_count[good] = trim_paths(enc.paths, enc.path_scores, np.inf if delta is None else delta)
        elif candidates:
            cand, cand_count[good] = trim_candidates(enc.candidates, enc.candidate_scores,
                                                     np.inf if delta is None else delta)
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
        "cand": ragged_list_column(cand, cand_count.sum(1) * (L if by_path else 1), mask) if candidates else pa.nulls(n, pa.list_(pa.int32())),
        "cand_count": list_column(cand_count, mask) if candidates else pa.nulls(n, pa.list_(pa.int32())),
    }, schema=ENCODED_SCHEMA)


def list_column(values: np.ndarray, null: np.ndarray) -> pa.ListArray:
    """(n, d) array -> list<dtype> Arrow column, null where ``null`` (n,) is True."""
    n, d = values.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * d)
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel()), mask=pa.array(null))


def ragged_list_column(values: np.ndarray, lengths: np.ndarray, null: np.ndarray) -> pa.ListArray:
    """values (sum(lengths),) and lengths (n,) -> list<dtype> Arrow column of n rows, row i the
    next lengths[i] values; null where ``null`` (n,) is True (its length must be 0)."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != values.size or (lengths[null] != 0).any():
        raise ValueError(f"{values.size} values for lengths summing to {offsets[-1]} (null rows must be empty)")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values), mask=pa.array(null))


def catalog_dataset(items_uri: str):
    """The catalog's Parquet files as a pyarrow Dataset (hive partitions as columns); its
    ``schema`` is read from one footer."""
    import pyarrow.dataset as pads

    from sidserve.artifact import resolve

    fs, path = resolve(items_uri)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")


def plan_units(items_uri: str, rows_per_unit: int) -> tuple[list[dict], pa.Schema]:
    """The catalog's Parquet files -> read units and the catalog's schema, from footers only.

    A unit is a run of consecutive row groups of one file holding at most ``rows_per_unit``
    rows, or one row group if that alone is larger (it is then read in slices of
    ``rows_per_unit``). Each unit: {"path", "row_groups", "rows"}, in file order.
    """
    dataset = catalog_dataset(items_uri)
    units: list[dict] = []
    for fragment in dataset.get_fragments():
        meta = fragment.metadata
        run: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if run and rows + n > rows_per_unit:
                units.append({"path": fragment.path, "row_groups": run, "rows": rows})
                run, rows = [], 0
            run.append(g)
            rows += n
        if run and rows:
            units.append({"path": fragment.path, "row_groups": run, "rows": rows})
    return units, dataset.schema


def read_unit(fs, unit: dict, rows_per_read: int, columns: list[str] | None = None):
    """Yield the rows of a read unit (``plan_units``) as tables of at most ``rows_per_read``
    rows, only ``columns``; raises once read if they are not the rows its footer counted."""
    import pyarrow.parquet as pq

    read = 0
    with fs.open_input_file(unit["path"]) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_read, row_groups=unit["row_groups"],
                                                   columns=columns):
            read += batch.num_rows
            yield pa.Table.from_batches([batch])
    if read != unit["rows"]:
        raise RuntimeError(f"{unit['path']} row groups {unit['row_groups']}: read {read} rows, "
                           f"the footer says {unit['rows']} (was the file replaced during the run?)")


class EncodeAndScatter(Encoder):
    """Map side of the item_id grouping: read a unit of the catalog (``plan_units``), encode it
    in calls of ``rows_per_task`` rows, and write each call's rows to one staging file split by
    item_id partition. -> the manifest of what it wrote."""

    def __init__(self, model_uri: str, use_gpu: bool, batch_size: int, staging: str, n_parts: int,
                 candidates: int = 0, items_uri: str = "", read_columns: list[str] | None = None,
                 renames: dict[str, str] | None = None, rows_per_task: int = 65536, delta: float | None = None):
        import json
        import uuid

        from sidserve.artifact import resolve, write_bytes
        from sidserve.tokenizers.probe import environment

        super().__init__(model_uri, use_gpu, batch_size, candidates, delta)
        self.root = SnapshotRoot(staging)
        # what this encoder's bits depend on (sidserve/tokenizers/probe.py): the job's summary
        # records every encoder's, and replicas compare theirs with it
        env = environment(self.tok, "cuda" if use_gpu else "cpu")
        self.root.fs.create_dir(self.root.join("environment"), recursive=True)
        write_bytes(self.root.fs, self.root.join("environment", f"{uuid.uuid4().hex}.json"), json.dumps(env).encode())
        self.n_parts = n_parts
        self.fs = resolve(items_uri)[0] if items_uri else None
        self.read_columns = read_columns
        self.renames = renames or {}
        self.rows_per_task = rows_per_task

    def __call__(self, units: pa.Table) -> pa.Table:
        manifests = [MANIFEST_SCHEMA.empty_table()]
        for unit in units.to_pylist():
            for table in read_unit(self.fs, unit, self.rows_per_task, self.read_columns):
                manifests.append(self.encode_and_scatter(table))
        return pa.concat_tables(manifests)

    def encode_and_scatter(self, table: pa.Table) -> pa.Table:
        import uuid

        if self.renames:
            table = table.rename_columns([self.renames.get(c, c) for c in table.column_names])
        enc = encode_table(self.tok, table, self.batch_size, self.candidates, self.delta)
        return scatter(enc, item_parts(enc.column("item_id"), self.n_parts), self.n_parts, self.root.fs,
                       self.root.join("encoded"), uuid.uuid4().hex)


def input_renames(columns: dict[str, str] | None, tok: BaseTokenizer, names: list[str]) -> dict[str, str]:
    """Column renames for this input: the ``columns`` given (each must exist), else the model's
    own mapping (``config.json`` "inputs") wherever the input has those columns."""
    from sidserve.inputs import renames

    if columns:
        return renames(columns, names)
    fitted = ((getattr(tok, "inputs_", None) or {}).get("columns")) or {}
    usable = {m: c for m, c in fitted.items() if c in names and column_name(m) not in names}
    return renames(usable, names) if usable else {}
