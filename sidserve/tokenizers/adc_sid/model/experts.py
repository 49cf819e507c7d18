"""Building blocks: the two-layer MLP used by projections D_m (eq. 2), experts
(eq. 4, 6), gates and the decoder."""

from __future__ import annotations

from torch import nn

from sidserve.tokenizers.invariant import Linear


class MLP(nn.Sequential):
    """x (B, d_in) -> (B, d_out): Linear -> SiLU -> Linear (exact inside
    ``invariant.batch_invariant()``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__(Linear(d_in, d_hidden), nn.SiLU(), Linear(d_hidden, d_out))
