"""OPQ (Ge et al., used by RPG): an orthogonal rotation R learned jointly with a
product quantizer; SID position m is the code of sub-vector m (unordered SIDs).

Non-parametric OPQ: alternate (1) k-means per sub-space of x R (faiss), (2) R from the
orthogonal Procrustes problem min ||x R - y_hat|| (SVD). faiss' OPQMatrix/ProductQuantizer
need K = 2^nbits; the paper's K = 100 is not, hence this small loop over faiss k-means.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from sidserve.tokenizers import invariant
from sidserve.tokenizers.baselines.common import BaselineConfig, BaselineTokenizer
from sidserve.tokenizers.baselines.rqkmeans import EXACT_CHUNK, kmeans, nearest

log = logging.getLogger(__name__)


@dataclass
class OPQConfig(BaselineConfig):
    opq_iters: int = 8  # rotation / codebook alternations


class OPQTokenizer(BaselineTokenizer):
    """Learned state: ``rotation_`` (D', D') float32, ``centroids_`` (L, K, D'/L) float32,
    D' = D rounded up to a multiple of L (inputs are zero-padded)."""

    tokenizer_type = "opq"
    independent_positions = True  # one sub-quantizer per subspace
    config_class = OPQConfig
    group = "subspace"

    def _fitted_attr(self) -> str:
        return "rotation_"

    def _padded(self, x):
        L = self.config.num_levels
        pad = (-x.shape[1]) % L
        return np.pad(x, ((0, 0), (0, pad))) if pad else x

    def _quantize(self, y, centroids, exact: bool = False):
        """y (N, D') rotated -> (codes (N, L), y_hat (N, D')); exact: see ``nearest``."""
        L = self.config.num_levels
        d = y.shape[1] // L
        codes = np.stack([nearest(y[:, m * d:(m + 1) * d], centroids[m], self.device_, exact=exact)
                          for m in range(L)], axis=1)
        y_hat = np.concatenate([centroids[m][codes[:, m]] for m in range(L)], axis=1)
        return codes, y_hat

    def _fit_features(self, x):
        c = self.config
        x = self._padded(x)
        L, D = c.num_levels, x.shape[1]
        d = D // L
        rotation = np.eye(D, dtype=np.float32)
        centroids = None
        for it in range(c.opq_iters + 1):
            t0 = time.perf_counter()
            y = x @ rotation
            centroids = np.stack([
                kmeans(y[:, m * d:(m + 1) * d], c.codebook_size, niter=c.kmeans_iters, seed=c.seed + m, gpu=self.on_gpu,
                       init=None if centroids is None else centroids[m])
                for m in range(L)
            ])
            if it == c.opq_iters:
                break
            _, y_hat = self._quantize(y, centroids)
            log.info("opq iteration %d/%d: distortion %.4f, %.0f items/s", it + 1, c.opq_iters,
                     float(((y - y_hat) ** 2).sum(1).mean()), x.shape[0] / max(time.perf_counter() - t0, 1e-9))
            u, _, vt = np.linalg.svd(x.T.astype(np.float64) @ y_hat.astype(np.float64))
            rotation = (u @ vt).astype(np.float32)
        self.rotation_, self.centroids_ = rotation, centroids

    def _encode_features(self, x):
        if not self.config.batch_invariant:
            return self._quantize(self._padded(x) @ self.rotation_, self.centroids_)[0]
        return self._quantize(self._rotate_exact(self._padded(x)), self.centroids_, exact=True)[0]

    def _candidates(self, x, k):
        """Per subspace, the k nearest centroids (exact distances, the lower index first on a
        tie) and their score 2 y.c - ||c||^2 (= ||y||^2 - ||y - c||^2: higher is nearer)."""
        import torch

        y = self._rotate_exact(self._padded(x))
        L = self.config.num_levels
        d = y.shape[1] // L
        codes = np.empty((len(x), L, k), np.int32)
        scores = np.empty((len(x), L, k), np.float64)
        for m in range(L):
            c = torch.as_tensor(np.ascontiguousarray(self.centroids_[m]), device=self.device_)
            for s in range(0, len(x), EXACT_CHUNK):
                yb = torch.as_tensor(np.ascontiguousarray(y[s:s + EXACT_CHUNK, m * d:(m + 1) * d]), device=self.device_)
                sims = invariant.similarity_l2(yb, c)  # (B, K)
                order = torch.sort(sims, dim=-1, descending=True, stable=True).indices[:, :k]
                codes[s:s + EXACT_CHUNK, m] = order.cpu().numpy()
                scores[s:s + EXACT_CHUNK, m] = sims.gather(-1, order).cpu().numpy()
        return codes, scores

    def _rotate_exact(self, x):
        """x (N, D') @ rotation_, each row's result independent of the other rows (an exact
        GEMM, ``invariant.exact_matmul``, rounded to float32), in chunks."""
        import torch

        rot_t = torch.as_tensor(np.ascontiguousarray(self.rotation_.T), device=self.device_)  # (D', D')
        out = np.empty(x.shape, dtype=np.float32)
        for s in range(0, x.shape[0], EXACT_CHUNK):
            xb = torch.as_tensor(np.ascontiguousarray(x[s:s + EXACT_CHUNK], dtype=np.float32), device=self.device_)
            out[s:s + EXACT_CHUNK] = invariant.exact_matmul(xb, rot_t).to(torch.float32).cpu().numpy()
        return out

    def _decode_codes(self, codes, x=None):
        L = self.config.num_levels
        y_hat = np.concatenate([self.centroids_[m][codes[:, m]] for m in range(L)], axis=1)
        return (y_hat @ self.rotation_.T)[:, : self.config.input_dim]

    def _tensors(self):
        return {"rotation": self.rotation_, "centroids": self.centroids_}

    def _load_tensors(self, tensors):
        self.rotation_, self.centroids_ = tensors["rotation"], tensors["centroids"]
