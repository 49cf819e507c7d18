"""How the train workers read a Parquet catalog: each worker reads its own share of the row
groups with pyarrow, cleans it and batches it, in its own process.

The driver plans read units from the footers (``plan_units``, the assignment job's), and
every epoch each worker takes an equal run of input rows over a per-epoch permutation of
those units. No catalog row passes through the object store and no Ray Data executor runs
during training: with Ray Data's streaming split the store pages an epoch touched stayed
mapped by the workers, so a fit's memory grew with the catalog until Ray Data's budget was
full (10M items: 1.55x a 1M fit on 2 CPUs), and its split coordinator used 0.43 of the 2
cores (docs/benchmarks.md). Here memory is one row group and a few cleaned slices per
worker, whatever the catalog's size.

Order is a function of (seed, epoch, rank, world size) only, so a run resumed from a
mid-epoch checkpoint (with as many workers) replays the same batches as an uninterrupted one.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from sidserve.items import ITEM_ID, POPULARITY, column_name
from sidserve.jobs.catalog import HAS_BEHAVIOR, clean_batch, required_columns
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.config import BEHAVIOR

PREFETCH = 2  # cleaned slices read ahead by a worker's reader thread (pyarrow and numpy release the GIL)


@dataclass
class ParquetShards:
    """A Parquet catalog planned for the workers (picklable: it travels in the train loop's
    config). ``for_rank(rank, world)`` -> that worker's ``ParquetShard``."""

    items: str  # the catalog's URI or path
    units: list[dict]  # plan_units(items, rows_per_read): {"path", "row_groups", "rows"}, file order
    config: dict  # the tokenizer config (to_dict) the rows are cleaned for
    read_columns: list[str]  # input columns the cleaning uses
    renames: dict[str, str] = field(default_factory=dict)  # input column -> standard name
    rows_per_read: int = 65_536  # rows per pyarrow slice (and per cleaning call)

    @classmethod
    def plan(cls, items: str, config: TokenizerConfig, renames: dict[str, str] | None = None,
             rows_per_read: int = 65_536, valid_rows: list[int] | None = None) -> "ParquetShards":
        """``valid_rows``: each unit's count of rows cleaning keeps (``parquet_prepass``'s
        ``unit_valid``, same ``rows_per_read``). With it an epoch is split by valid rows, so every
        worker gets an equal share of what it trains on however the rejects are spread; without
        it, by input rows (a rank whose share held more rejects ran out first, and since every
        rank takes the same number of steps, the others' remaining rows were left out)."""
        from sidserve.jobs.assign.encode import plan_units

        if rows_per_read < 1:
            raise ValueError(f"rows_per_read must be >= 1, got {rows_per_read}")
        renames = dict(renames or {})
        units, schema = plan_units(items, rows_per_read)
        if not units:
            raise ValueError(f"{items}: no Parquet rows to train on")
        if valid_rows is not None:
            if len(valid_rows) != len(units) or any(not 0 <= v <= u["rows"] for v, u in zip(valid_rows, units)):
                raise ValueError(f"valid_rows must give 0..rows valid rows for each of the {len(units)} read units "
                                 f"of {items}, got {len(valid_rows)} counts")
            units = [{**u, "valid": int(v)} for u, v in zip(units, valid_rows)]
        return cls(items, units, config.to_dict(), used_columns(list(schema.names), config, renames),
                   renames, rows_per_read)

    @property
    def num_rows(self) -> int:
        return sum(u["rows"] for u in self.units)

    def for_rank(self, rank: int, world: int) -> "ParquetShard":
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world size {world}")
        return ParquetShard(self, rank, world)


def used_columns(names: list[str], config: TokenizerConfig, renames: dict[str, str]) -> list[str]:
    """The input columns (their names in the input) that cleaning a row reads."""
    used = {ITEM_ID, POPULARITY, *required_columns(config)}
    if config.has_behavior:
        used.add(column_name(BEHAVIOR))
    return [c for c in names if renames.get(c, c) in used]


def spans(units: list[dict], rank: int, world: int, order: np.ndarray,
          key: str = "rows") -> list[tuple[int, int, int]]:
    """Rank ``rank``'s share of the units taken in ``order``: the rows
    [rank * N // world, (rank + 1) * N // world) of that sequence, as (unit index, first row,
    end row) within each unit, counting ``units[i][key]`` rows per unit ("rows": input rows,
    "valid": the rows cleaning keeps). Shares differ by at most one row and together are every row."""
    total = sum(units[i][key] for i in order)
    lo, hi = rank * total // world, (rank + 1) * total // world
    out, start = [], 0
    for i in order:
        end = start + units[i][key]
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append((int(i), a - start, b - start))
        start = end
    return out


class ParquetShard:
    """One worker's rows, with the subset of Ray's ``DataIterator.iter_batches`` the train loop
    uses: numpy batches of the cleaned columns (``clean_batch``)."""

    def __init__(self, shards: ParquetShards, rank: int, world: int):
        self.shards, self.rank, self.world = shards, rank, world

    def spans(self, epoch_seed: int | None) -> list[tuple[int, int, int]]:
        """This worker's units: a permutation of the catalog's units drawn from ``epoch_seed``
        (None: file order), then its equal share of the rows."""
        n = len(self.shards.units)
        order = np.arange(n) if epoch_seed is None else np.random.default_rng(epoch_seed).permutation(n)
        return spans(self.shards.units, self.rank, self.world, order, key=self.key)

    @property
    def key(self) -> str:
        """What a span counts: valid rows when the plan knows them, else input rows."""
        return "valid" if all("valid" in u for u in self.shards.units) else "rows"

    def tables(self, epoch_seed: int | None = None):
        """Yield this worker's cleaned rows (dicts of numpy columns), one slice at a time."""
        from sidserve.artifact import resolve
        from sidserve.jobs.assign.encode import read_unit
        s = self.shards
        config = TokenizerConfig.from_dict(s.config)
        fs = resolve(s.items)[0]
        key = self.key
        for index, first, end in self.spans(epoch_seed):
            unit = s.units[index]
            # a unit without rejects has the same valid and input positions: cut first, clean only
            # the span (cleaning the rows before it would cost up to a unit per rank and epoch)
            by_valid = key == "valid" and unit["valid"] != unit["rows"]
            at = 0  # rows of this unit passed so far: valid rows (by_valid) or input rows
            for table in read_unit(fs, unit, s.rows_per_read, s.read_columns):
                if s.renames:
                    table = table.rename_columns([s.renames.get(c, c) for c in table.column_names])
                if by_valid:  # the span is in valid rows: clean first, then cut
                    rows = clean_batch(table, config)
                    n = len(rows[HAS_BEHAVIOR])
                    a, b = max(first - at, 0), min(end - at, n)
                    if a < b:
                        yield take(rows, slice(a, b))
                else:
                    n = table.num_rows
                    a, b = max(first - at, 0), min(end - at, n)
                    if a < b:
                        yield clean_batch(table.slice(a, b - a), config)
                at += n
                if at >= end:
                    break

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy",
                     local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None):
        """Batches of ``batch_size`` rows (the last one shorter). With a shuffle buffer, the
        units' order is permuted by ``local_shuffle_seed`` and rows are shuffled within windows
        of at least ``local_shuffle_buffer_size`` rows; without one, rows come in file order."""
        if batch_format != "numpy":
            raise ValueError(f"ParquetShard gives numpy batches, not {batch_format!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shuffle = bool(local_shuffle_buffer_size)
        seed = local_shuffle_seed if shuffle else None
        rng = np.random.default_rng(None if seed is None else [seed, self.rank, self.world])
        window = max(local_shuffle_buffer_size or 0, batch_size)
        pending: list[dict] = []
        held = 0
        for part in prefetched(self.tables(seed if shuffle else None)):
            n = len(part[next(iter(part))]) if part else 0
            if not n:
                continue
            pending.append(part)
            held += n
            if held < window:
                continue
            rows = concat(pending)
            if shuffle:
                rows = take(rows, rng.permutation(held))
            full = held - held % batch_size
            for i in range(0, full, batch_size):
                yield take(rows, slice(i, i + batch_size))
            pending = [take(rows, slice(full, held))] if full < held else []
            held -= full
        if held:
            rows = concat(pending)
            if shuffle:
                rows = take(rows, rng.permutation(held))
            for i in range(0, held, batch_size):
                yield take(rows, slice(i, min(i + batch_size, held)))


def concat(parts: list[dict]) -> dict:
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def take(rows: dict, index) -> dict:
    return {k: v[index] for k, v in rows.items()}


def prefetched(iterable, depth: int = PREFETCH):
    """``iterable``'s items, produced by a thread up to ``depth`` ahead of the consumer; its
    exception is raised here; the thread stops when the consumer stops (even mid-way)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((done, e))

    thread = threading.Thread(target=produce, name="parquet-shard-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def sample_rows(shards: ParquetShards, num_valid: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """A uniform sample of at most ``n`` cleaned rows of the catalog (the k-means
    initialisation's), in one task per unit (1 CPU): each keeps every row with probability
    1.5 n / ``num_valid`` (seeded by unit), cleans only those, and returns them; ``n`` of the
    kept rows are then drawn without replacement. Memory: a row group per task, the sample at
    the driver; nothing else of the catalog leaves the tasks."""
    from sidserve.jobs.assign.shuffle import run_tasks

    fraction = min(1.0, 1.5 * n / max(num_valid, 1))
    shard = shards.for_rank(0, 1)

    def unit_sample(spec: dict) -> dict:
        from sidserve.artifact import resolve
        from sidserve.jobs.assign.encode import read_unit

        s, config = shard.shards, TokenizerConfig.from_dict(shard.shards.config)
        rng = np.random.default_rng([seed, spec["index"]])
        parts = []
        for table in read_unit(resolve(s.items)[0], s.units[spec["index"]], s.rows_per_read, s.read_columns):
            keep = np.flatnonzero(rng.random(table.num_rows) < fraction)
            if keep.size:
                table = table.take(pa.array(keep))
                if s.renames:
                    table = table.rename_columns([s.renames.get(c, c) for c in table.column_names])
                parts.append(clean_batch(table, config))
        parts = [p for p in parts if len(next(iter(p.values())))]
        return concat(parts) if parts else {}

    got = [r for r in run_tasks(unit_sample, [{"index": i} for i in range(len(shards.units))]) if r]
    if not got:
        return {}
    rows = concat(got)
    total = len(next(iter(rows.values())))
    if total > n:
        rows = take(rows, np.sort(np.random.default_rng(seed).choice(total, n, replace=False)))
    return rows
