"""The two-night stability simulation (sidserve/eval/stability.py): its pieces by hand, and a
--quick run on the vendored Beauty slice end to end."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, SLICE

from sidserve import load_tokenizer
from sidserve.eval.churn import (
    churn_table,
    input_rows_trained,
    mean_tree,
    procrustes,
    split_nights,
    summarize_seeds,
)
from sidserve.eval.stability import TwoNights
from sidserve.eval.stability_config import StabilityConfig
from sidserve.tokenizers.config import BEHAVIOR


def test_split_nights_holds_out_the_newest_interactions():
    train = [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7])]
    night1, new = split_nights(train, 1)
    assert [s.tolist() for s in night1] == [[1, 2, 3], [5], []]
    assert new == pytest.approx(3 / 7)
    assert split_nights(train, 2)[0][0].tolist() == [1, 2]


def test_procrustes_recovers_a_rotation_and_keeps_norms():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((200, 8)).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    source = target @ q.T.astype(np.float32)  # target rotated away
    r = procrustes(source, target, np.arange(150))  # fitted on a subset of the rows
    np.testing.assert_allclose(source @ r, target, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(source @ r, axis=1), np.linalg.norm(source, axis=1), rtol=1e-5)


def test_churn_table_by_hand():
    before = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    after = np.array([[0, 1], [2, 9], [8, 9], [6, 7]])
    t = churn_table(before, after, np.array([0, 5, 5, 50]), both_nights=np.array([False, False, True, True]))
    assert t["churn"] == 0.5 and t["changed"] == 2 and t["per_position"] == [0.25, 0.5]
    assert t["by_popularity"] == {"0": {"items": 1, "churn": 0.0}, "1-9": {"items": 2, "churn": 1.0},
                                  "10-99": {"items": 1, "churn": 0.0}}
    # items 3 and 4 alone (3 changed at both positions, 4 kept): new items never enter these figures
    assert t["both_nights"] == {"items": 2, "changed": 1, "churn": 0.5, "per_position": [0.5, 0.5],
                                "by_popularity": {"1-9": {"items": 1, "churn": 1.0},
                                                  "10-99": {"items": 1, "churn": 0.0}}}


def test_input_rows_trained_by_hand():
    # SASRec's inputs are each sequence's items but its last, the newest max_len of them
    seqs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 2])]
    assert input_rows_trained(seqs, 9, max_len=10).tolist() == [
        True, True, False, False, True, True, True, True, False]  # 3, 8, 9: never an input; 4: a 1-item sequence
    assert input_rows_trained(seqs, 9, max_len=2).tolist() == [
        True, True, False, False, False, False, True, True, False]  # only 7, 8 of the third
    # a tied table is also every target's output row: an item that is only a last item is trained
    assert input_rows_trained(seqs, 9, max_len=10, tied=True).tolist() == [
        True, True, True, False, True, True, True, True, False]  # 4: a 1-item sequence, no pair; 9: absent
    assert input_rows_trained(seqs, 9, max_len=2, tied=True).tolist() == [
        True, True, True, False, False, False, True, True, False]  # the newest max_len + 1 of the third


@pytest.mark.parametrize("tokenizer, weighted", [("adc_sid", False), ("adc_sid_cold_consistency", False),
                                                 ("adc_sid_untied", True)])
def test_sid_table_reads_codes_as_the_evaluation_does(tmp_path, tokenizer, weighted):
    """The evaluation's ADC-SID reads every code at weight 1; the paper's configuration scales
    the behavioral codes by R(e_b). The simulation must judge night 2's SIDs the same way."""
    run = TwoNights(StabilityConfig(data=SLICE, output=str(tmp_path), tokenizer=tokenizer))
    assert run.c.tied() is (tokenizer != "adc_sid_untied")
    layout = SimpleNamespace(sid_layout=[{"position": 0, "group": "shared"}, {"position": 1, "group": BEHAVIOR},
                                         {"position": 2, "group": BEHAVIOR}])
    sid = np.array([[1, 2, 3], [4, 5, 6]])
    beh = np.array([[0.5, 0.0], [2.0, 1.5]], np.float32)
    table = run.sid_table(sid, beh, layout)
    expect = np.ones((2, 3), np.float32)
    if weighted:
        expect[:, 1:] = beh
    assert np.array_equal(table.weights[1:, :3], expect)


def test_the_cli_offers_every_measured_configuration():
    """The CLI keeps its imports lazy, so it names the choices itself: they must be these."""
    from sidserve.cli import build_parser
    from sidserve.eval.stability_config import TOKENIZERS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["stability"]
    choice = next(a for a in sub._actions if a.dest == "tokenizer")
    assert tuple(choice.choices) == TOKENIZERS and choice.default == TOKENIZERS[0]


def test_the_library_default_is_measured_as_its_own_choice():
    """``adc_sid`` and ``adc_sid_untied`` are the paper's losses (their caches keep that
    meaning); ``adc_sid_cold_consistency`` is what the library fits by default."""
    from sidserve import TokenizerConfig
    from sidserve.eval.stability_config import TOKENIZERS
    from sidserve.eval.tokenizers import TokenizerBudget, _adc_config, family_overrides

    weight = {t: _adc_config({"text": 8, "meta": 8}, 8, TokenizerBudget(), family_overrides(t)).cold_consistency_weight
              for t in TOKENIZERS}
    assert weight["adc_sid"] == weight["adc_sid_untied"] == 0.0
    assert weight["adc_sid_cold_consistency"] == TokenizerConfig().cold_consistency_weight > 0


def test_seed_summaries_are_means_and_sample_deviations():
    runs = {0: {"valid": {"ndcg@10": 0.1, "seconds": 5}, "test": {"ndcg@10": 0.2}, "gauc": {"valid": 0.7}},
            1: {"valid": {"ndcg@10": 0.3, "seconds": 9}, "test": {"ndcg@10": 0.2}, "gauc": {"valid": 0.8}}}
    out = summarize_seeds(runs)
    assert out["valid"] == {"ndcg@10": pytest.approx(0.2)} and out["gauc"]["valid"] == pytest.approx(0.75)
    assert out["std"]["valid"]["ndcg@10"] == pytest.approx(0.1 * 2 ** 0.5)  # ddof 1: sqrt(0.02 / 1)
    assert out["std"]["test"]["ndcg@10"] == 0.0 and out["per_seed"]["1"] is runs[1]
    assert summarize_seeds({0: runs[0]})["std"]["valid"]["ndcg@10"] == 0.0
    t = mean_tree([{"items": 4, "churn": 0.5, "per_position": [0.0, 1.0], "codes_kept": None},
                   {"items": 4, "churn": 0.25, "per_position": [1.0, 1.0], "codes_kept": None}])
    assert t == {"items": 4, "churn": 0.375, "per_position": [0.5, 1.0], "codes_kept": None}


def test_which_settings_get_the_downstream_model(tmp_path):
    def wants(**kw):
        run = TwoNights(StabilityConfig(data=SLICE, output=str(tmp_path), deltas=[0, 0.05, 0.3], **kw))
        names = [f"{m}/{k}" for m in ("scratch", "warm") for k in ("cold", "none", "warm", "anchored")]
        names += [f"{m}/{k}+sticky {d:g}" for m in ("scratch", "warm") for k in ("none", "warm", "anchored")
                  for d in (0, 0.05, 0.3)]
        return {n for n in names if run.wants_downstream(n)}

    # default: every plain setting of the 'warm' mode, sticky ones at 0.3 (refresh's default)
    assert wants() == {"warm/cold", "warm/none", "warm/warm", "warm/anchored", "warm/none+sticky 0.3",
                       "warm/warm+sticky 0.3", "warm/anchored+sticky 0.3"}
    assert wants(downstream_modes=[]) == set()
    assert wants(downstream_settings=["scratch/cold", "warm/none+sticky 0.3"]) == {"scratch/cold",
                                                                                  "warm/none+sticky 0.3"}
    with pytest.raises(ValueError, match="downstream_deltas"):
        StabilityConfig(data=SLICE, output=str(tmp_path), deltas=[0, 0.1], downstream_deltas=[0.2]).validate()
    # listed settings replace the delta rule: the rule's default need not be among the deltas
    StabilityConfig(data=SLICE, output=str(tmp_path), deltas=[0, 0.2], downstream_deltas=[0.05],
                    downstream_settings=["warm/none+sticky 0.2"]).validate()
    # a misspelt setting is named before any work, not after the fits
    with pytest.raises(ValueError, match=r"\['warm/none\+sticky 0.25'\] are not settings"):
        StabilityConfig(data=SLICE, output=str(tmp_path), deltas=[0, 0.2],
                        downstream_settings=["warm/none+sticky 0.25"]).validate()
    for seeds in ([0, 0], [], [-1], [0.5]):
        with pytest.raises(ValueError, match="downstream_seeds"):
            StabilityConfig(data=SLICE, output=str(tmp_path), downstream_seeds=seeds).validate()


def test_a_cache_of_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "st")
    run = TwoNights(StabilityConfig(data=SLICE, output=out))  # pins its settings in run_config.json
    TwoNights(StabilityConfig(data=SLICE, output=out, deltas=[0, 0.3]))  # measuring other margins: same cache
    with pytest.raises(ValueError, match=r"different settings \(holdout\)"):
        TwoNights(StabilityConfig(data=SLICE, output=out, holdout=2))
    with pytest.raises(ValueError, match=r"different settings \(tokenizer\)"):  # another e_b and config
        TwoNights(StabilityConfig(data=SLICE, output=out, tokenizer="adc_sid_untied"))
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        StabilityConfig(data=SLICE, output=out, tokenizer="rqkmeans").validate()
    # a cache from before run_config.json: its settings are unknown, so it is not adopted
    os.makedirs(os.path.join(out, "behavior"))
    os.remove(os.path.join(out, "run_config.json"))
    with pytest.raises(ValueError, match="from before run_config.json"):
        TwoNights(StabilityConfig(data=SLICE, output=out))
    # the warm start needs the SASRec that gave night 1's e_b, not a retrained look-alike
    with pytest.raises(ValueError, match="night1_model.pt is missing"):
        run._night1_model(os.path.join(out, "behavior", "night1_model.pt"))


@pytest.fixture(scope="module")
def quick_nights(quick_run, tmp_path_factory):
    """One quick two-night run of the evaluation's ADC-SID (its night tables are reused by the
    residual k-means test: the same tied SASRec)."""
    out = str(tmp_path_factory.mktemp("stability") / "stability")
    # the text embeddings of the quick evaluation (same slice, same subsample): embedding the
    # item text again would be most of this test's time
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "stability.py"), "--data", SLICE, "--output", out,
           "--quick", "--deltas", "0,0.05,0.3", "--downstream-settings", "warm/warm+sticky 0.3",
           "--downstream-seeds", "0,1", "--content-from", quick_run[0]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, cmd


@pytest.mark.slow
def test_quick_two_nights_end_to_end(quick_nights):
    out, cmd = quick_nights
    r = json.load(open(os.path.join(out, "stability.json")))
    s = r["settings"]
    assert 0 < r["new_interaction_share"] < 0.5
    # the configuration the evaluation runs: a tied SASRec's table, richness from popularity
    assert r["config"]["tokenizer"] == "adc_sid" and r["config"]["tied"] is True
    assert load_tokenizer(os.path.join(out, "tokenizers", "night1")).config.richness_signal == "popularity"
    kinds = ("none", "warm", "anchored")
    assert set(s) == {f"{m}/{k}" for m in ("scratch", "warm", "procrustes")
                      for k in ("cold", *kinds, *(f"{k}+sticky {d}" for k in kinds for d in ("0", "0.05", "0.3")))}
    for mode in ("scratch", "warm", "procrustes"):
        for kind in kinds:
            churns = [s[f"{mode}/{kind}+sticky {d}"]["churn"] for d in ("0", "0.05", "0.3")]
            assert churns[0] == s[f"{mode}/{kind}"]["churn"]  # delta 0: the plain assignment
            assert churns[0] >= churns[1] >= churns[2]  # a larger margin keeps more codes
            kept = [s[f"{mode}/{kind}+sticky {d}"]["codes_kept"] for d in ("0", "0.05", "0.3")]
            assert kept[0] == 0 and kept[1] <= kept[2]
            assert all(s[f"{mode}/{kind}+sticky {d}"]["codes_unscored"] >= 0 for d in ("0", "0.05", "0.3"))
            assert s[f"{mode}/{kind}"]["codes_unscored"] is None  # no sticky decision, nothing unscored
            b = s[f"{mode}/{kind}"]["both_nights"]  # the per-position figures over the items on both nights
            assert len(b["per_position"]) == len(s[f"{mode}/{kind}"]["per_position"])
            assert sum(v["items"] for v in b["by_popularity"].values()) == b["items"]
        # night 1's model on night 2: the content-only positions see the same content, so
        # none of them changes (the encode is batch-invariant, the model the same)
        layout = load_tokenizer(os.path.join(out, "tokenizers", "night1")).config.sid_layout
        content = [q["position"] for q in layout if q["group"] in ("text", "meta")]
        assert content and all(s[f"{mode}/none"]["per_position"][p] == 0 for p in content)
    assert 0 < s["scratch/cold"]["churn"] <= 1
    with_downstream = {name for name, v in s.items() if "downstream" in v}
    assert with_downstream == {"warm/warm+sticky 0.3"}  # exactly the one asked for (of 43 settings)
    for name in with_downstream:
        d = s[name]["downstream"]
        assert 0 <= d["test"]["ndcg@10"] <= d["test"]["recall@10"] <= 1
        assert 0 <= d["gauc"]["valid"] <= 1 and 0 <= d["gauc"]["test"] <= 1
        # one model per seed; the figures are their mean and spread
        runs = d["per_seed"]
        assert set(runs) == {"0", "1"} and runs["0"]["gauc"]["valid"] != runs["1"]["gauc"]["valid"]
        for part, k in (("valid", "ndcg@10"), ("test", "recall@10"), ("gauc", "test")):
            v = [runs[x][part][k] for x in ("0", "1")]
            assert d[part][k] == pytest.approx(np.mean(v)) and d["std"][part][k] == pytest.approx(np.std(v, ddof=1))
        assert "best_epoch" in runs["0"]["early_stopping"] and "best_epoch" in d["per_seed"]["1"]["ranking_early_stopping"]
    # each seed is a replicate: its own tokenizer fits (night 1 and the re-fits), its own churn
    assert os.path.exists(os.path.join(out, "tokenizers", "night1-seed1", "manifest.json"))
    assert os.path.exists(os.path.join(out, "tokenizers", "warm-cold-seed1", "manifest.json"))
    sid_a = load_tokenizer(os.path.join(out, "tokenizers", "night1"))
    sid_b = load_tokenizer(os.path.join(out, "tokenizers", "night1-seed1"))
    assert sid_a.config.seed != sid_b.config.seed
    c = s["warm/warm"]
    assert set(c["churn_per_seed"]) == {"0", "1"}
    assert c["churn"] == pytest.approx(np.mean(list(c["churn_per_seed"].values())))
    assert 0 < c["both_nights"]["items"] < r["dataset"]["items"] and r["items_both_nights"] == c["both_nights"]["items"]
    # per-user arrays for paired tests; no training checkpoint left once results are written
    files = os.listdir(os.path.join(out, "downstream"))
    assert "warm_warm+sticky_0.3_k32.npz" in files and "warm_warm+sticky_0.3_k32_seed1_ranking.npz" in files
    assert not [f for f in files if f.endswith(".ckpt.pt")]
    assert not [f for f in os.listdir(os.path.join(out, "behavior")) if f.endswith(".ckpt.pt")]  # nor the nights'
    assert os.path.exists(os.path.join(out, "behavior", "night1_model.pt"))  # the warm start's source
    md = open(os.path.join(out, "stability.md")).read()
    assert "| warm/warm+sticky 0.3 |" in md and " +- " in md
    # the cache can be committed: only the rebuilt content embeddings are left out
    assert open(os.path.join(out, ".gitignore")).read().splitlines()[1:] == ["embeddings.npz", "*.tmp.npz",
                                                                             "*.tmp-*", "*.ckpt.pt"]
    # cold -> warm: a larger margin keeps the content-only path's shared code for more items
    t = r["cold_to_warm"]
    assert list(t) == ["plain", "sticky 0", "sticky 0.05", "sticky 0.3"]
    assert t["plain"]["all"] == t["sticky 0"]["all"] <= t["sticky 0.05"]["all"] <= t["sticky 0.3"]["all"] <= 1
    # a rerun reads every stage from the cache
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and json.load(open(os.path.join(out, "stability.json")))["stage_seconds"] == {}
    # the warm start continues from night 1's saved SASRec: a lost warm table is rebuilt from it.
    # Not bit for bit across processes: MKL's sgemm is reproducible run to run only under its
    # conditional-reproducibility mode (seen on CI's machine: the printed values equal, not every
    # bit). So: far closer to the lost table than to night 1's start or a scratch re-train.
    warm = os.path.join(out, "behavior", "warm.npz")
    before = np.load(warm)["emb"]
    os.remove(warm)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    rebuilt = np.load(warm)["emb"]
    gap = np.linalg.norm(rebuilt - before)
    for other in ("night1", "scratch"):
        assert gap < 1e-3 * np.linalg.norm(before - np.load(os.path.join(out, "behavior", f"{other}.npz"))["emb"])


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["rqevidence_tied"])
def test_residual_kmeans_two_nights_with_sticky_whole_sids(quick_run, quick_nights, tmp_path, tokenizer):
    """Issue 47, item 3's measurement for residual k-means: night 2 is a cold re-fit or night 1's
    model as it is, the latter with sticky assignment of whole SIDs at each margin; churn never
    rises with the margin, every sticky SID is tonight's or last night's, and the content prefix
    of rq-evidence is the cold path's for every item (it is coded from content alone)."""
    out = str(tmp_path / "stability")
    # the nights' tables of the ADC-SID run (the same tied SASRec, data and settings): no SASRec here
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "stability.py"), "--data", SLICE, "--output", out,
           "--quick", "--modes", "warm", "--deltas", "0,0.02,0.1", "--downstream-modes", "",
           "--tokenizer", tokenizer, "--content-from", quick_run[0], "--behavior-from", quick_nights[0]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(os.path.join(out, "stability.json")))
    s = r["settings"]
    assert set(s) == {"warm/cold", "warm/none", *(f"warm/none+{how} {d}" for how in ("sticky", "direct")
                                                  for d in ("0", "0.02", "0.1"))}
    # scoring the previous SID itself keeps every SID the beam's paths keep, and more
    for d in ("0", "0.02", "0.1"):
        assert s[f"warm/none+direct {d}"]["churn"] <= s[f"warm/none+sticky {d}"]["churn"]
    churns = [s[f"warm/none+sticky {d}"]["churn"] for d in ("0", "0.02", "0.1")]
    # delta 0 keeps a previous SID only where it reconstructs the item at least as well as
    # tonight's greedy SID (the beam finds such paths): never more churn than the plain assignment
    assert churns[0] <= s["warm/none"]["churn"] and churns[0] >= churns[1] >= churns[2]
    kept = [s[f"warm/none+sticky {d}"]["codes_kept"] for d in ("0", "0.02", "0.1")]
    assert kept[0] <= kept[1] <= kept[2]
    assert s["warm/none"]["churn"] > 0  # night 2's e_b and counts moved the residual codes
    tok = load_tokenizer(os.path.join(out, "tokenizers", "night1"))
    assert tok.tokenizer_type == "rq-evidence"
    prefix = [q["position"] for q in tok.sid_layout if q["group"] == "content"]
    assert prefix and all(s["warm/none"]["per_position"][q] == 0 for q in prefix)  # content unchanged
    t = r["cold_to_warm"]
    assert t["plain"]["all"] == 1.0 and t["sticky 0.1"]["all"] == 1.0  # the prefix is the cold path's
    assert not [k for k in r["stage_seconds"] if k.startswith("sasrec")]  # the nights were adopted
    np.testing.assert_array_equal(np.load(os.path.join(out, "behavior", "warm.npz"))["emb"],
                                  np.load(os.path.join(quick_nights[0], "behavior", "warm.npz"))["emb"])
    # nights trained otherwise are refused: the paper's configuration reads the untied table
    bad = cmd[:-6] + ["--tokenizer", "adc_sid_untied", "--output", str(tmp_path / "o2"), "--content-from",
                      quick_run[0], "--behavior-from", quick_nights[0]]
    p = subprocess.run(bad, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 2 and "--behavior-from" in p.stderr and "trained otherwise" in p.stderr
