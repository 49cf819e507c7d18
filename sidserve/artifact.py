"""Self-describing artifact directories with a verified manifest.

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


def safe_name(name: str, what: str) -> str:
    """``name`` if it is one plain path component (a file or version name read from data:
    a manifest, LATEST), else ValueError: no separators, no '..', nothing absolute."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or name != name.strip()):
        raise ValueError(f"{what} {name!r} is not a plain name (no '/', '\\', '..', NUL or surrounding "
                         "whitespace); refusing to use it as a path")
    return name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_id(files: dict[str, bytes]) -> str:
    """Content-derived: the same files give the same version, any change a new one."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(sha256(files[name]).encode())
    return "v" + h.hexdigest()[:16]


def write_artifact(uri: str, files: dict[str, bytes], *, source: Any = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write ``files`` (name -> bytes) under ``uri``, the manifest last. Returns the manifest.

    An artifact is immutable: ``uri`` must not hold one already (its readers, e.g. a serving
    replica, could otherwise load a mix of two models), unless ``overwrite``. Overwriting
    removes the old manifest first, so until the new manifest lands the directory is "not an
    artifact" to every reader, never half of one.
    """
    if MANIFEST in files:
        raise ValueError(f"{MANIFEST!r} is written by write_artifact itself")
    for name in files:
        safe_name(name, "artifact file name")
    fs, root = resolve(uri)
    if fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.File:
        if not overwrite:
            try:
                held = json.loads(read_bytes(fs, f"{root}/{MANIFEST}")).get("version")
            except ValueError:
                held = "an unreadable manifest"
            raise ValueError(f"{uri!r} already holds an artifact ({held}); artifacts are immutable: "
                             "write to a new location, or pass overwrite=True (--overwrite) to replace it")
        fs.delete_file(f"{root}/{MANIFEST}")
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


def read_manifest(uri: str) -> dict[str, Any]:
    """The artifact's manifest alone (one small read: e.g. to see whether the model at a URI
    is still the version already loaded); ValueError if there is none or it is unsupported."""
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
    return manifest


def read_artifact(uri: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """-> (files, manifest); ValueError if the manifest is missing or any file fails it."""
    manifest = read_manifest(uri)
    fs, root = resolve(uri)
    files = {}
    for name, meta in manifest["files"].items():
        path = f"{root}/{safe_name(name, f'{uri!r}: manifest file name')}"
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
