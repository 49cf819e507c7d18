"""The evaluation's text embeddings are cached by content (sidserve/eval/text.py)."""

import os

import numpy as np
import pytest

from sidserve.eval import text


class NoModel:
    def encode(self, *a, **k):
        raise AssertionError("the model ran although the cache holds these texts")


def test_embeddings_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv(text.CACHE_ENV, str(tmp_path))
    texts = ["lip gloss, shimmer", "shampoo for dry hair", "sunscreen spf 50"]
    first = text.embed_texts(texts)  # the real model
    assert first.shape == (3, text.EMBED_DIM) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    assert len(os.listdir(tmp_path)) == 1
    again = text.embed_texts(texts, model=NoModel())  # read back, the model never asked
    np.testing.assert_array_equal(again, first)
    # another order, another batch size or another split of the same characters: other keys
    reordered = text.embed_texts(texts[::-1])
    np.testing.assert_array_equal(reordered, first[::-1])
    assert len({text.cache_key(texts, 128), text.cache_key(texts[::-1], 128), text.cache_key(texts, 64),
                text.cache_key(["ab"], 128), text.cache_key(["a", "b"], 128)}) == 5
    # an entry of the wrong shape (another model's width, a truncated copy) is recomputed
    path = tmp_path / (text.cache_key(texts, 128) + ".npy")
    np.save(path, np.zeros((3, 7), np.float32))
    np.testing.assert_array_equal(text.embed_texts(texts), first)
    assert np.load(path).shape == (3, text.EMBED_DIM)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(text.CACHE_ENV, "off")
    assert text.cache_dir() is None
    with pytest.raises(AssertionError, match="the model ran"):
        text.embed_texts(["a"], model=NoModel())
    monkeypatch.delenv(text.CACHE_ENV)
    assert text.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "sidserve", "text-embeddings")
