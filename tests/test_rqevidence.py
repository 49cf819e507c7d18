"""Evidence-weighted RQ-Kmeans (sidserve/tokenizers/baselines/rqevidence.py): the reliability
it fits reads the catalog's regime, its weights rise with evidence, a cold item keeps the
content prefix, and it encodes like every tokenizer (round trip, batch invariance)."""

import numpy as np
import pytest

from sidserve.tokenizers.base import BaseTokenizer
from sidserve.tokenizers.baselines.rqevidence import (
    EvidenceRQConfig,
    EvidenceRQTokenizer,
    fit_kappa,
)

DIMS = {"text": 16, "meta": 8}


def catalog(content_says: float, n_items=3000, seed=0, cold_share=0.1):
    """Items whose behavior is ``content_says`` * (a function of content) + (1 - content_says) *
    a part of its own, seen through noise of variance 1/n for an item with n interactions."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n_items, 16)).astype(np.float32)
    meta = (text[:, :8] + 0.3 * rng.normal(size=(n_items, 8))).astype(np.float32)
    M = rng.normal(size=(16, 12)) / 4
    own = rng.normal(size=(n_items, 12)) * np.sqrt(np.mean((text @ M) ** 2))
    n = np.minimum(rng.zipf(1.6, size=n_items), 500).astype(np.float64)
    signal = content_says * (text @ M) + (1 - content_says) * own
    behavior = signal + rng.normal(size=signal.shape) * np.sqrt(np.mean(signal ** 2)) / np.sqrt(n)[:, None]
    cold = rng.random(n_items) < cold_share
    return {"item_id": np.array([f"i{i}" for i in range(n_items)]), "text_emb": text, "meta_emb": meta,
            "behavior_emb": [None if c else row for c, row in zip(cold, behavior.astype(np.float32))],
            "popularity": np.where(cold, 0.0, n)}, cold


def config(**kw):
    return EvidenceRQConfig(modality_dims=dict(DIMS), behavior_dim=12, codebook_size=16, num_levels=4,
                            kmeans_iters=10, **kw)


def test_kappa_is_the_noise_over_what_content_cannot_explain():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 200, size=20000).astype(np.float64)
    misfit = 0.5 + 2.0 / n + 0.01 * rng.normal(size=n.size)  # A = 0.5, S = 2
    kappa, A, S = fit_kappa(misfit, n)
    assert A == pytest.approx(0.5, abs=0.02) and S == pytest.approx(2.0, rel=0.05)
    assert kappa == pytest.approx(4.0, rel=0.08)
    # thin items no noisier than rich ones: their rows are trusted (kappa 0)
    assert fit_kappa(1.0 - 0.5 / n, n)[0] == 0.0


def test_where_content_says_little_thin_items_trust_their_behavior():
    strong = EvidenceRQTokenizer(config()).fit(catalog(content_says=0.95)[0])
    weak = EvidenceRQTokenizer(config()).fit(catalog(content_says=0.05)[0])
    assert strong.stats_["fit_metrics"]["r2_rich"] > weak.stats_["fit_metrics"]["r2_rich"]
    assert strong.kappa_ > weak.kappa_ > 0
    # so an item with 2 interactions counts its own behavior more in the weak catalog
    assert 2 / (2 + weak.kappa_) > 2 / (2 + strong.kappa_)


def test_weights_rise_with_evidence_and_a_cold_item_keeps_the_content_prefix():
    items, cold = catalog(content_says=0.5)
    tok = EvidenceRQTokenizer(config(content_levels=2)).fit(items)
    enc = tok.encode(items)
    assert enc.behavior_weights.shape == (len(cold), 2)  # one per fused level
    assert (enc.behavior_weights[cold] == 0).all() and (enc.path[cold] == "content_only").all()
    warm = ~cold
    n, w = items["popularity"][warm], enc.behavior_weights[warm, 0]
    buckets = [w[(n >= lo) & (n < hi)].mean() for lo, hi in ((1, 2), (2, 11), (11, 101), (101, np.inf))]
    assert all(a < b for a, b in zip(buckets, buckets[1:])), buckets
    # the prefix is content's alone: the same item without its behavior keeps its first 2 codes
    as_cold = {**items, "behavior_emb": [None] * len(cold)}
    cold_enc = tok.encode(as_cold)
    assert (cold_enc.sid[:, :2] == enc.sid[:, :2]).all()
    assert (cold_enc.sid[warm, 2:] != enc.sid[warm, 2:]).any()  # the fused levels read behavior
    assert [p["group"] for p in tok.sid_layout] == ["content", "content", "behavior", "behavior"]


def test_round_trip_and_batch_invariance(tmp_path):
    items, _ = catalog(content_says=0.5, n_items=1500)
    tok = EvidenceRQTokenizer(config()).fit(items)
    whole = tok.encode(items)
    tok.save_pretrained(str(tmp_path / "m"))
    back = BaseTokenizer.from_pretrained(str(tmp_path / "m"))
    assert type(back) is EvidenceRQTokenizer and back.kappa_ == tok.kappa_
    again = back.encode(items)
    np.testing.assert_array_equal(again.sid, whole.sid)
    np.testing.assert_array_equal(again.behavior_weights, whole.behavior_weights)
    rng = np.random.default_rng(1)
    for size in (1, 7, 64, 333):
        idx = rng.choice(len(whole), size=size, replace=False)
        part = tok.encode({k: [v[i] for i in idx] if isinstance(v, list) else v[idx] for k, v in items.items()})
        np.testing.assert_array_equal(part.sid, whole.sid[idx])


@pytest.mark.parametrize("bad, match", [
    (dict(content_levels=4), "content_levels must be"), (dict(behavior_weight=0.0), "behavior_weight"),
    (dict(ridge=0.0), "ridge"), (dict(kappa=-1.0), "kappa"), (dict(use_behavior=False), "use_behavior"),
])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        config(**bad).validate()


def test_a_fixed_kappa_and_a_catalog_without_counts():
    items, cold = catalog(content_says=0.5, n_items=1500)
    assert EvidenceRQTokenizer(config(kappa=3.0)).fit(items).kappa_ == 3.0
    no_counts = {k: v for k, v in items.items() if k != "popularity"}
    tok = EvidenceRQTokenizer(config()).fit(no_counts)
    w = tok.encode(no_counts).behavior_weights
    assert tok.kappa_ == 0.0 and (w[~cold] == 1).all() and (w[cold] == 0).all()
    # an item with behavior but no interaction (a table row never trained) gets weight 0
    zero = {**items, "popularity": np.where(np.arange(len(cold)) % 2 == 0, 0.0, items["popularity"])}
    tok = EvidenceRQTokenizer(config()).fit(zero)
    w = tok.encode(zero).behavior_weights[:, 0]
    assert tok.kappa_ > 0 and (w[::2] == 0).all() and (w[1::2][~cold[1::2]] > 0).all()
