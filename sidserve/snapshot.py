"""Versioned SID snapshots under a root directory or URI.

    <root>/LATEST                                  the published version, one line
    <root>/snapshots/<version>/items/*.parquet     one row per item (schema ITEMS_SCHEMA)
    <root>/snapshots/<version>/rejects/*.parquet   item_id, reason, for every bad input row
    <root>/snapshots/<version>/summary.json        counts, collision rate, utilisation, churn
    <root>/_staging/<version>/                     intermediate files of a run (safe to delete)

Readers go through ``LATEST`` only, so a run that dies before publishing leaves a
directory nobody reads. ``LATEST`` is replaced atomically (rename on a local file
system, a single-object PUT on object stores).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from sidserve.artifact import read_bytes, resolve, write_bytes

LATEST = "LATEST"
SUMMARY = "summary.json"

ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("sid", pa.list_(pa.int32())),
    ("sid_str", pa.string()),
    ("dedup", pa.int32()),
    ("behavior_weights", pa.list_(pa.float32())),
    ("path", pa.string()),
    ("model_version", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("item_id", pa.string()), ("reason", pa.string())])


def new_version() -> str:
    """Sortable and unique: UTC time + random suffix."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


class SnapshotRoot:
    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.fs, self.path = resolve(self.uri)

    def join(self, *parts: str) -> str:
        """Filesystem path (for self.fs)."""
        return "/".join([self.path, *parts])

    def uri_of(self, *parts: str) -> str:
        """URI/path usable by Ray Data and pyarrow readers."""
        return "/".join([self.uri, *parts])

    def snapshot_dir(self, version: str) -> str:
        return self.uri_of("snapshots", version)

    def staging_dir(self, version: str) -> str:
        return self.uri_of("_staging", version)

    def latest(self) -> str | None:
        """The published version, or None when nothing has been published."""
        path = self.join(LATEST)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        version = read_bytes(self.fs, path).decode().strip()
        return version or None

    def publish(self, version: str) -> None:
        """Atomically point LATEST at ``version``."""
        data = (version + "\n").encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = self.join(f".{LATEST}.{uuid.uuid4().hex}")
            write_bytes(self.fs, tmp, data)
            self.fs.move(tmp, self.join(LATEST))  # rename(2): atomic on POSIX
        else:
            write_bytes(self.fs, self.join(LATEST), data)  # object stores: a PUT is atomic

    def summary(self, version: str | None = None) -> dict:
        version = version or self.latest()
        if version is None:
            raise ValueError(f"{self.uri}: no published snapshot (no {LATEST})")
        return json.loads(read_bytes(self.fs, self.join("snapshots", version, SUMMARY)))

    def items_dataset(self, version: str | None = None) -> pads.Dataset:
        """pyarrow dataset of a snapshot's items (the published one by default)."""
        version = version or self.latest()
        if version is None:
            raise ValueError(f"{self.uri}: no published snapshot (no {LATEST})")
        return pads.dataset(self.join("snapshots", version, "items"), filesystem=self.fs, format="parquet")

    def read_items(self, version: str | None = None, columns: list[str] | None = None) -> pa.Table:
        return self.items_dataset(version).to_table(columns=columns)

    def read_rejects(self, version: str | None = None) -> pa.Table:
        version = version or self.latest()
        path = self.join("snapshots", version, "rejects")
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return REJECTS_SCHEMA.empty_table()
        return pads.dataset(path, filesystem=self.fs, format="parquet").to_table()
