"""What a replica serves: the service settings, and one immutable ``ServingState``
(tokenizer + snapshot index) swapped atomically on a hot swap.

A request takes the state once at its start and uses it to the end, so a swap never
mixes two models in one response and never fails a request in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from sidserve.artifact import read_manifest
from sidserve.serving.catalog_index import CatalogIndex
from sidserve.snapshot import SnapshotRoot
from sidserve.tokenizers.base import BaseTokenizer
from sidserve.tokenizers.config import config_from_dict
from sidserve.tokenizers.registry import load_tokenizer

log = logging.getLogger(__name__)

MODEL_ENV = "SIDSERVE_MODEL_URI"
SNAPSHOT_ENV = "SIDSERVE_SNAPSHOT_ROOT"
API_KEY_ENV = "SIDSERVE_API_KEY"
# GET /v1/model shows the model URI, the service config and the last load error: with no API
# key it answers 403 unless this is "1" (an explicit choice to show them to anyone who can reach it)
MODEL_INFO_OPEN_ENV = "SIDSERVE_MODEL_INFO_OPEN"


@dataclass
class ServiceConfig:
    """The deployment's ``user_config`` (every field optional; unknown keys are an error)."""

    # model artifact; None = $SIDSERVE_MODEL_URI, else the model that made the published snapshot
    model_uri: str | None = None
    # snapshot root for catalog lookups; None = $SIDSERVE_SNAPSHOT_ROOT; "" = no catalog
    snapshot_root: str | None = None
    # seconds between checks of <snapshot_root>/LATEST (0 = never: swap only via user_config)
    snapshot_poll_s: float = 30.0
    # @serve.batch: most requests merged into one model call, and how long the first one waits
    # (64: what deploy/serve.yaml ships and docs/benchmarks.md measured)
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.0  # 0: batch what queued meanwhile, never delay a lone request
    # largest accepted request (413 above it): bounds a replica's memory per request
    max_items_per_request: int = 1024
    # items per forward pass inside one model call
    encode_batch_size: int = 8192
    # largest accepted request body in bytes (413 above it, refused before it is read whole);
    # None: derived from max_items_per_request and the model's input dimensions (body_limit)
    max_body_bytes: int | None = None
    # longest accepted item_id (422 naming the field above it)
    max_item_id_chars: int = 512

    def validate(self) -> ServiceConfig:
        if self.snapshot_poll_s < 0:
            raise ValueError(f"snapshot_poll_s must be >= 0, got {self.snapshot_poll_s}")
        if self.max_body_bytes is not None and (not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024):
            raise ValueError(f"max_body_bytes must be an int >= 1024 (or null: derived), got {self.max_body_bytes!r}")
        for name in ("max_batch_size", "max_items_per_request", "encode_batch_size", "max_item_id_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise ValueError(f"batch_wait_timeout_s must be in [0, 10], got {self.batch_wait_timeout_s}")
        return self

    def body_limit(self, model_config) -> int:
        """Bytes a request may carry: ``max_body_bytes``, else room for ``max_items_per_request``
        items of this model written generously (every float as 26 characters, a 512-character
        id and field names), plus 64 KiB."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        values = sum(model_config.modality_dims.values()) + (model_config.behavior_dim or 0)
        return self.max_items_per_request * (26 * values + self.max_item_id_chars + 256) + 65536

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ServiceConfig:
        return config_from_dict(cls, dict(data or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resolved_snapshot_root(self) -> str | None:
        root = self.snapshot_root if self.snapshot_root is not None else os.environ.get(SNAPSHOT_ENV)
        return root or None

    @property
    def resolved_model_uri(self) -> str | None:
        uri = self.model_uri if self.model_uri is not None else os.environ.get(MODEL_ENV)
        return uri or None


@dataclass(frozen=True)
class ServingState:
    tokenizer: BaseTokenizer
    model_uri: str
    catalog: CatalogIndex | None  # None: no snapshot root configured
    catalog_reason: str | None = None  # why catalog lookups are off, if they are
    loaded_at: float = field(default_factory=time.time)
    # this replica's torch, CPU capability and probe hash (sidserve/tokenizers/probe.py)
    environment: dict | None = None

    @property
    def model_version(self) -> str:
        return self.tokenizer.version or "unversioned"

    @property
    def snapshot_version(self) -> str | None:
        return self.catalog.version if self.catalog is not None else None

    @property
    def snapshot_time(self) -> float | None:
        return self.catalog.created_at if self.catalog is not None else None

    @property
    def probe(self) -> dict:
        """This replica's probe hash against the one the snapshot's encoders recorded:
        ``status`` "match", "mismatch" (an item may be answered otherwise than the snapshot
        holds it: another CPU instruction set, torch build or device made the snapshot) or
        "unknown" (no snapshot, one made by another model, by encoders that disagree among
        themselves, or from before snapshots recorded it)."""
        mine = (self.environment or {}).get("probe_hash")
        env = (self.catalog.summary.get("environment") or {}) if self.catalog is not None else {}
        theirs = env.get("probe_hash")
        same_model = self.catalog is not None and self.catalog.model_version == self.tokenizer.version
        if mine is None or theirs is None or not same_model:
            status = "unknown"
        else:
            status = "match" if mine == theirs else "mismatch"
        return {"status": status, "replica": self.environment, "snapshot": env.get("encoders")}

    @property
    def catalog_usable(self) -> bool:
        return self.catalog is not None and self.catalog_reason is None

    def describe(self) -> dict[str, Any]:
        tok = self.tokenizer
        cfg = tok.config
        return {
            "model_version": self.model_version,
            "model_uri": self.model_uri,
            "tokenizer_type": tok.tokenizer_type,
            "codebook_size": tok.codebook_size,
            "missing_code": tok.codebook_size,
            "sid_length": len(tok.sid_layout),
            "sid_layout": tok.sid_layout,
            "inputs": {
                "content": {f"{m}_emb": d for m, d in cfg.modality_dims.items()},
                "behavior_emb": cfg.behavior_dim if cfg.has_behavior else None,
            },
            "config": cfg.to_dict(),
            "snapshot": None if self.catalog is None else {
                "version": self.catalog.version,
                "items": len(self.catalog),
                "model_version": self.catalog.model_version,
                "catalog_lookup": self.catalog_usable,
                "reason": self.catalog_reason,
            },
            "loaded_at": self.loaded_at,
            "probe": self.probe,
        }


def load_state(config: ServiceConfig, *, snapshot_version: str | None = None,
               current: ServingState | None = None) -> ServingState:
    """Load the model and the snapshot that ``config`` names (reusing ``current``'s pieces
    when they are unchanged). Raises ValueError/OSError naming what could not be loaded."""
    root_uri = config.resolved_snapshot_root
    catalog = None
    if root_uri is not None:
        root = SnapshotRoot(root_uri)
        version = snapshot_version or root.latest()
        if version is None:
            raise ValueError(f"snapshot root {root_uri!r} has no published snapshot (no LATEST); "
                             f"run jobs/assign.py first, or set snapshot_root to '' to serve without one")
        if current is not None and current.catalog is not None \
                and (current.catalog.root_uri, current.catalog.version) == (root.uri, version):
            catalog = current.catalog
        else:
            catalog = CatalogIndex.load(root, version)
    model_uri = config.resolved_model_uri
    if model_uri is None:
        if catalog is None:
            raise ValueError(f"no model: set model_uri in the user_config or ${MODEL_ENV}, "
                             f"or a snapshot root whose snapshot names its model")
        model_uri = catalog.summary.get("model")
        if not model_uri:
            raise ValueError(f"snapshot {catalog.version} does not name its model; set model_uri")
    # keyed by the artifact's manifest version, not its URI: a model replaced at the same URI
    # (``--overwrite``) is loaded, an unchanged one is reused without reading its weights
    if current is not None and current.model_uri == model_uri \
            and current.tokenizer.version == read_manifest(model_uri)["version"]:
        tokenizer, env = current.tokenizer, current.environment
    else:
        from sidserve.tokenizers.probe import environment

        tokenizer = load_tokenizer(model_uri)
        env = environment(tokenizer)
    reason = None
    if catalog is not None and catalog.model_version != tokenizer.version:
        reason = (f"snapshot {catalog.version} was made by model {catalog.model_versions or '[]'}, "
                  f"serving {tokenizer.version}: catalog lookups off, every item is computed")
        log.warning(reason)
    state = ServingState(tokenizer=tokenizer, model_uri=model_uri, catalog=catalog, catalog_reason=reason,
                         environment=env)
    if state.probe["status"] == "mismatch":
        log.warning("probe hash %s differs from snapshot %s's encoders' %s: this replica's encodes may differ in "
                    "their last bits from the snapshot's (another CPU instruction set, torch build or device)",
                    env["probe_hash"], catalog.version, catalog.summary["environment"]["probe_hash"])
    return state
