"""Self-describing artifact directories with a verified manifest (DESIGN.md §2).

An artifact is a directory (local path or any pyarrow filesystem URI) of named files
plus ``manifest.json``: the sha256 of every file, a content-derived version id, the
creation time and the source data. ``read_artifact`` refuses a directory whose files do
not match their manifest. No pickle anywhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """'s3://b/k', 'file:///x', '/x' or 'rel/x' -> (filesystem, path in it)."""
    uri = os.fspath(uri)
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_id(files: dict[str, bytes]) -> str:
    """Content-derived: the same files give the same version, any change a new one."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(sha256(files[name]).encode())
    return "v" + h.hexdigest()[:16]


def write_artifact(uri: str, files: dict[str, bytes], *, source: Any = None) -> dict[str, Any]:
    """Write ``files`` (name -> bytes) under ``uri``, the manifest last. Returns the manifest."""
    if MANIFEST in files:
        raise ValueError(f"{MANIFEST!r} is written by write_artifact itself")
    fs, root = resolve(uri)
    fs.create_dir(root, recursive=True)
    for name, data in files.items():
        write_bytes(fs, f"{root}/{name}", data)
    manifest = {
        "format_version": FORMAT_VERSION,
        "version": version_id(files),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": source,
        "files": {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()},
    }
    write_bytes(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    return manifest


def read_artifact(uri: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """-> (files, manifest); ValueError if the manifest is missing or any file fails it."""
    fs, root = resolve(uri)
    info = fs.get_file_info(f"{root}/{MANIFEST}")
    if info.type != pafs.FileType.File:
        raise ValueError(f"{uri!r} is not an artifact: no {MANIFEST}")
    manifest = json.loads(read_bytes(fs, f"{root}/{MANIFEST}"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{uri!r}: unsupported artifact format_version {manifest.get('format_version')!r} "
            f"(this sidserve reads {FORMAT_VERSION})"
        )
    files = {}
    for name, meta in manifest["files"].items():
        path = f"{root}/{name}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise ValueError(f"{uri!r}: file {name!r} listed in the manifest is missing")
        data = read_bytes(fs, path)
        if sha256(data) != meta["sha256"]:
            raise ValueError(
                f"{uri!r}: file {name!r} does not match its sha256 in the manifest "
                f"(modified or corrupted); refusing to load"
            )
        files[name] = data
    return files, manifest
