"""Baseline tokenizers behind the same interface as SemanticIdTokenizer."""

from sidserve.baselines.common import BaselineConfig, BaselineTokenizer
from sidserve.baselines.opq import OPQConfig, OPQTokenizer
from sidserve.baselines.rqkmeans import RQKmeansTokenizer
from sidserve.baselines.rqvae import RQVAEConfig, RQVAETokenizer

__all__ = [
    "BaselineConfig", "BaselineTokenizer", "OPQConfig", "OPQTokenizer", "RQKmeansTokenizer",
    "RQVAEConfig", "RQVAETokenizer",
]
