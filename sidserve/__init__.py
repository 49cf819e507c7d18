"""sidserve: Semantic IDs for recommender catalogs (ADC-SID tokenizer + Ray jobs + Serve)."""

import sidserve.baselines  # noqa: F401,E402  registers baseline artifact types
from sidserve.base import BaseTokenizer, Encoding, NotFittedError, load_tokenizer
from sidserve.config import TokenizerConfig
from sidserve.model.controller import alignment_strength
from sidserve.synthetic import make_synthetic_catalog
from sidserve.tokenizer import SemanticIdTokenizer

__version__ = "0.1.0"

__all__ = [
    "BaseTokenizer", "Encoding", "NotFittedError", "load_tokenizer", "TokenizerConfig",
    "alignment_strength", "make_synthetic_catalog", "SemanticIdTokenizer",
]
