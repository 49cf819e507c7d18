"""Sparsely-activated training of the behavioral gate (paper eq. 23, after ReMoE).

L_reg = lambda * 1/B * sum_t c_t * sum_j f_j * R(e_b)_{t,j}

- f_j, the load-balancing factor of expert j (ReMoE): its share of active gates over
  the mean share, detached; busy experts are pushed harder, idle ones spared, so no
  expert starves.
- c_t = s_target,t / mean(s_target): per-item strength from the target sparsity
  s_target = theta * (1 - N_norm) (MMQ-v2): long-tail items (small N_norm) are pushed
  to switch off more behavioral SIDs than head items.
- lambda is not learned by gradient: like ReMoE, it is multiplied by ``rate`` when the
  batch is less sparse than its mean target, divided by it otherwise.
"""

from __future__ import annotations

import torch
from torch import nn


def target_sparsity(n_norm: torch.Tensor, theta: float) -> torch.Tensor:
    """n_norm (B,) -> s_target (B,) = theta * (1 - N_norm)."""
    return theta * (1.0 - n_norm)


def load_balance_factor(r: torch.Tensor) -> torch.Tensor:
    """r (B, N_b) gate values -> f (N_b,): active share of each expert / mean active share."""
    active = (r > 0).float().mean(dim=0)  # (N_b,)
    return (active / active.mean().clamp_min(1e-6)).detach()


def realised_sparsity(r: torch.Tensor) -> float:
    """Share of exactly-zero gate values in r (B, N_b)."""
    return float((r == 0).float().mean())


class SparsityRegularizer(nn.Module):
    def __init__(self, *, theta: float, lambda_init: float, rate: float):
        super().__init__()
        self.theta = theta
        self.rate = rate
        # lambda lives in the state dict: checkpoints resume it
        self.register_buffer("lam", torch.tensor(float(lambda_init)))

    def forward(self, r: torch.Tensor, n_norm: torch.Tensor) -> torch.Tensor:
        """r (B, N_b), n_norm (B,) of items with behavior -> L_reg scalar."""
        if r.shape[0] == 0:
            return r.new_zeros(())
        s_target = target_sparsity(n_norm, self.theta)  # (B,)
        c = (s_target / s_target.mean().clamp_min(1e-6)).detach()  # (B,)
        f = load_balance_factor(r)  # (N_b,)
        return self.lam * (c.unsqueeze(-1) * f * r).sum(dim=-1).mean()

    @torch.no_grad()
    def sparsity_gap(self, r: torch.Tensor, n_norm: torch.Tensor) -> tuple[float, float]:
        """(mean target sparsity, realised sparsity) of a batch; (0, 0) if it has no behavior.

        Data-parallel callers average both over workers before ``update_lambda`` so
        every worker keeps the same lambda.
        """
        if r.shape[0] == 0:
            return 0.0, 0.0
        return float(target_sparsity(n_norm, self.theta).mean()), realised_sparsity(r)

    @torch.no_grad()
    def update_lambda(self, target: float, actual: float) -> None:
        """One ReMoE step: lambda *= rate^sign(target - actual)."""
        if actual < target:
            self.lam.mul_(self.rate)
        elif actual > target:
            self.lam.div_(self.rate)
