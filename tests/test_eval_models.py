"""The evaluation's downstream models at published strength (issue 16): the full-softmax
CE loss, tied / untied item tables, SID-SASRec's item vectors, early stopping, the paired
bootstrap, the multi-token retrieval history and the adaptive ablation seeds."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sidserve.eval.chunked_ce import chunked_cross_entropy
from sidserve.eval.config import EvalConfig
from sidserve.eval.data import Dataset
from sidserve.eval.early_stopping import EarlyStopping
from sidserve.eval.metrics import gauc, mean_std, paired_bootstrap, per_user_auc, recall_ndcg
from sidserve.eval.pipeline import Evaluation
from sidserve.eval.ranking import RankingConfig, sample_negatives, train_ranker
from sidserve.eval.retrieval import RetrievalConfig, SIDSeq2Seq
from sidserve.eval.sasrec import (
    IDItems,
    SASRec,
    SASRecConfig,
    SIDItems,
    ce_loss,
    evaluate_sasrec,
    pad_left,
    rank_sasrec,
    train_sasrec,
)
from sidserve.eval.sid_table import PrefixTrie, SIDTable


def _successor_data(n=40, users=400, seed=0):
    """Item i is always followed by item (i mod n) + 1."""
    rng = np.random.default_rng(seed)
    seqs = [(s - 1 + np.arange(k)) % n + 1 for s, k in zip(rng.integers(1, n + 1, users), rng.integers(6, 12, users))]
    return Dataset(seqs, [{"item_id": i + 1} for i in range(n)])


# ---- CE loss ---------------------------------------------------------------------------------


def test_ce_loss_matches_a_hand_computed_value():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # row 0 is padding: its huge score must not enter the softmax
    table = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([1, 3])
    # user 0: logits (1, 0, 1), target item 1 -> log(2e + 1) - 1
    # user 1: logits (0, 2, 2), target item 3 -> log(1 + 2e^2) - 2
    expected = ((math.log(2 * math.e + 1) - 1) + (math.log(1 + 2 * math.e ** 2) - 2)) / 2
    assert ce_loss(h, table, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tile", [1, 3, 7, 64])
def test_chunked_ce_equals_the_dense_loss_and_gradients(tile):
    # 10 positions x 23 items: tiles that divide neither, one that covers both, and 1 x 1
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 22, 5, 5, 7, 1, 0, 13, 22, 9])  # repeated targets: index_add_ sums
    dense = F.cross_entropy(h @ w.T, target)
    dh, dw = torch.autograd.grad(dense, (h, w))
    ours = chunked_cross_entropy(h, w, target, tile=tile)
    gh, gw = torch.autograd.grad(ours * 1.0, (h, w))
    assert ours.item() == pytest.approx(dense.item(), rel=1e-12)
    torch.testing.assert_close(gh, dh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, dw, rtol=1e-10, atol=1e-12)
    # an upstream gradient other than 1 scales both
    gh2, _ = torch.autograd.grad(3.0 * chunked_cross_entropy(h, w, target, tile=tile), (h, w))
    torch.testing.assert_close(gh2, 3 * dh, rtol=1e-10, atol=1e-12)


def test_chunked_ce_names_a_wrong_shape():
    with pytest.raises(ValueError, match="same width"):
        chunked_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be"):
        chunked_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("loss,tied", [("ce", True), ("ce", False), ("bce", True)])
def test_sasrec_learns_successors_with_either_loss_and_table(loss, tied):
    d = _successor_data()
    c = SASRecConfig(max_epochs=25, patience=25, dropout=0.1, hidden_dim=32, ff_dim=64, batch_size=64, lr=5e-3,
                     loss=loss, tied=tied, max_len=20)
    model, hist = train_sasrec(d.train_sequences(), 40, c, valid=d.targets("valid"))
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert evaluate_sasrec(model, *d.targets("test"), ks=(1,))["recall@1"] > 0.8
    es = model.early_stopping
    assert es["best_value"] == max(h["valid_ndcg@10"] for h in hist)
    assert es["best_epoch"] == int(np.argmax([h["valid_ndcg@10"] for h in hist]))
    same = np.array_equal(model.item_vectors("input"), model.item_vectors("output"))
    assert same == tied


def test_untied_model_scores_with_its_output_table():
    torch.manual_seed(0)
    c = SASRecConfig(hidden_dim=8, ff_dim=16, max_len=5, tied=False)
    model = SASRec(IDItems(10, 8, tied=False), c).eval()
    hist = [np.array([1, 2])]
    with torch.no_grad():
        state = model(torch.from_numpy(pad_left(hist, 5)))[0, -1]
        model.items.out.weight.zero_()
        model.items.out.weight[7] = state * 100  # only the output table says "item 7"
    assert rank_sasrec(model, hist, 1).tolist() == [[7]]
    assert not np.allclose(model.item_vectors("input")[6], model.item_vectors("output")[6])


@pytest.mark.parametrize("heads", [1, 2])
def test_sasrec_states_do_not_depend_on_the_padding_before_a_sequence(heads):
    """Training trims each batch to its longest sequence, scoring pads to max_len: the same
    history must give the same states either way. Biases are drawn non-zero, as after
    training: padding then leaves a pre-norm block as LayerNorm's bias, which an unmasked
    key would let real items read."""
    torch.manual_seed(0)
    c = SASRecConfig(hidden_dim=8, ff_dim=16, max_len=20, num_heads=heads)
    model = SASRec(IDItems(10, 8, tied=True), c).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 1.0)
    hist = [np.array([3, 1, 4, 1])]
    with torch.no_grad():
        trimmed = model(torch.from_numpy(pad_left(hist, 4)))  # (1, 4, d)
        full = model(torch.from_numpy(pad_left(hist, 20)))  # (1, 20, d): 16 padding positions first
        mixed = model(torch.from_numpy(pad_left(hist + [np.arange(1, 10)], 12)))  # batched with a longer one
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full[0, -4:], trimmed[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[0, -4:], trimmed[0], rtol=1e-5, atol=1e-5)


# ---- SID-SASRec ------------------------------------------------------------------------------


def test_sid_items_are_the_weighted_sum_of_their_code_embeddings():
    sid = np.array([[0, 1, 2], [0, 1, 2], [3, 0, 1]])  # items 1 and 2 share a SID
    w = np.array([[1.0, 0.5, 0.25], [1.0, 0.5, 0.25], [1.0, 0.0, 2.0]], np.float32)
    table = SIDTable.build(sid, w)
    items = SIDItems(table, d=4)
    E, off = items.emb.weight.detach(), table.offsets
    vec = items.item_vectors().detach()
    assert torch.equal(vec[0], torch.zeros(4))  # padding
    for i in range(1, 4):
        expected = sum(w[i - 1, t] * E[off[t] + sid[i - 1, t]] for t in range(3))
        assert torch.allclose(vec[i], expected, atol=1e-6)
    assert torch.equal(vec[1], vec[2])  # same SID, same vector without the dedup code
    unweighted = SIDItems(table, d=4, use_weights=False)
    unweighted.emb.weight.data.copy_(E)
    assert torch.allclose(unweighted.item_vectors()[3], E[off[0] + 3] + E[off[1] + 0] + E[off[2] + 1])
    with_dedup = SIDItems(table, d=4, use_dedup=True)
    v = with_dedup.item_vectors().detach()
    Ed = with_dedup.emb.weight.detach()
    assert not torch.equal(v[1], v[2])  # the dedup suffix 0 / 1 separates them
    assert torch.allclose(v[2] - v[1], Ed[table.offsets[3] + 1] - Ed[table.offsets[3] + 0], atol=1e-6)
    assert torch.equal(items.item_vectors(torch.tensor([2, 3])), vec[[2, 3]])


def test_sid_sasrec_learns_successors_over_the_whole_catalog():
    d = _successor_data()
    sid = np.stack([np.arange(40) % 6, np.arange(40) // 6], 1)  # unique SIDs
    table = SIDTable.build(sid)
    c = SASRecConfig(max_epochs=30, patience=30, dropout=0.1, hidden_dim=32, ff_dim=64, batch_size=64, lr=5e-3,
                     max_len=20)
    model, hist = train_sasrec(d.train_sequences(), 40, c, valid=d.targets("valid"), items=SIDItems(table, 32))
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert evaluate_sasrec(model, *d.targets("test"), ks=(1,))["recall@1"] > 0.8


# ---- early stopping --------------------------------------------------------------------------


@pytest.mark.parametrize("mode,curve,best", [
    ("max", [0.1, 0.3, 0.25, 0.35, 0.34, 0.33, 0.2, 0.9], 3),
    ("min", [3.0, 2.0, 2.5, 1.5, float("nan"), 1.6, 1.7, 0.1], 3),
])
def test_early_stopping_restores_the_best_epoch_of_a_scripted_curve(mode, curve, best):
    model = nn.Linear(1, 1, bias=False)
    stopper = EarlyStopping(patience=3, mode=mode)
    stopped_at = None
    for epoch, value in enumerate(curve):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights say which epoch they are from
        if stopper.update(epoch, value, model):
            stopped_at = epoch
            break
    assert stopped_at == best + 3  # three evaluations without improvement; the 0.9 / 0.1 is never seen
    assert stopper.best_epoch == best and stopper.best_value == curve[best]
    stopper.restore(model)
    assert model.weight.item() == best


def test_early_stopping_runs_at_least_min_epochs():
    # the curve above without its floor stops at epoch 6 (best 3); with 8 epochs at least it
    # sees the 0.9 of epoch 7, and then stops 3 evaluations after it
    curve = [0.1, 0.3, 0.25, 0.35, 0.34, 0.33, 0.2, 0.9, 0.5, 0.5, 0.5, 0.95]

    def stop(**kw):
        stopper = EarlyStopping(patience=3, **kw)
        model = nn.Linear(1, 1, bias=False)
        return next(e for e, v in enumerate(curve) if stopper.update(e, v, model)), stopper.best_epoch
    assert stop() == (6, 3)
    assert stop(min_epochs=8) == (10, 7)
    assert stop(min_epochs=5) == (6, 3)  # a floor the run passed anyway changes nothing


def test_early_stopping_rejects_bad_settings():
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)
    with pytest.raises(ValueError, match="min_epochs"):
        EarlyStopping(2, min_epochs=-1)
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(2, mode="up")


# ---- significance ----------------------------------------------------------------------------


def test_paired_bootstrap_known_cases():
    rng = np.random.default_rng(0)
    b = rng.uniform(size=500)
    shifted = paired_bootstrap(b + 0.1, b, num_samples=1000)
    assert shifted["diff"] == pytest.approx(0.1)
    assert shifted["ci_low"] == pytest.approx(0.1) and shifted["ci_high"] == pytest.approx(0.1)
    assert shifted["p_value"] == pytest.approx(1 / 1000)  # every resample is on the same side
    same = paired_bootstrap(b, b, num_samples=1000)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    # two users with differences 0 and 1: a resampled mean is 0 with probability 1/4,
    # so the two-sided p is 2 * 1/4 = 0.5 and the interval spans [0, 1]
    two = paired_bootstrap(np.array([0.0, 1.0]), np.zeros(2), num_samples=20000, seed=1)
    assert two["diff"] == 0.5 and two["p_value"] == pytest.approx(0.5, abs=0.03)
    assert two["ci_low"] == 0.0 and two["ci_high"] == 1.0
    # paired: a large per-user noise shared by both systems does not hide a small shift
    noise = rng.normal(0, 10, size=2000)
    paired = paired_bootstrap(noise + 0.01 + rng.normal(0, 0.01, 2000), noise, num_samples=1000)
    assert paired["ci_low"] > 0 and paired["p_value"] < 0.01
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def test_a_single_seed_has_no_spread_rather_than_a_zero_one():
    from sidserve.eval.report import _fmt, _std

    assert mean_std([0.1, 0.2, 0.3]) == {"mean": pytest.approx(0.2), "std": pytest.approx(0.1), "n": 3}
    one = mean_std([0.25])
    assert one == {"mean": 0.25, "std": None, "n": 1}
    # the report prints the mean alone and "n/a" for its spread, never "± 0.0000"
    assert _fmt(one) == "0.2500" and _std(one["std"]) == "n/a"
    assert _fmt(mean_std([0.1, 0.3])) == f"0.2000 ± {np.std([0.1, 0.3], ddof=1):.4f}"


def test_per_user_auc_is_the_gauc_of_one_positive_per_user():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 11))
    scores[::7, 3] = scores[::7, 0]  # ties count one half
    per_user = per_user_auc(scores)
    labels = np.zeros_like(scores, bool)
    labels[:, 0] = True
    groups = np.repeat(np.arange(50), 11)
    assert per_user.mean() == pytest.approx(gauc(groups, labels.ravel(), scores.ravel()))
    assert per_user_auc(np.array([[1.0, 0.0, 2.0, 1.0]])).tolist() == [(1 + 0.5) / 3]


# ---- ranking and retrieval -------------------------------------------------------------------


def test_ranker_keeps_its_best_validation_epoch():
    rng = np.random.default_rng(0)
    n = 60
    table = SIDTable.build(np.stack([np.arange(n) % 10, np.arange(n) // 10], 1))
    d = _successor_data(n=n, users=300)
    vh, vt = d.targets("valid")
    neg = sample_negatives(rng, [s[:-1] for s in d.sequences], n, 20)
    model, hist = train_ranker(table, d.train_sequences(), RankingConfig(max_epochs=6, patience=6, d_model=16,
                                                                          mlp_dim=16, batch_size=128, lr=1e-2),
                               valid=(vh, vt, neg))
    assert len(hist) == 6
    assert model.early_stopping["best_epoch"] == int(np.argmax([h["valid_gauc"] for h in hist]))


def test_codes_history_gives_every_code_its_own_encoder_token():
    rng = np.random.default_rng(0)
    table = SIDTable.build(rng.integers(0, 5, size=(50, 3)))
    hist = torch.from_numpy(pad_left([np.array([3, 4, 5]), np.array([7])], 6))
    item = SIDSeq2Seq(table, RetrievalConfig(d_model=16, ff_dim=16, num_heads=2)).eval()
    codes = SIDSeq2Seq(table, RetrievalConfig(d_model=16, ff_dim=16, num_heads=2, history_tokens="codes")).eval()
    mem, mask = item.encode(hist)
    assert mem.shape == (2, 6, 16) and mask[:, 0, 0].sum(1).tolist() == [3, 1]
    mem, mask = codes.encode(hist)
    T = table.length  # 3 codes + dedup suffix
    assert mem.shape == (2, 6 * T, 16) and mask[:, 0, 0].sum(1).tolist() == [3 * T, T]
    out = codes.generate(hist, PrefixTrie.build(table), beam_size=10)
    assert out.shape == (2, 10) and (out >= 1).all()
    with pytest.raises(ValueError, match="history_tokens"):
        RetrievalConfig(history_tokens="words").validate()


# ---- pipeline settings -----------------------------------------------------------------------


def test_behavior_embedding_needs_its_sasrec_variant(tmp_path):
    with pytest.raises(ValueError, match="needs the 'untied' SASRec variant"):
        EvalConfig(data="x", output="y", sasrec_variants=["tied"], behavior_embedding="untied-input").validate()
    with pytest.raises(ValueError, match="behavior_embedding"):
        EvalConfig(data="x", output="y", behavior_embedding="popularity").validate()


def test_ablations_get_every_seed_only_when_validation_cannot_separate_them(tmp_path):
    data = _successor_data(users=20)
    data.save(str(tmp_path / "data"))
    ev = Evaluation(EvalConfig(data=str(tmp_path / "data"), output=str(tmp_path / "out"), seeds=[0, 1, 2],
                               tokenizers=["adc_sid", "adc_sid_no_gate", "adc_sid_no_align"]))

    def write(name, task, seed, value):
        """A stage whose kept epoch (1) scored ``value`` on validation; its test figure and
        its other epochs point the other way, so a decision that read them would differ."""
        key = {"sid_sasrec": "ndcg@10", "retrieval": "recall@10", "ranking": "gauc"}[task]
        p = ev.stage_path(name, task, seed)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        history = [{"epoch": e, f"valid_{key}": value if e == 1 else 0.5} for e in range(3)]
        json.dump({"all": {key: 0.5}, "history": history, "early_stopping": {"best_epoch": 1}}, open(p, "w"))

    for seed, v in zip([0, 1, 2], [0.10, 0.11, 0.12]):  # ADC-SID: mean 0.11, std 0.01 on every task
        for task in ("sid_sasrec", "retrieval", "ranking"):
            write("adc_sid", task, seed, v)
    for task in ("sid_sasrec", "retrieval", "ranking"):
        write("adc_sid_no_gate", task, 0, 0.20)  # 9 spreads away everywhere: one seed is enough
        write("adc_sid_no_align", task, 0, 0.20)
    write("adc_sid_no_align", "retrieval", 0, 0.125)  # within 2 spreads on one metric: all seeds
    assert ev.seeds_for("adc_sid_no_gate") == [0]
    assert ev.seeds_for("adc_sid_no_align") == [0, 1, 2]
    assert ev.seeds_for("adc_sid") == [0, 1, 2]


def test_a_cache_written_by_an_older_harness_is_refused(tmp_path):
    """Settings are not the only thing a cache depends on: a code change that moves figures
    bumps HARNESS_VERSION, and stages cached before it are not mixed with new ones."""
    data = _successor_data(users=20)
    data.save(str(tmp_path / "data"))
    cfg = EvalConfig(data=str(tmp_path / "data"), output=str(tmp_path / "out"))
    Evaluation(cfg)  # writes run_config.json
    p = tmp_path / "out" / "run_config.json"
    key = json.loads(p.read_text())
    Evaluation(cfg)  # the same harness resumes
    del key["harness"]  # a cache from before the version existed
    p.write_text(json.dumps(key))
    with pytest.raises(ValueError, match=r"different settings \(harness\)"):
        Evaluation(cfg)


def test_recall_ndcg_ranks_the_catalog_in_sasrec_order():
    """rank_sasrec never returns padding or a history item."""
    torch.manual_seed(0)
    model = SASRec(IDItems(12, 8), SASRecConfig(hidden_dim=8, ff_dim=8, max_len=5)).eval()
    hist = [np.array([1, 2, 3]), np.array([4])]
    ranked = rank_sasrec(model, hist, 9)
    assert not np.isin(ranked[0], [0, 1, 2, 3]).any() and not np.isin(ranked[1], [0, 4]).any()
    assert recall_ndcg(ranked, np.array([ranked[0, 0], 99]), (1,))["recall@1"].tolist() == [1, 0]


# ---- selection on validation -----------------------------------------------------------------


def test_select_overrides_are_typed_and_unknown_keys_named():
    from sidserve.eval.tuning import parse_overrides
    assert parse_overrides(["lr=0.002", "tied=false", "max_len=30"], SASRecConfig) == \
        {"lr": 0.002, "tied": False, "max_len": 30}
    with pytest.raises(ValueError, match="unknown SASRecConfig field 'epochs'"):
        parse_overrides(["epochs=3"], SASRecConfig)
    with pytest.raises(ValueError, match="max_len must be a int"):
        parse_overrides(["max_len=ten"], SASRecConfig)
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"], SASRecConfig)


def test_select_logs_validation_results(tmp_path):
    from sidserve.eval.tuning import tune
    _successor_data(users=100).save(str(tmp_path / "d"))
    log = tmp_path / "sel.jsonl"
    r = tune(str(tmp_path / "d"), "sasrec", {"max_epochs": 2, "hidden_dim": 16, "ff_dim": 16, "max_len": 10},
               log_path=str(log))
    assert set(r["valid"]) == {"recall@10", "ndcg@10"} and r["early_stopping"]["epochs_run"] == 2
    assert not any(k.startswith("test") for k in r)
    logged = json.loads(log.read_text().splitlines()[-1])
    assert logged["overrides"]["hidden_dim"] == 16 and logged["valid"] == r["valid"]


def test_select_breaks_validation_down_by_popularity_group(tmp_path):
    """The per-group figures are the selected model (best epoch restored) on every validation
    target: their 'all' row is the selection's own validation metric, and head / tail are
    subsets of those users."""
    from sidserve.eval.tuning import tune
    data = _successor_data(n=150, users=300)
    data.save(str(tmp_path / "d"))
    rng = np.random.default_rng(0)
    sids = tmp_path / "sids.npz"
    np.savez(sids, sid=rng.integers(0, 8, size=(150, 3)), weights=rng.uniform(0.2, 1, size=(150, 3)).astype(np.float32))
    small = {"sid_sasrec": {"max_epochs": 2, "hidden_dim": 16, "ff_dim": 16, "max_len": 10},
             "ranking": {"max_epochs": 2, "d_model": 16, "mlp_dim": 16}}
    for model, metric in (("sid_sasrec", "ndcg@10"), ("ranking", "gauc")):
        r = tune(str(tmp_path / "d"), model, small[model], sids=str(sids))
        g = r["valid_by_group"]
        assert g["all"][metric] == pytest.approx(r["valid"][metric], abs=1e-6)
        assert g["all"]["users"] == 300 and 0 < g["head"]["users"] + g["tail"]["users"] <= 300
        assert all(0 <= g[k][metric] <= 1 for k in ("head", "tail"))
        if model == "sid_sasrec":  # the code weights R(e_b) can be set to 1 (same seed, same init)
            assert r["sid_weights"] == "r"
            ones = tune(str(tmp_path / "d"), model, small[model], sids=str(sids), sid_weights=False)
            assert ones["sid_weights"] == "one" and ones["valid"] != r["valid"]


def test_ablations_are_judged_on_validation_against_the_full_models_spread():
    from sidserve.eval.report import _ablation_markdown, ablations

    def entry(label, seeds, sid, ret, gauc, test=0.5):
        def task(metric, values):
            return {"valid": {metric: {**mean_std(values), "values": values}},
                    "all": {metric: {**mean_std([test] * len(values)), "values": [test] * len(values)}}}
        return {"label": label, "seeds": seeds, "sid_sasrec": task("ndcg@10", sid),
                "retrieval": task("recall@10", ret), "ranking": task("gauc", gauc)}
    tok = {"adc_sid": entry("ADC-SID", [0, 1, 2], [0.04, 0.05, 0.06], [0.06, 0.06, 0.06], [0.80, 0.81, 0.82]),
           "adc_sid_no_align": entry("w/o alignment loss", [0], [0.02], [0.05], [0.79], test=0.9),
           "adc_sid_no_gate": entry("w/o gate", [0, 1], [0.03, 0.05], [0.07, 0.07], [0.80, 0.80]),
           "rqkmeans": entry("RQ-Kmeans", [0], [0.09], [0.09], [0.90])}
    rows = {r["name"]: r for r in ablations(tok)}
    assert set(rows) == {"adc_sid_no_align", "adc_sid_no_gate"}  # ablations only, never the baselines
    a = rows["adc_sid_no_align"]["tasks"]
    # full model: mean 0.05, sample std 0.01, so 0.02 is -0.03 = -3 spreads
    assert a["sid_sasrec"]["diff"] == pytest.approx(-0.03) and a["sid_sasrec"]["spreads"] == pytest.approx(-3.0)
    assert a["retrieval"]["spreads"] is None  # the full model's seeds agree exactly: no spread to count in
    assert a["ranking"]["diff"] == pytest.approx(-0.02) and rows["adc_sid_no_align"]["loses_all"]
    g = rows["adc_sid_no_gate"]  # the mean over the ablation's own seeds; ahead in retrieval
    assert g["tasks"]["sid_sasrec"]["ablation"] == pytest.approx(0.04) and g["tasks"]["retrieval"]["diff"] > 0
    assert not g["loses_all"]
    md = "\n".join(_ablation_markdown(list(rows.values()), tok))
    assert "-3.0 spreads" in md and "| w/o alignment loss | 1 |" in md and md.count("| yes |") == 1
    tok_without_full = {k: v for k, v in tok.items() if k != "adc_sid"}
    assert ablations(tok_without_full) == []
