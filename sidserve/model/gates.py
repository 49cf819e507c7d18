"""Fusion gates: softmax gates of content experts (eq. 12-13) and the dynamic
behavioral weighting gate (eq. 22)."""

from __future__ import annotations

import torch
from torch import nn

from sidserve.model.experts import MLP


class ContentGate(nn.Module):
    """Eq. 12-13: e_m (B, d_m) -> g_m (B, N_m) = softmax(MLP_m(e_m) + b_m)."""

    def __init__(self, *, dim: int, num_experts: int, hidden_dim: int):
        super().__init__()
        self.mlp = MLP(dim, hidden_dim, num_experts)
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, e_m: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mlp(e_m) + self.bias, dim=-1)


class BehaviorWeightingGate(nn.Module):
    """Eq. 22: R(e_b) (B, N_b) = sigmoid(N_norm(e_b)) * relu(MLP(e_b) + b).

    relu makes weights exactly 0 (sparse: that behavioral SID is switched off);
    sigmoid(N_norm) in [0.5, 0.73] rescales by information richness.
    """

    def __init__(self, *, dim: int, num_experts: int, hidden_dim: int, bias_init: float):
        super().__init__()
        self.mlp = MLP(dim, hidden_dim, num_experts)
        self.bias = nn.Parameter(torch.full((num_experts,), float(bias_init)))

    def forward(self, e_b: torch.Tensor, n_norm: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(n_norm).unsqueeze(-1) * torch.relu(self.mlp(e_b) + self.bias)
