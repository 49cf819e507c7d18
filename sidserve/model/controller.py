"""Alignment strength controller (paper eq. 15-17)."""

from __future__ import annotations

import math

import torch


def normalized_norm(e_b: torch.Tensor, n_min: float, n_max: float) -> torch.Tensor:
    """Eq. 16: e_b (B, d_b) -> N_norm (B,) in [0, 1].

    N_min / N_max are catalog statistics (eq. 15, over ALL items, not a batch); a norm
    outside [N_min, N_max] (an item newer than the statistics) is clipped.
    """
    if not n_max > n_min:
        raise ValueError(f"need n_max > n_min, got n_min={n_min}, n_max={n_max}")
    norms = torch.linalg.vector_norm(e_b, dim=-1)
    return ((norms - n_min) / (n_max - n_min)).clamp(0.0, 1.0)


def alignment_strength(n_norm, alpha: float = 10.0, beta: float = 9.0):
    """Eq. 17: w = sigmoid(alpha * N_norm - beta) / sigmoid(alpha - beta).

    n_norm: float or tensor (B,) in [0, 1] -> w of the same shape; w(1) = 1, and w is
    close to 0 for long-tail items (small N_norm).
    """
    denom = 1.0 / (1.0 + math.exp(-(alpha - beta)))
    if isinstance(n_norm, torch.Tensor):
        return torch.sigmoid(alpha * n_norm - beta) / denom
    return (1.0 / (1.0 + math.exp(-(alpha * float(n_norm) - beta)))) / denom
