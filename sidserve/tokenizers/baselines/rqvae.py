"""RQ-VAE (TIGER): MLP encoder, residual quantization over L Euclidean codebooks with a
straight-through estimator, MLP decoder; k-means initialisation per level and dead-code
restarts, as in TIGER's implementation notes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidserve.tokenizers import invariant
from sidserve.tokenizers.adc_sid.model.experts import MLP
from sidserve.tokenizers.baselines.common import BaselineConfig, BaselineTokenizer
from sidserve.tokenizers.baselines.rqkmeans import kmeans

log = logging.getLogger(__name__)


@dataclass
class RQVAEConfig(BaselineConfig):
    latent_dim: int = 32  # encoder output / codeword dim
    hidden_dim: int = 256  # encoder/decoder MLP width
    epochs: int = 20  # passes over the catalog
    batch_size: int = 1024  # items per step
    lr: float = 1e-3  # AdamW learning rate
    commitment_weight: float = 0.25  # beta of the commitment term
    restart_every: int = 50  # steps between dead-code checks
    dead_code_threshold: float = 0.1  # dead below this share of a code's fair usage


class RQVAE(nn.Module):
    def __init__(self, c: RQVAEConfig):
        super().__init__()
        self.c = c
        self.encoder = MLP(c.input_dim, c.hidden_dim, c.latent_dim)
        self.decoder = MLP(c.latent_dim, c.hidden_dim, c.input_dim)
        self.codebooks = nn.Parameter(torch.randn(c.num_levels, c.codebook_size, c.latent_dim) * 0.1)
        self.register_buffer("usage", torch.zeros(c.num_levels, c.codebook_size))

    def quantize(self, z: torch.Tensor):
        """z (B, d) -> (z_q (B, d), codes (B, L), residuals list of (B, d), vq loss)."""
        residual = z
        z_q = torch.zeros_like(z)
        codes, residuals = [], []
        vq = z.new_zeros(())
        for level in range(self.c.num_levels):
            book = self.codebooks[level]  # (K, d)
            if invariant.active():  # encoding: exact distances, batch-invariant
                idx = invariant.nearest_l2(residual, book)
            else:
                idx = torch.cdist(residual, book).argmin(dim=-1)  # (B,)
            q = book[idx]
            vq = vq + F.mse_loss(q, residual.detach()) + self.c.commitment_weight * F.mse_loss(residual, q.detach())
            residuals.append(residual.detach())
            codes.append(idx)
            z_q = z_q + q
            residual = residual - q.detach()
        return z_q, torch.stack(codes, dim=-1), residuals, vq

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        z_q, codes, residuals, vq = self.quantize(z)
        x_hat = self.decoder(z + (z_q - z).detach())
        if self.training:
            with torch.no_grad():
                for level in range(self.c.num_levels):
                    self.usage[level] += torch.bincount(codes[:, level], minlength=self.c.codebook_size).float()
        return x_hat, codes, residuals, vq


class RQVAETokenizer(BaselineTokenizer):
    """Learned state: ``model_`` (RQVAE: encoder, L codebooks (L, K, d), decoder)."""

    tokenizer_type = "rq-vae"
    config_class = RQVAEConfig

    def _fitted_attr(self) -> str:
        return "model_"

    @torch.no_grad()
    def _kmeans_init(self, model: RQVAE, x: torch.Tensor) -> None:
        c = self.config
        residual = model.encoder(x)
        for level in range(c.num_levels):
            cent = torch.from_numpy(kmeans(residual.cpu().numpy(), c.codebook_size, niter=c.kmeans_iters,
                                           seed=c.seed + level, gpu=self.on_gpu)).to(residual.device)
            model.codebooks.data[level] = cent
            residual = residual - cent[torch.cdist(residual, cent).argmin(-1)]

    def _fit_features(self, x):
        c = self.config
        torch.manual_seed(c.seed)
        rng = np.random.default_rng(c.seed)
        gen = torch.Generator().manual_seed(c.seed)
        model = RQVAE(c).to(self.device_)
        xt = torch.from_numpy(x).to(self.device_)
        self._kmeans_init(model, xt[torch.from_numpy(rng.permutation(len(x))[:20000])])
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr)
        step = 0
        model.train()
        for epoch in range(c.epochs):
            t0, total, steps = time.perf_counter(), 0.0, 0
            order = torch.from_numpy(rng.permutation(len(x))).to(self.device_)
            for start in range(0, len(x), c.batch_size):
                batch = xt[order[start:start + c.batch_size]]  # (B, D)
                x_hat, codes, residuals, vq = model(batch)
                loss = F.mse_loss(x_hat, batch) + vq
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                steps += 1
                total += loss.detach()  # summed on the device: no sync per step
                if step % c.restart_every == 0:
                    self._restart(model, residuals, gen)
            dt = time.perf_counter() - t0
            log.info("rq-vae epoch %d/%d: loss %.5f, %.0f items/s", epoch + 1, c.epochs, float(total) / max(steps, 1),
                     len(x) / max(dt, 1e-9))
        self.model_ = model.eval()

    @torch.no_grad()
    def _restart(self, model: RQVAE, residuals: list[torch.Tensor], gen: torch.Generator) -> None:
        c = self.config
        for level in range(c.num_levels):
            usage = model.usage[level]
            dead = torch.nonzero(usage < c.dead_code_threshold * usage.sum() / c.codebook_size).flatten()
            if dead.numel():
                pick = torch.randint(0, residuals[level].shape[0], (dead.numel(),), generator=gen).to(dead.device)
                model.codebooks.data[level, dead] = residuals[level][pick]
        model.usage.zero_()

    @torch.no_grad()
    def _encode_features(self, x):
        self.model_.eval()
        out = []
        exact = self.config.batch_invariant  # exact GEMMs and distances, one thread, rows padded
        step = invariant.CHUNK_ROWS if exact else 8192
        with invariant.batch_invariant(exact):
            for s in range(0, len(x), step):
                k = min(len(x), s + step) - s
                xb = torch.from_numpy(x[s + (invariant.padded_rows(k) if exact else np.arange(k))]).to(self.device_)
                out.append(self.model_.quantize(self.model_.encoder(xb))[1][:k].cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.config.num_levels), np.int64)

    @torch.no_grad()
    def _decode_codes(self, codes, x=None):
        c = self.config
        ct = torch.from_numpy(codes).to(self.device_)
        z_q = sum(self.model_.codebooks[level][ct[:, level]] for level in range(c.num_levels))
        return self.model_.decoder(z_q).cpu().numpy()

    def _moved(self, device) -> None:
        if getattr(self, "model_", None) is not None:
            self.model_.to(device)

    def _tensors(self):
        return {k: v.detach().cpu().numpy() for k, v in self.model_.state_dict().items()}

    def _load_tensors(self, tensors):
        model = RQVAE(self.config)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
        self.model_ = model.eval()
