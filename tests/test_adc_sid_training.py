"""Issue 17: the behavioral gates, the richness normalisation and the codebooks stay
healthy through a fit on a synthetic catalog; every new field survives config.json."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from sidserve import SemanticIdTokenizer, TokenizerConfig
from sidserve.items import coerce_items
from sidserve.synthetic import make_synthetic_catalog
from sidserve.tokenizers.adc_sid.model.controller import quantile_normalized
from sidserve.tokenizers.adc_sid.training import to_model_input

DIMS = {"text": 32, "image": 16}
FIT = dict(modality_dims=DIMS, behavior_dim=16, codebook_size=16, hidden_dim=32, latent_dim=16,
           expert_hidden_dim=32, num_behavior_experts=3, epochs=12, batch_size=128, kmeans_init_samples=3000)


@pytest.fixture(scope="module")
def catalog():
    return make_synthetic_catalog(3000, modality_dims=DIMS, behavior_dim=16, n_clusters=64, cold_share=0.1, seed=3)


@pytest.fixture(scope="module")
def tok(catalog):
    return SemanticIdTokenizer(TokenizerConfig(**FIT)).fit(catalog)


def test_gate_sparsity_converges_to_its_target_and_no_expert_dies(tok, catalog):
    last = tok.history_[-1]
    # the realised share of closed gates (items with behavior, last epoch) tracks the
    # mean of the per-item targets theta * (1 - N_norm)
    assert abs(last["gate_sparsity"] - last["sparsity_target"]) <= 0.05
    assert last["sparsity_target"] > 0.1  # a target that is not trivially met
    # every behavioral expert is open for some items (a dead expert: 0 for every item)
    enc = tok.encode(catalog)
    warm = np.asarray(catalog.column("behavior_emb").is_valid())
    w = enc.behavior_weights[warm]
    assert (w > 0).mean(axis=0).min() > 0.05
    assert all(last[f"gate_mean_expert_{i}"] > 0 for i in range(3))


def test_per_epoch_statistics_are_recorded(tok):
    for record in tok.history_:
        for key in ("gate_sparsity", "sparsity_target", "align_w_above_half", "gate_mean_expert_0",
                    "utilisation_per_position", "entropy_per_position"):
            assert key in record, key
        assert len(record["utilisation_per_position"]) == tok.config.sid_length
    assert tok.stats_["history"] == tok.history_  # stats.json carries them


def test_codebooks_stay_in_use(tok, catalog):
    # 3,000 items, 16 codes per position: every position should use (nearly) every code
    q = tok.evaluate(catalog)
    assert q["utilisation_mean"] >= 0.95
    assert min(tok.history_[-1]["utilisation_per_position"]) >= 0.9


def test_quantile_normalisation_maps_the_catalog_uniformly(tok, catalog):
    arrays = coerce_items(catalog, tok.config)
    e_b = torch.from_numpy(arrays.behavior[arrays.has_behavior])
    u = tok.model_.richness(e_b).numpy()
    # the fit read the quantiles from its k-means sample = the whole (3,000-item) catalog:
    # N_norm is each item's mid-rank in the catalog (the synthetic norms have many ties)
    norms = np.linalg.norm(arrays.behavior[arrays.has_behavior].astype(np.float64), axis=1)
    tie = np.abs(norms[:, None] - norms[None, :]) <= 1e-6 * norms[:, None]  # float32 noise
    less = ((norms[:, None] > norms[None, :]) & ~tie).sum(1)
    equal = tie.sum(1)
    mid_rank = (less + (equal - 1) / 2) / (len(norms) - 1)
    np.testing.assert_allclose(u, mid_rank, atol=0.01)
    assert (equal > 1).mean() > 0.5  # the ties are really there
    q = tok.model_.richness_quantiles
    assert q.shape == (tok.config.richness_quantile_points,) and bool((q[1:] >= q[:-1]).all())
    # a new item beyond the catalog's range is clipped: above it -> 1; below it -> the
    # value of the catalog's smallest norm (here the mid-rank of the tied tail items)
    out = quantile_normalized(torch.stack([q[0] / 2, q[0], q[-1] * 2]), q).tolist()
    assert out[0] == out[1] < 0.5 and out[2] == 1.0


def test_a_new_item_gets_the_same_richness_and_weights_after_save_and_load(tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "m"))
    loaded = SemanticIdTokenizer.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(loaded.model_.richness_quantiles, tok.model_.richness_quantiles)
    new = make_synthetic_catalog(50, modality_dims=DIMS, behavior_dim=16, cold_share=0.0, seed=99)
    a, b = tok.encode(new), loaded.encode(new)
    np.testing.assert_array_equal(a.sid, b.sid)
    np.testing.assert_array_equal(a.behavior_weights, b.behavior_weights)
    arrays = coerce_items(new, tok.config)
    x = to_model_input(arrays)
    assert torch.equal(tok.model_.richness(x.behavior), loaded.model_.richness(x.behavior))


NEW_FIELDS = dict(recon_reduction="mean", recon_balance=False, richness_normalization="minmax",
                  richness_quantile_points=11, gate_straight_through=False, sparsity_lambda_update="sign",
                  richness_signal="popularity", sparsity_control="lambda", sparsity_threshold_gain=1.0,
                  behavior_weight_scale="unit_mean", behavior_quantization="residual",
                  behavior_shrinkage=2.0, behavior_prior_ridge=0.5)


def test_new_fields_round_trip_through_config_json(catalog, tmp_path):
    cfg = TokenizerConfig(**{**FIT, "epochs": 1}, **NEW_FIELDS)
    tok = SemanticIdTokenizer(cfg).fit(catalog.slice(0, 600))
    tok.save_pretrained(str(tmp_path / "m"))
    with open(tmp_path / "m" / "config.json") as f:
        saved = json.load(f)
    text = json.dumps(saved)
    for k, v in NEW_FIELDS.items():
        assert f'"{k}": {json.dumps(v)}' in text, k
    loaded = SemanticIdTokenizer.from_pretrained(str(tmp_path / "m"))
    for k, v in NEW_FIELDS.items():
        assert getattr(loaded.config, k) == v, k
    assert loaded.model_.richness_quantiles.shape == (11,)
    part = catalog.slice(0, 200)  # the learned state too (behavior_shrinkage's W among it)
    np.testing.assert_array_equal(loaded.encode(part).sid, tok.encode(part).sid)


def test_behavior_shrinkage_needs_the_popularity_it_reads():
    with pytest.raises(ValueError, match="behavior_shrinkage"):
        TokenizerConfig(behavior_shrinkage=3.0, richness_signal="norm").validate()


@pytest.mark.parametrize("field,value", [("recon_reduction", "max"), ("richness_normalization", "rank"),
                                         ("richness_quantile_points", 1), ("sparsity_lambda_update", "pid"),
                                         ("richness_signal", "clicks"), ("sparsity_control", "pid"),
                                         ("sparsity_threshold_gain", 0.0), ("behavior_quantization", "tree"), ("behavior_quantization", "residual_table"),
                                         ("behavior_shrinkage", -1.0), ("behavior_prior_ridge", 0.0)])
def test_bad_new_fields_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        TokenizerConfig(**{field: value}).validate()


def test_minmax_normalisation_is_eq16(catalog):
    cfg = TokenizerConfig(**{**FIT, "epochs": 1}, richness_normalization="minmax")
    tok = SemanticIdTokenizer(cfg).fit(catalog.slice(0, 600))
    e_b = torch.tensor([[tok.catalog_stats_["n_min"], 0.0], [tok.catalog_stats_["n_max"], 0.0]]).float()
    e_b = torch.nn.functional.pad(e_b, (0, 14))
    assert tok.model_.richness(e_b).tolist() == pytest.approx([0.0, 1.0], abs=1e-5)


def test_popularity_richness_signal(catalog):
    cfg = TokenizerConfig(**{**FIT, "epochs": 2}, richness_signal="popularity")
    tok = SemanticIdTokenizer(cfg).fit(catalog)
    arrays = coerce_items(catalog, cfg)
    x = to_model_input(arrays)
    warm = x.has_behavior
    u = tok.model_.richness(x.behavior[warm], x.popularity[warm]).numpy()
    pop = arrays.popularity[arrays.has_behavior]
    # N_norm is monotone in popularity (ties share a value) and spans the catalog's ranks
    order = np.argsort(pop, kind="stable")
    assert np.all(np.diff(u[order]) >= -1e-6)
    assert u.min() < 0.3 and u.max() == pytest.approx(1.0)
    # the same items without the column cannot be encoded: the error names it
    with pytest.raises(ValueError, match="popularity"):
        tok.encode(catalog.drop_columns(["popularity"]))
    bad = catalog.set_column(catalog.schema.get_field_index("popularity"), "popularity",
                             pa.array(np.full(catalog.num_rows, -1.0)))
    with pytest.raises(ValueError, match="popularity: negative"):
        tok.encode(bad)


def test_unit_mean_weights_rescale_reported_weights_only(catalog):
    """Same training, same codes; the reported weights are R divided by the catalog's mean
    R per expert (mean 1 over items with behavior), so the ratios between items stay."""
    small = catalog.slice(0, 1200)
    raw = SemanticIdTokenizer(TokenizerConfig(**{**FIT, "epochs": 2})).fit(small)
    unit = SemanticIdTokenizer(TokenizerConfig(**{**FIT, "epochs": 2}, behavior_weight_scale="unit_mean")).fit(small)
    a, b = raw.encode(small), unit.encode(small)
    np.testing.assert_array_equal(a.sid, b.sid)
    warm = np.asarray(small.column("behavior_emb").is_valid())
    mean_raw = a.behavior_weights[warm].mean(0)
    assert (mean_raw > 0).all()
    np.testing.assert_allclose(b.behavior_weights[warm].mean(0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(b.behavior_weights, a.behavior_weights / mean_raw, rtol=1e-5, atol=1e-7)
    assert (b.behavior_weights[~warm] == 0).all()


def test_frozen_codebooks_anchor_a_warm_refit(tok, catalog):
    """Issue 20: train_codebooks=False on a warm re-fit keeps the previous model's codewords
    bit for bit (no gradient step, no weight decay, no dead-code restart) while the encoders
    re-fit; the default re-fit moves them."""
    def books(t):
        return [b.embed.detach().clone() for b in t.model_.codebooks]

    old = books(tok)
    frozen = SemanticIdTokenizer(tok.config.replace(epochs=1, train_codebooks=False)).fit(catalog, init=tok)
    trained = SemanticIdTokenizer(tok.config.replace(epochs=1)).fit(catalog, init=tok)
    assert all(torch.equal(a, b) for a, b in zip(old, books(frozen)))
    assert not all(torch.equal(a, b) for a, b in zip(old, books(trained)))
    encoders = [n for n, _ in tok.model_.named_parameters() if "experts" in n]
    assert encoders and any(not torch.equal(dict(tok.model_.named_parameters())[n],
                                            dict(frozen.model_.named_parameters())[n]) for n in encoders)
    assert frozen.config.train_codebooks is False  # said in the artifact's config
    # anything but epochs / batch size / lr / train_codebooks is architecture: refused
    with pytest.raises(ValueError, match="train_codebooks"):
        SemanticIdTokenizer(tok.config.replace(codebook_size=8)).fit(catalog, init=tok)


def test_cold_consistency_keeps_the_shared_code_of_thin_items(tok, catalog):
    """Issue 20.6: with the consistency term, a warm item's shared code agrees with its
    content-only (cold path) code far more often than without, most of all for thin items."""
    def agreement(t):
        return t.stats_["fit_metrics"]["cold_path_agreement"]

    plain = SemanticIdTokenizer(tok.config.replace(cold_consistency_weight=0.0)).fit(catalog)
    consistent = SemanticIdTokenizer(tok.config.replace(cold_consistency_weight=10.0)).fit(catalog)
    # without it about 3 in 10 warm items change shared code when their behavior is withheld
    # on this catalog (behavior there is content plus noise); with it fewer than 1 in 10
    assert 1 - agreement(consistent) < 0.1 < 1 - agreement(plain)
    assert 1 - agreement(consistent) < (1 - agreement(plain)) / 3
    # the default (0.3) sits between the paper's model and the strong pull
    assert agreement(plain) < agreement(tok) < agreement(consistent) + 1e-9
    assert consistent.history_[-1]["consistency"] < consistent.history_[0]["consistency"]
    with pytest.raises(ValueError, match="cold_consistency_weight"):
        TokenizerConfig(**FIT, cold_consistency_weight=-1.0).validate()
    for below in (0.0, 1.5):
        with pytest.raises(ValueError, match="cold_consistency_below"):
            TokenizerConfig(**FIT, cold_consistency_below=below).validate()
