"""Collision regulation in the fit (issue 8): pair weights by hand for every mode and
ablation, collision-aware batches, the repulsion term by hand, and its effect on a
synthetic catalog with near-duplicate items."""

import math

import numpy as np
import pytest
import torch

from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog
from sidserve.items import ItemArrays, coerce_items
from sidserve.tokenizers.adc_sid.model.adc_sid import ADCSIDModel
from sidserve.tokenizers.adc_sid.model.io import ModelOutput
from sidserve.tokenizers.adc_sid.regulation.overlaps import find_overlaps
from sidserve.tokenizers.adc_sid.regulation.pairs import (
    OverlapPlan,
    PairBatch,
    build_pair_set,
    content_signature,
    expected_region_size,
    pair_repulsion,
    plan_overlaps,
)
from sidserve.tokenizers.adc_sid.training import TrainState, to_model_input, train_step

CONTENT = dict(modality_dims={"text": 2}, behavior_dim=None, codebook_size=4, num_shared_experts=1,
               num_content_experts=1)


def items(vectors, behavior=None):
    v = np.asarray(vectors, np.float32)
    has_b = np.zeros(len(v), bool) if behavior is None else np.asarray([b is not None for b in behavior])
    b = None if behavior is None else np.asarray([x if x is not None else [0.0, 0.0] for x in behavior], np.float32)
    return ItemArrays({"text": v}, b, has_b)


def hand_plan(region, expected=2.0):
    # pairs (0, 1): near duplicates; (0, 2): orthogonal content; both share position 0 only
    return OverlapPlan(a=np.array([0, 0]), b=np.array([1, 2]), shared=np.array([[True, False], [True, False]]),
                       region=np.array(region), expected_region=expected)


CATALOG = items([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]])
R = 1 - 1 / (1 + math.exp(-(1.0 - 0.9) / 0.02))  # 1 - compat of identical content (threshold 0.9, T 0.02)


@pytest.mark.parametrize("mode, relax, pressure, progress, expected", [
    # adaptive: (1 - compat) * load * schedule; load = clamp(region / 2, 1, 4): 1 and 3
    ("adaptive", True, True, 0.0, [R, 3.0]),
    ("adaptive", True, True, 1.0, [0.1 * R, 0.3]),  # schedule decayed to its floor 0.1
    ("adaptive", False, True, 0.0, [1.0, 3.0]),  # stage 1 ablated: no relaxation
    ("adaptive", True, False, 1.0, [R, 1.0]),  # stage 2 ablated: no load, no schedule
    ("static", True, True, 0.5, [1.0, 1.0]),  # the baseline: the same weight for every overlap
])
def test_pair_weights_by_hand(mode, relax, pressure, progress, expected):
    c = TokenizerConfig(**CONTENT, collision_regulation=mode, collision_relaxation=relax,
                        collision_adaptive_pressure=pressure, collision_schedule_floor=0.1)
    ps = build_pair_set(hand_plan([2, 6]), CATALOG, np.arange(3), c, progress=progress, seed=0)
    np.testing.assert_allclose(ps.weight, expected, rtol=1e-3, atol=1e-6)
    assert ps.metrics["admissible_share"] == 0.5  # the near-duplicate pair is admissible


def test_pair_set_rows_follow_global_indices():
    c = TokenizerConfig(**CONTENT, collision_regulation="adaptive")
    # the items come in another order than their global indices 10, 11, 12
    plan = OverlapPlan(np.array([10]), np.array([12]), np.array([[True, True]]), np.array([2]), 2.0)
    ps = build_pair_set(plan, items([[0.0, 1.0], [5.0, 5.0], [1.0, 0.0]]), np.array([12, 11, 10]), c,
                        progress=0.0, seed=0)
    assert (ps.a[0], ps.b[0]) == (2, 0) and ps.weight[0] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="missing"):
        build_pair_set(plan, items([[0.0, 1.0]]), np.array([12]), c, progress=0.0, seed=0)


def test_collision_aware_batches_hold_both_sides_of_their_pairs():
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(40, 2)).astype(np.float32)
    c = TokenizerConfig(**CONTENT, collision_regulation="static")
    plan = OverlapPlan(np.arange(0, 20), np.arange(20, 40), np.ones((20, 2), bool), np.full(20, 2), 2.0)
    ps = build_pair_set(plan, items(vec), np.arange(40), c, progress=0.0, seed=3)
    per_rank = []
    for rank in (0, 1):
        seen = set()
        for step in range(4):  # 10 pairs per rank, 3 per batch: cycles through all of them
            pb = ps.batch(step, 3, rank=rank, world=2)
            x = pb.items.content["text"].numpy()
            assert x.shape == (6, 2) and pb.num_pairs == 3
            for i in range(3):  # row i and row 3 + i are the two items of one overlapping pair
                a = int(np.flatnonzero((vec == x[i]).all(1))[0])
                assert (x[3 + i] == vec[a + 20]).all()
                seen.add(a)
        per_rank.append(seen)
    assert len(per_rank[0]) == len(per_rank[1]) == 10 and not per_rank[0] & per_rank[1]


def test_pair_repulsion_by_hand():
    c = TokenizerConfig(modality_dims={"text": 2}, behavior_dim=2, num_behavior_experts=1,
                        collision_margin=0.5)  # layout: shared, text, behavior
    # batch: 1 ordinary row, then the pair (row 1 = a side, row 2 = b side); row 0 has no behavior
    x = to_model_input(items([[0, 0]] * 3, behavior=[None, [1, 0], [1, 0]]))
    s = 1 / math.sqrt(2)
    latents = [
        torch.tensor([[9.0, 9.0], [1.0, 0.0], [1.0, 0.0]]),  # shared: cos 1 -> hinge 0.5
        torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0]]),  # text: cos 0 -> 0 (not shared anyway)
        torch.tensor([[1.0, 0.0], [s, s]]),  # behavior rows 1, 2 only: cos 0.707 -> 0.207
    ]
    out = ModelOutput(codes=torch.zeros(3, 3, dtype=torch.long), behavior_weights=torch.zeros(3, 1),
                      latents=latents)
    pb = PairBatch(items=x, weight=torch.tensor([2.0]), shared=torch.tensor([[True, False, True]]))
    got = pair_repulsion(out, x, 1, pb, c)
    assert float(got) == pytest.approx(2.0 * (0.5 + (s - 0.5)) / 2, abs=1e-5)


def test_expected_region_size_by_hand():
    assert expected_region_size(10, 100, 3, 0) == 2.0  # sparse code space: a pair is the baseline
    # K=2, L=2, h=1: P(within 1) = 1/4 + 2 * (1/2)(1/2) = 3/4 -> 1 + 99 * 0.75
    assert expected_region_size(100, 2, 2, 1) == pytest.approx(1 + 99 * 0.75)


def test_plan_caps_pairs_and_skips_missing_behavior_codes():
    c = TokenizerConfig(modality_dims={"text": 2}, behavior_dim=2, num_behavior_experts=1, codebook_size=4,
                        collision_regulation="adaptive", collision_max_pairs=5)
    missing = c.missing_code
    codes = np.array([[1, 1, missing]] * 6 + [[2, 2, 3], [2, 2, 3], [0, 1, 2]])  # 15 + 1 overlapping pairs
    plan = plan_overlaps(codes, c, seed=0)
    assert len(plan.a) <= 5 and (plan.a < plan.b).all()
    assert (codes[plan.a] == codes[plan.b]).all()
    assert not plan.shared[:, 2][(codes[plan.a, 2] == missing)].any()  # no latent to repel there
    assert plan.metrics["catalog_collision_rate"] == pytest.approx(8 / 9)
    assert plan.metrics["catalog_collision_groups"] == 2 and plan.metrics["catalog_collision_group_max"] == 6
    assert plan.metrics["overlap_pairs_complete"] is False  # the group of 6 (15 pairs) was sampled


def test_sampled_large_groups_keep_every_member():
    codes = np.zeros((50, 3), int)  # one group of 50: 1225 pairs
    o = find_overlaps(codes, 0, max_group_pairs=100, seed=1)
    assert len(o.pairs) <= 100 and not o.complete
    assert set(np.unique(o.pairs)) == set(range(50))
    assert (o.region_size == 50).all()


def test_train_step_repulsion_separates_a_pair():
    c = TokenizerConfig(modality_dims={"text": 4}, behavior_dim=None, codebook_size=2, hidden_dim=8,
                        latent_dim=4, expert_hidden_dim=8, collision_regulation="static", collision_weight=50.0,
                        use_alignment_loss=False, restart_every=10_000)
    torch.manual_seed(0)
    model = ADCSIDModel(c)
    arr = items(np.array([[1.0, 0.2, 0.0, 0.0], [1.0, 0.0, 0.2, 0.0]]))
    plan = OverlapPlan(np.array([0]), np.array([1]), np.array([[True, True]]), np.array([2]), 2.0)
    ps = build_pair_set(plan, ItemArrays({"text": arr.content["text"]}, None, arr.has_behavior),
                        np.arange(2), c, progress=0.0, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = TrainState.create(0)

    def cos():
        model.eval()
        out = model(to_model_input(arr))
        return [float(torch.cosine_similarity(z[0], z[1], dim=0)) for z in out.latents]

    before = cos()
    for step in range(30):
        m = train_step(model, opt, to_model_input(arr), state, pairs=ps.batch(step, 1))
    after = cos()
    assert "collision" in m
    assert all(a < b for a, b in zip(after, before)) and max(after) < 0.6


def test_config_rejects_bad_regulation_settings():
    with pytest.raises(ValueError, match="collision_regulation must be"):
        TokenizerConfig(collision_regulation="on").validate()
    with pytest.raises(ValueError, match="collision_hamming must be an int in \\[0, 5\\]"):
        TokenizerConfig(collision_hamming=6).validate()
    with pytest.raises(ValueError, match="collision_pairs_per_batch"):
        TokenizerConfig(collision_pairs_per_batch=0).validate()


# ---- on the synthetic catalog --------------------------------------------------------------

SYN = dict(modality_dims={"text": 32, "image": 16}, behavior_dim=None, codebook_size=16, hidden_dim=32,
           latent_dim=16, expert_hidden_dim=32, epochs=8, batch_size=256, kmeans_init_samples=2000)
DUPS = 150


@pytest.fixture(scope="module")
def near_duplicate_catalog():
    # 64 content clusters and 4,096 SIDs for 3,000 items: crowded, so most SIDs collide
    return make_synthetic_catalog(3000, modality_dims=SYN["modality_dims"], behavior_dim=None, n_clusters=64,
                                  near_duplicate_pairs=DUPS, seed=0)


def collisions_by_kind(tok, table):
    sid = tok.encode(table).sid
    sig = content_signature(coerce_items(table, tok.config))
    pairs = find_overlaps(sid, 0).pairs
    cos = (sig[pairs[:, 0]] * sig[pairs[:, 1]]).sum(1)
    incompatible = int((cos < tok.config.collision_compat_threshold).sum())
    dup = np.arange(DUPS)
    kept_together = float((sid[2 * dup] == sid[2 * dup + 1]).all(1).mean())
    return incompatible, kept_together


@pytest.mark.timeout(300)
def test_regulation_separates_incompatible_items_and_keeps_near_duplicates(near_duplicate_catalog):
    table = near_duplicate_catalog
    results = {}
    for mode in ("off", "adaptive"):
        # 5: the repulsion beside eq. 14's summed (not per-element) reconstruction loss
        cfg = TokenizerConfig(**SYN, collision_regulation=mode, collision_weight=5.0)
        tok = SemanticIdTokenizer(cfg).fit(table)
        results[mode] = collisions_by_kind(tok, table)
        if mode == "adaptive":
            h = tok.history_
            assert all("catalog_collision_rate" in e and "admissible_share" in e for e in h)
            assert h[-1]["catalog_collision_rate"] < h[0]["catalog_collision_rate"]
            assert h[0]["collision_schedule"] == 1.0 > h[-1]["collision_schedule"]
    (bad_off, dup_off), (bad_reg, dup_reg) = results["off"], results["adaptive"]
    assert bad_reg < 0.6 * bad_off  # far fewer incompatible items share a SID
    assert dup_reg >= dup_off - 0.1 and dup_reg > 0.6  # near duplicates still share theirs


def test_distributed_refresh_plans_the_same_pairs_as_the_in_process_fit():
    """The Ray Train job's refresh (SIDs gathered by item_id from shuffled shards) and the
    in-process fit's refresh pick the same pairs with the same weights."""
    from sidserve.jobs.catalog import clean_batch
    from sidserve.jobs.train.worker import regulation_refresh
    from sidserve.tokenizers.adc_sid.regulation.pairs import refresh_pair_set
    from sidserve.tokenizers.adc_sid.training import (
        Sync,
        assign_codes,
        compute_catalog_stats,
        init_codebooks,
    )

    c = TokenizerConfig(modality_dims={"text": 16, "image": 8}, behavior_dim=8, num_behavior_experts=1,
                        codebook_size=8, hidden_dim=16, latent_dim=8, expert_hidden_dim=16,
                        collision_regulation="adaptive", collision_hamming=1, collision_max_pairs=500)
    table = make_synthetic_catalog(400, modality_dims=c.modality_dims, behavior_dim=8, seed=1)
    arrays = coerce_items(table, c)
    torch.manual_seed(0)
    model = ADCSIDModel(c)
    stats = compute_catalog_stats(arrays, c)
    model.set_catalog_stats(stats["n_min"], stats["n_max"])
    init_codebooks(model, to_model_input(arrays))
    clean = clean_batch(table, c)

    class ShuffledShard:  # what ray.train.get_dataset_shard yields: numpy batches, any order
        def iter_batches(self, batch_size, batch_format):
            perm = np.random.default_rng(7).permutation(400)
            for i in range(0, 400, 96):
                yield {k: v[perm[i:i + 96]] for k, v in clean.items()}

    dist_set, dist_metrics = regulation_refresh(model, ShuffledShard(), c, Sync(), "cpu", epoch=0)
    local_set, local_metrics = refresh_pair_set(assign_codes(model, arrays), arrays, c, epoch=0)

    def pairs(ps):
        ids = ps.items.item_ids
        return sorted((str(ids[a]), str(ids[b]), round(float(w), 5)) for a, b, w in zip(ps.a, ps.b, ps.weight))

    assert len(local_set) == 500  # capped: more overlaps exist
    assert pairs(dist_set) == pairs(local_set)
    assert dist_metrics["catalog_collision_rate_h1"] == local_metrics["catalog_collision_rate_h1"]
