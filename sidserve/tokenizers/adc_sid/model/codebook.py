"""Cosine-similarity codebook (paper eq. 5, 7-9) with straight-through estimator,
codebook/commitment loss, k-means initialisation and dead-code restarts."""

from __future__ import annotations

import faiss  # the faiss.loader INFO noise is silenced in sidserve/__init__.py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidserve.tokenizers import invariant

# helper functions


def spherical_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int) -> np.ndarray:
    """x: (n, d) float32, unit rows -> centroids (k, d) float32, unit rows (faiss)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} samples, got {x.shape[0]}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, x.shape[0] // k + 1))
    km.train(x)
    return F.normalize(torch.from_numpy(km.centroids.copy()), dim=-1).numpy()


# main class


class CosineCodebook(nn.Module):
    """K codewords of dim d; a latent picks the codeword of highest cosine similarity.

    forward(z): z (B, d) -> (z_hat (B, d) unit, z_q (B, d) unit codeword, codes (B,) int64,
    vq_loss scalar). The straight-through path is applied by the caller on the fused
    latent (eq. 14); ``vq_loss`` trains the codewords and commits the encoder.
    """

    def __init__(self, *, dim: int, codebook_size: int, commitment_weight: float = 0.25):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.commitment_weight = commitment_weight
        self.embed = nn.Parameter(F.normalize(torch.randn(codebook_size, dim), dim=-1))
        # assignments counted since the last dead-code check: (K,)
        self.register_buffer("usage", torch.zeros(codebook_size))

    def codewords(self) -> torch.Tensor:
        return F.normalize(self.embed, dim=-1)  # (K, d)

    def _fixed_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit codewords in fixed point for ``invariant.exact_matmul``, made again only
        when ``embed`` changed (a training step, a restart, a load)."""
        key = (self.embed.data_ptr(), self.embed._version, self.embed.device)
        if getattr(self, "_fixed_point_key", None) != key:
            self._fixed_point_value = invariant.fixed_point_weight(self.codewords().detach())
            self._fixed_point_key = key
        return self._fixed_point_value

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, d) -> codes (B,) int64: argmax_j cos(z, c_j), the lowest j on a tie
        (exact, so batch-invariant, inside ``invariant.batch_invariant()``)."""
        if invariant.exact():
            return invariant.exact_matmul(invariant.normalize(z), self._fixed_point()).argmax(dim=-1)
        return (F.normalize(z, dim=-1) @ self.codewords().t()).argmax(dim=-1)

    def top(self, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d) -> (codes (B, k) int64, cosines (B, k)): the k most similar codewords, best
        first, the lower index first on a tie (so codes[:, 0] == assign(z)); exact float64
        cosines inside ``invariant.batch_invariant()``."""
        if invariant.exact():
            sims = invariant.exact_matmul(invariant.normalize(z), self._fixed_point())
        else:
            sims = F.normalize(z, dim=-1) @ self.codewords().t()
        order = torch.sort(sims, dim=-1, descending=True, stable=True).indices[:, :k]
        return order, sims.gather(-1, order)

    def forward(self, z: torch.Tensor):
        z_hat = invariant.normalize(z)  # (B, d)
        codebook = self.codewords()  # (K, d)
        sims = invariant.exact_matmul(z_hat, self._fixed_point()) if invariant.exact() else z_hat @ codebook.t()
        codes = sims.argmax(dim=-1)  # (B,)
        z_q = codebook[codes]  # (B, d)
        vq_loss = F.mse_loss(z_q, z_hat.detach()) + self.commitment_weight * F.mse_loss(
            z_hat, z_q.detach()
        )
        self._count_usage(codes)
        return z_hat, z_q, codes, vq_loss

    @torch.no_grad()
    def _count_usage(self, codes: torch.Tensor) -> None:
        """codes (B,) int64 assigned in a training step -> usage, for the dead-code check."""
        if self.training:
            self.usage += torch.bincount(codes, minlength=self.codebook_size).to(self.usage)

    @torch.no_grad()
    def init_from_kmeans(self, z: torch.Tensor, *, niter: int, seed: int) -> None:
        """z (n, d) latents of a sample of items -> codewords := spherical k-means centroids."""
        z_hat = F.normalize(z.detach().float().cpu(), dim=-1).numpy()
        centroids = spherical_kmeans(z_hat, self.codebook_size, niter=niter, seed=seed)
        self.embed.copy_(torch.from_numpy(centroids).to(self.embed))
        self.usage.zero_()

    @torch.no_grad()
    def dead_codes(self, threshold: float) -> torch.Tensor:
        """Codes used less than ``threshold`` x their fair share since the last check: (n_dead,)"""
        total = self.usage.sum()
        if total <= 0:
            return torch.zeros(0, dtype=torch.long, device=self.usage.device)
        fair = total / self.codebook_size
        return torch.nonzero(self.usage < threshold * fair).flatten()

    @torch.no_grad()
    def restart_dead_codes(
        self, z: torch.Tensor, *, threshold: float, generator: torch.Generator
    ) -> int:
        """Replace dead codewords by latents drawn from z (n, d); reset usage. Returns #restarted.

        ``generator`` makes the draw reproducible (and identical across data-parallel
        workers when they pass the same z and seed).
        """
        dead = self.dead_codes(threshold)
        n_dead = int(dead.numel())
        if n_dead:
            z_hat = F.normalize(z.detach().float(), dim=-1)
            pick = torch.randint(0, z_hat.shape[0], (n_dead,), generator=generator)
            noise = 0.01 * torch.randn(n_dead, self.dim, generator=generator)
            new = F.normalize(z_hat[pick.to(z_hat.device)] + noise.to(z_hat.device), dim=-1)
            self.embed[dead] = new.to(self.embed)  # bumps _version: _fixed_point is remade
        self.usage.zero_()
        return n_dead
