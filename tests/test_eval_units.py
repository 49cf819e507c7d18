"""The evaluation's pieces on fixtures with hand-checkable answers: metrics, the SID
table and prefix trie, constrained beam search, SASRec, the retrieval and ranking models."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from sidserve.eval.data import Dataset, load_dataset
from sidserve.eval.metrics import auc, gauc, rankdata, recall_ndcg, spearman
from sidserve.eval.ranking import (
    RankingConfig,
    evaluate_ranking,
    sample_negatives,
    score,
    train_ranker,
)
from sidserve.eval.retrieval import (
    RetrievalConfig,
    SIDSeq2Seq,
    length_buckets,
    rank_items,
    train_retrieval,
    training_examples,
)
from sidserve.eval.sasrec import SASRecConfig, evaluate_sasrec, pad_left, train_sasrec
from sidserve.eval.sid_table import PrefixTrie, SIDTable, dedup_suffix
from sidserve.eval.tokenizers import parse_letter_sids

# ---- metrics ---------------------------------------------------------------------------


def test_recall_ndcg_of_a_known_ranking():
    ranked = np.array([[7, 3, 9, 1], [2, 4, 6, 8], [5, 5, 5, 5]])
    target = np.array([3, 8, 1])  # hit at rank 1, at rank 3, never
    m = recall_ndcg(ranked, target, ks=(1, 2, 4, 10))
    assert m["recall@1"].tolist() == [0, 0, 0]
    assert m["recall@2"].tolist() == [1, 0, 0]
    assert m["recall@4"].tolist() == [1, 1, 0]
    assert m["recall@10"].tolist() == [1, 1, 0]  # K beyond the list: hits stop at its end
    assert m["ndcg@2"][0] == pytest.approx(1 / math.log2(3))
    assert m["ndcg@4"][1] == pytest.approx(1 / math.log2(5))
    assert m["ndcg@4"][2] == 0


def test_auc_counts_pairs_and_half_ties():
    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5)(0.9>0.1)(0.5=0.5 -> 1/2)(0.5>0.1)
    assert auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(3.5 / 4)
    assert auc(np.array([1, 0]), np.array([0.0, 1.0])) == 0.0
    with pytest.raises(ValueError, match="positives and negatives"):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_gauc_weights_groups_by_size_and_skips_one_class_groups():
    groups = np.array([0, 0, 0, 1, 1, 2, 2])
    labels = np.array([1, 0, 0, 1, 0, 1, 1])  # group 2 has no negative: skipped
    scores = np.array([0.9, 0.1, 0.2, 0.1, 0.8, 0.5, 0.4])
    # group 0: AUC 1 (3 rows), group 1: AUC 0 (2 rows) -> (3*1 + 2*0) / 5
    assert gauc(groups, labels, scores) == pytest.approx(0.6)


def test_rankdata_and_spearman():
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2, 3.5, 3.5, 1]
    x = np.arange(20.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_evaluate_ranking_by_hand():
    # 2 users, column 0 the positive: user 0 ranks it above both negatives, user 1 below one
    scores = np.array([[0.9, 0.1, 0.2], [0.5, 0.6, 0.1]])
    out = evaluate_ranking(scores, np.array([1, 2]), {"head": np.array([1]), "tail": np.array([2])})
    assert out["all"]["gauc"] == pytest.approx((1.0 * 3 + 0.5 * 3) / 6)
    # pooled: positives 0.9, 0.5 vs negatives 0.1 0.2 0.6 0.1 -> 0.9 beats 4, 0.5 beats 3
    assert out["all"]["auc"] == pytest.approx(7 / 8)
    assert out["head"]["gauc"] == 1.0 and out["tail"]["gauc"] == 0.5
    assert out["head"]["users"] == 1


# ---- data ------------------------------------------------------------------------------


def _toy_dataset():
    seqs = [np.array([1, 2, 3, 4]), np.array([2, 3, 5]), np.array([1, 3, 4, 5, 2])]
    return Dataset(seqs, [{"item_id": i, "title": f"t{i}", "brand": "b", "categories": ["c"]} for i in range(1, 6)])


def test_leave_one_out_split_and_popularity(tmp_path):
    d = _toy_dataset()
    assert [s.tolist() for s in d.train_sequences()] == [[1, 2], [2], [1, 3, 4]]
    hist, tgt = d.targets("test")
    assert tgt.tolist() == [4, 5, 2] and hist[2].tolist() == [1, 3, 4, 5]
    hist, tgt = d.targets("valid")
    assert tgt.tolist() == [3, 3, 5] and hist[0].tolist() == [1, 2]
    assert d.popularity().tolist() == [0, 2, 2, 1, 1, 0]  # training part only
    g = d.popularity_groups(0.4)  # 2 of 5 items; ties by id
    assert g["head"].tolist() == [1, 2] and g["tail"].tolist() == [4, 5]
    d.save(str(tmp_path))
    back = load_dataset(str(tmp_path))
    assert [s.tolist() for s in back.sequences] == [s.tolist() for s in d.sequences]
    assert back.item_texts() == d.item_texts()


def test_weak_content_keeps_three_title_words_and_the_first_category():
    items = [{"item_id": 1, "title": "OPI Nail Lacquer, Simmer and Shimmer", "brand": "OPI",
              "categories": ["Makeup", "Nails", "Nail Polish"]},
             {"item_id": 2, "title": "", "brand": None, "categories": ["Skin Care", "Face"]},
             {"item_id": 3, "title": "Two words", "brand": "X", "categories": []}]
    d = Dataset([np.array([1, 2, 3])], items)
    weak = d.item_texts("weak")
    assert weak == {"text": ["OPI Nail Lacquer,", "Skin Care", "Two words"], "meta": ["Makeup", "Skin Care", "Two words"]}
    full = d.item_texts()
    assert "Brand: OPI" in full["meta"][0] and "Simmer" in full["text"][0]  # the full regime is unchanged
    assert not any("OPI" in m or "Nails" in m for m in weak["meta"])  # nothing else leaks into weak
    with pytest.raises(ValueError, match="content must be one of"):
        d.item_texts("none")


def test_load_dataset_errors_name_file_and_line(tmp_path):
    (tmp_path / "items.jsonl").write_text('{"item_id": 1}\n{"item_id": 3}\n')
    (tmp_path / "sequences.txt").write_text("1 1 1 1\n")
    with pytest.raises(ValueError, match=r"items.jsonl:2: item_id must be 2"):
        load_dataset(str(tmp_path))
    (tmp_path / "items.jsonl").write_text('{"item_id": 1}\n{"item_id": 2}\n')
    (tmp_path / "sequences.txt").write_text("1 1 2 1\n2 1 2\n")
    with pytest.raises(ValueError, match=r"sequences.txt:2: user 2 has 2 items"):
        load_dataset(str(tmp_path))
    (tmp_path / "sequences.txt").write_text("1 1 2 9\n")
    with pytest.raises(ValueError, match=r"sequences.txt:1: item id outside 1..2"):
        load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        load_dataset(str(tmp_path / "nope"))


def test_subsample_renumbers_consistently():
    d = _toy_dataset()
    s = d.subsample(2, seed=1)
    assert s.num_users == 2
    used = np.unique(np.concatenate(s.sequences))
    assert used.tolist() == list(range(1, s.num_items + 1))
    # every kept user's sequence reads the same titles as before the renumbering
    titles = {it["item_id"]: it["title"] for it in s.items}
    originals = {tuple(f"t{i}" for i in seq.tolist()) for seq in d.sequences}
    for seq in s.sequences:
        assert tuple(titles[j] for j in seq.tolist()) in originals


# ---- SID table and trie ------------------------------------------------------------------


def test_dedup_suffix_and_table():
    sid = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    assert dedup_suffix(sid).tolist() == [0, 0, 1, 2, 0]
    t = SIDTable.build(sid, np.array([[1, 0.5]] * 5, np.float32))
    assert t.codes.shape == (6, 3) and t.codes[0].tolist() == [0, 0, 0]
    assert t.codes[4].tolist() == [1, 2, 2]
    assert t.vocab.tolist() == [2, 3, 3] and t.offsets.tolist() == [0, 2, 5]
    assert t.weights[0].tolist() == [0, 0, 0] and t.weights[1].tolist() == [1, 0.5, 1]
    with pytest.raises(ValueError, match="weights must have shape"):
        SIDTable.build(sid, np.ones((5, 3)))


def test_trie_walks_exactly_the_item_codes():
    rng = np.random.default_rng(0)
    t = SIDTable.build(rng.integers(0, 4, size=(60, 3)))
    trie = PrefixTrie.build(t)
    seen = set()
    for item in range(1, 61):
        node = 0
        for pos, code in enumerate(t.codes[item]):
            node = trie.children[pos][node, code]
            assert node >= 0
        assert trie.leaf_item[node] == item
        seen.add(item)
    # every transition leads somewhere real: the number of valid leaves equals the items
    assert (trie.children[-1] >= 0).sum() == 60


def test_letter_sids_parse():
    assert parse_letter_sids([["<a_1>", "<b_20>"], ["<a_0>", "<b_3>"]]).tolist() == [[1, 20], [0, 3]]
    with pytest.raises(ValueError, match="item 2"):
        parse_letter_sids([["<a_1>"], ["x"]])


def test_adc_variants_switch_exactly_their_stage():
    from sidserve.eval.tokenizers import ADC_VARIANTS, LABELS, TokenizerBudget, _adc_config

    def cfg(name):
        return _adc_config({"text": 8, "meta": 4}, 4, TokenizerBudget(), **ADC_VARIANTS.get(name, {}))

    base, reg = cfg("adc_sid"), cfg("adc_sid_adasid")
    assert base.collision_regulation == "off" and reg.collision_regulation == "adaptive"
    assert reg.replace(collision_regulation="off", collision_hamming=0) == base  # nothing else differs
    assert cfg("adc_sid_adasid_static").collision_regulation == "static"
    assert cfg("adc_sid_adasid_no_relaxation") == reg.replace(collision_relaxation=False)
    assert cfg("adc_sid_adasid_no_pressure") == reg.replace(collision_adaptive_pressure=False)
    assert cfg("adc_sid_cold_consistency") == base.replace(cold_consistency_weight=0.3)
    assert all(name in LABELS for name in ADC_VARIANTS)


def test_content_only_rqkmeans_ignores_behavior_and_the_full_one_reads_it():
    from sidserve.eval.tokenizers import LABELS, TokenizerBudget, fit_tokenizer

    rng = np.random.default_rng(0)
    n = 400
    items = {"text_emb": rng.normal(size=(n, 8)).astype(np.float32),
             "meta_emb": rng.normal(size=(n, 4)).astype(np.float32),
             "behavior_emb": 3 * rng.normal(size=(n, 4)).astype(np.float32)}
    shuffled = {**items, "behavior_emb": items["behavior_emb"][rng.permutation(n)]}
    b = TokenizerBudget(codebook_size=8, sid_length=3)

    def sids(name, x):
        return fit_tokenizer(name, x, {"text": 8, "meta": 4}, 4, b).sid

    np.testing.assert_array_equal(sids("rqkmeans_content", items), sids("rqkmeans_content", shuffled))
    assert (sids("rqkmeans", items) != sids("rqkmeans", shuffled)).any()
    assert "rqkmeans_content" in LABELS


def test_budget_overrides_reach_each_tokenizers_own_config():
    """A selection trial sets RQ-VAE's training budget the way it sets ADC-SID's fields;
    a field the tokenizer's config does not have is named, not ignored."""
    from sidserve.eval.tokenizers import TokenizerBudget, config_class, fit_tokenizer
    from sidserve.tokenizers.baselines import RQVAEConfig

    rng = np.random.default_rng(0)
    n = 200
    items = {"text_emb": rng.normal(size=(n, 8)).astype(np.float32),
             "meta_emb": rng.normal(size=(n, 4)).astype(np.float32),
             "behavior_emb": rng.normal(size=(n, 4)).astype(np.float32)}
    dims = {"text": 8, "meta": 4}
    b = TokenizerBudget(codebook_size=8, sid_length=3, rqvae_epochs=1, batch_size=200)
    steps = fit_tokenizer("rqvae", items, dims, 4, b).tokenizer.config
    assert (steps.epochs, steps.batch_size) == (1, 200)
    more = fit_tokenizer("rqvae", items, dims, 4, replace(b, overrides={"epochs": 3, "batch_size": 50})).tokenizer.config
    assert (more.epochs, more.batch_size) == (3, 50)
    assert config_class("rqvae") is RQVAEConfig
    with pytest.raises(ValueError, match=r"\['num_shared_experts'\] are not RQVAEConfig fields"):
        fit_tokenizer("rqvae", items, dims, 4, replace(b, overrides={"num_shared_experts": 2}))
    with pytest.raises(ValueError, match="has no config"):
        config_class("letter")


# ---- retrieval ---------------------------------------------------------------------------


def _small_table(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return SIDTable.build(rng.integers(0, 5, size=(n, 3)), rng.uniform(0.2, 1, size=(n, 3)).astype(np.float32))


def test_incremental_decoding_matches_teacher_forcing_and_beams_are_valid():
    torch.manual_seed(0)
    table = _small_table()
    trie = PrefixTrie.build(table)
    model = SIDSeq2Seq(table, RetrievalConfig(d_model=32, ff_dim=64, dropout=0.0)).eval()
    hist = torch.from_numpy(pad_left([np.array([3, 4, 5]), np.array([7]), np.array([1, 2])], 20))
    items = model.generate(hist, trie, beam_size=50)
    assert items.shape == (3, 50)
    for row in items.tolist():
        got = [i for i in row if i >= 0]
        assert len(got) == len(set(got)) == 50 and all(1 <= i <= 120 for i in got)
    # the beam's order is the order of the sequence log-probabilities under teacher forcing
    with torch.no_grad():
        for u in range(3):
            cand = items[u]
            logits = model(hist[u:u + 1].expand(50, -1), cand)
            codes = model.codes[cand]
            lp = sum(torch.log_softmax(lg, -1)[torch.arange(50), codes[:, t]] for t, lg in enumerate(logits))
            assert (lp[:-1] >= lp[1:] - 1e-4).all()


def test_beam_search_returns_fewer_when_few_sids_exist():
    table = SIDTable.build(np.array([[0, 1], [1, 0], [1, 1]]))
    trie = PrefixTrie.build(table)
    model = SIDSeq2Seq(table, RetrievalConfig(d_model=16, ff_dim=16, num_heads=2)).eval()
    out = model.generate(torch.tensor([[0, 1], [2, 3]]), trie, beam_size=5)
    assert out.shape == (2, 5)
    assert sorted(out[0, :3].tolist()) == [1, 2, 3] and out[0, 3:].tolist() == [-1, -1]


def test_retrieval_learns_a_deterministic_successor():
    """Item i is always followed by item (i mod 30) + 1: a trained model generates it first."""
    rng = np.random.default_rng(1)
    table = SIDTable.build(rng.integers(0, 6, size=(30, 3)))
    seqs = []
    for _ in range(300):
        start, n = rng.integers(1, 31), rng.integers(5, 9)
        seqs.append((start - 1 + np.arange(n)) % 30 + 1)
    d = Dataset(seqs, [{} for _ in range(30)])
    c = RetrievalConfig(d_model=32, ff_dim=64, max_epochs=12, patience=12, batch_size=64, lr=5e-3, dropout=0.0,
                        warmup_steps=5)
    model, hist = train_retrieval(table, d.train_sequences(), d.targets("valid"), c)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # the kept epoch is the one with the best validation NDCG@10
    es = model.early_stopping
    assert es["best_value"] == max(h["valid_ndcg@10"] for h in hist) and len(hist) == 12
    h, tgt = d.targets("test")
    ranked = rank_items(model, PrefixTrie.build(table), h, beam_size=50)
    assert recall_ndcg(ranked, tgt, ks=(1,))["recall@1"].mean() > 0.9


def test_training_examples_and_buckets():
    hist, tgt = training_examples([np.array([1, 2, 3]), np.array([4, 5])], max_history=2)
    assert tgt.tolist() == [2, 3, 5]
    assert hist.tolist() == [[0, 1], [1, 2], [0, 4]]
    lengths = np.array([1, 5, 2, 5, 1, 2, 3])
    batches = list(length_buckets(np.random.default_rng(0), lengths, batch_size=2, chunk=4))
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))  # each example once


# ---- SASRec and ranking ------------------------------------------------------------------


def test_sasrec_learns_successors_and_exposes_raw_embeddings():
    rng = np.random.default_rng(0)
    seqs = [(s - 1 + np.arange(n)) % 40 + 1 for s, n in zip(rng.integers(1, 41, 400), rng.integers(6, 12, 400))]
    d = Dataset(seqs, [{} for _ in range(40)])
    model, hist = train_sasrec(d.train_sequences(), 40, SASRecConfig(max_epochs=25, dropout=0.1, hidden_dim=32,
                                                                    ff_dim=64, batch_size=64, lr=5e-3))
    assert hist[-1]["loss"] < hist[0]["loss"]
    m = evaluate_sasrec(model, *d.targets("test"), ks=(1,))
    assert m["recall@1"] > 0.8
    emb = model.item_vectors()
    assert emb.shape == (40, 32) and not np.allclose(np.linalg.norm(emb, axis=1), 1.0)


def test_sample_negatives_avoid_the_users_items():
    rng = np.random.default_rng(0)
    seqs = [np.array([1, 2, 3]), np.array([4, 5, 6, 7])]
    neg = sample_negatives(rng, seqs, 10, 50)
    assert neg.shape == (2, 50) and neg.min() >= 1 and neg.max() <= 10
    assert not np.isin(neg[0], seqs[0]).any() and not np.isin(neg[1], seqs[1]).any()


def test_ranker_separates_true_successors_from_random_items():
    rng = np.random.default_rng(0)
    n = 60
    table = SIDTable.build(np.stack([np.arange(n) % 10, np.arange(n) // 10], 1))
    seqs = [(s - 1 + np.arange(k)) % n + 1 for s, k in zip(rng.integers(1, n + 1, 400), rng.integers(5, 9, 400))]
    d = Dataset(seqs, [{} for _ in range(n)])
    model, hist = train_ranker(table, d.train_sequences(), RankingConfig(max_epochs=8, d_model=16, mlp_dim=32,
                                                                          batch_size=128, lr=1e-2))
    assert hist[-1]["loss"] < hist[0]["loss"]
    h, tgt = d.targets("test")
    neg = sample_negatives(np.random.default_rng(1), d.sequences, n, 20)
    res = evaluate_ranking(score(model, h, np.concatenate([tgt[:, None], neg], 1)), tgt, {})
    assert res["all"]["auc"] > 0.8 and res["all"]["gauc"] > 0.8
