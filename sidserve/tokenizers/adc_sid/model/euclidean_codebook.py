"""Euclidean codebook: one level of residual quantization (config.behavior_quantization =
"residual"). A latent picks its nearest codeword; the caller subtracts the codeword and hands
what is left to the next level, so level i codes what levels < i could not.

The cosine codebook cannot do this: a residual's length is the information the next level
needs, and a cosine codebook throws it away.
"""

from __future__ import annotations

import faiss  # the faiss.loader INFO noise is silenced in sidserve/__init__.py
import numpy as np
import torch
import torch.nn.functional as F

from sidserve.tokenizers import invariant
from sidserve.tokenizers.adc_sid.model.codebook import CosineCodebook


class EuclideanCodebook(CosineCodebook):
    """K codewords of dim d, unconstrained; a latent picks the nearest (squared L2).

    forward(r): r (B, d) -> (r (B, d), z_q (B, d) its nearest codeword, codes (B,) int64,
    vq_loss scalar). The usage counting and dead-code bookkeeping are the cosine codebook's.
    Scores (``top``) are -||r - c||^2, best first, so a margin is in squared latent units
    (latents are unit vectors at the first level: distances lie in [0, 4]).
    """

    def __init__(self, *, dim: int, codebook_size: int, commitment_weight: float = 0.25):
        super().__init__(dim=dim, codebook_size=codebook_size, commitment_weight=commitment_weight)
        with torch.no_grad():  # k-means replaces these; small, as later levels' residuals are
            self.embed.mul_(0.1)
        self._fixed_point_l2 = invariant.FixedPointWeight()  # the raw codewords, made once per change

    def codewords(self) -> torch.Tensor:
        return self.embed  # (K, d)

    def _scores(self, r: torch.Tensor) -> torch.Tensor:
        """r (B, d) -> 2 r.c_j - ||c_j||^2 (B, K) (= ||r||^2 - ||r - c_j||^2: argmax = the
        nearest codeword); exact float64 (batch-invariant) inside ``invariant.batch_invariant()``."""
        if invariant.exact():
            return invariant.similarity_l2(r, self._fixed_point_l2(self.embed))
        return 2.0 * r @ self.embed.t() - (self.embed ** 2).sum(-1)

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, d) -> codes (B,) int64: the nearest codeword, the lowest index on a tie."""
        return self._scores(z).argmax(dim=-1)

    def top(self, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d) -> (codes (B, k) int64, -||z - c||^2 (B, k) float64): the k nearest
        codewords, best first, the lower index first on a tie (codes[:, 0] == assign(z))."""
        scores = self._scores(z)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        sq = invariant.row_norm(z).double() ** 2  # (B,) exact-then-rounded when active()
        return order, scores.gather(-1, order).double() - sq.unsqueeze(-1)

    def forward(self, r: torch.Tensor):
        codes = self.assign(r.detach())  # (B,)
        z_q = self.embed[codes]  # (B, d)
        vq_loss = F.mse_loss(z_q, r.detach()) + self.commitment_weight * F.mse_loss(r, z_q.detach())
        self._count_usage(codes)
        return r, z_q, codes, vq_loss

    @torch.no_grad()
    def init_from_kmeans(self, z: torch.Tensor, *, niter: int, seed: int) -> None:
        """z (n, d) residuals of a sample of items -> codewords := their k-means centroids."""
        x = np.ascontiguousarray(z.detach().float().cpu().numpy())
        if x.shape[0] < self.codebook_size:
            raise ValueError(f"k-means needs at least k={self.codebook_size} samples, got {x.shape[0]}")
        km = faiss.Kmeans(x.shape[1], self.codebook_size, niter=niter, seed=seed, verbose=False,
                          max_points_per_centroid=max(256, x.shape[0] // self.codebook_size + 1))
        km.train(x)
        self.embed.copy_(torch.from_numpy(km.centroids.copy()).to(self.embed))
        self.usage.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, *, threshold: float, generator: torch.Generator) -> int:
        """Replace dead codewords by residuals drawn from z (n, d) (plus 1% noise of their
        scale); reset usage. Returns #restarted."""
        dead = self.dead_codes(threshold)
        n_dead = int(dead.numel())
        if n_dead:
            z = z.detach().float()
            pick = torch.randint(0, z.shape[0], (n_dead,), generator=generator)
            scale = z.norm(dim=-1).mean().item()
            noise = 0.01 * scale / self.dim ** 0.5 * torch.randn(n_dead, self.dim, generator=generator)
            self.embed[dead] = (z[pick.to(z.device)] + noise.to(z.device)).to(self.embed)  # bumps _version: the cache is remade
        self.usage.zero_()
        return n_dead
