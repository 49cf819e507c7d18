"""Catalog-wide passes over the items: validation + statistics (the pre-pass of the training
and refresh jobs: ``parquet_prepass`` for a Parquet catalog, ``catalog_prepass`` for a Ray
Dataset such as the demo's) and the cleaned rows the trainers read.

Fatal problems (the whole input is unusable) raise ``ValueError`` before any training:
missing columns, embeddings of the wrong dimension, an empty input, behavior null
everywhere. Row problems that are the data's, not the schema's (NaN/inf values, a null
content embedding, a null item_id), are skipped and counted, never trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from sidserve.items import ITEM_ID, POPULARITY, check_items, column_name
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.config import BEHAVIOR

HAS_BEHAVIOR = "has_behavior"


def required_columns(config: TokenizerConfig) -> list[str]:
    return [column_name(m) for m in config.content_modalities]


def check_schema(names: list[str], config: TokenizerConfig) -> None:
    missing = [c for c in required_columns(config) if c not in names]
    if missing:
        raise ValueError(f"input is missing required column(s) {missing}; it has {sorted(names)}")
    if config.has_behavior and column_name(BEHAVIOR) not in names:
        raise ValueError(
            f"input has no {column_name(BEHAVIOR)!r} column but the config has behavior_dim="
            f"{config.behavior_dim}; set behavior_dim: null for a content-only tokenizer"
        )
    if config.has_behavior and getattr(config, "richness_signal", "norm") == "popularity" and POPULARITY not in names:
        raise ValueError(f"input has no {POPULARITY!r} column but the config has richness_signal='popularity'; "
                         f"add interactions per item or use richness_signal: norm")


@dataclass
class CatalogStats:
    """Whole-catalog statistics from the pre-pass."""

    num_rows: int = 0  # input rows
    num_valid: int = 0  # rows trained on
    num_with_behavior: int = 0  # valid rows with a behavior embedding
    n_min: float | None = None  # min ||e_b|| over valid rows (eq. 15)
    n_max: float | None = None  # max ||e_b|| over valid rows
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped
    wrong_dim: dict[str, int] = field(default_factory=dict)  # column -> rows of the wrong dim
    wrong_dim_example: str | None = None  # one offending row, for the error message
    # valid rows per read unit (parquet_prepass only, in plan_units order): the train workers
    # split an epoch by valid rows, so uneven rejects cannot leave ranks short (ingest.py)
    unit_valid: list[int] = field(default_factory=list)

    @property
    def null_behavior_share(self) -> float:
        return 1.0 - self.num_with_behavior / self.num_valid if self.num_valid else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["null_behavior_share"] = self.null_behavior_share
        d["num_skipped"] = sum(self.skipped.values())
        d.pop("unit_valid")  # one number per read unit: the plan's business, not the report's
        return d

    def merge(self, other: "CatalogStats") -> "CatalogStats":
        def pick(f, a, b):
            return b if a is None else a if b is None else f(a, b)

        skipped = dict(self.skipped)
        for k, v in other.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        wrong = dict(self.wrong_dim)
        for k, v in other.wrong_dim.items():
            wrong[k] = wrong.get(k, 0) + v
        return CatalogStats(
            self.num_rows + other.num_rows, self.num_valid + other.num_valid,
            self.num_with_behavior + other.num_with_behavior,
            pick(min, self.n_min, other.n_min), pick(max, self.n_max, other.n_max),
            skipped, wrong, self.wrong_dim_example or other.wrong_dim_example,
            self.unit_valid + other.unit_valid,
        )

    def raise_if_unusable(self, config: TokenizerConfig) -> None:
        if self.wrong_dim:
            dims = {column_name(m): d for m, d in config.modality_dims.items()}
            if config.has_behavior:
                dims[column_name(BEHAVIOR)] = config.behavior_dim
            detail = ", ".join(f"{c}: {n} row(s), expected dim {dims[c]}" for c, n in self.wrong_dim.items())
            raise ValueError(f"embeddings of the wrong dimension ({detail}); e.g. {self.wrong_dim_example}")
        if self.num_rows == 0:
            raise ValueError("the input has no rows")
        if self.num_valid == 0:
            raise ValueError(f"no usable row: all {self.num_rows} rows were skipped ({self.skipped})")
        if config.has_behavior and self.num_with_behavior == 0:
            raise ValueError(
                f"{column_name(BEHAVIOR)!r} is null (or invalid) in every row: N_min/N_max cannot be "
                "computed; set behavior_dim: null for a content-only tokenizer"
            )


def batch_stats(table: pa.Table, config: TokenizerConfig) -> CatalogStats:
    """Statistics of one batch (pyarrow Table) of raw input rows."""
    checked = check_items(table, config)
    reasons = checked.reasons
    stats = CatalogStats(num_rows=table.num_rows)
    ok = np.array([r is None for r in reasons], dtype=bool)
    for i, r in enumerate(reasons):
        if r is None:
            continue
        col, _, what = r.partition(": ")
        if what.startswith("wrong dimension"):
            stats.wrong_dim[col] = stats.wrong_dim.get(col, 0) + 1
            if stats.wrong_dim_example is None:
                item = table.column(ITEM_ID)[i].as_py() if ITEM_ID in table.column_names else f"row {i}"
                stats.wrong_dim_example = f"item {item!r}: {r}"
        else:
            stats.skipped[r] = stats.skipped.get(r, 0) + 1
    a = checked.arrays
    stats.num_valid = int(ok.sum())
    if config.has_behavior:
        warm = a.has_behavior & ok
        stats.num_with_behavior = int(warm.sum())
        if warm.any():
            norms = np.linalg.norm(a.behavior[warm].astype(np.float64), axis=1)
            stats.n_min, stats.n_max = float(norms.min()), float(norms.max())
    return stats


def clean_batch(table: pa.Table, config: TokenizerConfig) -> dict[str, np.ndarray]:
    """Raw rows -> the valid ones as dense columns: item_id, <m>_emb (n, d) float32,
    behavior_emb (n, d_b) float32 (zeros when missing), has_behavior (n,) bool."""
    checked = check_items(table, config)
    keep = np.flatnonzero(checked.ok)
    a = checked.arrays.take(keep)
    out: dict[str, np.ndarray] = {}
    if a.item_ids is not None:
        out[ITEM_ID] = np.asarray([str(x) for x in a.item_ids], dtype=object)
    for m in config.content_modalities:
        out[column_name(m)] = a.content[m]
    if config.has_behavior:
        out[column_name(BEHAVIOR)] = a.behavior
    out[HAS_BEHAVIOR] = a.has_behavior
    if a.popularity is not None and getattr(config, "richness_signal", "norm") == "popularity":
        out[POPULARITY] = a.popularity
    return out


def catalog_prepass(ds, config: TokenizerConfig, *, num_cpus: float = 0.25) -> CatalogStats:
    """One Ray Data pass over the whole input -> CatalogStats (raises if unusable)."""
    schema = ds.schema()
    if schema is None:
        raise ValueError("the input has no rows (empty dataset)")
    check_schema(list(schema.names), config)
    cfg, config_class = config.to_dict(), type(config)  # ADC-SID's or a baseline's config

    def per_batch(table: pa.Table) -> pa.Table:
        s = batch_stats(table, config_class.from_dict(cfg))
        return pa.table({"stats": [json.dumps(asdict(s))]})  # JSON: per-batch keys differ

    rows = ds.map_batches(per_batch, batch_format="pyarrow", batch_size=4096, num_cpus=num_cpus).take_all()
    total = CatalogStats()
    for row in rows:
        total = total.merge(CatalogStats(**json.loads(row["stats"])))
    total.raise_if_unusable(config)
    return total


def parquet_prepass(items: str, config: TokenizerConfig, *, renames: dict[str, str] | None = None,
                    rows_per_read: int = 65_536) -> CatalogStats:
    """``catalog_prepass`` of a Parquet catalog, read the way the assignment's encoders read it.

    One Ray task (1 CPU) per read unit (``plan_units``: footers only) reads its row groups with
    pyarrow, only the columns the checks use, in slices of ``rows_per_read`` rows, and returns
    its statistics. No block of the catalog passes through the object store, and memory is one
    slice per running task whatever the catalog size: a Ray Data read of the whole catalog
    (``catalog_prepass`` on ``read_parquet``) filled the store to Ray Data's budget and ran a
    0.25-CPU task per block, 6.7 GiB peak PSS at 20M items on 2 CPUs (docs/benchmarks.md).
    ``renames``: input column -> standard name (``sidserve.inputs.renames``).
    """
    from sidserve.jobs.assign.encode import plan_units, read_unit
    from sidserve.jobs.assign.shuffle import run_tasks

    if rows_per_read < 1:
        raise ValueError(f"rows_per_read must be >= 1, got {rows_per_read}")
    renames = renames or {}
    units, schema = plan_units(items, rows_per_read)
    names = list(schema.names)
    renamed = [renames.get(c, c) for c in names]
    check_schema(renamed, config)
    used = {ITEM_ID, POPULARITY, *required_columns(config)}
    if config.has_behavior:
        used.add(column_name(BEHAVIOR))
    read_columns = [c for c, r in zip(names, renamed) if r in used]
    cfg, config_class = config.to_dict(), type(config)

    def unit_stats(unit: dict) -> str:
        from sidserve.artifact import resolve

        conf, stats = config_class.from_dict(cfg), CatalogStats()
        for table in read_unit(resolve(items)[0], unit, rows_per_read, read_columns):
            table = table.rename_columns([renames.get(c, c) for c in table.column_names])
            stats = stats.merge(batch_stats(table, conf))
        return json.dumps(asdict(stats))

    total = CatalogStats()
    for s in run_tasks(unit_stats, units):  # in the units' order
        unit = CatalogStats(**json.loads(s))
        unit.unit_valid = [unit.num_valid]
        total = total.merge(unit)
    total.raise_if_unusable(config)
    return total


def input_prepass(config: TokenizerConfig, *, items: str | None, ds=None,
                  columns: dict[str, str] | None = None) -> CatalogStats:
    """The jobs' pre-pass: a Parquet catalog (``items``) by ``parquet_prepass`` with the
    ``columns`` mapping (modality -> input column), an in-memory dataset (``ds``, the demo's,
    columns already standard) by ``catalog_prepass``."""
    if not items:
        if ds is None:
            raise ValueError("input_prepass needs items (a Parquet catalog) or ds (a Ray Dataset)")
        return catalog_prepass(ds, config)
    from sidserve.inputs import renames
    from sidserve.jobs.assign.encode import catalog_dataset

    mapping = renames(columns, list(catalog_dataset(items).schema.names)) if columns else {}
    return parquet_prepass(items, config, renames=mapping)
