"""What every tokenizer shares: the ``Encoding`` result, the fitted-state check and the
``save_pretrained`` / ``from_pretrained`` artifact format (the files below; sidserve/artifact.py verifies them).

Artifact files (fixed names): ``config.json`` (tokenizer type, hyper-parameters, SID
layout, format version), ``model.safetensors`` (weights/centroids; never pickle),
``stats.json`` (catalog statistics, training metrics), ``manifest.json`` (sha256 per
file, version id, created-at, source data; verified on load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import safetensors.numpy

from sidserve.artifact import FORMAT_VERSION, read_artifact, write_artifact
from sidserve.tokenizers.registry import known_types, register, tokenizer_class

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "stats.json"


@dataclass
class Encoding:
    """SIDs of N items.

    sid: (N, L) int32 codes, positions in the tokenizer's ``sid_layout``; codes are in
         [0, K), except ``missing_code`` (= K) at behavioral positions of content-only items.
    behavior_weights: (N, N_b) float32 R(e_b) per behavioral position, 0 when content-only.
    path: (N,) str, "full" or "content_only".
    item_id: (N,) ids when the input had an ``item_id`` column, else None.
    candidates: (N, L, k) int32, encode(candidates=k) only: the k best codes per position, best
         first (candidates[:, :, 0] == sid), ``missing_code`` where a position has no code.
    candidate_scores: (N, L, k) float64: their similarity (higher is better; ADC-SID: cosine,
         OPQ: minus the squared distance), NaN where a position has no code.
    paths: (N, k, L) int32, encode(candidates=k) of a residual tokenizer (``sticky_unit``
         "path") instead of ``candidates``: whole SIDs, paths[:, 0] == sid, then the best others.
    path_scores: (N, k) float64: minus the share of the item's input energy each path leaves
         unexplained (higher is better), NaN where fewer than k paths exist.
    """

    sid: np.ndarray
    behavior_weights: np.ndarray
    path: np.ndarray
    item_id: np.ndarray | None = None
    candidates: np.ndarray | None = None
    candidate_scores: np.ndarray | None = None
    paths: np.ndarray | None = None
    path_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.sid.shape[0])

    @property
    def sid_str(self) -> list[str]:
        """'c0-c1-...-cL' per item."""
        return ["-".join(map(str, row)) for row in self.sid.tolist()]


class NotFittedError(ValueError):
    """Raised when encode/save is called before fit."""


class BaseTokenizer:
    tokenizer_type: ClassVar[str]
    # each SID position chosen on its own (not from a residual of the codes before it), so
    # encode(candidates=k) can offer per-position alternatives (sticky assignment needs them)
    independent_positions: ClassVar[bool] = False

    @property
    def sticky_unit(self) -> str | None:
        """What sticky assignment can keep of a previous SID (sidserve/jobs/assign/sticky.py):
        "position", each code on its own (independent positions: encode(candidates=k) gives
        per-position alternatives), "path", the whole SID (residual k-means overrides this:
        its encode(candidates=k) gives whole alternative SIDs), or None (nothing)."""
        return "position" if self.independent_positions else None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "tokenizer_type" in cls.__dict__:
            register(cls.tokenizer_type, cls)

    # subclasses implement --------------------------------------------------------
    def _fitted_attr(self) -> str:
        raise NotImplementedError

    def _config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def _tensors(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def _restore(cls, config: dict[str, Any], tensors: dict[str, np.ndarray], stats: dict[str, Any]):
        raise NotImplementedError

    @property
    def sid_layout(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    @property
    def codebook_size(self) -> int:
        raise NotImplementedError

    # shared ----------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if getattr(self, self._fitted_attr(), None) is None:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted: call fit(items) or from_pretrained(dir) first"
            )

    @property
    def version(self) -> str | None:
        """Version id of the artifact this tokenizer was saved as / loaded from."""
        return getattr(self, "version_", None)

    def save_pretrained(self, uri: str, *, source: Any = None, extra_files: dict[str, bytes] | None = None,
                        overwrite: bool = False) -> str:
        """Write the artifact directory; returns its version id. ``extra_files`` (e.g. a
        job's ``metrics.json``) are covered by the manifest like the rest. A directory that
        holds an artifact is refused unless ``overwrite`` (artifacts are immutable)."""
        self._check_fitted()
        config = {
            "format_version": FORMAT_VERSION,
            "tokenizer_type": self.tokenizer_type,
            "config": self._config_dict(),
            "sid_layout": self.sid_layout,
            "codebook_size": self.codebook_size,
            "missing_code": self.codebook_size,
        }
        if getattr(self, "inputs_", None):  # how the fit found its inputs (sidserve/inputs.py)
            config["inputs"] = self.inputs_
        files = {
            # no sort_keys: modality order fixes the SID layout
            CONFIG_FILE: json.dumps(config, indent=2).encode(),
            WEIGHTS_FILE: safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in self._tensors().items()}),
            STATS_FILE: json.dumps(getattr(self, "stats_", {}) or {}, indent=2, sort_keys=True).encode(),
        }
        for name, data in (extra_files or {}).items():
            if name in files:
                raise ValueError(f"extra file {name!r} would overwrite a standard artifact file")
            files[name] = data
        manifest = write_artifact(uri, files, source=source, overwrite=overwrite)
        self.version_ = manifest["version"]
        return self.version_

    @classmethod
    def from_pretrained(cls, uri: str) -> "BaseTokenizer":
        """Load and verify an artifact. Called on BaseTokenizer it returns whichever
        tokenizer type the artifact holds; on a subclass the type must match."""
        files, manifest = read_artifact(uri)
        for name in (CONFIG_FILE, WEIGHTS_FILE, STATS_FILE):
            if name not in files:
                raise ValueError(f"{uri!r}: artifact lacks {name!r}")
        config = json.loads(files[CONFIG_FILE])
        kind = config.get("tokenizer_type")
        if not isinstance(kind, str) or kind not in known_types():
            raise ValueError(f"{uri!r}: unknown tokenizer_type {kind!r}; known: {known_types()}")
        target = tokenizer_class(kind)
        if cls is not BaseTokenizer and not issubclass(target, cls):
            raise ValueError(f"{uri!r} holds a {kind!r} tokenizer, not a {cls.tokenizer_type!r} one")
        tensors = safetensors.numpy.load(files[WEIGHTS_FILE])
        tok = target._restore(config["config"], tensors, json.loads(files[STATS_FILE]))
        tok.version_ = manifest["version"]
        tok.manifest_ = manifest
        tok.inputs_ = config.get("inputs")
        return tok
