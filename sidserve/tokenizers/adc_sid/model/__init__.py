"""ADC-SID network pieces, one concept per module."""

from sidserve.tokenizers.adc_sid.model.adc_sid import ADCSIDModel
from sidserve.tokenizers.adc_sid.model.alignment import (
    alignment_loss,
    behavior_alignment_loss,
    content_alignment_loss,
    info_nce,
)
from sidserve.tokenizers.adc_sid.model.codebook import CosineCodebook, spherical_kmeans
from sidserve.tokenizers.adc_sid.model.controller import (
    alignment_strength,
    catalog_quantiles,
    normalized_norm,
    quantile_normalized,
)
from sidserve.tokenizers.adc_sid.model.gates import BehaviorWeightingGate, ContentGate
from sidserve.tokenizers.adc_sid.model.io import ModelInput, ModelOutput
from sidserve.tokenizers.adc_sid.model.sparsity import (
    SparsityRegularizer,
    load_balance_factor,
    target_sparsity,
)

__all__ = [
    "ADCSIDModel", "ModelInput", "ModelOutput", "alignment_loss", "behavior_alignment_loss",
    "content_alignment_loss", "info_nce", "CosineCodebook", "spherical_kmeans",
    "alignment_strength", "catalog_quantiles", "normalized_norm", "quantile_normalized", "BehaviorWeightingGate", "ContentGate",
    "SparsityRegularizer", "load_balance_factor", "target_sparsity",
]
