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
    sticky_unit = "path"  # residual: a code cannot be kept alone, a whole previous SID can (_paths)

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

    def _paths(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x (N, D) float32 -> (paths (N, k, L) int32, scores (N, k) float64): whole SIDs that
        reconstruct x almost as well as its SID does, for sticky assignment of residual codes.

        paths[:, 0] is the SID ``encode`` gives (greedy, level by level); the rest are the
        best other paths a beam of width k finds (at each level every kept prefix is extended
        by every code and the k prefixes with the smallest residual are kept), best first.
        score = -||x - decode(path)||^2 / ||x||^2 in float64, the share of the item's input
        energy its SID leaves unexplained (minus), so a margin means the same for every item;
        a beam path may score above the greedy one. With k >= K^L the beam is exhaustive."""
        import torch

        greedy = self._encode_features(x)  # (N, L)
        cents = torch.from_numpy(np.ascontiguousarray(self.centroids_, dtype=np.float32))  # (L, K, D)
        L, K, _ = cents.shape
        n = x.shape[0]
        beam = np.zeros((n, k, L), np.int64)
        chunk = max(1, EXACT_CHUNK // k)
        for s in range(0, n, chunk):
            res = torch.from_numpy(np.ascontiguousarray(x[s:s + chunk], dtype=np.float32))[:, None, :]  # (B, 1, D)
            codes = torch.zeros((res.shape[0], 1, 0), dtype=torch.int64)
            for level in range(L):
                c = cents[level]  # (K, D)
                d = (res * res).sum(-1, keepdim=True) - 2.0 * res @ c.T + (c * c).sum(1)  # (B, P, K)
                width = min(k, d.shape[1] * K)
                best = d.reshape(d.shape[0], -1).topk(width, dim=1, largest=False).indices  # (B, width), sorted
                prefix, code = best // K, best % K
                rows = torch.arange(res.shape[0])[:, None]
                res = res[rows, prefix] - c[code]  # (B, width, D)
                codes = torch.cat([codes[rows, prefix], code[..., None]], dim=2)  # (B, width, level + 1)
            got = codes.numpy()
            beam[s:s + chunk, :got.shape[1]] = got
            if got.shape[1] < k:  # fewer than k paths exist: repeat the last (dropped below)
                beam[s:s + chunk, got.shape[1]:] = got[:, -1:]
        x64 = x.astype(np.float64)
        energy = np.maximum((x64 * x64).sum(1), 1e-300)

        def score(p):  # (N, L) -> (N,)
            r = x64 - sum(self.centroids_[lv].astype(np.float64)[p[:, lv]] for lv in range(L))
            return -(r * r).sum(1) / energy

        cand = np.concatenate([greedy[:, None, :], beam], axis=1)  # (N, k + 1, L)
        sc = np.stack([score(cand[:, j]) for j in range(k + 1)], axis=1)  # (N, k + 1)
        dup = np.zeros(sc.shape, bool)  # the greedy path again, or a repeat: not a second candidate
        for j in range(1, k + 1):
            dup[:, j] = (cand[:, j:j + 1] == cand[:, :j]).all(-1).any(-1)
        order = np.argsort(np.where(dup, np.inf, -sc)[:, 1:], axis=1, kind="stable") + 1  # others, best first
        order = np.concatenate([np.zeros((n, 1), np.int64), order[:, :k - 1]], axis=1)  # (N, k)
        rows = np.arange(n)[:, None]
        paths, scores = cand[rows, order], sc[rows, order]
        scores[dup[rows, order]] = np.nan  # no such path (fewer than k exist)
        return paths.astype(np.int32), scores

    def _tensors(self):
        return {"centroids": self.centroids_}

    def _load_tensors(self, tensors):
        self.centroids_ = tensors["centroids"]
