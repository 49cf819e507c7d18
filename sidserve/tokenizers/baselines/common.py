"""What the baseline tokenizers share: config, input features, encode/evaluate.

A baseline quantizes one vector per item: the concatenation of its content embeddings
(and, with ``use_behavior``, its behavioral embedding, zeros for cold items) into
``num_levels`` codes of ``codebook_size`` each. It speaks the same interface as
``SemanticIdTokenizer`` (fit / encode / evaluate / save_pretrained / from_pretrained),
with ``behavior_weights`` of width 0, so every comparison runs through one code path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sidserve.items import ItemArrays, coerce_items
from sidserve.metrics import quantization_report
from sidserve.tokenizers.base import BaseTokenizer, Encoding
from sidserve.tokenizers.config import ModalityInputs, config_from_dict


@dataclass
class BaselineConfig(ModalityInputs):
    modality_dims: dict[str, int] = field(default_factory=lambda: {"text": 64, "image": 32})  # content inputs
    behavior_dim: int | None = None  # dim of behavior_emb when the input has one
    use_behavior: bool = False  # quantize [content, behavior] (behavior-aware baseline)
    codebook_size: int = 100  # K per level (paper's public setting)
    num_levels: int = 6  # SID length L (paper's public setting)
    kmeans_iters: int = 25  # faiss k-means iterations
    seed: int = 0  # k-means / init seed
    # encode() codes each item from that item alone, bit for bit, whatever shares its call
    # (exact distances: sidserve/tokenizers/invariant.py); False: faiss / float32 (faster;
    # an item near a tie between two centroids can change code with its batch)
    batch_invariant: bool = True

    @property
    def input_dim(self) -> int:
        return sum(self.modality_dims.values()) + (self.behavior_dim if self.use_behavior else 0)

    def validate(self):
        if not self.modality_dims:
            raise ValueError("modality_dims must name at least one content modality")
        for name, dim in self.modality_dims.items():
            if not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"modality_dims[{name!r}] must be a positive int, got {dim!r}")
        if self.use_behavior and not self.behavior_dim:
            raise ValueError("use_behavior=True needs behavior_dim")
        for name in ("codebook_size", "num_levels", "kmeans_iters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return config_from_dict(cls, data)


class BaselineTokenizer(BaseTokenizer):
    config_class = BaselineConfig
    group = "level"  # sid_layout group name

    device_ = "cpu"  # where encode (and fit) compute; ``to(device)`` moves it

    def __init__(self, config: BaselineConfig | None = None):
        self.config = config if config is not None else self.config_class()

    def to(self, device) -> "BaselineTokenizer":
        """Compute on ``device`` ('cpu', 'cuda', 'cuda:1', ...): nearest-centroid search in torch
        on that GPU, k-means training on faiss-gpu, RQ-VAE's network on the device. Works before
        fit (to fit on the GPU) and after it (to encode there)."""
        import torch

        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device on this machine")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
        self.device_ = str(dev)
        self._moved(dev)
        return self

    @property
    def on_gpu(self) -> bool:
        return self.device_.startswith("cuda")

    def _moved(self, device) -> None:
        """Subclasses with device state (torch modules) move it here."""

    # subclasses implement --------------------------------------------------------
    def _fit_features(self, x: np.ndarray) -> None:
        """x (N, D) float32 -> learned state."""
        raise NotImplementedError

    def _encode_features(self, x: np.ndarray) -> np.ndarray:
        """x (N, D) float32 -> codes (N, L) int64."""
        raise NotImplementedError

    def _decode_codes(self, codes: np.ndarray, x: np.ndarray) -> np.ndarray:
        """codes (N, L) -> reconstruction (N, D) float32 (x given for models that need it)."""
        raise NotImplementedError

    # shared ----------------------------------------------------------------------
    def _config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @property
    def sid_layout(self) -> list[dict[str, Any]]:
        return [{"group": self.group, "index": i, "position": i} for i in range(self.config.num_levels)]

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def features(self, arrays: ItemArrays) -> np.ndarray:
        """(N, D) float32: concatenated inputs, zeros for a missing behavior vector."""
        parts = [arrays.content[m] for m in self.config.content_modalities]
        if self.config.use_behavior:
            parts.append(arrays.behavior * arrays.has_behavior[:, None])
        return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)

    def fit(self, items) -> "BaselineTokenizer":
        self.config.validate()
        arrays = coerce_items(items, self.config)
        if len(arrays) < self.config.codebook_size:
            raise ValueError(
                f"need at least codebook_size={self.config.codebook_size} items to fit, got {len(arrays)}"
            )
        self._fit_features(self.features(arrays))
        self.stats_ = {"fit_metrics": self.evaluate(arrays)}
        return self

    def _candidates(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x (N, D) -> (codes (N, L, k), scores (N, L, k)): the k best codes per position."""
        raise ValueError(
            f"{self.tokenizer_type} is residual: a position's candidates depend on the codes chosen "
            "before it, so it cannot offer per-position alternatives (sticky assignment needs "
            "independent positions, adc-sid or opq, or whole alternative SIDs, rq-kmeans and rq-evidence)")

    def encode(self, items, *, batch_size: int | None = None, candidates: int = 0) -> Encoding:
        """items -> Encoding (``batch_size`` is accepted for the common interface; ``candidates``:
        see Encoding)."""
        self._check_fitted()
        if not isinstance(candidates, int) or not 0 <= candidates <= self.config.codebook_size:
            raise ValueError(f"candidates must be an int in [0, {self.config.codebook_size}], got {candidates!r}")
        arrays = coerce_items(items, self.config)
        cand = scores = paths = path_scores = None
        if candidates and self.sticky_unit == "path":
            paths, path_scores = self._paths(self.features(arrays), candidates)
            codes = paths[:, 0]
        elif candidates:
            cand, scores = self._candidates(self.features(arrays), candidates)
            codes = cand[:, :, 0]
        else:
            codes = self._encode_features(self.features(arrays)).astype(np.int32)
        if self.config.use_behavior:
            path = np.where(arrays.has_behavior, "full", "content_only").astype(object)
        else:
            path = np.full(len(arrays), "full", dtype=object)
        return Encoding(codes, np.zeros((len(arrays), 0), np.float32), path, arrays.item_ids,
                        candidates=cand, candidate_scores=scores, paths=paths, path_scores=path_scores)

    def reconstruction_error(self, items) -> np.ndarray:
        """(N,) mean squared error per input element of decode(encode(x))."""
        self._check_fitted()
        x = self.features(coerce_items(items, self.config))
        x_hat = self._decode_codes(self._encode_features(x), x)
        return ((x_hat - x) ** 2).mean(axis=1)

    def evaluate(self, items) -> dict[str, Any]:
        arrays = coerce_items(items, self.config)
        x = self.features(arrays)
        codes = self._encode_features(x)
        recon = ((self._decode_codes(codes, x) - x) ** 2).mean(axis=1)
        return quantization_report(codes, self.config.codebook_size, recon)

    @classmethod
    def _restore(cls, config, tensors, stats):
        tok = cls(cls.config_class.from_dict(config))
        tok._load_tensors(tensors)
        tok.stats_ = stats
        return tok

    def _load_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError
