"""AdaSID-style collision regulation, the pieces of the loss (issue 8; how pairs are found
and fed to the training step: ``sidserve.tokenizers.adc_sid.regulation.pairs``).

For an observed overlap (i, j) (``sidserve.tokenizers.adc_sid.regulation.overlaps.find_overlaps``), the repulsion the
pair receives is

    w_ij = (1 - compat_ij) * load_ij * schedule(progress)

1. semantic relaxation: ``compat_ij`` in (0, 1) from the cosine similarity of the items'
   content embeddings; near-duplicates (compat ~ 1) keep their shared code (admissible
   sharing), unrelated items (compat ~ 0) are pushed apart;
2. load-adaptive pressure: ``load_ij`` grows with how crowded the pair's region of the code
   space is (its overlap group's size relative to the expected share), capped;
3. progress-adaptive pressure: ``schedule`` is strong early in training and decays toward
   a floor, handing the objective back to reconstruction/alignment.

The static baseline of the issue is w_ij = constant for every overlap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def compatibility(content_a: torch.Tensor, content_b: torch.Tensor, threshold: float = 0.9,
                  temperature: float = 0.02) -> torch.Tensor:
    """(P, d) content embeddings of the two sides -> (P,) sigmoid((cos - threshold) / temperature).
    cos = threshold gives 0.5; well above it -> 1 (admissible), well below -> 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    cos = F.cosine_similarity(content_a, content_b, dim=-1)
    return torch.sigmoid((cos - threshold) / temperature)


def load_factor(group_size: torch.Tensor, expected: float, cap: float = 4.0) -> torch.Tensor:
    """(P,) size of the overlap group each pair belongs to -> (P,) clamp(size / expected, 1, cap).
    ``expected``: the group size a uniform use of the code space would give (>= 1 in practice:
    two items per group is already one collision)."""
    if expected <= 0 or cap < 1:
        raise ValueError(f"need expected > 0 and cap >= 1, got expected={expected}, cap={cap}")
    return (group_size.float() / expected).clamp(1.0, cap)


def progress_schedule(progress: float, start: float = 1.0, floor: float = 0.1) -> float:
    """Cosine decay from ``start`` at progress 0 to ``floor`` at progress 1."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return floor + (start - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def repulsion(z_a: torch.Tensor, z_b: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Margin repulsion on the latents that produced a shared code.

    z_a, z_b: (P, d) latents of the two sides at one shared position -> (P,)
    relu(cos(z_a, z_b) - (1 - margin)): zero once the two latents are at least ``margin``
    apart in cosine. The training loss is mean_p w_p * (mean of this over the positions
    pair p shares), ``sidserve.tokenizers.adc_sid.regulation.pairs.pair_repulsion``."""
    return F.relu(F.cosine_similarity(z_a, z_b, dim=-1) - (1.0 - margin))
