"""Full-catalog softmax cross-entropy computed in tiles, never holding the (P, N) logits.

    loss = mean_p [ logsumexp_j (h_p . w_j) - h_p . w_{t_p} ]

The same loss and gradients as ``F.cross_entropy(h @ w.T, t)`` (up to float rounding), but
the forward keeps only the per-row logsumexp (P,) and the backward recomputes each
(rows x items) tile of logits, turns it into softmax probabilities and accumulates

    dL/dh = (softmax - onehot) @ w / P,   dL/dw = (softmax - onehot).T @ h / P

tile by tile. Why: with d = 64 the logits matmul is bound by memory, not arithmetic; the
dense path writes and re-reads a (P, N) float32 tensor five times per step (logits,
log_softmax, its gradient's zero fill, the gradient, the backward's matmuls), 75 MB for 1,536
positions against Beauty's 12,101 items. Tiles of 512 x 512 stay in the CPU's cache: on one
thread a SID-SASRec step's loss took 1.7-2.1x less time (docs/evaluation.md, "Cost and
budget"), at the price of one more (cheap, cached) matmul per tile.

Shapes: P positions, N items (the scored rows), d width.
"""

from __future__ import annotations

import torch

TILE = 512  # rows and items per tile: 512 x 512 float32 = 1 MiB, inside a core's L2


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, tile: int) -> torch.Tensor:
        P = h.shape[0]
        lse = torch.empty(P, dtype=h.dtype, device=h.device)  # (P,)
        for r in range(0, P, tile):
            hr = h[r:r + tile]
            acc = torch.full((hr.shape[0],), float("-inf"), dtype=h.dtype, device=h.device)
            for s in range(0, w.shape[0], tile):
                acc = torch.logaddexp(acc, torch.logsumexp(hr @ w[s:s + tile].T, dim=1))
            lse[r:r + tile] = acc
        target_logit = (h * w[target]).sum(-1)  # (P,)
        ctx.save_for_backward(h, w, target, lse)
        ctx.tile = tile
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w, target, lse = ctx.saved_tensors
        tile = ctx.tile
        scale = grad / h.shape[0]
        gh = torch.zeros_like(h)  # (P, d)
        gw = torch.zeros_like(w)  # (N, d)
        for s in range(0, w.shape[0], tile):
            wc, gwc = w[s:s + tile], gw[s:s + tile]
            for r in range(0, h.shape[0], tile):
                hr = h[r:r + tile]
                p = torch.exp(hr @ wc.T - lse[r:r + tile, None]).mul_(scale)  # (rows, items) softmax / P
                gh[r:r + tile].addmm_(p, wc)
                gwc.addmm_(p.T, hr)
        gh.sub_(scale * w[target])  # the one-hot part
        gw.index_add_(0, target, -scale * h)
        return gh, gw, None, None


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """h (P, d) float, w (N, d) same dtype, target (P,) int64 in [0, N) -> mean CE (scalar)."""
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"need h (P, d) and w (N, d) of the same width, got {tuple(h.shape)} and {tuple(w.shape)}")
    if target.shape != (h.shape[0],):
        raise ValueError(f"target must be ({h.shape[0]},), got {tuple(target.shape)}")
    if h.shape[0] == 0:
        raise ValueError("no positions to score (P = 0)")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    return _ChunkedCrossEntropy.apply(h, w, target, tile)
