"""jobs/evaluate.py --quick end to end on the vendored Beauty slice: every stage, the
report, resuming from the cache, and clear errors."""

import json
import os
import re

import numpy as np
import pytest
from conftest import QUICK_EVAL_TOKENIZERS as TOKENIZERS
from conftest import SLICE
from conftest import run_evaluate as evaluate


@pytest.mark.slow
def test_quick_run_writes_a_complete_report(quick_run):
    out, p = quick_run
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["dataset"] == {"name": "beauty-slice[250 users]", "users": 250, "items": 1766,
                            "interactions": 2200, "quick": True, "content": "full"}
    assert r["seeds"] == [0, 1] and "--quick" in r["command"]
    assert list(r["tokenizers"]) == TOKENIZERS
    # ID SASRec: a tied and an untied model, each table's norm/popularity correlation
    assert set(r["sasrec"]) == {"tied", "untied"} and r["config"]["behavior_embedding"] == "untied-input"
    for v, e in r["sasrec"].items():
        assert e["tied"] == (v == "tied")
        for table in ("input", "output"):
            assert -1 <= e["tables"][table]["norm_popularity_spearman"] <= 1
        assert 0 <= e["test"]["recall@10"] <= e["test"]["recall@50"] <= 1
        es = e["early_stopping"]
        assert 0 <= es["best_epoch"] < es["epochs_run"] <= es["max_epochs"]
    e_b = np.load(os.path.join(out, "sasrec", "untied", "input_emb.npy"))
    assert e_b.shape == (1766, 64)
    for name, e in r["tokenizers"].items():
        q = e["quantization"]
        assert q["sid_length"] == (4 if name == "letter" else 6)
        assert 0 < q["utilisation_mean"] <= 1 and 0 <= q["collision_rate"] <= 1
        assert e["seeds"] == [0, 1]
        for g in ("all", "head", "tail"):
            for task, metrics in (("retrieval", ["recall@5", "recall@10", "recall@50", "ndcg@50"]),
                                  ("sid_sasrec", ["recall@5", "recall@10", "recall@50", "ndcg@10"]),
                                  ("ranking", ["auc", "gauc"])):
                for m in metrics:
                    v = e[task][g][m]
                    assert len(v["values"]) == 2 and 0 <= v["mean"] <= 1 and v["std"] >= 0
            # recall can only grow with K
            rec = e["retrieval"][g]
            assert rec["recall@5"]["mean"] <= rec["recall@10"]["mean"] <= rec["recall@50"]["mean"]
        assert e["retrieval"]["all"]["users"] == 250
        assert e["retrieval"]["head"]["users"] + e["retrieval"]["tail"]["users"] <= 250
        assert e["retrieval"]["valid_sid_share"] == 1.0  # 1,766 items >= 50 beams: always full
        # validation per group (issue 47's rule reads it): the kept epoch's, so its "all" is the
        # figure early stopping chose that epoch by, and a group's users are a subset
        for task, m in (("sid_sasrec", "ndcg@10"), ("ranking", "gauc")):
            vg = e[task]["valid_groups"]
            assert vg["all"][m]["values"] == pytest.approx(e[task]["valid"][m]["values"], abs=1e-6)
            assert all(0 <= v <= 1 for g in ("head", "tail") for v in vg[g][m]["values"])
        for task in ("sid_sasrec", "retrieval", "ranking"):  # early stopping kept an epoch it ran
            assert all(0 <= b < n for b, n in zip(e[task]["best_epoch"], e[task]["epochs_run"]))
        # the per-user arrays behind the bootstrap agree with the reported means
        per_user = np.load(os.path.join(out, "downstream", name, "retrieval_seed0.npz"))["recall@10"]
        assert per_user.shape == (250,) and per_user.mean() == pytest.approx(e["retrieval"]["all"]["recall@10"]["values"][0])
    # every tokenizer is tested against ADC-SID on each headline metric
    sig = r["significance"]
    for task, metric in (("sid_sasrec", "ndcg@10"), ("retrieval", "recall@10"), ("ranking", "gauc")):
        rows = [x for x in sig if x["task"] == task and x["metric"] == metric and x["b"] == "adc_sid"]
        assert sorted(x["a"] for x in rows) == ["letter", "rqkmeans"]
        assert all(x["ci_low"] <= x["diff"] <= x["ci_high"] and 0 < x["p_value"] <= 1 for x in rows)
    # "the best tokenizer" each comparison names is chosen on validation, the kept epoch's figure
    for task, metric in (("sid_sasrec", "ndcg@10"), ("retrieval", "recall@10"), ("ranking", "gauc")):
        valid = {n: e[task]["valid"][metric]["mean"] for n, e in r["tokenizers"].items()}
        assert {x["b"] for x in sig if x["task"] == task and x["metric"] == metric and x["b_is_best"]} == \
            {max(valid, key=valid.get)}
    for name, e in r["tokenizers"].items():
        stage = json.load(open(os.path.join(out, "downstream", name, "ranking_seed0.json")))
        assert e["ranking"]["valid"]["gauc"]["values"][0] == stage["early_stopping"]["best_value"]
    assert set(r["stage_seconds_total"]) == {"embeddings", "sasrec", "tokenizers", "sid_sasrec", "retrieval", "ranking"}
    report = open(os.path.join(out, "report.md")).read()
    assert "ADC-SID" in report and "long-tail" in report and r["command"] in report
    assert "paired bootstrap" in report and "SID-SASRec" in report and "Downstream, validation" in report
    for png in ("metrics.png", "head_tail.png", "codebook_usage.png", "norm_vs_popularity.png", "learning_curves.png"):
        with open(os.path.join(out, "plots", png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "LETTER (published SIDs)" in p.stdout
    # the fitted tokenizers are real artifacts
    from sidserve.tokenizers.base import BaseTokenizer
    tok = BaseTokenizer.from_pretrained(os.path.join(out, "tokenizers", "adc_sid", "artifact"))
    assert tok.config.codebook_size == 100 and tok.config.sid_length == 6
    # seed 1 is a draw of its own: the tokenizer fitted with seed 1, its downstream models on that fit
    for name in ("adc_sid", "rqkmeans"):
        fits = [os.path.join(out, "tokenizers", name, *sub) for sub in ((), ("seed1",))]
        q = [json.load(open(os.path.join(f, "quantization.json"))) for f in fits]
        assert [x["fit_seed"] for x in q] == [0, 1]
        assert BaseTokenizer.from_pretrained(os.path.join(fits[1], "artifact")).config.seed == 1
        sids = [np.load(os.path.join(f, "sids.npz"))["sid"] for f in fits]
        assert (sids[0] != sids[1]).any()  # another fit, other SIDs
        for task in ("sid_sasrec", "retrieval", "ranking"):
            assert [json.load(open(os.path.join(out, "downstream", name, f"{task}_seed{k}.json")))["fit_seed"]
                    for k in (0, 1)] == [0, 1]
    assert not os.path.exists(os.path.join(out, "tokenizers", "letter", "seed1"))  # published: one table
    assert json.load(open(os.path.join(out, "downstream", "letter", "ranking_seed1.json")))["fit_seed"] is None


@pytest.mark.slow
def test_rerun_resumes_from_cache_and_lost_stages_are_redone(quick_run):
    out, _ = quick_run
    before = json.load(open(os.path.join(out, "results.json")))
    os.remove(os.path.join(out, "downstream", "rqkmeans", "ranking_seed1.json"))
    p = evaluate("--data", SLICE, "--output", out, "--quick", "--tokenizers", ",".join(TOKENIZERS))
    assert p.returncode == 0, p.stderr[-3000:]
    after = json.load(open(os.path.join(out, "results.json")))
    assert list(after["stage_seconds_this_invocation"]) == ["ranking"]  # only the lost stage ran
    for g in ("all", "head", "tail"):  # the redone stage is seeded: same numbers
        for m in ("auc", "gauc"):
            assert after["tokenizers"]["rqkmeans"]["ranking"][g][m]["values"] == \
                pytest.approx(before["tokenizers"]["rqkmeans"]["ranking"][g][m]["values"], abs=1e-6)
    assert after["tokenizers"]["adc_sid"] == before["tokenizers"]["adc_sid"]


@pytest.mark.slow
def test_changed_settings_on_the_same_output_are_refused(quick_run):
    out, _ = quick_run
    p = evaluate("--data", SLICE, "--output", out, "--quick", "--quick-users", "100")
    assert p.returncode == 2
    assert "different settings" in p.stderr and "quick_users" in p.stderr and "Traceback" not in p.stderr


def test_bad_arguments_exit_2_with_a_message(tmp_path):
    p = evaluate("--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--quick", process=True)
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr
    p = evaluate("--data", SLICE, "--output", str(tmp_path / "o"), "--tokenizers", "adc_sid,nope")
    assert p.returncode == 2 and "unknown tokenizers ['nope']" in p.stderr
    p = evaluate("--data", SLICE, "--output", str(tmp_path / "o"), "--seeds", "0,x")
    assert p.returncode == 2 and "--seeds" in p.stderr


@pytest.mark.slow
def test_report_only_reports_a_run_part_way_through(quick_run, tmp_path):
    import shutil
    out = str(tmp_path / "partial")
    shutil.copytree(quick_run[0], out)
    shutil.rmtree(os.path.join(out, "downstream", "letter"))  # as if the run stopped before it
    os.remove(os.path.join(out, "downstream", "rqkmeans", "retrieval_seed1.json"))  # and part-way through a seed
    p = evaluate("--data", SLICE, "--output", out, "--quick", "--tokenizers", ",".join(TOKENIZERS), "--report-only")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["pending"] == ["letter"] and list(r["tokenizers"]) == ["adc_sid", "rqkmeans"]
    assert r["tokenizers"]["rqkmeans"]["seeds"] == [0] and r["tokenizers"]["adc_sid"]["seeds"] == [0, 1]
    assert r["stage_seconds_this_invocation"] == {}  # nothing was trained
    assert not os.path.exists(os.path.join(out, "downstream", "letter"))
    assert "Interim report" in open(os.path.join(out, "report.md")).read()
    # issue 47's study: the same run with --withhold-test shows no figure, results.json keeps them
    os.remove(os.path.join(out, "results.json"))
    p = evaluate("--data", SLICE, "--output", out, "--quick", "--tokenizers", ",".join(TOKENIZERS), "--report-only",
                 "--withhold-test")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "withheld" in p.stdout and not re.search(r"R@10|N@10|GAUC|0\.\d{4}", p.stdout), p.stdout
    report = open(os.path.join(out, "report.md")).read()
    assert "withheld" in report and not re.search(r"\d\.\d{4}", report), report
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["tokenizers"]["adc_sid"]["sid_sasrec"]["all"]["recall@10"]["mean"] >= 0  # kept for the final read


@pytest.mark.slow
def test_tasks_left_out_are_not_trained_and_the_report_says_so(quick_run, tmp_path):
    """--tasks sid_sasrec,ranking (the default-tokenizer study, issue 47): retrieval is neither
    trained nor waited for, and the report's retrieval columns say '-' instead of failing."""
    import glob
    import shutil
    out = str(tmp_path / "tasks")
    shutil.copytree(quick_run[0], out)
    for f in glob.glob(os.path.join(out, "downstream", "*", "retrieval_seed*")):
        os.remove(f)
    p = evaluate("--data", SLICE, "--output", out, "--quick", "--tokenizers", ",".join(TOKENIZERS),
                 "--tasks", "ranking,sid_sasrec")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["stage_seconds_this_invocation"] == {} and r["pending"] == []  # nothing trained, nothing missing
    assert r["tasks"] == ["sid_sasrec", "ranking"]
    assert not glob.glob(os.path.join(out, "downstream", "*", "retrieval_seed*"))
    for e in r["tokenizers"].values():
        assert "retrieval" not in e and {"sid_sasrec", "ranking"} <= set(e)
    assert all(s["task"] != "retrieval" for s in r["significance"]) and r["significance"]
    md = open(os.path.join(out, "report.md")).read()
    assert "Downstream tasks trained: sid_sasrec, ranking" in md
    p = evaluate("--data", SLICE, "--output", out, "--quick", "--tasks", "ranking,nope")
    assert p.returncode == 2 and "tasks must name" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_the_evidence_weights_never_fall_with_popularity_on_the_slice(quick_run):
    """Issue 47, item 2: rq-evidence fitted as the evaluation fits it (the Beauty slice, its
    content embeddings and the quick run's SASRec table) exports weights whose bucket means
    never fall with popularity, 0 for items never trained, in [0, 1]. (The slice's SASRec is
    four epochs on 250 users: its misfit need not fall with n, and kappa may be 0, so the
    rise itself is checked on the full runs below.)"""
    from sidserve.eval.config import EvalConfig
    from sidserve.eval.pipeline import Evaluation
    from sidserve.eval.tokenizers import fit_tokenizer, weight_by_popularity

    ev = Evaluation(EvalConfig.quick_profile(SLICE, quick_run[0], tokenizers=TOKENIZERS))
    items, dims = ev.fit_inputs(ev.embedding_of("rqevidence_tied"))
    tk = fit_tokenizer("rqevidence_tied", items, dims, items["behavior_emb"].shape[1], ev.c.budget)
    by = tk.quantization["behavior_weight_by_popularity"]
    pop = items["popularity"]
    means = [m for m in by.values() if m is not None]
    assert len(means) >= 2 and all(a <= b for a, b in zip(means, means[1:])), by
    w = tk.tokenizer.encode(items).behavior_weights
    assert (w[pop == 0] == 0).all() and ((w >= 0) & (w <= 1)).all()
    assert w.shape[1] == tk.tokenizer.config.num_levels - 2 and by == weight_by_popularity(w[:, 0], pop)


@pytest.mark.parametrize("regime", ["full", "weak"])
def test_the_evidence_weights_rise_with_popularity_on_beauty(regime):
    """Issue 47, item 2, on Beauty: the fits of the default-tokenizer study (kept in git,
    docs/evaluation/default/<regime>, every seed) export mean weights that rise strictly
    across the popularity buckets 1 / 2-10 / 11-100 / 100+, none 0, none above 1."""
    import glob
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "evaluation",
                        "default", regime, "tokenizers", "rqevidence_tied")
    files = glob.glob(os.path.join(root, "quantization.json")) + glob.glob(os.path.join(root, "seed*",
                                                                                         "quantization.json"))
    assert files, f"no fit of rqevidence_tied under {root}"
    for f in files:
        by = json.load(open(f))["behavior_weight_by_popularity"]
        means = [by[b] for b in ("1", "2-10", "11-100", "100+")]
        assert 0 < means[0] and all(a < b for a, b in zip(means, means[1:])) and means[-1] <= 1, (f, by)


@pytest.mark.slow
def test_a_cache_kept_in_git_resumes_on_a_fresh_checkout(quick_run, tmp_path):
    """The full run outlives one machine, so its cache is kept in git: what the cache's own
    .gitignore leaves out is rebuilt only when needed, and nothing trained is lost."""
    import shutil
    import subprocess
    repo, clone = str(tmp_path / "repo"), str(tmp_path / "clone")
    shutil.copytree(quick_run[0], repo)
    open(os.path.join(repo, "downstream", "adc_sid", "ranking_seed0.json.lock"), "w").close()  # as if running
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "cache"]):
        subprocess.run(git + cmd, cwd=repo, check=True)
    subprocess.run(git + ["clone", "-q", repo, clone], check=True)
    kept = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    assert not any(f.startswith("embeddings/") and f.endswith(".npy") for f in kept)  # rebuilt from text
    assert not any("/artifact/" in f or f.startswith("ranking_negatives") or f.endswith(".lock") for f in kept)
    assert "sasrec/untied/input_emb.npy" in kept and "sasrec/tied/input_norms.npy" in kept  # e_b, the plot
    assert "sasrec/tied/input_emb.npy" in kept  # rqkmeans_tied's e_b
    assert "downstream/adc_sid/retrieval_seed1.npz" in kept
    assert "tokenizers/adc_sid/seed1/sids.npz" in kept  # seed 1's fit: its SIDs, not its artifact

    before = json.load(open(os.path.join(quick_run[0], "results.json")))
    args = ("--data", SLICE, "--output", clone, "--quick", "--tokenizers", ",".join(TOKENIZERS))
    p = evaluate(*args)  # everything cached: no text model, no fit, no training
    assert p.returncode == 0, p.stderr[-3000:]
    after = json.load(open(os.path.join(clone, "results.json")))
    assert after["stage_seconds_this_invocation"] == {}
    assert not os.path.exists(os.path.join(clone, "embeddings", "text.npy"))
    assert after["tokenizers"] == before["tokenizers"] and after["significance"] == before["significance"]

    # a tokenizer still to be fitted on the fresh checkout: the text embeddings come back first
    for f in ("quantization.json", "sids.npz"):
        os.remove(os.path.join(clone, "tokenizers", "letter", f))
    p = evaluate(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    after = json.load(open(os.path.join(clone, "results.json")))
    assert set(after["stage_seconds_this_invocation"]) == {"embeddings", "tokenizers"}
    assert os.path.exists(os.path.join(clone, "embeddings", "text.npy"))
    run_only = {"stage_seconds", "pid", "torch_threads"}  # of the fit just redone

    def same(entry):
        return {**entry, "quantization": {k: v for k, v in entry["quantization"].items() if k not in run_only}}
    assert same(after["tokenizers"]["letter"]) == same(before["tokenizers"]["letter"])  # published SIDs: same


def test_a_stage_lock_is_held_by_a_live_process_and_taken_over_from_a_dead_one(tmp_path):
    import signal
    import subprocess
    import sys

    from sidserve.files import try_lock

    done = str(tmp_path / "downstream" / "x" / "ranking_seed0.json")
    lock = try_lock(done + ".lock")
    assert lock is not None and try_lock(done + ".lock") is None  # held by this (live) process
    lock.release()
    # another process takes the stage and is killed holding it (no cleanup of any kind)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from sidserve.files import try_lock; "
                               "l = try_lock(sys.argv[1]); print(l is not None, flush=True); sys.stdin.read()",
                               done + ".lock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    assert try_lock(done + ".lock") is None  # held by a live process
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = try_lock(done + ".lock")  # the kernel dropped the dead process' lock
    assert lock is not None
    lock.release()
    with open(done + ".lock", "w") as f:  # a lock file copied from another machine: nobody holds it
        f.write("another-host 1234 0\n")
    lock = try_lock(done + ".lock")
    assert lock is not None
    lock.release()


@pytest.mark.slow
def test_parallel_processes_share_the_stages_and_one_reports(quick_run, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("SIDSERVE_EVAL_POLL_S", "0.2")  # quick stages take a second, real ones minutes
    out = str(tmp_path / "par")
    shutil.copytree(quick_run[0], out)  # embeddings, SASRec and fits cached: the downstream stages run again
    for n in ("rqkmeans", "letter"):
        shutil.rmtree(os.path.join(out, "downstream", n))
    p = evaluate("--data", SLICE, "--output", out, "--quick", "--tokenizers", "rqkmeans,letter", "--parallel", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(os.path.join(out, "results.json")))
    assert set(r["tokenizers"]) == {"rqkmeans", "letter"} and not r["pending"]
    stages = [json.load(open(os.path.join(out, "downstream", n, f))) for n in ("rqkmeans", "letter")
              for f in os.listdir(os.path.join(out, "downstream", n)) if f.endswith(".json")]
    assert len(stages) == 2 * 2 * 3  # 2 tokenizers x 2 seeds x 3 tasks, each once
    assert len({s["pid"] for s in stages}) == 2  # both processes trained some
    assert {s["torch_threads"] for s in stages} == {max(1, (os.cpu_count() or 1) // 2)}
    from sidserve.files import try_lock

    assert not [f for d, _, fs in os.walk(out) for f in fs if f.endswith(".ckpt.pt")]
    for lock in (try_lock(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs if f.endswith(".lock")):
        assert lock is not None  # every stage's lock was released
        lock.release()


@pytest.mark.slow
def test_a_stage_interrupted_mid_training_resumes_from_its_checkpoint(quick_run, tmp_path, monkeypatch):
    """A process killed during a stage's training loses only the epoch in progress: the
    next run resumes from ``<stage>.ckpt.pt`` and writes what an uninterrupted run writes."""
    import shutil

    from sidserve.eval import checkpoint as ckpt_mod
    from sidserve.eval.config import EvalConfig, checkpoint_path
    from sidserve.eval.pipeline import Evaluation

    out = str(tmp_path / "resume")
    shutil.copytree(quick_run[0], out)
    done = os.path.join(out, "downstream", "rqkmeans", "ranking_seed1.json")
    before = json.load(open(done))
    os.remove(done)
    cfg = EvalConfig.quick_profile(SLICE, out, tokenizers=list(TOKENIZERS))
    save = ckpt_mod.EpochCheckpoint.save

    class Killed(Exception):
        pass

    def save_then_die(self, epoch, *a, **kw):
        save(self, epoch, *a, **kw)
        raise Killed  # after epoch 0 was saved

    monkeypatch.setattr(ckpt_mod.EpochCheckpoint, "save", save_then_die)
    with pytest.raises(Killed):
        Evaluation(cfg).run()
    assert os.path.exists(checkpoint_path(done)) and not os.path.exists(done)
    monkeypatch.setattr(ckpt_mod.EpochCheckpoint, "save", save)
    Evaluation(cfg).run()
    after = json.load(open(done))
    assert after["early_stopping"]["resumed_from_epoch"] == 1
    assert not os.path.exists(checkpoint_path(done))  # the result is written: the checkpoint goes
    assert [h["valid_gauc"] for h in after["history"]] == pytest.approx([h["valid_gauc"] for h in before["history"]],
                                                                        abs=1e-6)
    assert after["all"]["gauc"] == pytest.approx(before["all"]["gauc"], abs=1e-6)
    assert "*.ckpt.pt" in open(os.path.join(out, ".gitignore")).read().split("\n")


def test_an_embedding_variant_fits_on_its_own_table(quick_run):
    """rqkmeans_tied is rqkmeans with the tied SASRec table as e_b: the same SIDs as rqkmeans
    told to read that table, other SIDs than on the run's e_b; a contradicting table is refused,
    and a run without the tied SASRec cannot plan it."""
    from sidserve.eval.config import EvalConfig
    from sidserve.eval.tuning import fit_candidate
    small = {"codebook_size": 16, "num_levels": 3}
    variant, _ = fit_candidate(quick_run[0], "rqkmeans_tied", small)
    same, _ = fit_candidate(quick_run[0], "rqkmeans", small, "tied")
    run_eb, _ = fit_candidate(quick_run[0], "rqkmeans", small)
    assert np.array_equal(variant.codes, same.codes) and not np.array_equal(variant.codes, run_eb.codes)
    with pytest.raises(ValueError, match="reads the 'tied' table"):
        fit_candidate(quick_run[0], "rqkmeans_tied", small, "untied-input")
    with pytest.raises(ValueError, match="needs the 'tied' SASRec variant"):
        EvalConfig(data=SLICE, output="x", tokenizers=["rqkmeans_tied"], sasrec_variants=["untied"]).validate()


@pytest.mark.slow
def test_adc_sid_runs_in_its_validated_configuration_and_a_fit_of_another_is_refused(quick_run, tmp_path):
    """adc_sid reads the tied table with popularity richness and no downstream weights
    (tokenizers.ADC_EVAL); every stage file records that spec, and a cache holding a fit or a
    downstream stage made with another spec (here: the paper's configuration, as adc_sid was
    cached before specs were kept) is refused with what to remove, not mixed in."""
    import shutil

    from sidserve.eval.tokenizers import ADC_EVAL, spec
    out, _ = quick_run
    want = json.load(open(os.path.join(out, "tokenizers", "adc_sid", "quantization.json")))["spec"]
    assert want == {"tokenizer": "adc_sid", "embedding": ADC_EVAL["embedding"],
                    "overrides": ADC_EVAL["overrides"], "sid_weights": ADC_EVAL["sid_weights"]}
    for task in ("sid_sasrec", "retrieval", "ranking"):
        assert json.load(open(os.path.join(out, "downstream", "adc_sid", f"{task}_seed0.json")))["spec"] == want
    fitted = json.load(open(os.path.join(out, "tokenizers", "adc_sid", "artifact", "config.json")))["config"]
    assert fitted["richness_signal"] == "popularity"
    report = open(os.path.join(out, "report.md")).read()  # the report says which table each one read
    assert "receive `untied-input` as e_b, except ADC-SID (`tied`, richness_signal=popularity, its codes read " \
           "at weight 1 downstream)." in report
    assert spec("rqkmeans", "untied-input")["sid_weights"] and spec("adc_sid_untied", "untied-input") == {
        "tokenizer": "adc_sid_untied", "embedding": "untied-input", "overrides": {}, "sid_weights": True}
    args = ("--data", SLICE, "--quick", "--tokenizers", ",".join(TOKENIZERS))
    for stage in ("tokenizers/adc_sid/quantization.json", "downstream/adc_sid/ranking_seed1.json"):
        copy = str(tmp_path / stage.split("/")[0])
        shutil.copytree(out, copy)
        path = os.path.join(copy, stage)
        d = json.load(open(path))
        del d["spec"]  # a file from before specs: read as the paper's configuration
        json.dump(d, open(path, "w"))
        for mode in ((), ("--report-only",)):  # neither trained on nor reported
            p = evaluate(*args, "--output", copy, *mode)
            assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
            assert path in p.stderr and "remove tokenizers/adc_sid/ and downstream/adc_sid/" in p.stderr


def test_adc_sid_and_the_papers_configuration_fit_what_they_say():
    """fit_tokenizer builds adc_sid from ADC_EVAL's overrides and adc_sid_untied from the
    paper's defaults; a selection trial's override still wins over the family's."""
    from sidserve.eval.tokenizers import TokenizerBudget, _adc_config, in_adc_eval, uses_sid_weights
    dims, b = {"text": 8, "meta": 8}, TokenizerBudget(codebook_size=8)
    assert _adc_config(dims, 4, b, {"richness_signal": "popularity"}).richness_signal == "popularity"
    assert _adc_config(dims, 4, b).richness_signal == "norm"
    trial = TokenizerBudget(codebook_size=8, overrides={"richness_signal": "norm"})
    assert _adc_config(dims, 4, trial, {"richness_signal": "popularity"}).richness_signal == "norm"
    assert in_adc_eval("adc_sid") and in_adc_eval("adc_sid_no_gate") and not in_adc_eval("adc_sid_untied")
    assert not in_adc_eval("rqkmeans_tied") and uses_sid_weights("adc_sid_untied") and uses_sid_weights("opq")
