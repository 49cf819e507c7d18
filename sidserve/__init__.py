"""sidserve: Semantic IDs for recommender catalogs (ADC-SID tokenizer + Ray jobs + Serve).

The public names below are imported on first use (PEP 562), so that ``import sidserve`` and
the modules that need no model (the Ray Data grouping tasks, the snapshot readers) do not
pay for torch in every fresh Ray worker (about 1.5 s on a 2-CPU machine).
"""

import importlib
import logging

# faiss' loader logs "ModuleNotFoundError(...swigfaiss_avx2)" at INFO when it falls back to
# its generic build: harmless, but it reads like an error in every Ray worker's log
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"

_EXPORTS = {
    "BaseTokenizer": "sidserve.tokenizers.base", "Encoding": "sidserve.tokenizers.base", "NotFittedError": "sidserve.tokenizers.base",
    "load_tokenizer": "sidserve.tokenizers.registry", "TokenizerConfig": "sidserve.tokenizers.adc_sid.config",
    "alignment_strength": "sidserve.tokenizers.adc_sid.model.controller", "make_synthetic_catalog": "sidserve.synthetic",
    "SemanticIdTokenizer": "sidserve.tokenizers.adc_sid.tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sidserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
