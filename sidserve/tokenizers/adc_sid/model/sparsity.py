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

``threshold_step`` is the alternative control of the sparsity *level* (config
``sparsity_control="threshold"``): each expert's gate offset t_j is moved by integral
control toward closing the mean target share of the batch's gates; the offset acts on
the same step (no optimizer in the loop), its step is scaled by the logits' spread (so it
is scale-free), and it holds every expert at the target (none can die). The L1 term still decides *which* items close (long-tail items, pushed harder by
c_t). Lambda control alone reacts through the optimizer: the lambda a catalog needs
ranged from 0.2 (Beauty) to 10 (the synthetic test catalog), and by the time the gates
reacted it had overshot and closed them all.
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
    def __init__(self, *, theta: float, lambda_init: float, rate: float, update: str = "sign"):
        super().__init__()
        if update not in ("sign", "proportional"):
            raise ValueError(f"update must be 'sign' or 'proportional', got {update!r}")
        self.theta = theta
        self.rate = rate
        self.update = update
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
        """One step: lambda *= rate^sign(target - actual) (ReMoE, ``update="sign"``) or
        rate^clip((target - actual) / target, -1, 1) (``"proportional"``)."""
        if self.update == "sign" or target <= 0:
            if actual < target:
                self.lam.mul_(self.rate)
            elif actual > target:
                self.lam.div_(self.rate)
            return
        gap = max(-1.0, min(1.0, (target - actual) / target))
        self.lam.mul_(self.rate ** gap)


@torch.no_grad()
def threshold_step(logits: torch.Tensor, threshold: torch.Tensor, target: float, gain: float) -> torch.Tensor:
    """One integral-control step of the per-expert gate offsets.

    logits (B, N_b): MLP(e_b) + b of a batch; threshold (N_b,): the current offsets ->
    (N_b,) the step t_j += gain * (target - closed_j) * std_j, where closed_j is the share
    of the batch's gates expert j closes under the current offsets and std_j the spread
    of its logits (which makes the step independent of the logits' scale).
    """
    closed = (logits <= threshold).float().mean(dim=0)  # (N_b,)
    spread = logits.float().std(dim=0) if logits.shape[0] > 1 else torch.zeros_like(closed)
    return gain * (target - closed) * spread
