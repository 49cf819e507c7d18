"""What a catalog's columns say about the model's inputs: which content modalities it has,
their dimensions, whether it carries a behavioral embedding, and under which column names.

A team's catalog rarely has the demo's 64-d ``text_emb`` and 32-d ``image_emb``. The jobs
therefore take the inputs from the data: every ``<modality>_emb`` column is a content
modality (in column order, which fixes the SID layout), ``behavior_emb`` is the behavioral
embedding, and each dimension is read off the column type (fixed-size lists) or the first
non-null value. Columns under other names map with ``columns={"text": "title_vec"}``
(``--column text=title_vec``): the job renames them on read, so everything after the read
speaks the standard names. A config that names its own dimensions is checked against the
data, and a contradiction is an error naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sidserve.items import column_name
from sidserve.tokenizers.config import BEHAVIOR

SUFFIX = "_emb"
PEEK_ROWS = 1024  # rows read to find a non-null value of a variable-length list column


@dataclass
class InputSpec:
    """Inputs found in a catalog."""

    modality_dims: dict[str, int]  # content modality -> dim, in column order
    behavior_dim: int | None  # dim of behavior_emb; None when the catalog has none
    columns: dict[str, str] = field(default_factory=dict)  # modality -> source column, when renamed
    # embedding columns whose dimension the first rows could not tell (null there): fine when the
    # config names it, an error when it would have to be inferred
    undetermined: dict[str, str] = field(default_factory=dict)  # modality -> why


def parse_columns(pairs: list[str] | None) -> dict[str, str]:
    """``["text=title_vec", ...]`` -> ``{"text": "title_vec"}`` (``--column`` flags)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        modality, sep, source = pair.partition("=")
        if not sep or not modality.strip() or not source.strip():
            raise ValueError(f"--column expects MODALITY=COLUMN (e.g. text=title_vec), got {pair!r}")
        modality = modality.strip()
        if modality.endswith(SUFFIX):
            modality = modality[: -len(SUFFIX)]
        if modality in out:
            raise ValueError(f"--column names modality {modality!r} twice")
        out[modality] = source.strip()
    return out


def renames(columns: dict[str, str], names: list[str]) -> dict[str, str]:
    """source column -> standard ``<modality>_emb`` name; every source must exist."""
    out = {}
    for modality, source in columns.items():
        if source not in names:
            raise ValueError(f"--column {modality}={source}: the input has no column {source!r}; "
                             f"it has {sorted(names)}")
        target = column_name(modality)
        if target in names and target != source:
            raise ValueError(f"--column {modality}={source}: the input already has a {target!r} column; "
                             "drop one of them or map another modality name")
        out[source] = target
    return out


def _dim_from_type(t: pa.DataType) -> int | None:
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return None
    raise ValueError(f"not a list of floats: {t}")


def infer_inputs(schema: pa.Schema, peek: pa.Table | None, columns: dict[str, str] | None = None) -> InputSpec:
    """Inputs from a schema (already renamed) and a few rows (for variable-length lists).

    schema: the catalog's Arrow schema after the ``columns`` renames.
    peek: the first rows, used only when a list column's type does not carry its size.
    """
    dims: dict[str, int] = {}
    behavior_dim = None
    undetermined: dict[str, str] = {}
    for f in schema:
        if not f.name.endswith(SUFFIX):
            continue
        try:
            dim = _dim_from_type(f.type)
        except ValueError as err:
            raise ValueError(f"column {f.name!r} looks like an embedding (name ends in {SUFFIX!r}) but is "
                             f"{err}; rename it or map the embedding with --column") from None
        if dim is None:
            values = [] if peek is None or f.name not in peek.column_names else peek.column(f.name)
            first = next((v for v in values if v.is_valid), None)
            if first is None:
                undetermined[f.name[: -len(SUFFIX)]] = (
                    f"cannot infer the dimension of {f.name!r}: it is null in the first "
                    f"{0 if peek is None else peek.num_rows} rows; give it in the config (modality_dims / behavior_dim)")
                continue
            dim = len(first)
        if dim <= 0:
            raise ValueError(f"column {f.name!r} holds empty vectors")
        modality = f.name[: -len(SUFFIX)]
        if modality == BEHAVIOR:
            behavior_dim = dim
        else:
            dims[modality] = dim
    if not dims and not undetermined:
        raise ValueError(f"the input has no content embedding column (<modality>{SUFFIX}, e.g. text{SUFFIX}); "
                         f"it has {schema.names}; map yours with --column text=<column>")
    return InputSpec(dims, behavior_dim, dict(columns or {}), undetermined)


def reconcile(options: dict[str, Any] | None, spec: InputSpec, *, behavior_key: str = "behavior_dim") -> tuple[dict[str, Any], list[str]]:
    """Fill a config mapping's input fields from the data, or check them against it.

    options: config fields the user gave (YAML and flags); ``modality_dims`` and
        ``behavior_dim`` are taken from ``spec`` when absent, checked when present.
    -> (options completed, names of the fields inferred).
    """
    out = dict(options or {})
    inferred = []
    if "modality_dims" not in out:
        for modality, why in spec.undetermined.items():
            if modality != BEHAVIOR:
                raise ValueError(why)
        out["modality_dims"] = dict(spec.modality_dims)
        inferred.append("modality_dims")
    else:
        given = out["modality_dims"]
        if not isinstance(given, dict):
            raise ValueError(f"modality_dims must be a mapping, got {given!r}")
        for modality, dim in given.items():
            if modality in spec.undetermined:
                continue  # null in the first rows: the pre-pass checks every row
            if modality not in spec.modality_dims:
                raise ValueError(f"the config's modality_dims names {modality!r} but the input has no "
                                 f"{column_name(modality)!r} column (its embeddings: {spec.modality_dims}); "
                                 "map it with --column or drop it from the config")
            if dim != spec.modality_dims[modality]:
                raise ValueError(f"the config's modality_dims[{modality!r}]={dim} contradicts the input, whose "
                                 f"{column_name(modality)!r} holds {spec.modality_dims[modality]}-d vectors")
    if behavior_key not in out:
        if BEHAVIOR in spec.undetermined:
            raise ValueError(spec.undetermined[BEHAVIOR])
        out[behavior_key] = spec.behavior_dim
        inferred.append(behavior_key)
    elif out[behavior_key] is not None and BEHAVIOR not in spec.undetermined:
        if spec.behavior_dim is None:
            raise ValueError(f"the config's {behavior_key}={out[behavior_key]} contradicts the input, which has "
                             f"no {column_name(BEHAVIOR)!r} column; set {behavior_key}: null for a content-only "
                             "tokenizer")
        if out[behavior_key] != spec.behavior_dim:
            raise ValueError(f"the config's {behavior_key}={out[behavior_key]} contradicts the input, whose "
                             f"{column_name(BEHAVIOR)!r} holds {spec.behavior_dim}-d vectors")
    return out, inferred


def check_config(config, spec: InputSpec) -> None:
    """A config object given whole (the Python API) against the data: contradictions are errors
    naming both (a modality the config lacks is fine: that column is simply not used)."""
    reconcile({"modality_dims": dict(config.modality_dims), "behavior_dim": config.behavior_dim}, spec)
