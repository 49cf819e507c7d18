"""Local files written whole or not at all, and the one lock the package takes on them.

``atomic_write`` is how every cache, checkpoint and report file under an output directory is
written: a temporary file beside the target (``<path>.tmp-<pid>-<thread>``, a name the evaluation's
cache lists ignore), flushed and fsynced, then renamed over the target (and the directory fsynced), so a reader sees the
old file or the new one, never half of one, and a process killed half-way leaves only a
temporary file. ``write_json`` / ``write_npz`` / ``write_npy`` are its common uses.

``file_lock`` is an exclusive advisory lock on a local file (``filelock``, flock(2) on
POSIX): the kernel drops it when its holder exits, however it exits, so a lock can never be
left held by a dead process. The lock file itself stays (deleting it under another waiter
would let two processes hold "the" lock); it is empty and harmless.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from filelock import FileLock, Timeout

__all__ = ["atomic_write", "file_lock", "try_lock", "write_json", "write_npy", "write_npz"]


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; when the block ends without an error it replaces
    ``path`` (rename(2): atomic on POSIX); on an error it is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")  # the rename itself survives a power loss
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)


def write_npz(path: str, compressed: bool = True, **arrays: np.ndarray) -> None:
    """``np.savez[_compressed]`` to exactly ``path`` (numpy appends no suffix to a file object)."""
    with atomic_write(path) as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


def write_npy(path: str, arr: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, arr)


@contextlib.contextmanager
def file_lock(path: str, timeout_s: float, what: str = "another process") -> Iterator[None]:
    """Hold the exclusive lock on ``path`` for the block; TimeoutError naming ``what`` if it is
    still held by someone else after ``timeout_s`` seconds."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise TimeoutError(f"{path}: {what} holds the lock (waited {timeout_s:g} s)") from None
    try:
        yield
    finally:
        lock.release()


def try_lock(path: str) -> FileLock | None:
    """The lock on ``path`` if no one holds it (held until ``.release()`` or this process
    exits), else None. For work that one process of several claims and the others skip."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock
