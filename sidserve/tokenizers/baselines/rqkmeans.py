"""RQ-Kmeans (OneRec): residual quantization with k-means at each level (faiss)."""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from sidserve.tokenizers import invariant
from sidserve.tokenizers.baselines.common import BaselineTokenizer

log = logging.getLogger(__name__)


GPU_CHUNK = 65536  # rows per distance matrix on a GPU (65536 x K float32)
EXACT_CHUNK = invariant.CHUNK_ROWS  # rows per exact (float64) distance matrix


def nearest(x: np.ndarray, centroids: np.ndarray, device: str = "cpu", *, exact: bool = False) -> np.ndarray:
    """x (N, d), centroids (K, d) float32 -> index of the L2-nearest centroid (N,) int64.

    exact=False (fitting): faiss' flat index on the CPU, torch float32 distances on a GPU.
    exact=True (encoding): ``invariant.nearest_l2``, exact distances, so a row's answer does
    not depend on the other rows of the call (faiss switches to a BLAS path from 20 queries).
    """
    import torch

    if device == "cpu" and not exact:
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0]
    c = torch.as_tensor(np.ascontiguousarray(centroids, dtype=np.float32), device=device)  # (K, d)
    c_sq = (c * c).sum(1)  # (K,); ||x||^2 is the same for every centroid of a row
    chunk = EXACT_CHUNK if exact else GPU_CHUNK
    out = []
    for s in range(0, x.shape[0], chunk):
        xb = torch.as_tensor(np.ascontiguousarray(x[s:s + chunk], dtype=np.float32), device=device)
        if exact:
            out.append(invariant.nearest_l2(xb, c).cpu())
        else:
            out.append((c_sq[None, :] - 2.0 * xb @ c.T).argmin(1).cpu())  # (B,)
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, init: np.ndarray | None = None,
           gpu: bool = False) -> np.ndarray:
    """x (N, d) float32 -> centroids (k, d) float32 (faiss k-means, optional warm start;
    ``gpu`` trains on every GPU faiss sees, which needs the faiss-gpu build)."""
    if gpu and faiss.get_num_gpus() == 0:
        raise ValueError("k-means on the GPU needs faiss with GPU support, and this faiss sees no GPU: "
                         "pip install 'sidserve[gpu]' (faiss-gpu-cu12, after uninstalling faiss-cpu), or "
                         "fit without --use-gpu")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, gpu=gpu,
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
            t0 = time.perf_counter()
            cent = kmeans(residual, c.codebook_size, niter=c.kmeans_iters, seed=c.seed + level,
                          gpu=self.on_gpu)
            residual -= cent[nearest(residual, cent, self.device_)]
            levels.append(cent)
            dt = time.perf_counter() - t0
            log.info("rq-kmeans level %d/%d: residual energy %.4f, %.0f items/s", level + 1, c.num_levels,
                     float((residual ** 2).sum(1).mean()), x.shape[0] / max(dt, 1e-9))
        self.centroids_ = np.stack(levels)

    def _encode_features(self, x):
        residual = x.copy()
        codes = np.empty((x.shape[0], self.config.num_levels), dtype=np.int64)
        for level, cent in enumerate(self.centroids_):
            codes[:, level] = nearest(residual, cent, self.device_, exact=self.config.batch_invariant)
            residual -= cent[codes[:, level]]
        return codes

    def _decode_codes(self, codes, x=None):
        return sum(self.centroids_[level][codes[:, level]] for level in range(codes.shape[1]))

    def _tensors(self):
        return {"centroids": self.centroids_}

    def _load_tensors(self, tensors):
        self.centroids_ = tensors["centroids"]
