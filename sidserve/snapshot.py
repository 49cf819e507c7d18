"""Versioned SID snapshots under a root directory or URI.

    <root>/LATEST                                  the published version, one line
    <root>/snapshots/<version>/items/*.parquet     one row per item (schema ITEMS_SCHEMA)
    <root>/snapshots/<version>/rejects/*.parquet   item_id, reason, for every bad input row
    <root>/snapshots/<version>/reservations/*.parquet  (sid, dedup) keys held for items absent
                                                   or rejected tonight (RESERVATIONS_SCHEMA)
    <root>/snapshots/<version>/summary.json        counts, collision rate, utilisation, churn
                                                   (written last: a snapshot without it is incomplete)
    <root>/snapshots/<version>/REFUSED             a snapshot --max-churn did not publish (reason)
    <root>/_staging/<version>/                     intermediate files of a run (safe to delete)

Readers go through ``LATEST`` only, so a run that dies before publishing leaves a
directory nobody reads. ``LATEST`` is replaced atomically (rename on a local file
system, a single-object PUT on object stores).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from sidserve import conditional
from sidserve.artifact import read_bytes, resolve, safe_name, write_bytes
from sidserve.files import atomic_write, file_lock

LATEST = "LATEST"
SUMMARY = "summary.json"
REFUSED = "REFUSED"  # a complete snapshot that --max-churn kept from being published

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
# a key (sid_str, dedup) kept for an item that was in a snapshot and is absent (or rejected)
# now, for ``nights_absent`` nights so far: no other item takes it while it is reserved, and
# the item gets it back when it returns with the same SID (AssignJobConfig.reserve_nights)
RESERVATIONS_SCHEMA = pa.schema([("item_id", pa.string()), ("sid_str", pa.string()), ("dedup", pa.int32()),
                                 ("nights_absent", pa.int32())])


ANY = object()  # SnapshotRoot.publish(expected=ANY): no check (a manual re-point)
LOCK_TIMEOUT_S = 30.0  # how long publish waits for another publisher's lock
STAGING_MAX_AGE_S = 24 * 3600.0  # a run's staging untouched this long belongs to a run that died


class PublishConflict(RuntimeError):
    """LATEST moved while a run was building on it."""


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
        return self.uri_of("snapshots", safe_name(version, "snapshot version"))

    def staging_dir(self, version: str) -> str:
        return self.uri_of("_staging", safe_name(version, "snapshot version"))

    def latest(self) -> str | None:
        """The published version, or None when nothing has been published (no LATEST file).

        A LATEST that is there but empty, or names a snapshot that is not complete (a file
        truncated by a crash or a partial copy), is an error, never "nothing published": that
        would start a new dedup key space, drop every reservation and leave replicas nothing
        to load. ``publish(version)`` (no ``expected``) re-points it by hand."""
        path = self.join(LATEST)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        return self._parse_latest(read_bytes(self.fs, path))

    def _parse_latest(self, raw: bytes | None) -> str | None:
        """LATEST's bytes (None: no LATEST) -> the version it names, checked as ``latest`` says."""
        if raw is None:
            return None
        version = raw.decode().strip()
        repair = (f"write the last good version (a directory under {self.uri_of('snapshots')} with a "
                  f"{SUMMARY}) into it")
        if not version:
            raise ValueError(f"{self.uri}/{LATEST} is empty (truncated?); not treating the root as never "
                             f"published: {repair}")
        safe_name(version, f"{self.uri}/{LATEST} names version")
        if self.fs.get_file_info(self.join("snapshots", version, SUMMARY)).type != pafs.FileType.File:
            raise ValueError(f"{self.uri}/{LATEST} names {version!r}, which is not a complete snapshot "
                             f"(no snapshots/{version}/{SUMMARY}; truncated?): {repair}")
        return version

    def publish(self, version: str, *, expected: str | None | object = ANY) -> None:
        """Atomically point LATEST at ``version``.

        expected: the version LATEST named when the run started (None: nothing published).
        Publishing then succeeds only if LATEST still names it, so of two runs that started
        from the same snapshot the second to finish fails instead of silently replacing the
        first (whose dedup continuity it would break). On a local file system the check and
        the rename happen under an exclusive lock (sidserve/files.py); on S3 and GCS the PUT is
        conditional on LATEST's ETag / generation as read for the check (sidserve/conditional.py),
        so a publisher that lands between the check and the write makes this one fail too.
        Another object store (no conditional write known here) checks just before the PUT.
        """
        safe_name(version, "snapshot version")
        if self.fs.get_file_info(self.join("snapshots", version, SUMMARY)).type != pafs.FileType.File:
            raise ValueError(f"not publishing {version}: {self.uri_of('snapshots', version)} has no {SUMMARY} "
                             "(a snapshot is complete, and publishable, once its summary is written)")
        data = (version + "\n").encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            with file_lock(self.join(f".{LATEST}.lock"), LOCK_TIMEOUT_S, "another publisher"):
                self._check_expected(expected, version)
                # temp file, fsync, rename(2), fsync of the directory: after a crash LATEST is
                # the old version or the new one, never empty
                with atomic_write(self.join(LATEST)) as f:
                    f.write(data)
        elif (store := conditional.for_uri(self.uri_of(LATEST))) is not None:
            if expected is ANY:  # a manual re-point: whatever LATEST names now
                write_bytes(self.fs, self.join(LATEST), data)
                return
            current = store.read()
            self._check_expected(expected, version, now=self._parse_latest(current.data))
            try:
                store.write(data, current.token)
            except conditional.Conflict as e:
                raise PublishConflict(
                    f"{self.uri}: not publishing {version}: LATEST changed between this run's check "
                    f"(it named {expected or 'no published snapshot'}) and its write; it names "
                    f"{self.latest()} now (another run published at the same moment); rerun to build on it") from e
        else:
            self._check_expected(expected, version)
            write_bytes(self.fs, self.join(LATEST), data)  # another object store: a PUT is atomic

    def _check_expected(self, expected, version: str, *, now: str | None | object = ANY) -> None:
        if expected is ANY:
            return
        now = self.latest() if now is ANY else now
        if now != expected:
            raise PublishConflict(
                f"{self.uri}: not publishing {version}: this run started from "
                f"{expected or 'no published snapshot'}, but LATEST now names {now} (another run "
                f"published meanwhile); rerun to build on {now}")

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

    def _children(self, sub: str) -> list[pafs.FileInfo]:
        path = self.join(sub)
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return [i for i in self.fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory]

    def refuse(self, version: str, reason: str) -> None:
        """Mark a complete snapshot as refused (``--max-churn``): never published, and never a
        rollback target that retention keeps in place of a published one."""
        write_bytes(self.fs, self.join("snapshots", safe_name(version, "snapshot version"), REFUSED),
                    json.dumps({"reason": reason, "at": time.time()}).encode())

    def prune(self, keep: int | None, *, staging_max_age_s: float = STAGING_MAX_AGE_S) -> dict[str, list[str]]:
        """Retention: keep the ``keep`` newest rollback targets and delete older snapshots
        (``None`` keeps every snapshot), and delete the staging directories of runs that stopped
        writing more than ``staging_max_age_s`` ago (failed runs; a run in progress touches its
        staging). -> the versions deleted, per kind.

        A rollback target is a complete snapshot (its summary written) that was not refused;
        newest = latest summary. The published snapshot is always kept besides them. A
        refused or incomplete snapshot (a run that died before its summary) never takes a
        target's place: it is deleted once it is older than the newest target (until then it
        stays, for inspection)."""
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (the published snapshot is always kept), got {keep}")
        published = self.latest()
        deleted: dict[str, list[str]] = {"snapshots": [], "staging": []}
        if keep is not None:
            targets, others = [], []
            for info in self._children("snapshots"):
                summary = self.fs.get_file_info(self.join("snapshots", info.base_name, SUMMARY))
                refused = self.fs.get_file_info(self.join("snapshots", info.base_name, REFUSED))
                done = summary.type == pafs.FileType.File
                when = (summary.mtime_ns if done else info.mtime_ns) or 0
                is_target = done and refused.type != pafs.FileType.File
                (targets if is_target else others).append((when, info.base_name, info.path))
            targets.sort(reverse=True)
            kept = targets[:keep] + [t for t in targets[keep:] if t[1] == published]
            newest = max((t[0] for t in kept), default=0)
            doomed = [t for t in targets if t not in kept] + [o for o in others if o[0] < newest]
            for _, name, path in sorted(doomed):
                if name != published:
                    self.fs.delete_dir(path)
                    deleted["snapshots"].append(name)
        cutoff = time.time() - staging_max_age_s
        for info in self._children("_staging"):
            newest = max([info.mtime_ns or 0] + [(f.mtime_ns or 0) for f in self.fs.get_file_info(
                pafs.FileSelector(info.path, recursive=True))])
            if newest / 1e9 < cutoff:
                self.fs.delete_dir(info.path)
                deleted["staging"].append(info.base_name)
        return deleted

    def read_reservations(self, version: str | None = None) -> pa.Table:
        """The keys a snapshot holds for absent items (empty for snapshots made before them)."""
        return self._read_side(version, "reservations", RESERVATIONS_SCHEMA)

    def read_rejects(self, version: str | None = None) -> pa.Table:
        return self._read_side(version, "rejects", REJECTS_SCHEMA)

    def count_reservations(self, version: str | None = None) -> int:
        """How many keys a snapshot holds for absent items (from the Parquet footers only)."""
        ds = self._side(version, "reservations")
        return 0 if ds is None else ds.count_rows()

    def _side(self, version: str | None, sub: str) -> pads.Dataset | None:
        version = version or self.latest()
        path = self.join("snapshots", version, sub)
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return None
        return pads.dataset(path, filesystem=self.fs, format="parquet")

    def _read_side(self, version: str | None, sub: str, schema: pa.Schema) -> pa.Table:
        """A snapshot's ``sub`` directory as a table (``schema``'s empty table when absent)."""
        ds = self._side(version, sub)
        return schema.empty_table() if ds is None else ds.to_table()
