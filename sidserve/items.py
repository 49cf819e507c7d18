"""Item input contract: coercion of Arrow tables / numpy dicts to dense arrays, and
per-row validation.

Columns (the contract every job and the service read; README.md, "The command line"): ``item_id`` (string or int64), ``<modality>_emb`` per content
modality (list<float32> or fixed_size_list, required), ``behavior_emb`` (nullable),
optional ``popularity``. A numpy dict uses the same keys with (N, d) float arrays;
``behavior_emb`` may also be a list whose entries are a vector or None (cold item).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.config import BEHAVIOR

ITEM_ID = "item_id"
POPULARITY = "popularity"


def column_name(modality: str) -> str:
    return f"{modality}_emb"


@dataclass
class ItemArrays:
    """Dense, validated inputs for N items."""

    content: dict[str, np.ndarray]  # modality -> (N, d_m) float32
    behavior: np.ndarray | None  # (N, d_b) float32, zero rows where missing; None w/o behavior
    has_behavior: np.ndarray  # (N,) bool
    item_ids: np.ndarray | None = None  # (N,) str/object or int64
    popularity: np.ndarray | None = None  # (N,) float64

    def __len__(self) -> int:
        return int(self.has_behavior.shape[0])

    def take(self, idx: np.ndarray) -> "ItemArrays":
        return ItemArrays(
            {m: v[idx] for m, v in self.content.items()},
            None if self.behavior is None else self.behavior[idx],
            self.has_behavior[idx],
            None if self.item_ids is None else self.item_ids[idx],
            None if self.popularity is None else self.popularity[idx],
        )


@dataclass
class DenseColumn:
    """An embedding column as (N, d) float32 plus per-row flags."""

    values: np.ndarray  # (N, d) float32, zeros on bad rows
    null: np.ndarray  # (N,) bool: the row has no vector
    wrong_dim: np.ndarray  # (N,) bool: a vector of another length
    nonfinite: np.ndarray  # (N,) bool: NaN/inf (or a null element) inside the vector
    lengths: np.ndarray  # (N,) int64 actual lengths (0 for null)

    @property
    def ok(self) -> np.ndarray:
        return ~(self.null | self.wrong_dim | self.nonfinite)


# conversion helpers


def arrow_list_to_dense(col: pa.Array | pa.ChunkedArray, dim: int, name: str) -> DenseColumn:
    """A list<float> / fixed_size_list<float> Arrow column -> DenseColumn of width ``dim``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        if pa.types.is_null(col.type):  # an all-null column
            n = len(col)
            return DenseColumn(np.zeros((n, dim), np.float32), np.ones(n, bool),
                               np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, np.int64))
        raise ValueError(f"column {name!r} must be a list of floats, got Arrow type {col.type}")
    if not (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)
            or pa.types.is_null(col.type.value_type)):
        raise ValueError(f"column {name!r} must hold floats, got Arrow type {col.type}")
    n = len(col)
    null = col.is_null().to_numpy(zero_copy_only=False).astype(bool)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    wrong_dim = ~null & (lengths != dim)
    ok_idx = np.flatnonzero(~null & ~wrong_dim)
    values = np.zeros((n, dim), dtype=np.float32)
    if ok_idx.size:
        sub = col if ok_idx.size == n else col.take(pa.array(ok_idx))
        flat = sub.flatten().to_numpy(zero_copy_only=False)  # null elements -> nan
        values[ok_idx] = np.asarray(flat, dtype=np.float32).reshape(ok_idx.size, dim)
    nonfinite = ~np.isfinite(values).all(axis=1)
    values[nonfinite] = 0.0
    return DenseColumn(values, null, wrong_dim, nonfinite, lengths)


def numpy_to_dense(value, dim: int, name: str, n: int | None) -> DenseColumn:
    """(N, d) array, or a list of vectors / None -> DenseColumn."""
    if isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype != object:
        if value.shape[1] != dim:
            raise ValueError(f"column {name!r} has dim {value.shape[1]}, expected {dim}")
        vals = np.ascontiguousarray(value, dtype=np.float32)
        N = vals.shape[0]
        nonfinite = ~np.isfinite(vals).all(axis=1)
        if nonfinite.any():  # never write into the caller's array (it may be read-only, e.g. Ray's)
            vals = vals.copy()
            vals[nonfinite] = 0.0
        z = np.zeros(N, bool)
        return DenseColumn(vals, z, z.copy(), nonfinite, np.full(N, dim, np.int64))
    rows = list(value)
    arr = pa.array([None if r is None else np.asarray(r, dtype=np.float32).ravel().tolist() for r in rows],
                   type=pa.list_(pa.float32()))
    return arrow_list_to_dense(arr, dim, name)


def _problems(col: DenseColumn, name: str, dim: int) -> list[tuple[np.ndarray, str]]:
    return [
        (col.wrong_dim, f"{name}: wrong dimension (expected {dim})"),
        (col.nonfinite, f"{name}: NaN or inf value"),  # float64 beyond float32 range: inf
    ]


@dataclass
class CheckedItems:
    """Items plus a reason per bad row (None for a good row): the batch-job form."""

    arrays: ItemArrays  # all N rows; bad rows hold zeros
    reasons: list[str | None]  # (N,)

    @property
    def ok(self) -> np.ndarray:
        return np.array([r is None for r in self.reasons], dtype=bool)


def check_items(items, config: TokenizerConfig, *, require_item_id: bool = False) -> CheckedItems:
    """Coerce ``items`` and list every bad row's first problem, never raising for a row.

    Raises ValueError only for problems of the whole input (not a table, missing column,
    wrong column type).
    """
    getter, n, columns = _accessor(items)
    content: dict[str, np.ndarray] = {}
    reasons: list[str | None] = [None] * n
    bad_masks: list[tuple[np.ndarray, str]] = []

    def note(mask: np.ndarray, reason: str) -> None:
        bad_masks.append((mask, reason))

    item_ids = None
    if ITEM_ID in columns:
        item_ids = getter(ITEM_ID, kind="ids")
        id_null = np.array([v is None for v in item_ids], dtype=bool)
        note(id_null, "item_id: null")
    elif require_item_id:
        raise ValueError(f"missing required column {ITEM_ID!r}; got columns {sorted(columns)}")

    for m in config.content_modalities:
        name = column_name(m)
        if name not in columns:
            raise ValueError(
                f"missing required column {name!r} for content modality {m!r}; got columns {sorted(columns)}"
            )
        col = getter(name, kind="emb", dim=config.modality_dims[m])
        note(col.null, f"{name}: null (content modalities are required)")
        for mask, reason in _problems(col, name, config.modality_dims[m]):
            note(mask, reason)
        content[m] = col.values

    behavior = None
    has_b = np.zeros(n, dtype=bool)
    if config.has_behavior:
        name = column_name(BEHAVIOR)
        if name in columns:
            col = getter(name, kind="emb", dim=config.behavior_dim)
            for mask, reason in _problems(col, name, config.behavior_dim):
                note(mask, reason)
            behavior = col.values
            has_b = col.ok.copy()
        else:
            behavior = np.zeros((n, config.behavior_dim), dtype=np.float32)

    popularity = getter(POPULARITY, kind="float") if POPULARITY in columns else None
    if config.has_behavior and getattr(config, "richness_signal", "norm") == "popularity":
        if popularity is None:
            raise ValueError(f"richness_signal='popularity': the input needs a {POPULARITY!r} column "
                             f"(interactions per item; null = 0); got columns {sorted(columns)}")
        note(~np.isfinite(popularity) | (popularity < 0), f"{POPULARITY}: negative or not finite")

    for mask, reason in bad_masks:
        for i in np.flatnonzero(mask):
            if reasons[i] is None:
                reasons[i] = reason
    bad = np.array([r is not None for r in reasons], dtype=bool)
    has_b &= ~bad
    return CheckedItems(ItemArrays(content, behavior, has_b, item_ids, popularity), reasons)


def coerce_items(items, config: TokenizerConfig, *, require_item_id: bool = False) -> ItemArrays:
    """Coerce and validate; the first bad row raises ValueError naming row and column."""
    if isinstance(items, ItemArrays):
        return items
    checked = check_items(items, config, require_item_id=require_item_id)
    for i, reason in enumerate(checked.reasons):
        if reason is not None:
            n_bad = sum(r is not None for r in checked.reasons)
            raise ValueError(f"row {i}: {reason} ({n_bad} bad row(s) in total)")
    if len(checked.arrays) == 0:
        raise ValueError("no items: the input is empty")
    return checked.arrays


def _accessor(items):
    """-> (getter(name, kind, dim), n_rows, column names) for Arrow or a mapping of arrays."""
    if isinstance(items, pa.RecordBatch):
        items = pa.Table.from_batches([items])
    if hasattr(items, "__dataframe__") and not isinstance(items, (pa.Table, Mapping)):
        items = pa.Table.from_pandas(items, preserve_index=False)
    if isinstance(items, pa.Table):
        table = items

        def get(name, kind, dim=None):
            col = table.column(name)
            if kind == "emb":
                return arrow_list_to_dense(col, dim, name)
            if kind == "ids":
                return np.array(col.to_pylist(), dtype=object)
            return np.asarray(pc.fill_null(col.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False))

        return get, table.num_rows, set(table.column_names)
    if isinstance(items, Mapping):
        lengths = {k: len(v) for k, v in items.items() if v is not None}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns have different numbers of rows: {lengths}")
        n = next(iter(lengths.values()), 0)

        def get(name, kind, dim=None):
            value = items[name]
            if kind == "emb":
                return numpy_to_dense(value, dim, name, n)
            if kind == "ids":
                return np.array(list(value), dtype=object)
            return np.asarray(value, dtype=np.float64)

        return get, n, {k for k, v in items.items() if v is not None}
    raise ValueError(
        f"items must be a pyarrow Table/RecordBatch, a pandas DataFrame or a dict of arrays, "
        f"got {type(items).__name__}"
    )
