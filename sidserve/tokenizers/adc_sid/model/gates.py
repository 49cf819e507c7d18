"""Fusion gates: softmax gates of content experts (eq. 12-13) and the dynamic
behavioral weighting gate (eq. 22)."""

from __future__ import annotations

import torch
from torch import nn

from sidserve.tokenizers import invariant
from sidserve.tokenizers.adc_sid.model.experts import MLP


class ContentGate(nn.Module):
    """Eq. 12-13: e_m (B, d_m) -> g_m (B, N_m) = softmax(MLP_m(e_m) + b_m)."""

    def __init__(self, *, dim: int, num_experts: int, hidden_dim: int):
        super().__init__()
        self.mlp = MLP(dim, hidden_dim, num_experts)
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, e_m: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mlp(e_m) + self.bias, dim=-1)


class BehaviorWeightingGate(nn.Module):
    """Eq. 22: R(e_b) (B, N_b) = sigmoid(N_norm(e_b)) * relu(MLP(e_b) + b - t), with t a
    per-expert offset the sparsity controller sets (0 under ReMoE's lambda control).

    relu makes weights exactly 0 (sparse: that behavioral SID is switched off);
    sigmoid(N_norm) in [0.5, 0.73] rescales by information richness.

    forward -> (r, r_fuse), both (B, N_b) and equal in value. ``r`` is eq. 22 with relu's
    gradient (the sparsity loss reads it: a closed gate is not pushed further). ``r_fuse``
    is what the fusion (eq. 10-11) multiplies the latents by; with ``straight_through`` its
    gradient also flows through relu's zero side, so a gate closed by the sparsity pressure
    still sees the reconstruction gradient and reopens when lambda falls (a plain relu gate
    that closes for every item never gets a gradient again).
    """

    def __init__(self, *, dim: int, num_experts: int, hidden_dim: int, bias_init: float,
                 straight_through: bool = False):
        super().__init__()
        self.mlp = MLP(dim, hidden_dim, num_experts)
        self.bias = nn.Parameter(torch.full((num_experts,), float(bias_init)))
        self.straight_through = straight_through
        # per-expert offset subtracted before the relu, set by the sparsity controller
        # (``sparsity_control="threshold"``: sidserve/tokenizers/adc_sid/model/sparsity.py); 0 otherwise
        self.register_buffer("threshold", torch.zeros(num_experts))
        self.last_logits: torch.Tensor | None = None  # (B, N_b) MLP(e_b) + b of the last call, detached

    def forward(self, e_b: torch.Tensor, n_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.mlp(e_b) + self.bias  # (B, N_b)
        self.last_logits = logits.detach()
        pre = logits - self.threshold
        scale = invariant.pointwise(torch.sigmoid, n_norm).unsqueeze(-1)  # (B, 1)
        r = scale * torch.relu(pre)
        if not self.straight_through:
            return r, r
        closed = (pre <= 0).to(pre.dtype)
        return r, r + scale * closed * (pre - pre.detach())
