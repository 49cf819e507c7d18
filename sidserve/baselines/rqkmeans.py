"""RQ-Kmeans (OneRec): residual quantization with k-means at each level (faiss)."""

from __future__ import annotations

import faiss
import numpy as np

from sidserve.baselines.common import BaselineTokenizer


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """x (N, d), centroids (K, d) float32 -> index of the L2-nearest centroid (N,) int64."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0]


def kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, init: np.ndarray | None = None) -> np.ndarray:
    """x (N, d) float32 -> centroids (k, d) float32 (faiss k-means, optional warm start)."""
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False,
                      max_points_per_centroid=max(256, x.shape[0] // k + 1))
    km.train(np.ascontiguousarray(x, dtype=np.float32),
             init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    return km.centroids.copy()


class RQKmeansTokenizer(BaselineTokenizer):
    """Level l quantizes the residual left by levels < l with its own k-means codebook.

    Learned state: ``centroids_`` (L, K, D) float32. (faiss.ResidualQuantizer needs
    K = 2^nbits; the paper's K = 100 is not a power of two, hence k-means per level.)
    """

    tokenizer_type = "rq-kmeans"

    def _fitted_attr(self) -> str:
        return "centroids_"

    def _fit_features(self, x):
        c = self.config
        residual = x.copy()
        levels = []
        for level in range(c.num_levels):
            cent = kmeans(residual, c.codebook_size, niter=c.kmeans_iters, seed=c.seed + level)
            residual -= cent[nearest(residual, cent)]
            levels.append(cent)
        self.centroids_ = np.stack(levels)

    def _encode_features(self, x):
        residual = x.copy()
        codes = np.empty((x.shape[0], self.config.num_levels), dtype=np.int64)
        for level, cent in enumerate(self.centroids_):
            codes[:, level] = nearest(residual, cent)
            residual -= cent[codes[:, level]]
        return codes

    def _decode_codes(self, codes, x=None):
        return sum(self.centroids_[level][codes[:, level]] for level in range(codes.shape[1]))

    def _tensors(self):
        return {"centroids": self.centroids_}

    def _load_tensors(self, tensors):
        self.centroids_ = tensors["centroids"]
