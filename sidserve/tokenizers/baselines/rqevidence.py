"""Evidence-weighted RQ-Kmeans: a content prefix, then residual levels over [content; behavior]
where each item's behavior counts as much as its interactions make it reliable (issue 47).

docs/evaluation.md found behavior-fused tokenizers (RQ-Kmeans on [content; SASRec table]) best
on head items and content-only ones best on the long tail of Beauty, and the reverse order on a
catalog whose content says little. This tokenizer reads which regime a catalog is in from the
catalog itself:

1. Blocks standardised: each content modality and the behavior table centred and scaled to
   unit mean squared norm (content modalities share one unit), so no block wins by its scale.
2. ``W``: ridge regression from content to behavior on the rich half of the warm items (by
   interaction count): what content says about behavior on this catalog (``r2_rich_``).
3. Reliability ``r = n / (n + kappa)`` of an item with ``n`` interactions. ``kappa`` is fitted
   (empirical Bayes) from how the misfit ``||b - W c||^2`` falls with ``n`` over popularity
   buckets, ``misfit ~ A + S / n``: ``A`` is what content cannot explain (the prior spread of
   behavior around its content prediction), ``S / n`` the noise of a thin item's table row;
   ``kappa = S / A``. Where content predicts behavior well (small ``A``) thin items lean on
   content; where content says little (large ``A``) behavior is trusted from few interactions.
4. Each item's behavior estimate ``b~ = r b + (1 - r) W c`` (a cold item: ``W c``), and the
   vector quantized is ``[c; behavior_weight * b~]``.
5. Levels ``1..content_levels``: residual k-means on the content part alone (their centroids
   are zero in the behavior part, so encoding is one nearest-centroid rule for every level and
   a cold item gets the prefix of a warm twin with the same content); the other levels:
   residual k-means on the whole vector.

``behavior_weights`` (one per fused level) are ``r``: 0 for a cold item and for one with no
interactions (``popularity`` 0: its table row was never trained), rising with its interactions,
the share of its own behavior in the vector those codes describe. Without a ``popularity``
column every warm item has ``r = 1``.

Learned state: ``centroids_`` (L, K, D) float32, ``content_mean_`` / ``content_scale_`` (per
content dimension), ``behavior_mean_`` (d_b,), ``behavior_scale_`` (), ``W_`` (D_c, d_b),
``kappa_`` ().
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from sidserve.items import ItemArrays, coerce_items
from sidserve.tokenizers import invariant
from sidserve.tokenizers.base import Encoding
from sidserve.tokenizers.baselines.common import BaselineConfig
from sidserve.tokenizers.baselines.rqkmeans import RQKmeansTokenizer, kmeans, nearest
from sidserve.tokenizers.config import BEHAVIOR

log = logging.getLogger(__name__)

KAPPA_BUCKETS = 8  # popularity buckets the misfit-vs-1/n fit reads (quantiles of warm items' n)
MAX_KAPPA = 1e6


@dataclass
class EvidenceRQConfig(BaselineConfig):
    use_behavior: bool = True  # the behavior block is the point of this tokenizer
    content_levels: int = 2  # leading levels from content alone: the prefix a cold item shares
    behavior_weight: float = 1.0  # scale of the behavior block against content (both unit norm)
    ridge: float = 0.1  # ridge penalty of content -> behavior, relative to the mean diagonal of X'X
    # r = n / (n + kappa); None: fitted from the catalog (empirical Bayes, module docstring)
    kappa: float | None = None

    def validate(self):
        super().validate()
        if not self.use_behavior:
            raise ValueError("rq-evidence quantizes [content; behavior]: use_behavior must be True")
        if not isinstance(self.content_levels, int) or not 0 <= self.content_levels < self.num_levels:
            raise ValueError(f"content_levels must be an int in [0, num_levels={self.num_levels}), "
                             f"got {self.content_levels!r}")
        if not self.behavior_weight > 0:
            raise ValueError(f"behavior_weight must be > 0, got {self.behavior_weight!r}")
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge!r}")
        if self.kappa is not None and not self.kappa >= 0:
            raise ValueError(f"kappa must be >= 0 or None (fitted), got {self.kappa!r}")
        return self


def fit_kappa(misfit: np.ndarray, n: np.ndarray) -> tuple[float, float, float]:
    """misfit (N,) ``||b - W c||^2`` and interactions n (N,) > 0 of warm items -> (kappa, A, S)
    of ``mean misfit ~ A + S / n`` fitted over popularity buckets (least squares, one point per
    bucket). kappa = S / A; 0 when S <= 0 (thin items' rows are not noisier: trust them)."""
    edges = np.unique(np.quantile(n, np.linspace(0, 1, KAPPA_BUCKETS + 1)))
    bucket = np.clip(np.searchsorted(edges, n, side="right") - 1, 0, max(len(edges) - 2, 0))
    xs, ys = [], []
    for b in np.unique(bucket):
        sel = bucket == b
        xs.append(float(np.mean(1.0 / n[sel])))
        ys.append(float(np.mean(misfit[sel])))
    if len(xs) < 2 or np.ptp(xs) == 0:
        return 0.0, float(np.mean(misfit)), 0.0
    S, A = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    if S <= 0 or A <= 0:
        return (0.0 if S <= 0 else MAX_KAPPA), float(A), float(S)
    return float(min(S / A, MAX_KAPPA)), float(A), float(S)


class EvidenceRQTokenizer(RQKmeansTokenizer):
    config_class = EvidenceRQConfig
    tokenizer_type = "rq-evidence"

    # ---- features --------------------------------------------------------------------
    def _content(self, arrays: ItemArrays) -> np.ndarray:
        x = np.concatenate([arrays.content[m] for m in self.config.content_modalities], axis=1)
        return ((x - self.content_mean_) / self.content_scale_).astype(np.float64)  # (N, D_c)

    def reliability(self, arrays: ItemArrays) -> np.ndarray:
        """(N,) r in [0, 1]: 0 without behavior, n / (n + kappa_) with, 1 without popularity."""
        r = arrays.has_behavior.astype(np.float64)
        if arrays.popularity is not None:  # no interaction at all: the row was never trained
            n = np.maximum(np.asarray(arrays.popularity, np.float64), 0.0)
            r = r * np.where(n > 0, n / np.maximum(n + self.kappa_, 1e-300), 0.0)
        return r

    def features(self, arrays: ItemArrays) -> np.ndarray:
        """(N, D_c + d_b) float32: [c; behavior_weight * (r b + (1 - r) W c)]."""
        c = self._content(arrays)
        if self.config.batch_invariant:  # a row's product from that row alone (invariant.py)
            import torch

            predicted = invariant.exact_matmul(torch.from_numpy(c), torch.from_numpy(np.ascontiguousarray(self.W_.T)))
            predicted = predicted.numpy()
        else:
            predicted = c @ self.W_  # (N, d_b)
        b = (arrays.behavior.astype(np.float64) - self.behavior_mean_) / self.behavior_scale_
        r = self.reliability(arrays)[:, None]
        b = np.where(arrays.has_behavior[:, None], r * b + (1.0 - r) * predicted, predicted)
        return np.ascontiguousarray(np.concatenate([c, self.config.behavior_weight * b], 1), np.float32)

    # ---- fit -------------------------------------------------------------------------
    def fit(self, items) -> "EvidenceRQTokenizer":
        c = self.config.validate()
        arrays = coerce_items(items, c)
        if len(arrays) < c.codebook_size:
            raise ValueError(f"need at least codebook_size={c.codebook_size} items to fit, got {len(arrays)}")
        warm = arrays.has_behavior
        if warm.sum() < c.codebook_size:
            raise ValueError(f"rq-evidence needs behavior for at least codebook_size={c.codebook_size} items, "
                             f"got {int(warm.sum())}")
        mods = c.content_modalities
        raw = np.concatenate([arrays.content[m] for m in mods], axis=1).astype(np.float64)
        self.content_mean_ = raw.mean(0)
        scales, start = [], 0
        for m in mods:  # one scale per modality block, sqrt(#blocks) so the blocks share one unit
            d = arrays.content[m].shape[1]
            block = raw[:, start:start + d] - self.content_mean_[start:start + d]
            scales.append(np.full(d, np.sqrt(max(float((block ** 2).sum(1).mean()), 1e-12) * len(mods))))
            start += d
        self.content_scale_ = np.concatenate(scales)
        beh = arrays.behavior[warm].astype(np.float64)
        self.behavior_mean_ = beh.mean(0)
        self.behavior_scale_ = np.float64(np.sqrt(max(float(((beh - self.behavior_mean_) ** 2).sum(1).mean()), 1e-12)))
        x = self._content(arrays)[warm]
        b = (beh - self.behavior_mean_) / self.behavior_scale_
        n = None if arrays.popularity is None else np.asarray(arrays.popularity, np.float64)[warm]
        rich = np.ones(len(b), bool) if n is None else n >= max(np.median(n), 1.0)
        xr, br = x[rich], b[rich]
        lam = c.ridge * float(np.trace(xr.T @ xr)) / xr.shape[1]
        self.W_ = np.linalg.solve(xr.T @ xr + lam * np.eye(xr.shape[1]), xr.T @ br)  # (D_c, d_b)
        misfit = ((b - x @ self.W_) ** 2).sum(1)
        r2 = 1.0 - float(misfit[rich].mean()) / max(float((br ** 2).sum(1).mean()), 1e-12)
        if c.kappa is not None:
            self.kappa_, A, S = float(c.kappa), None, None
        elif n is None or not (n > 0).any():
            self.kappa_, A, S = 0.0, None, None  # no interaction counts: every warm item's row is trusted
        else:  # items with no interaction (a table row never trained) say nothing about noise vs n
            self.kappa_, A, S = fit_kappa(misfit[n > 0], n[n > 0])
        log.info("rq-evidence: content explains R^2 %.3f of behavior on rich items; kappa %.3g (A %s, S %s)",
                 r2, self.kappa_, A, S)
        self._fit_features(self.features(arrays))
        r = self.reliability(arrays)
        self.stats_ = {"fit_metrics": {**self.evaluate(arrays), "r2_rich": r2, "kappa": self.kappa_,
                                       "misfit_intercept": A, "misfit_slope": S,
                                       "reliability_mean_warm": float(r[warm].mean())}}
        return self

    def _fit_features(self, x):
        c = self.config
        dc = x.shape[1] - (c.behavior_dim or 0)
        residual = x.copy()
        levels = []
        for level in range(c.num_levels):
            if level < c.content_levels:  # content alone; zero in the behavior part
                cent = np.zeros((c.codebook_size, x.shape[1]), np.float32)
                cent[:, :dc] = kmeans(residual[:, :dc], c.codebook_size, niter=c.kmeans_iters, seed=c.seed + level,
                                      gpu=self.on_gpu)
            else:
                cent = kmeans(residual, c.codebook_size, niter=c.kmeans_iters, seed=c.seed + level, gpu=self.on_gpu)
            residual -= cent[nearest(residual, cent, self.device_)]
            levels.append(cent)
        self.centroids_ = np.stack(levels)

    # ---- encode ----------------------------------------------------------------------
    @property
    def sid_layout(self):
        p = self.config.content_levels
        return [{"group": "content" if i < p else BEHAVIOR, "index": i if i < p else i - p, "position": i}
                for i in range(self.config.num_levels)]

    def encode(self, items, *, batch_size: int | None = None, candidates: int = 0) -> Encoding:
        """items -> Encoding: codes, ``behavior_weights`` = r at every fused level (``batch_size``
        is accepted for the common interface; ``candidates=k``: the k best whole SIDs, as
        RQ-Kmeans gives them, ``paths``)."""
        self._check_fitted()
        if not isinstance(candidates, int) or not 0 <= candidates <= self.config.codebook_size:
            raise ValueError(f"candidates must be an int in [0, {self.config.codebook_size}], got {candidates!r}")
        arrays = coerce_items(items, self.config)
        paths = path_scores = None
        if candidates:
            paths, path_scores = self._paths(self.features(arrays), candidates)
            codes = paths[:, 0]
        else:
            codes = self._encode_features(self.features(arrays)).astype(np.int32)
        r = self.reliability(arrays).astype(np.float32)
        width = self.config.num_levels - self.config.content_levels
        path = np.where(arrays.has_behavior, "full", "content_only").astype(object)
        return Encoding(codes, np.repeat(r[:, None], width, axis=1), path, arrays.item_ids,
                        paths=paths, path_scores=path_scores)

    # ---- state -----------------------------------------------------------------------
    def _tensors(self):
        return {"centroids": self.centroids_, "content_mean": self.content_mean_,
                "content_scale": self.content_scale_, "behavior_mean": self.behavior_mean_,
                "behavior_scale": np.asarray([self.behavior_scale_], np.float64), "W": self.W_,
                "kappa": np.asarray([self.kappa_], np.float64)}

    def _load_tensors(self, tensors):
        self.centroids_ = tensors["centroids"]
        self.content_mean_, self.content_scale_ = tensors["content_mean"], tensors["content_scale"]
        self.behavior_mean_ = tensors["behavior_mean"]
        self.behavior_scale_ = np.float64(tensors["behavior_scale"][0])
        self.W_, self.kappa_ = tensors["W"], float(tensors["kappa"][0])
