"""Baseline tokenizers behind the same interface as SemanticIdTokenizer."""

from sidserve.tokenizers.baselines.common import BaselineConfig, BaselineTokenizer
from sidserve.tokenizers.baselines.opq import OPQConfig, OPQTokenizer
from sidserve.tokenizers.baselines.rqkmeans import RQKmeansTokenizer
from sidserve.tokenizers.baselines.rqvae import RQVAEConfig, RQVAETokenizer

__all__ = [
    "BaselineConfig", "BaselineTokenizer", "OPQConfig", "OPQTokenizer", "RQKmeansTokenizer",
    "RQVAEConfig", "RQVAETokenizer",
]
