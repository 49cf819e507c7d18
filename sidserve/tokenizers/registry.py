"""Tokenizer types by name: ``"adc-sid" | "rq-kmeans" | "rq-vae" | "opq"`` -> class.

The built-in types are imported on first use (they import torch); ``register`` adds one.
``BaseTokenizer.from_pretrained`` looks the artifact's ``tokenizer_type`` up here, so the
base class never imports its subclasses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidserve.tokenizers.base import BaseTokenizer

BUILTIN = {
    "adc-sid": "sidserve.tokenizers.adc_sid.tokenizer:SemanticIdTokenizer",
    "rq-kmeans": "sidserve.tokenizers.baselines.rqkmeans:RQKmeansTokenizer",
    "rq-vae": "sidserve.tokenizers.baselines.rqvae:RQVAETokenizer",
    "opq": "sidserve.tokenizers.baselines.opq:OPQTokenizer",
}
_REGISTERED: dict[str, type] = {}


def register(kind: str, cls: type) -> None:
    """Make ``cls`` loadable as ``tokenizer_type == kind`` (subclasses of BaseTokenizer that
    set ``tokenizer_type`` are registered when their class is created)."""
    _REGISTERED[kind] = cls


def known_types() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTERED))


def tokenizer_class(kind: str) -> type[BaseTokenizer]:
    """The class of tokenizer type ``kind`` (its ``config_class`` names its config)."""
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    if kind not in BUILTIN:
        raise ValueError(f"unknown tokenizer {kind!r}; choose one of {known_types()}")
    module, _, name = BUILTIN[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def load_tokenizer(uri: str) -> BaseTokenizer:
    """Load any sidserve tokenizer artifact (ADC-SID or a baseline)."""
    from sidserve.tokenizers.base import BaseTokenizer

    return BaseTokenizer.from_pretrained(uri)
