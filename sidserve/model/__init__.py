"""ADC-SID network pieces, one concept per module."""

from sidserve.model.adc_sid import ADCSIDModel, ModelInput, ModelOutput
from sidserve.model.alignment import (
    alignment_loss,
    behavior_alignment_loss,
    content_alignment_loss,
    info_nce,
)
from sidserve.model.codebook import CosineCodebook, spherical_kmeans
from sidserve.model.controller import (
    alignment_strength,
    catalog_quantiles,
    normalized_norm,
    quantile_normalized,
)
from sidserve.model.gates import BehaviorWeightingGate, ContentGate
from sidserve.model.sparsity import SparsityRegularizer, load_balance_factor, target_sparsity

__all__ = [
    "ADCSIDModel", "ModelInput", "ModelOutput", "alignment_loss", "behavior_alignment_loss",
    "content_alignment_loss", "info_nce", "CosineCodebook", "spherical_kmeans",
    "alignment_strength", "catalog_quantiles", "normalized_norm", "quantile_normalized", "BehaviorWeightingGate", "ContentGate",
    "SparsityRegularizer", "load_balance_factor", "target_sparsity",
]
