"""Item-id lookup into a published snapshot, compact enough for tens of millions of items.

The columns a response needs stay in Arrow (about 66 bytes per item for L=6, N_b=3); the
index is a sorted array of 64-bit hashes of the ids plus the row of each (16 bytes per
item), so a lookup is a binary search and a check that the stored id really matches. No
Python object per item, unlike a dict (over 100 bytes per item before the values).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.ids import hash_strings
from sidserve.snapshot import ITEMS_SCHEMA, SnapshotRoot

KEEP = ["item_id", "sid", "dedup", "behavior_weights"]  # columns held in memory
KEEP_SCHEMA = pa.schema([ITEMS_SCHEMA.field(name) for name in KEEP])
READ = [*KEEP, "model_version"]  # columns read while loading
READ_BATCH_ROWS = 65_536  # rows decoded at a time while loading
HASH_CHUNK_ROWS = 16_384  # ids hashed at a time (hash_strings' temporaries: ~48 bytes per id byte)
@dataclass
class CatalogHits:
    """Rows of a lookup: ``found`` (Q,) bool and, for found ones, ``rows`` into the table."""

    found: np.ndarray  # (Q,) bool
    rows: np.ndarray  # (Q,) int64, -1 where not found


class CatalogIndex:
    """One snapshot's items, looked up by item_id.

    Loading streams the snapshot in record batches and keeps only ``KEEP``: the columns a
    response does not need (``sid_str``, ``path``) are never read, ``model_version`` is read one
    batch at a time for its distinct values, and the ids are hashed ``HASH_CHUNK_ROWS`` at a
    time (``hash_strings`` holds about 40 bytes per id *byte* while it works). Peak memory
    while loading stays within 2x of the loaded index (``nbytes``); bench/catalog_index_memory.py
    measures it at 5M items.
    """

    def __init__(self, table: pa.Table, version: str, summary: dict | None = None, root_uri: str | None = None):
        if not set(ITEMS_SCHEMA.names) <= set(table.column_names):
            raise ValueError(f"snapshot {version}: items have columns {table.column_names}, "
                             f"expected {ITEMS_SCHEMA.names}")
        self._build(table.select(READ).to_batches(), table.num_rows, version, summary, root_uri)

    @classmethod
    def load(cls, root: SnapshotRoot, version: str | None = None) -> CatalogIndex:
        version = version or root.latest()
        if version is None:
            raise ValueError(f"{root.uri}: no published snapshot (no LATEST)")
        dataset = root.items_dataset(version)
        missing = sorted(set(ITEMS_SCHEMA.names) - set(dataset.schema.names))
        if missing:
            raise ValueError(f"snapshot {version}: items have columns {dataset.schema.names}, "
                             f"expected {ITEMS_SCHEMA.names} (missing {missing})")
        index = cls.__new__(cls)
        index._build(dataset.to_batches(columns=READ, batch_size=READ_BATCH_ROWS, batch_readahead=2,
                                        fragment_readahead=1), dataset.count_rows(),
                     version, root.summary(version), root.uri)
        return index

    def _build(self, batches, n: int, version: str, summary: dict | None, root_uri: str | None) -> None:
        kept: list[pa.RecordBatch] = []
        h = np.empty(n, np.uint64)  # (N,) the ids' hashes, filled batch by batch
        done = 0
        versions: set[str] = set()
        nulls = 0
        for batch in batches:
            versions.update(v for v in pc.unique(batch.column("model_version")).to_pylist() if v is not None)
            batch = batch.select(KEEP)
            ids = batch.column("item_id")
            nulls += ids.null_count
            if nulls:
                continue  # counted for the error below; nothing more to build
            if done + len(ids) > n:
                raise ValueError(f"snapshot {version}: more items than its files' metadata count ({n})")
            for start in range(0, len(ids), HASH_CHUNK_ROWS):  # bounded temporaries
                chunk = ids.slice(start, HASH_CHUNK_ROWS)
                h[done:done + len(chunk)] = hash_strings(chunk)
                done += len(chunk)
            kept.append(batch)
        if nulls:
            raise ValueError(f"snapshot {version}: {nulls} item(s) with a null item_id")
        self.model_versions: list[str] = sorted(versions)
        # only what a response needs (sid_str is rebuilt from sid): about 70 bytes an item
        self.table = pa.Table.from_batches(kept, schema=kept[0].schema if kept else KEEP_SCHEMA)
        del kept
        self.version = version
        self.summary = summary or {}
        self.root_uri = root_uri
        if done != n:
            raise ValueError(f"snapshot {version}: read {done} items, its files' metadata count {n}")
        self._order = np.argsort(h, kind="stable")  # (N,) int64 rows by hash
        self._hashes = h[self._order]  # (N,) sorted
        del h
        self._ids = self.table.column("item_id")  # chunked: indexing finds the chunk

    @property
    def nbytes(self) -> int:
        """Bytes the loaded index holds: the kept columns plus the hash index (16 per item)."""
        return self.table.nbytes + self._hashes.nbytes + self._order.nbytes

    @property
    def created_at(self) -> float | None:
        """When the snapshot was written (unix seconds): its summary's ``created_at``, else, for
        a snapshot from before that field, the time in a generated version name; None if neither."""
        if self.summary.get("created_at") is not None:
            return float(self.summary["created_at"])
        try:
            stamp = dt.datetime.strptime(self.version[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            return None
        return stamp.timestamp()

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def model_version(self) -> str | None:
        """The model that made every SID of the snapshot (None if empty or mixed)."""
        return self.model_versions[0] if len(self.model_versions) == 1 else None

    def lookup(self, item_ids: list[str | None]) -> CatalogHits:
        q = len(item_ids)
        found = np.zeros(q, dtype=bool)
        rows = np.full(q, -1, dtype=np.int64)
        present = [i for i, v in enumerate(item_ids) if v is not None]
        if not present or not len(self):
            return CatalogHits(found, rows)
        query = pa.array([item_ids[i] for i in present], type=pa.string())
        h = hash_strings(query)
        lo = np.searchsorted(self._hashes, h, side="left")
        hi = np.searchsorted(self._hashes, h, side="right")
        for j, i in enumerate(present):
            for k in range(lo[j], hi[j]):  # almost always 0 or 1 candidate
                row = int(self._order[k])
                if self._ids[row].as_py() == item_ids[i]:
                    found[i], rows[i] = True, row
                    break
        return CatalogHits(found, rows)

    def rows(self, rows: np.ndarray) -> dict[str, list]:
        """Columns of the given rows as Python lists (the response fields)."""
        sub = self.table.take(pa.array(rows, pa.int64()))
        out = {name: sub.column(name).to_pylist() for name in KEEP}
        out["sid_str"] = ["-".join(map(str, s)) for s in out["sid"]]  # the snapshot's sid_str format
        return out
