"""ADC-SID's inference path: a batch's codes and behavioral weights, nothing else (no
decoder, no losses, no latents kept). ``ADCSIDModel.forward(x, codes_only=True)`` calls it;
the training path is ``ADCSIDModel.forward`` itself.

Every row goes through the same computation whatever its batch holds (rows without behavior
are computed with zeros and masked after), so an item's codes and weights do not depend on
how many rows of its batch have behavior: a tensor's size decides which of its elements a
kernel computes in its scalar tail (sidserve/tokenizers/invariant.py has the rest of that
guarantee; invariant_encode.py pads and chunks the rows and picks the arithmetic).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sidserve.tokenizers import invariant
from sidserve.tokenizers.adc_sid.model.invariant_encode import encode_invariant
from sidserve.tokenizers.adc_sid.model.io import ModelInput, ModelOutput, fill_missing

if TYPE_CHECKING:
    from sidserve.tokenizers.adc_sid.model.adc_sid import ADCSIDModel


def encode(model: ADCSIDModel, x: ModelInput, candidates: int = 0) -> ModelOutput:
    """Codes (B, L) int64 and behavioral weights (B, N_b) of the batch ``x``; with
    ``candidates=k`` also the k best codes per position (B, L, k), best first, and their
    cosines (``missing_code`` and NaN at positions an item has no code for). Inside
    ``invariant.batch_invariant()``: chunked, padded and in the arithmetic that
    invariant_encode.py picks, so that each row's results are a function of that row alone."""
    if invariant.active() and not invariant.float32_inside_active():
        return encode_invariant(model, x, candidates, _encode)
    return _encode(model, x, candidates)


def _encode(model: ADCSIDModel, x: ModelInput, candidates: int = 0) -> ModelOutput:
    c = model.config
    B = x.batch_size
    dev = x.has_behavior.device
    x = model.shrink_behavior(x)  # e_b' for every part below (behavior_shrinkage)
    has_b = x.has_behavior
    h, _, shared_in = model.shared_input(x, has_b)

    codes: list[torch.Tensor] = []
    cand: list[torch.Tensor] = []
    cand_scores: list[torch.Tensor] = []

    def pick(book, z: torch.Tensor) -> None:
        if candidates:
            top, sims = book.top(z, candidates)
            codes.append(top[:, 0])
            cand.append(top)
            cand_scores.append(sims)
        else:
            codes.append(book.assign(z))

    for expert, book in zip(model.shared_experts, model.shared_codebooks):
        pick(book, expert(shared_in))
    for m in c.content_modalities:
        for expert, book in zip(model.content_experts[m], model.content_codebooks[m]):
            pick(book, expert(x.content[m]))

    r_full = None
    if c.has_behavior:
        popularity = fill_missing(x.popularity, has_b)
        if popularity is None and c.richness_signal == "popularity" and not bool(has_b.any()):
            popularity = torch.zeros(B, dtype=torch.float64, device=dev)  # nothing reads it
        n_norm = model.richness(x.behavior, popularity)  # (B,)
        if c.use_behavior_gate:
            r = model.behavior_gate(x.behavior, n_norm)[1]  # (B, N_b)
        else:
            r = torch.ones(B, c.num_behavior_experts, device=dev)
        r_full = torch.where(has_b.unsqueeze(-1), r, torch.zeros_like(r))
        residual = c.behavior_quantization != "parallel"
        r_b = model.behavior_residual(x.behavior)  # (B, D or d_b); None for parallel experts
        for i, book in enumerate(model.behavior_codebooks):
            z_b = r_b if residual else model.behavior_experts[i](x.behavior)  # (B, D)
            if candidates:
                top, sims = book.top(z_b, candidates)
                best = top[:, 0]
                top = torch.where(has_b.unsqueeze(-1), top, c.missing_code)
                cand.append(top)
                cand_scores.append(torch.where(has_b.unsqueeze(-1), sims, torch.full_like(sims, float("nan"))))
                codes.append(top[:, 0])
            else:
                best = book.assign(z_b)
                codes.append(torch.where(has_b, best, c.missing_code))
            if residual:  # the next level codes what this one left
                r_b = r_b - book.codewords()[best]

    weights = r_full / model.weight_scale if r_full is not None else torch.zeros(B, 0, device=dev)
    return ModelOutput(codes=torch.stack(codes, dim=-1), behavior_weights=weights,
                       candidates=torch.stack(cand, dim=1) if cand else None,
                       candidate_scores=torch.stack(cand_scores, dim=1) if cand else None)

