"""sidserve: Semantic IDs for recommender catalogs (ADC-SID tokenizer + Ray jobs + Serve)."""

import logging

# faiss' loader logs "ModuleNotFoundError(...swigfaiss_avx2)" at INFO when it falls back to
# its generic build: harmless, but it reads like an error in every Ray worker's log
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

import sidserve.baselines  # noqa: F401,E402,I001  registers baseline artifact types
from sidserve.base import BaseTokenizer, Encoding, NotFittedError, load_tokenizer  # noqa: E402
from sidserve.config import TokenizerConfig  # noqa: E402
from sidserve.model.controller import alignment_strength  # noqa: E402
from sidserve.synthetic import make_synthetic_catalog  # noqa: E402
from sidserve.tokenizer import SemanticIdTokenizer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BaseTokenizer", "Encoding", "NotFittedError", "load_tokenizer", "TokenizerConfig",
    "alignment_strength", "make_synthetic_catalog", "SemanticIdTokenizer",
]
