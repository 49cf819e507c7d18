"""What goes into ADC-SID's network and what comes out: ``ModelInput`` (a batch as tensors)
and ``ModelOutput`` (codes, behavioral weights and, when training, losses and latents)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ModelInput:
    """A batch as tensors. content: modality -> (B, d_m) float32; behavior: (B, d_b)
    float32 with zero rows where missing (or None without a behavior modality);
    has_behavior: (B,) bool."""

    content: dict[str, torch.Tensor]
    behavior: torch.Tensor | None
    has_behavior: torch.Tensor
    popularity: torch.Tensor | None = None  # (B,) float64, read with richness_signal="popularity"

    def to(self, device) -> "ModelInput":
        return ModelInput(
            {k: v.to(device) for k, v in self.content.items()},
            None if self.behavior is None else self.behavior.to(device),
            self.has_behavior.to(device),
            None if self.popularity is None else self.popularity.to(device),
        )

    @property
    def batch_size(self) -> int:
        return self.has_behavior.shape[0]

    @classmethod
    def from_arrays(cls, arrays) -> "ModelInput":
        """Dense ``sidserve.items.ItemArrays`` -> ModelInput on the CPU."""
        return cls(
            content={m: torch.from_numpy(np.ascontiguousarray(v)) for m, v in arrays.content.items()},
            behavior=None if arrays.behavior is None else torch.from_numpy(np.ascontiguousarray(arrays.behavior)),
            has_behavior=torch.from_numpy(np.ascontiguousarray(arrays.has_behavior)),
            popularity=None if arrays.popularity is None
            else torch.from_numpy(np.ascontiguousarray(arrays.popularity, dtype=np.float64)),
        )


@dataclass
class ModelOutput:
    codes: torch.Tensor  # (B, L) int64, layout of config.sid_layout
    behavior_weights: torch.Tensor  # (B, N_b) float32, 0 for items without behavior
    # scalars incl. "total"; "align" and "reg" are 0 in eval mode (not computed)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    latents: list[torch.Tensor] = field(default_factory=list)  # per codebook (n_i, d), for restarts
    gates_raw: torch.Tensor | None = None  # (B_b, N_b) R(e_b) of items with behavior (pre-dropout)
    n_norm: torch.Tensor | None = None  # (B_b,) N_norm of items with behavior
    recon: torch.Tensor | None = None  # (B,) per-item mean squared reconstruction error
    # codes_only with candidates=k: the k most similar codes per position, best first (B, L, k)
    # int64 (missing_code where the position has no code), and their cosines (B, L, k) (NaN there)
    candidates: torch.Tensor | None = None
    candidate_scores: torch.Tensor | None = None


def fill_missing(values: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """values (B,) with the rows outside ``mask`` set to 0 (a missing value must not turn into
    NaN that a mask multiplies through)."""
    return None if values is None else torch.where(mask, values, torch.zeros_like(values))
