"""Alignment strength controller (paper eq. 15-17) and the normalisation of the
richness signal N_norm that it, the behavioral gate (eq. 22) and the target sparsity read.

``minmax`` is eq. 16. ``quantile`` maps the signal through its catalog quantiles: on
Beauty, min-max put 75% of items at N_norm <= 0.26 where eq. 17 gives w <= 0.003 (one
outlier norm stretches the range), which switched alignment off for nearly every item,
while the paper reads its (alpha, beta) as filtering the least-informative ~40%."""

from __future__ import annotations

import math

import torch

from sidserve.tokenizers import invariant


def normalized_norm(e_b: torch.Tensor, n_min: float, n_max: float) -> torch.Tensor:
    """Eq. 16: e_b (B, d_b) -> N_norm (B,) in [0, 1].

    N_min / N_max are catalog statistics (eq. 15, over ALL items, not a batch); a norm
    outside [N_min, N_max] (an item newer than the statistics) is clipped.
    """
    if not n_max > n_min:
        raise ValueError(f"need n_max > n_min, got n_min={n_min}, n_max={n_max}")
    norms = invariant.row_norm(e_b)
    return ((norms - n_min) / (n_max - n_min)).clamp(0.0, 1.0)


def quantile_normalized(signal: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Rank normalisation of a richness signal: signal (B,) -> (B,) in [0, 1].

    quantiles (Q,) ascending: the signal's q-th quantiles over the catalog at
    q = 0, 1/(Q-1), ..., 1 (stored in the model, so serving maps a new item exactly as
    the fit did). A value between two stored quantiles is interpolated linearly; outside
    [q_0, q_{Q-1}] it is clipped; a value several quantiles share gets the middle of their
    run (its mid-rank). The catalog's own items come out ~ uniform on [0, 1], so
    a threshold on N_norm reads as a share of the catalog whatever the norm distribution.
    Computed in float64, one row at a time in effect: the result does not depend on the batch.
    """
    if quantiles.ndim != 1 or quantiles.numel() < 2:
        raise ValueError(f"quantiles must be a 1-d tensor of >= 2 values, got shape {tuple(quantiles.shape)}")
    q = quantiles.to(torch.float64)
    x = signal.to(torch.float64).clamp(q[0], q[-1]).contiguous()
    # a value that several stored quantiles share (ties: many tail items with the same
    # norm) maps to the middle of their run, as a mid-rank does
    # (within a relative 1e-6: float32 norms of tied items differ in the last bits)
    tol = 1e-6 * x.abs().clamp_min(1e-30)
    both = [_position(q, (x - tol).clamp(q[0], q[-1]), False), _position(q, (x + tol).clamp(q[0], q[-1]), True)]
    return ((both[0] + both[1]) / (2 * (q.numel() - 1))).to(signal.dtype)


def _position(q: torch.Tensor, x: torch.Tensor, right: bool) -> torch.Tensor:
    """Fractional index of x (B,) in ascending q (Q,), by linear interpolation."""
    hi = torch.searchsorted(q, x, right=right).clamp(1, q.numel() - 1)  # (B,)
    lo = hi - 1
    span = q[hi] - q[lo]
    frac = torch.where(span > 0, (x - q[lo]) / span.clamp_min(1e-300), torch.ones_like(x)).clamp(0.0, 1.0)
    return lo.to(torch.float64) + frac


def catalog_quantiles(signal: torch.Tensor, points: int) -> torch.Tensor:
    """signal (n,) over a catalog (or a uniform sample of it) -> (points,) float32 quantiles
    at 0, 1/(points-1), ..., 1, the table ``quantile_normalized`` reads."""
    if signal.numel() == 0:
        raise ValueError("no items to compute richness quantiles from")
    levels = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    return torch.quantile(signal.detach().to(torch.float64).cpu(), levels).to(torch.float32)


def alignment_strength(n_norm, alpha: float = 10.0, beta: float = 9.0):
    """Eq. 17: w = sigmoid(alpha * N_norm - beta) / sigmoid(alpha - beta).

    n_norm: float or tensor (B,) in [0, 1] -> w of the same shape; w(1) = 1, and w is
    close to 0 for long-tail items (small N_norm).
    """
    denom = 1.0 / (1.0 + math.exp(-(alpha - beta)))
    if isinstance(n_norm, torch.Tensor):
        return torch.sigmoid(alpha * n_norm - beta) / denom
    return (1.0 / (1.0 + math.exp(-(alpha * float(n_norm) - beta)))) / denom
