"""Behavior-content contrastive alignment (paper eq. 18-21)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 18: anchor (B, d), positive (B, d) -> per-anchor loss (B,).

    Row j's positive is positive[j]; every other row of ``positive`` is an in-batch
    negative. Similarity is cosine, divided by tau.
    """
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).t() / tau  # (B, B)
    target = torch.arange(anchor.shape[0], device=anchor.device)
    return F.cross_entropy(logits, target, reduction="none")


def content_alignment_loss(h: dict[str, torch.Tensor], tau: float) -> torch.Tensor:
    """Eq. 20 for every pair of content modalities: h: modality -> (B, d) -> scalar.

    Symmetric: both directions summed, averaged over the batch. One modality -> 0.
    """
    names = list(h)
    total = next(iter(h.values())).new_zeros(())
    for i, m in enumerate(names):
        for n in names[i + 1:]:
            total = total + (info_nce(h[m], h[n], tau) + info_nce(h[n], h[m], tau)).mean()
    return total


def behavior_alignment_loss(
    h: dict[str, torch.Tensor], h_b: torch.Tensor, w: torch.Tensor, tau: float
) -> torch.Tensor:
    """Eq. 18-19 weighted as in eq. 21: sum_m mean_j(w_j * L_bm,j) -> scalar.

    h: modality -> (B, d) content projections; h_b: (B, d) behavior projections of the
    same items (items without behavior must be left out: they are not valid negatives);
    w: (B,) alignment strength per positive pair (eq. 17).
    """
    if w.shape != (h_b.shape[0],):
        raise ValueError(f"w must have shape ({h_b.shape[0]},), got {tuple(w.shape)}")
    if h_b.shape[0] < 2:  # no in-batch negative: InfoNCE is undefined
        return h_b.new_zeros(())
    return sum((w * info_nce(h[m], h_b, tau)).mean() for m in h)


def alignment_loss(
    h: dict[str, torch.Tensor], h_b: torch.Tensor | None, w: torch.Tensor | None, tau: float
) -> torch.Tensor:
    """Eq. 21, L_align_total = L_vt + w L_bv + w L_bt, for any set of content modalities
    (all items have behavior here; see the two parts above for mixed batches)."""
    total = content_alignment_loss(h, tau)
    if h_b is not None:
        total = total + behavior_alignment_loss(h, h_b, w, tau)
    return total
