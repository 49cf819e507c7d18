"""`sidserve train | assign | refresh | serve`: every tokenizer through every job, on a catalog
whose dimensions are not the defaults and whose text column has its own name."""

import json
import os
import subprocess
import sys
import time

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port

from sidserve import load_tokenizer, make_synthetic_catalog
from sidserve.cli import build_parser, main
from sidserve.inputs import InputSpec, infer_inputs, parse_columns, reconcile
from sidserve.snapshot import SnapshotRoot
from sidserve.tokenizers.registry import tokenizer_class

DIMS = {"text": 20, "image": 12}  # not the defaults (64, 32)
BEHAVIOR_DIM = 8
SMALL = {
    "adc-sid": "codebook_size: 16\nhidden_dim: 32\nlatent_dim: 16\nexpert_hidden_dim: 32\nbatch_size: 256\n"
               "kmeans_init_samples: 1500\nrestart_every: 4\n",
    "rq-kmeans": "codebook_size: 16\nnum_levels: 3\n",
    "opq": "codebook_size: 16\nnum_levels: 4\nopq_iters: 2\n",
    "rq-vae": "codebook_size: 16\nnum_levels: 3\nlatent_dim: 8\nhidden_dim: 32\nbatch_size: 256\n",
}
EPOCHS = {"adc-sid": "1", "rq-vae": "2"}


@pytest.fixture(autouse=True)
def _root_handlers():
    """``sidserve`` configures logging on stderr, which pytest swaps per test: drop the handler
    it adds so later tests do not log into a closed capture stream."""
    import logging

    before = list(logging.root.handlers)
    yield
    logging.root.handlers[:] = before


# inputs from the data -------------------------------------------------------------------

def test_dimensions_come_from_column_types_and_values():
    fixed = pa.array([[0.0] * 5, None], pa.list_(pa.float32(), 5))
    var = pa.array([None, [1.0, 2.0, 3.0]], pa.list_(pa.float32()))
    beh = pa.array([[1.0] * 7, None], pa.list_(pa.float32()))
    t = pa.table({"item_id": ["a", "b"], "img_emb": fixed, "text_emb": var, "behavior_emb": beh, "n": [1, 2]})
    spec = infer_inputs(t.schema, t)
    assert spec.modality_dims == {"img": 5, "text": 3}  # column order: it fixes the SID layout
    assert list(spec.modality_dims) == ["img", "text"] and spec.behavior_dim == 7
    assert infer_inputs(t.drop_columns(["behavior_emb"]).schema, t).behavior_dim is None


@pytest.mark.parametrize("table, needle", [
    (pa.table({"item_id": ["a"], "vec": [[1.0]]}), "no content embedding column"),
    (pa.table({"text_emb": ["not a vector"]}), "'text_emb' looks like an embedding"),
])
def test_inputs_that_cannot_be_inferred_are_named(table, needle):
    with pytest.raises(ValueError, match=needle):
        infer_inputs(table.schema, table)


def test_config_fields_are_filled_from_the_data_or_checked_against_it():
    spec = InputSpec({"text": 20, "image": 12}, 8)
    filled, inferred = reconcile({"codebook_size": 16}, spec)
    assert filled == {"codebook_size": 16, "modality_dims": {"text": 20, "image": 12}, "behavior_dim": 8}
    assert inferred == ["modality_dims", "behavior_dim"]
    kept, inferred = reconcile({"modality_dims": {"text": 20}, "behavior_dim": None}, spec)
    assert kept["modality_dims"] == {"text": 20} and kept["behavior_dim"] is None and inferred == []
    with pytest.raises(ValueError, match=r"modality_dims\['text'\]=64 contradicts .*'text_emb' holds 20-d"):
        reconcile({"modality_dims": {"text": 64}}, spec)
    with pytest.raises(ValueError, match=r"names 'audio' but the input has no 'audio_emb'"):
        reconcile({"modality_dims": {"audio": 4}}, spec)
    with pytest.raises(ValueError, match=r"behavior_dim=32 contradicts .*holds 8-d"):
        reconcile({"behavior_dim": 32}, spec)
    with pytest.raises(ValueError, match=r"behavior_dim=8 contradicts the input, which has no 'behavior_emb'"):
        reconcile({"behavior_dim": 8}, InputSpec({"text": 20}, None))
    # a column null in the first rows: fine when the config names its dimension, else an error
    null_start = InputSpec({"text": 20}, None, undetermined={"behavior": "cannot infer the dimension of x"})
    assert reconcile({"behavior_dim": 8}, null_start)[0]["behavior_dim"] == 8
    with pytest.raises(ValueError, match="cannot infer the dimension of x"):
        reconcile({}, null_start)


def test_column_flags():
    assert parse_columns(["text=title_vec", "behavior_emb=cf"]) == {"text": "title_vec", "behavior": "cf"}
    for bad in (["text"], ["=x"], ["text=a", "text=b"]):
        with pytest.raises(ValueError, match="--column"):
            parse_columns(bad)


# the command line ----------------------------------------------------------------------

def test_every_subcommand_has_help_with_defaults(capsys):
    for command in ("train", "assign", "refresh", "serve", "evaluate", "demo"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert f"sidserve {command}" in out and "--" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: adc-sid)" in out and "(default: 200000)" in out and "(default: outputs/model)" in out


def test_jobs_scripts_are_the_same_commands():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "jobs/train.py", "--help"], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--tokenizer {adc-sid,rq-kmeans,rq-vae,opq}" in proc.stdout


def test_the_tokenizer_types_are_registered():
    for kind in ("adc-sid", "rq-kmeans", "rq-vae", "opq"):
        assert tokenizer_class(kind).tokenizer_type == kind
    with pytest.raises(ValueError, match="unknown tokenizer 'rq-kmean'; choose one of"):
        tokenizer_class("rq-kmean")


def test_baselines_refuse_a_gpu_that_is_not_there():
    import torch

    tok = tokenizer_class("rq-kmeans")()
    assert tok.to("cpu").device_ == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            tok.to("cuda")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        tok.to("meta")


# every tokenizer through every job -------------------------------------------------------

@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    t = make_synthetic_catalog(1500, modality_dims=DIMS, behavior_dim=BEHAVIOR_DIM, n_clusters=24,
                               cold_share=0.1, seed=5)
    t = t.rename_columns(["title_vec" if n == "text_emb" else n for n in t.column_names])
    d = tmp_path_factory.mktemp("cli-items")
    pq.write_table(t.slice(0, 800), d / "a.parquet")
    pq.write_table(t.slice(800), d / "b.parquet")
    return t, str(d)


def standard(table: pa.Table) -> pa.Table:
    return table.rename_columns(["text_emb" if n == "title_vec" else n for n in table.column_names])


def run(argv) -> int:
    return main([str(a) for a in argv])


def serve_local(model: str, snapshot: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sidserve", "serve", "--local", "--model", model, "--snapshot",
                             snapshot, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "SIDSERVE_API_KEY": ""})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.time() + 90
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return proc, client
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"sidserve serve --local did not start: {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("kind", ["rq-kmeans", "opq", "rq-vae", "adc-sid"])
def test_train_assign_serve_with_the_datas_own_dimensions(kind, ray_session, catalog, tmp_path, capsys):
    ray_session()
    table, items = catalog
    config = tmp_path / "config.yaml"
    config.write_text(SMALL[kind])
    model, snaps = str(tmp_path / "model"), str(tmp_path / "snapshots")
    argv = ["train", "--items", items, "--output", model, "--tokenizer", kind, "--config", config,
            "--column", "text=title_vec", "--storage-path", tmp_path / "ckpt", "--num-workers", "1"]
    if kind in EPOCHS:
        argv += ["--epochs", EPOCHS[kind]]
    assert run(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "inputs from the data: modality_dims={'text': 20, 'image': 12}, behavior_dim=8" in out
    tok = load_tokenizer(model)
    assert tok.tokenizer_type == kind
    assert tok.config.modality_dims == DIMS and tok.config.behavior_dim == BEHAVIOR_DIM
    saved = json.loads(open(os.path.join(model, "config.json")).read())
    assert saved["inputs"]["columns"] == {"text": "title_vec"}
    assert "modality_dims" in saved["inputs"]["inferred"]
    metrics = json.loads(open(os.path.join(model, "metrics.json")).read())
    assert metrics["catalog"]["num_valid"] == table.num_rows

    # assign: the model's column mapping applies without --column
    assert run(["assign", "--items", items, "--model", model, "--output", snaps, "--num-workers", 1]) == 0, \
        capsys.readouterr().err
    root = SnapshotRoot(snaps)
    version = root.latest()
    snap = pq.read_table(os.path.join(snaps, "snapshots", version, "items")).sort_by("item_id")
    assert snap.num_rows == table.num_rows
    expect = tok.encode(standard(table))
    by_id = dict(zip(expect.item_id.tolist(), expect.sid.tolist()))
    assert [by_id[i] for i in snap.column("item_id").to_pylist()] == snap.column("sid").to_pylist()

    # serve: a catalog item answers from the snapshot, a new one is computed by the model
    proc, client = serve_local(model, snaps)
    try:
        row = standard(table).slice(0, 1).to_pylist()[0]  # the service speaks the standard names
        vectors = {k: v for k, v in row.items() if k.endswith("_emb")}
        r = client.post("/tokenize", json={"items": [{**vectors, "item_id": row["item_id"]},
                                                     {**vectors, "item_id": "never-seen"}]})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert res[0]["path"] == "catalog" and res[0]["sid"] == by_id[row["item_id"]]
        assert res[1]["path"] != "catalog" and res[1]["sid"] == expect.sid[0].tolist()
        assert r.json()["model_version"] == tok.version
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)

    if kind == "rq-kmeans":  # a nightly refresh re-fits a baseline too
        refit = str(tmp_path / "refit")
        assert run(["refresh", "--items", items, "--model", model, "--output", snaps, "--refit",
                    "--refit-output", refit, "--num-workers", 1]) == 0, capsys.readouterr().err
        again = load_tokenizer(refit)
        assert again.tokenizer_type == kind and again.config == tok.config
        assert root.latest() != version
        # same data, same seed: k-means lands where it did, so no item changes its SID
        assert "churn 0.0000" in capsys.readouterr().out


def test_bad_choices_exit_2_naming_the_value(ray_session, catalog, tmp_path, capsys):
    ray_session()
    _, items = catalog
    config = tmp_path / "c.yaml"
    config.write_text("modality_dims: {text: 64, image: 12}\n")
    argv = ["train", "--items", items, "--output", tmp_path / "m", "--column", "text=title_vec", "--config", config]
    assert run(argv) == 2
    assert "modality_dims['text']=64 contradicts the input, whose 'text_emb' holds 20-d vectors" in \
        capsys.readouterr().err
    assert run(["train", "--items", items, "--output", tmp_path / "m", "--tokenizer", "rq-kmeans", "--epochs", 3]) == 2
    assert "unknown rq-kmeans config key(s) ['epochs']" in capsys.readouterr().err
    assert run(["train", "--items", items, "--output", tmp_path / "m", "--column", "text=nope"]) == 2
    assert "--column text=nope: the input has no column 'nope'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")  # every refusal came before anything was written
