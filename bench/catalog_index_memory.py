"""Memory a serving replica needs to load a snapshot's catalog index (issue 50.2).

    .venv/bin/python bench/catalog_index_memory.py [--items 5000000] [--workdir /tmp/sidserve-index-bench]

Writes a snapshot of ``--items`` items as the assignment job lays it out (ITEMS_SCHEMA, 4 part
files, ids like ``B00ABC1234-<n>``, L=6 SIDs, 3 behavioral weights, ``path`` and ``model_version``),
then loads it in a fresh process per loader and reports, per loader: seconds, peak RSS above
the process's RSS before the load, RSS kept after it, Arrow's pool peak, numpy's traced peak
and the index's own size (``CatalogIndex.nbytes``). Loaders:

- ``current``: ``CatalogIndex.load`` (reads the 4 kept columns and ``model_version`` batch by
  batch, hashes the ids 16,384 at a time);
- ``baseline``: the loader as it was at ccfcc03, rebuilt here: every column read into one
  table, then the kept columns combined, then every id hashed at once by the byte-wise hash
  (about 48 bytes per id byte of temporaries).

The issue's bound: peak while loading at most 2x the loaded index's steady size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import gc, json, resource, sys, time, tracemalloc
import numpy as np, pyarrow as pa, pyarrow.compute as pc

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def old_hash(ids):  # ccfcc03's sidserve.ids.hash_strings, byte-wise
    P = np.uint64(1099511628211)
    ids = ids.combine_chunks().cast(pa.large_string())
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + n + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)
    start, end = offsets[:-1], offsets[1:]
    lengths = end - start
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.concatenate([[np.uint64(1)], np.full(int(lengths.max()), P, np.uint64)]))
        lo, hi = int(start[0]), int(end[-1])
        seg = data[lo:hi].astype(np.uint64) + np.uint64(1)
        pos = np.arange(lo, hi, dtype=np.int64)
        terms = seg * powers[np.repeat(end, lengths) - pos - 1]
        out = np.add.reduceat(terms, start - lo)
        out += lengths.astype(np.uint64) * powers[lengths]
    return out

which, uri = sys.argv[1], sys.argv[2]
from sidserve.serving.catalog_index import KEEP, CatalogIndex
from sidserve.snapshot import ITEMS_SCHEMA, SnapshotRoot
import pyarrow.dataset, pyarrow.parquet  # imported before the baseline RSS
root = SnapshotRoot(uri)
root.items_dataset().count_rows()  # the filesystem, the dataset machinery and its threads started
gc.collect()
before = rss()
tracemalloc.start()
t0 = time.perf_counter()
if which == "current":
    index = CatalogIndex.load(root)
    keep = index
else:
    table = root.read_items(None, columns=ITEMS_SCHEMA.names)
    versions = pc.unique(table.column("model_version")).to_pylist()
    table = table.select(KEEP).combine_chunks()
    h = old_hash(table.column("item_id"))
    order = np.argsort(h, kind="stable").astype(np.int64)
    keep = (table, h[order], order)
    del h
seconds = time.perf_counter() - t0
numpy_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gc.collect()
nbytes = keep.nbytes if which == "current" else keep[0].nbytes + keep[1].nbytes + keep[2].nbytes
print(json.dumps({"loader": which, "seconds": seconds, "peak_above_start": peak - before,
                  "kept_rss": rss() - before, "arrow_peak": pa.default_memory_pool().max_memory(),
                  "numpy_peak": numpy_peak, "index_nbytes": nbytes}))
"""


def write_snapshot(uri: str, n: int, files: int = 4) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sidserve.snapshot import ITEMS_SCHEMA, SUMMARY, SnapshotRoot

    root = SnapshotRoot(uri)
    if root.latest() == "bench" and root.summary("bench").get("items") == n:
        return  # written by an earlier run with the same size
    items = os.path.join(uri, "snapshots", "bench", "items")
    os.makedirs(items, exist_ok=True)
    rng = np.random.default_rng(0)
    step = -(-n // files)
    for f in range(files):
        lo, hi = f * step, min(n, (f + 1) * step)
        m = hi - lo
        sid = rng.integers(0, 256, size=(m, 6), dtype=np.int32)
        ids = pa.array([f"B{i * 7919 % 10**9:09d}X-{i}" for i in range(lo, hi)], pa.string())
        table = pa.table({
            "item_id": ids,
            "sid": pa.FixedSizeListArray.from_arrays(sid.reshape(-1), 6).cast(pa.list_(pa.int32())),
            "sid_str": pa.array(["-".join(map(str, s)) for s in sid.tolist()], pa.string()),
            "dedup": pa.array(np.zeros(m, np.int32)),
            "behavior_weights": pa.FixedSizeListArray.from_arrays(
                rng.random(m * 3, dtype=np.float32), 3).cast(pa.list_(pa.float32())),
            "path": pa.array(np.where(rng.random(m) < 0.1, "content", "full").tolist(), pa.string()),
            "model_version": pa.array(["bench-model"] * m, pa.string()),
        }, schema=ITEMS_SCHEMA)
        pq.write_table(table, os.path.join(items, f"part-{f}.parquet"), row_group_size=262_144)
    with open(os.path.join(uri, "snapshots", "bench", SUMMARY), "w") as fh:
        json.dump({"version": "bench", "items": n}, fh)
    root.publish("bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=5_000_000)
    ap.add_argument("--workdir", default="/tmp/sidserve-index-bench")
    args = ap.parse_args()
    if args.items < 1:
        raise SystemExit(f"--items must be >= 1, got {args.items}")
    uri = os.path.join(args.workdir, f"snapshot-{args.items}")
    write_snapshot(uri, args.items)
    rows = []
    for loader in ("baseline", "current"):
        out = subprocess.run([sys.executable, "-c", CHILD, loader, uri], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{loader} loader failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = 1024 ** 2
    n = args.items
    print(f"catalog index load, {n:,} items; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| loader | load s | peak RSS above start (MB) | peak / index | RSS kept (MB) | "
          "Arrow pool peak (MB) | numpy peak (MB) | index (MB) | index B/item |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loader']} | {r['seconds']:.2f} | {r['peak_above_start'] / mb:.0f} | "
              f"{r['peak_above_start'] / r['index_nbytes']:.2f}x | {r['kept_rss'] / mb:.0f} | "
              f"{r['arrow_peak'] / mb:.0f} | {r['numpy_peak'] / mb:.0f} | {r['index_nbytes'] / mb:.0f} | "
              f"{r['index_nbytes'] / n:.0f} |")
    base, cur = rows
    print(f"peak while loading: current / baseline = {cur['peak_above_start'] / base['peak_above_start']:.2f}; "
          f"current peak / index = {cur['peak_above_start'] / cur['index_nbytes']:.2f}x (bound: 2x)")


if __name__ == "__main__":
    main()
