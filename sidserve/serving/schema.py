"""The HTTP contract of ``POST /tokenize`` and the per-item checks that need the model.

``read_request`` turns a raw body into validated dense arrays in two layers: the JSON
shape (types, unknown top-level fields) and, in ``prepare``, each item against the
serving model's inputs (field names, dimensions, finite values), naming the item index
and field of every problem in FastAPI's 422 ``detail`` format.

The JSON shape has a fast path: orjson parses the body and a few type checks accept the
plain shape (numbers in the vectors, string ids, a boolean ``recompute``); anything else,
from malformed JSON to a string among the floats, is parsed again by the pydantic models
below, which are the contract and write the error messages. Both paths give the same
result for every body the fast path accepts; for a 32-item request the fast path costs
about half (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from sidserve.items import ITEM_ID, POPULARITY, ItemArrays, column_name
from sidserve.tokenizers.config import BEHAVIOR


class TokenizeItem(BaseModel):
    """One item: ``item_id`` (optional), one ``<modality>_emb`` per content modality of
    the model (required), ``behavior_emb`` (null or absent for a cold item), ``popularity``
    (interactions; required with behavior by a model whose richness_signal is popularity,
    refused by others)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {
        "item_id": "item-42", "text_emb": [0.1, -0.3, 0.7], "image_emb": [0.2, 0.0, -0.5],
        "behavior_emb": None}})
    # strict: a JSON boolean or a string is not a number (lax pydantic would take true as 1.0)
    __pydantic_extra__: dict[str, list[Annotated[float, Field(strict=True)]] | None] = Field(init=False)

    item_id: str | None = None
    popularity: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[TokenizeItem]
    recompute: bool = Field(False, strict=True,
                            description="compute every item, even those in the published snapshot")


class TokenizeResult(BaseModel):
    item_id: str | None
    sid: list[int]
    sid_str: str
    dedup: int | None = Field(description="suffix making (sid, dedup) unique in the snapshot; null if computed")
    behavior_weights: list[float]
    path: Literal["full", "content_only", "catalog"]


class TokenizeResponse(BaseModel):
    model_version: str
    results: list[TokenizeResult]


class RequestError(Exception):
    """A request the service refuses: HTTP ``status`` with FastAPI-style ``detail``."""

    def __init__(self, status: int, detail: list[dict]):
        super().__init__(detail)
        self.status = status
        self.detail = detail


MAX_ERRORS = 20  # problems listed in one 422


def _error(loc: list, msg: str, kind: str = "value_error") -> dict:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


@dataclass
class Prepared:
    item_ids: list[str | None]
    arrays: ItemArrays  # all items of the request, validated
    recompute: bool = False


class _NotPlain(Exception):
    """The fast path met something only the pydantic models can judge."""


def _plain_items(body: bytes) -> tuple[list[dict], bool]:
    """orjson parse + shape checks -> (items as {field: value}, recompute); _NotPlain
    when the body is not the plain shape (the vectors' elements are checked in prepare)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _NotPlain from None
    if type(doc) is not dict or not doc.keys() <= {"items", "recompute"}:
        raise _NotPlain
    items, recompute = doc.get("items"), doc.get("recompute", False)
    if type(items) is not list or type(recompute) is not bool:
        raise _NotPlain
    # a JSON boolean anywhere but ``recompute`` (numpy would read true among floats as 1.0):
    # the pydantic models judge it, and refuse it (a string id that spells true only costs speed)
    if body.count(b"true") + body.count(b"false") > ("recompute" in doc):
        raise _NotPlain
    for item in items:
        if type(item) is not dict:
            raise _NotPlain
        for name, value in item.items():
            if name == ITEM_ID:
                if value is not None and type(value) is not str:
                    raise _NotPlain
            elif name == POPULARITY:  # a JSON number (not a boolean); checked in prepare
                if value is not None and type(value) not in (int, float):
                    raise _NotPlain
            elif value is not None and type(value) is not list:
                raise _NotPlain
    return items, recompute


def read_request(body: bytes, config, max_items: int, *, max_id_chars: int = 512) -> Prepared:
    """A raw ``POST /tokenize`` body -> validated arrays for the model ``config``.

    Raises pydantic.ValidationError for a body that is not the request's JSON shape
    (FastAPI's 422), RequestError for items the model cannot take (see ``prepare``).
    """
    try:
        items, recompute = _plain_items(body)
        return prepare(items, recompute, config, max_items, plain=True, max_id_chars=max_id_chars)
    except _NotPlain:
        pass
    request = TokenizeRequest.model_validate_json(body)
    items = [{ITEM_ID: it.item_id, **({POPULARITY: it.popularity} if it.popularity is not None else {}),
              **(it.__pydantic_extra__ or {})} for it in request.items]
    return prepare(items, request.recompute, config, max_items, max_id_chars=max_id_chars)


_NUMERIC = frozenset("biuf")  # numpy kinds of a vector that holds only JSON numbers (and booleans)


def prepare(items: list[dict], recompute: bool, config, max_items: int, *, plain: bool = False,
            max_id_chars: int = 512) -> Prepared:
    """Validate items ({field: value}, shape already checked) against the model ``config``
    -> dense arrays.

    Raises RequestError: 413 for more than ``max_items`` items, 422 listing the bad
    fields (up to MAX_ERRORS) as ``items[i].field``. With ``plain`` (the fast path's raw
    JSON values) raises _NotPlain for a vector holding anything but numbers.
    """
    n = len(items)
    if n == 0:
        raise RequestError(422, [_error(["items"], "items is empty: send at least one item")])
    if n > max_items:
        raise RequestError(413, [_error(["items"], f"{n} items in one request; the limit is {max_items}: "
                                        f"split the batch")])
    dims = {column_name(m): d for m, d in config.modality_dims.items()}
    b_name = column_name(BEHAVIOR)
    b_dim = config.behavior_dim if config.has_behavior else None
    wants_popularity = bool(b_dim) and getattr(config, "richness_signal", "norm") == "popularity"
    allowed = sorted([ITEM_ID, *dims, *([b_name] if b_dim else []), *([POPULARITY] if wants_popularity else [])])
    extras = items
    errors: list[tuple[int, dict]] = []
    for i, extra in enumerate(extras):
        item_id = extra.get(ITEM_ID)
        if item_id is not None and len(item_id) > max_id_chars:
            errors.append((i, _error(["items", i, ITEM_ID], f"items[{i}].item_id has {len(item_id)} characters; "
                                     f"the limit is {max_id_chars}", "string_too_long")))
        for name in extra:
            if name not in allowed:
                errors.append((i, _error(["items", i, name], f"items[{i}] has unknown field {name!r}; "
                                         f"this model takes {allowed}", "extra_forbidden")))

    def column(name: str, dim: int, required: bool) -> tuple[np.ndarray, np.ndarray]:
        """-> (n, dim) float32 values, (n,) bool present-and-valid; one np.array per field."""
        out = np.zeros((n, dim), np.float32)
        ok = np.zeros(n, bool)
        idx, rows = [], []
        for i, extra in enumerate(extras):
            values = extra.get(name)
            if values is None:
                if required:
                    errors.append((i, _error(["items", i, name], f"items[{i}].{name} is missing (content "
                                             f"embeddings are required, {dim} values)", "missing")))
            elif len(values) != dim:
                errors.append((i, _error(["items", i, name],
                                         f"items[{i}].{name} has {len(values)} values, expected {dim}")))
            else:
                idx.append(i)
                rows.append(values)
        if rows:
            if plain:  # raw JSON: accept numbers only (pydantic judges strings, nulls, nesting)
                try:
                    block = np.array(rows)  # (n_ok, dim)
                except (ValueError, TypeError):
                    raise _NotPlain from None
                if block.dtype.kind not in _NUMERIC or block.ndim != 2:
                    raise _NotPlain
            else:
                block = rows
            with np.errstate(over="ignore", invalid="ignore"):
                block = np.asarray(block, dtype=np.float32)  # (n_ok, dim); beyond float32 -> inf
            finite = np.isfinite(block)
            for k in np.flatnonzero(~finite.all(axis=1)):
                i, j = idx[k], int(np.flatnonzero(~finite[k])[0])
                errors.append((i, _error(["items", i, name, j],
                                         f"items[{i}].{name}[{j}] is {rows[k][j]}: values must be finite "
                                         f"(and within float32 range)")))
            out[idx] = block
            ok[idx] = finite.all(axis=1)
        return out, ok

    content = {m: column(column_name(m), d, True)[0] for m, d in config.modality_dims.items()}
    behavior, has_b = column(b_name, b_dim, False) if b_dim else (None, np.zeros(n, bool))
    popularity = None
    if wants_popularity:
        popularity = np.zeros(n, np.float64)
        for i, extra in enumerate(extras):
            value = extra.get(POPULARITY)
            if value is None:
                if has_b[i]:
                    errors.append((i, _error(["items", i, POPULARITY], f"items[{i}].{POPULARITY} is missing: "
                                             "this model reads behavioral richness from popularity", "missing")))
            elif not (np.isfinite(value) and value >= 0):
                errors.append((i, _error(["items", i, POPULARITY],
                                         f"items[{i}].{POPULARITY} is {value}: it must be a finite number >= 0")))
            else:
                popularity[i] = float(value)
    if errors:
        errors.sort(key=lambda e: e[0])  # by item, then in the order found
        raise RequestError(422, [e for _, e in errors[:MAX_ERRORS]])
    ids = [it.get(ITEM_ID) for it in items]
    return Prepared(ids, ItemArrays(content, behavior, has_b, np.array(ids, dtype=object), popularity), recompute)


def concat_arrays(parts: list[ItemArrays]) -> ItemArrays:
    """Stack several requests' items into one model call (same model for all parts)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return ItemArrays(
        content={m: np.concatenate([p.content[m] for p in parts]) for m in first.content},
        behavior=None if first.behavior is None else np.concatenate([p.behavior for p in parts]),
        has_behavior=np.concatenate([p.has_behavior for p in parts]),
        item_ids=None if first.item_ids is None else np.concatenate([p.item_ids for p in parts]),
        popularity=None if first.popularity is None else np.concatenate([p.popularity for p in parts]),
    )
