"""`sidserve select` (issue 48) end to end on the Beauty slice written as a user would have it:
a Parquet catalog with its embeddings and a Parquet interaction log. It resumes after a kill,
its choice is the rule's on the run's own validation figures, and it is the evaluation's code
path: the same inputs give the same SIDs and figures as `sidserve evaluate`."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, SLICE

from sidserve.eval.data import load_dataset
from sidserve.eval.default_rule import (
    CELLS,
    LIBRARY_DEFAULT,
    choose_for_catalog,
    figures_from_results,
)

CANDIDATES = [LIBRARY_DEFAULT, "rqkmeans"]


def select(*args, timeout=900, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "select_tokenizer.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def write_inputs(quick_run, root):
    """The slice as Parquet: catalog (asin ids, the quick evaluation's text/meta embeddings),
    log (user ids that sort like the slice's users, timestamps), plus 3 rows naming an unknown
    item and a user with one interaction (both dropped and counted)."""
    data = load_dataset(SLICE)
    emb = {m: np.load(os.path.join(quick_run[0], "embeddings", f"{m}.npy")) for m in ("text", "meta")}
    assert emb["text"].shape[0] == data.num_items
    asin = [it["asin"] for it in data.items]
    os.makedirs(root / "catalog")
    cols = {"item_id": pa.array(asin)}
    for m, v in emb.items():
        cols[f"{m}_emb"] = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float32).ravel()), v.shape[1])
    pq.write_table(pa.table(cols), root / "catalog" / "part-0.parquet")
    users, items, ts = [], [], []
    for u, seq in enumerate(data.sequences):
        for t, i in enumerate(seq.tolist()):
            users.append(f"u{u:05d}")
            items.append(asin[i - 1])
            ts.append(1_000_000 + 1000 * u + t)
    users += ["u00000", "u00001", "u00002", "zz-lonely"]
    items += ["NOT-IN-CATALOG"] * 3 + [asin[0]]
    ts += [5, 6, 7, 8]
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": ts}), root / "log.parquet")
    return str(root / "catalog"), str(root / "log.parquet")


@pytest.fixture(scope="module")
def selected(quick_run, tmp_path_factory):
    """One select run, killed once its first downstream stage is written, then resumed."""
    root = tmp_path_factory.mktemp("select")
    catalog, log = write_inputs(quick_run, root)
    out = str(root / "out")
    args = ["--items", catalog, "--interactions", log, "--output", out, "--quick", "--sample-users", "0",
            "--tokenizers", ",".join(CANDIDATES), "--seeds", "0,1"]
    p = select(*args, wait=False)
    first = os.path.join(out, "evaluation", "downstream", CANDIDATES[0], "sid_sasrec_seed0.json")
    deadline = time.time() + 600
    while not os.path.exists(first) and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()[-3000:]  # still running: killed part-way
    p.send_signal(signal.SIGKILL)
    p.wait()
    kept = os.path.getmtime(first)
    assert not os.path.exists(os.path.join(out, "report.md"))
    done = select(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, kept, done


def test_select_resumes_after_a_kill_and_writes_its_outputs(selected):
    out, kept, done = selected
    first = os.path.join(out, "evaluation", "downstream", CANDIDATES[0], "sid_sasrec_seed0.json")
    assert os.path.getmtime(first) == kept  # the stage finished before the kill was not redone
    s = json.load(open(os.path.join(out, "selection.json")))
    p = s["inputs"]
    assert p["unknown_item_rows"] == 3 and p["users_dropped_too_short"] == 1 and p["users_kept"] == 250
    assert s["behavior_source"] == "sasrec" and "[sidserve] select:" in done.stdout
    # test is read for the chosen candidate and the runner-up only
    assert set(s["test"]) == {s["chosen"], s["runner_up"]} and s["chosen"] in CANDIDATES
    report = open(os.path.join(out, "report.md")).read()
    assert "The rule, on validation" in report and s["reason"] in report
    # the config sidserve train takes: the chosen fit's fields, input dims left to the catalog
    fields = yaml.safe_load(open(os.path.join(out, "tokenizer.yaml")))
    art = json.load(open(os.path.join(out, "evaluation", "tokenizers", s["chosen"], "artifact", "config.json")))
    assert fields == {k: v for k, v in art["config"].items() if k not in ("modality_dims", "behavior_dim")}
    assert f"--tokenizer {art['tokenizer_type']}" in open(os.path.join(out, "tokenizer.yaml")).read()
    # the learned behavior table, keyed by the catalog's ids, for sidserve train
    beh = pq.read_table(os.path.join(out, "behavior_emb.parquet"))
    assert beh.num_rows == p["items"] and beh.column_names == ["item_id", "behavior_emb"]


def test_the_choice_is_the_rule_on_the_runs_own_validation_figures(selected):
    out, _, _ = selected
    s = json.load(open(os.path.join(out, "selection.json")))
    results = json.load(open(os.path.join(out, "evaluation", "results.json")))
    assert results["tasks"] == ["sid_sasrec", "ranking"]  # what the rule reads, nothing more
    rule = choose_for_catalog(figures_from_results(results, CANDIDATES))
    assert (s["chosen"], s["runner_up"], s["reason"]) == (rule.chosen, rule.runner_up, rule.reason)


def test_select_is_the_evaluations_code_path(selected, quick_run):
    """The same catalog through evaluate (the quick run on the slice) and through select: the
    same SASRec table, the same RQ-Kmeans SIDs, the same validation figures."""
    out, _, _ = selected
    ev = os.path.join(out, "evaluation")
    np.testing.assert_array_equal(np.load(os.path.join(ev, "sasrec", "untied", "input_emb.npy")),
                                  np.load(os.path.join(quick_run[0], "sasrec", "untied", "input_emb.npy")))
    a = np.load(os.path.join(ev, "tokenizers", "rqkmeans", "sids.npz"))["sid"]
    b = np.load(os.path.join(quick_run[0], "tokenizers", "rqkmeans", "sids.npz"))["sid"]
    np.testing.assert_array_equal(a, b)
    for task in {t for t, _, _ in CELLS}:
        mine = json.load(open(os.path.join(ev, "downstream", "rqkmeans", f"{task}_seed0.json")))
        theirs = json.load(open(os.path.join(quick_run[0], "downstream", "rqkmeans", f"{task}_seed0.json")))
        assert mine["valid_groups"] == theirs["valid_groups"]


def test_bad_inputs_are_refused_with_a_message_and_nothing_written(quick_run, tmp_path):
    from sidserve.select import SelectConfig, run_select

    catalog, log = write_inputs(quick_run, tmp_path)
    out = str(tmp_path / "out")

    def refused(match, **kw):
        c = SelectConfig(**{"items": catalog, "interactions": log, "output": out, "quick": True, **kw})
        with pytest.raises(ValueError, match=match):
            run_select(c)
        assert not os.path.exists(out)  # nothing half-written

    other = str(tmp_path / "other.parquet")  # a log in another id space
    pq.write_table(pa.table({"user_id": ["a"] * 3, "item_id": ["x", "y", "z"], "timestamp": [1, 2, 3]}), other)
    refused("same id space", interactions=other)
    t = pq.read_table(log)  # too many unknown ids
    bad = pa.concat_tables([t, pa.table({"user_id": ["q"] * 200, "item_id": ["nope"] * 200,
                                         "timestamp": list(range(200))}).cast(t.schema)])
    pq.write_table(bad, str(tmp_path / "bad.parquet"))
    refused("above --max-unknown-share", interactions=str(tmp_path / "bad.parquet"))
    refused(r"no column\(s\) \['ts'\]", order_column="ts")
    cat = pq.read_table(os.path.join(catalog, "part-0.parquet")).to_pylist()  # a vector of the wrong length
    cat[5]["text_emb"] = cat[5]["text_emb"][:-1]
    os.makedirs(tmp_path / "badcat")
    pq.write_table(pa.Table.from_pylist(cat), str(tmp_path / "badcat" / "a.parquet"))
    refused(f"'text_emb' has a length other than 384 for 1 items \\(first: item_id '{cat[5]['item_id']}'\\)",
            items=str(tmp_path / "badcat"))
    refused("library default", tokenizers=["rqkmeans", "opq"])
    refused("no behavior_emb", behavior="catalog")
    # the command: exit 2 and the message, no traceback
    p = select("--items", catalog, "--interactions", other, "--output", out)
    assert p.returncode == 2 and "same id space" in p.stderr and "Traceback" not in p.stderr


def test_prepare_splits_by_time_and_by_user_as_documented(tmp_path):
    """The two splits on a hand-made log, checked line by line."""
    from sidserve.eval.data import load_dataset
    from sidserve.eval.parquet_input import prepare

    ids = ["a", "b", "c", "d", "e"]
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    os.makedirs(tmp_path / "cat")
    pq.write_table(pa.table({"item_id": ids, "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 2),
                             "behavior_emb": [[1.0, 2.0], None, [3.0, 4.0], None, [5.0, 6.0]]}),
                   tmp_path / "cat" / "p.parquet")
    # u1: a b c d e at t = 1..5; u2: e d at t = 2, 9 (then c at 10, then b at 20); u3: one item
    log = pa.table({"user_id": ["u1"] * 5 + ["u2"] * 4 + ["u3"],
                    "item_id": ["a", "b", "c", "d", "e", "e", "d", "c", "b", "a"],
                    "timestamp": [1, 2, 3, 4, 5, 2, 9, 10, 20, 3]})
    pq.write_table(log, tmp_path / "log.parquet")
    cat, lg = str(tmp_path / "cat"), str(tmp_path / "log.parquet")
    s = prepare(cat, lg, str(tmp_path / "loo"), split="loo")
    d = load_dataset(str(tmp_path / "loo"))
    names = [json.loads(line)["id"] for line in open(tmp_path / "loo" / "items.jsonl")]
    seqs = [[names[i - 1] for i in q] for q in d.sequences]
    assert seqs == [list("abcde"), list("edcb")] and s["users_dropped_too_short"] == 1
    assert s["behavior_dim"] == 2 and np.isnan(np.load(tmp_path / "loo" / "behavior.npy")[names.index("b")]).all()
    np.testing.assert_array_equal(np.load(tmp_path / "loo" / "embeddings" / "text.npy")[names.index("c")], emb[2])
    # time: cuts at the 0.5 / 0.8 quantiles of the log's order ranks (1..10, ties in file order:
    # u1 a1 b2 c4 d6 e7, u2 e3 d8 c9 b10, u3 a5 -> cuts 5.5 and 8.2). u1: train a b c, validation
    # d (then e, dropped), no test -> dropped; u2: train e, validation d, test c (then b, dropped)
    s = prepare(cat, lg, str(tmp_path / "time"), split="time", valid_quantile=0.5, test_quantile=0.8)
    d = load_dataset(str(tmp_path / "time"))
    names = [json.loads(line)["id"] for line in open(tmp_path / "time" / "items.jsonl")]
    seqs = [[names[i - 1] for i in q] for q in d.sequences]
    assert seqs == [list("edc")] and s["users_dropped_too_short"] == 2
    # the same output again is reused; other inputs on it are refused
    assert prepare(cat, lg, str(tmp_path / "time"), split="time", valid_quantile=0.5, test_quantile=0.8) == s
    with pytest.raises(ValueError, match="was prepared from"):
        prepare(cat, lg, str(tmp_path / "time"), split="loo")
