"""Distributed fitting on a local Ray: sharded Parquet, disjoint shards, fault recovery,
resume, input validation, resource checks."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import train_hooks
from ray import cloudpickle
from train_hooks import FaultAtStep, FaultInjection, RecordShards

from sidserve import SemanticIdTokenizer, TokenizerConfig, load_tokenizer, make_synthetic_catalog
from sidserve.jobs.train import TrainJobConfig, fit_distributed, load_tokenizer_config
from sidserve.synthetic import embedding_array

# the workers import no test module: the callbacks travel by value
cloudpickle.register_pickle_by_value(train_hooks)

TINY = dict(modality_dims={"text": 16, "image": 8}, behavior_dim=8, codebook_size=16, hidden_dim=32,
            latent_dim=16, expert_hidden_dim=32, epochs=3, batch_size=256, kmeans_init_samples=2000,
            restart_every=4)


def write_shards(table: pa.Table, directory, n_files: int = 4) -> str:
    os.makedirs(directory, exist_ok=True)
    step = -(-table.num_rows // n_files)
    for i in range(n_files):
        pq.write_table(table.slice(i * step, step), os.path.join(directory, f"part-{i}.parquet"))
    return str(directory)


@pytest.fixture(scope="module")
def catalog():
    return make_synthetic_catalog(3000, modality_dims=TINY["modality_dims"], behavior_dim=8,
                                  n_clusters=32, cold_share=0.1, seed=3)


@pytest.fixture(scope="module")
def items_dir(catalog, tmp_path_factory):
    return write_shards(catalog, tmp_path_factory.mktemp("items"))


def job(tmp_path, items, **kw):
    base = dict(output=str(tmp_path / "model"), items=items, tokenizer=TokenizerConfig(**TINY),
                num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path / "ckpt"))
    return TrainJobConfig(**{**base, **kw})


# collision regulation, its overlaps found across both workers' shards, pairs re-planned every 2 epochs
REGULATED = dict(collision_regulation="adaptive", collision_hamming=1, collision_refresh_every=2)


@pytest.fixture(scope="module")
def regulated_fit(ray_session, items_dir, tmp_path_factory):
    """Two workers reading their own row groups every epoch (ingest.py), with collision
    regulation: one fit, read by the sharded-fit test and the regulated resume test."""
    ray_session()
    tmp_path = tmp_path_factory.mktemp("regulated")
    shards = tmp_path / "shards"
    shards.mkdir()
    tok, version, metrics = fit_distributed(job(tmp_path, items_dir, callbacks=[RecordShards(str(shards))],
                                                tokenizer=TokenizerConfig(**TINY).replace(**REGULATED)))
    return tmp_path, shards, tok, version, metrics


@pytest.mark.timeout(300)
def test_two_worker_fit_over_sharded_parquet(regulated_fit, catalog):
    tmp_path, shards, tok, version, metrics = regulated_fit
    assert metrics["ingest"] == "parquet" and not metrics["catalog_cached"]

    loaded = SemanticIdTokenizer.from_pretrained(str(tmp_path / "model"))
    assert loaded.version == version
    enc = loaded.encode(catalog)
    assert enc.sid.shape == (catalog.num_rows, 6)
    np.testing.assert_array_equal(enc.sid, tok.encode(catalog).sid)

    # every worker saw a disjoint shard, together every item (equal shares: the same steps)
    seen = [set((shards / f"rank-{r}-epoch-0.txt").read_text().split()) for r in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == catalog.num_rows

    # metrics a person can follow: per epoch and final, in metrics.json inside the artifact
    m = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [0, 1, 2]
    for key in ("recon", "vq", "align", "reg", "entropy_per_position", "utilisation_per_position",
                "collision_rate", "items_per_s"):
        assert key in m["epochs"][-1]
    assert len(m["final"]["utilisation_per_position"]) == 6
    # the job's final metrics are the ones an in-process evaluate of the same model gives
    # (over every worker's shard = the catalog)
    ref = loaded.evaluate(catalog)
    warm = sum(v is not None for v in catalog.column("behavior_emb").to_pylist())
    for key in ("cold_path_agreement", "gate_zero_share"):
        assert m["final"][key] == pytest.approx(ref[key], abs=2 / warm), key
    np.testing.assert_allclose(m["final"]["gate_mean_per_position"], ref["gate_mean_per_position"], atol=2e-3)
    np.testing.assert_allclose(m["final"]["cold_path_agreement_per_position"],
                               ref["cold_path_agreement_per_position"], atol=2 / warm)
    for key in ("collision", "catalog_collision_rate", "catalog_collision_rate_h1", "catalog_collision_groups",
                "admissible_share", "regulated_pairs", "catalog_utilisation_per_position"):
        assert key in m["epochs"][0], key

    # both workers regulate the same pairs (found over the whole catalog, not one shard),
    # and the pairs are overlaps of the catalog's SIDs at the start of that epoch
    for epoch in (0, 2):  # refreshed every 2 epochs
        ranks = [json.loads((shards / f"rank-{r}-pairs-epoch-{epoch}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == ranks[1] and ranks[0]["pairs"]
        assert len(ranks[0]["pairs"]) == m["epochs"][epoch]["regulated_pairs"]
    assert not (shards / "rank-0-pairs-epoch-1.json").exists() and "regulated_pairs" not in m["epochs"][1]
    crossing = [p for p in ranks[0]["pairs"] if (p[0] in seen[0]) != (p[1] in seen[0])]
    assert crossing  # pairs whose items were trained by different workers were found
    assert m["final"]["num_items"] == m["catalog"]["num_valid"]
    assert m["catalog"]["num_rows"] == catalog.num_rows
    # the catalog statistics are over the whole input, not a worker's shard
    norms = [np.linalg.norm(v) for v in catalog.column("behavior_emb").to_pylist() if v is not None]
    assert loaded.catalog_stats_["n_max"] == pytest.approx(max(norms), rel=1e-5)
    assert loaded.catalog_stats_["n_min"] == pytest.approx(min(norms), rel=1e-5)


@pytest.mark.timeout(600)
def test_a_failed_run_resumes_and_equals_an_uninterrupted_one(ray_session, items_dir, tmp_path):
    """One worker (a fixed data order: the cleaned catalog is materialised in block order and
    shuffled locally with a per-epoch seed). The worker dies after step 6 of epoch 1, past the
    mid-epoch checkpoint of step 4; with no restarts allowed the run fails and publishes
    nothing; a plain rerun under the same name is refused; ``resume`` finishes it from that
    checkpoint (weights, optimizer, step, RNG; the resumed worker skips the 4 batches it had
    trained on). The model equals, bit for bit, with the same per-epoch history, a run never
    interrupted. (A restart inside a run, from an epoch's checkpoint, with two workers: the
    regulated test below; both read ``ray.train.get_checkpoint()`` the same way.)"""
    import torch

    ray_session()
    tok_a, _, m_a = fit_distributed(job(tmp_path / "a", items_dir, num_workers=1, cpus_per_worker=1.0))

    def nightly(**kw):
        return job(tmp_path / "b", items_dir, num_workers=1, cpus_per_worker=1.0, name="nightly",
                   checkpoint_every_steps=4, **kw)

    with pytest.raises(Exception, match="(?i)fail|died|error"):
        fit_distributed(nightly(max_failures=0, callbacks=[FaultAtStep(1, 6, 0, str(tmp_path / "died-mid"))]))
    assert (tmp_path / "died-mid").exists()  # the worker did die
    assert not (tmp_path / "b" / "model" / "manifest.json").exists()
    # a plain rerun under the same name is refused: it would silently mix two runs
    with pytest.raises(ValueError, match="--resume"):
        fit_distributed(nightly())
    tok_b, _, m_b = fit_distributed(nightly(resume=True))
    # epoch 0 by the failed run, 1 (from step 4) and 2 by the resumed one
    assert [e["started_at_epoch"] for e in m_b["epochs"]] == [0, 1, 1]
    assert [e["resumed_at_step"] for e in m_b["epochs"]] == [0, 4, 0]
    a, b = tok_a.model_.state_dict(), tok_b.model_.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors that differ after the restart and the resume: {differ}"
    drop = {"started_at_epoch", "resumed_at_step", "items_per_s", "data_wait_s", "step_s"}  # timings differ
    assert [{k: v for k, v in e.items() if k not in drop} for e in m_a["epochs"]] == \
        [{k: v for k, v in e.items() if k not in drop} for e in m_b["epochs"]]
    assert load_tokenizer(str(tmp_path / "b" / "model")).config == tok_b.config
    assert sorted(os.listdir(tmp_path / "b" / "model")) == [
        "config.json", "manifest.json", "metrics.json", "model.safetensors", "stats.json"]


@pytest.mark.timeout(300)
def test_a_two_worker_resume_inside_a_regulation_refresh_period_equals_an_uninterrupted_run(
        regulated_fit, items_dir, tmp_path):
    """Issue 50.6: collision regulation plans its pairs at epoch 0 and then every 2 epochs. A
    worker dies at the start of epoch 1; the restarted group resumes from epoch 0's checkpoint
    and trains epoch 1 on epoch 0's pairs, which the checkpoint keeps (re-planning them from
    the epoch-0 model, as before, gave another model). Two workers (issue 50's node faults
    lose some of several): each rank goes on with its own generator, which the checkpoint
    keeps per rank (it kept rank 0's, and a restarted rank 1 drew rank 0's numbers). The
    uninterrupted run is the module's regulated fit (same workers, each reading its own row
    groups in a seeded order): the same weights, bit for bit, and the same history."""
    import torch

    _, _, tok_a, _, m_a = regulated_fit
    tok_b, _, m_b = fit_distributed(job(tmp_path, items_dir, max_failures=1,
                                        callbacks=[FaultInjection(1, 1, str(tmp_path / "died"))],
                                        tokenizer=TokenizerConfig(**TINY).replace(**REGULATED)))
    assert (tmp_path / "died").exists()
    assert [e["started_at_epoch"] for e in m_b["epochs"]] == [0, 1, 1]  # epochs 1-2 by the restarted group
    a, b = tok_a.model_.state_dict(), tok_b.model_.state_dict()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    drop = {"started_at_epoch", "resumed_at_step", "items_per_s", "data_wait_s", "step_s"}
    assert [{k: v for k, v in e.items() if k not in drop} for e in m_a["epochs"]] == \
        [{k: v for k, v in e.items() if k not in drop} for e in m_b["epochs"]]


def test_mid_epoch_checkpoints_with_collision_regulation_are_refused(ray_session, items_dir, tmp_path):
    ray_session()
    tcfg = TokenizerConfig(**TINY).replace(collision_regulation="adaptive")
    with pytest.raises(ValueError, match="checkpoint-every-steps with collision_regulation='adaptive'"):
        fit_distributed(job(tmp_path, items_dir, tokenizer=tcfg, checkpoint_every_steps=10))
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        fit_distributed(job(tmp_path, items_dir, checkpoint_every_steps=0))


def test_resume_without_a_run_is_an_error(ray_session, items_dir, tmp_path):
    ray_session()
    with pytest.raises(ValueError, match="no run named 'ghost'"):
        fit_distributed(job(tmp_path, items_dir, name="ghost", resume=True))


def test_too_few_resources_fail_fast(ray_session, items_dir, tmp_path):
    ray_session()
    with pytest.raises(ValueError, match="needs 3 CPUs but the cluster has 2"):
        fit_distributed(job(tmp_path, items_dir, num_workers=3, cpus_per_worker=1.0))
    # an in-memory catalog streams through Ray Data, which keeps a CPU beside the workers
    with pytest.raises(ValueError, match="plus 1 for Ray Data"):
        fit_distributed(job(tmp_path, None, num_workers=2, cpus_per_worker=1.0))
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        fit_distributed(job(tmp_path, items_dir, use_gpu=True))
    # sized automatically on 2 CPUs: a Parquet catalog is read by the workers themselves, so
    # they take every CPU; with Ray Data they share one and a whole one stays with it (a
    # streamed epoch's read tasks need one to start)
    from sidserve.jobs.train.resources import check_resources
    for items, share in ((items_dir, 1.0), (None, 0.5)):
        auto = job(tmp_path, items, cpus_per_worker=None)
        check_resources(auto)
        assert auto.cpus_per_worker == share, items


def test_resource_check_waits_for_cpus_that_are_being_released(ray_session):
    """CPUs of work that just ended come back asynchronously; the fail-fast check must not
    mistake them for CPUs held by someone else (seen: a job right after a failed one)."""
    import threading

    import ray

    from sidserve.jobs.train.resources import available_after_settling

    ray_session()

    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self):
            return 1

    holder = Holder.remote()
    ray.get(holder.ping.remote())
    total = ray.cluster_resources()["CPU"]
    assert ray.available_resources().get("CPU", 0) <= total - 1
    threading.Timer(1.0, ray.kill, args=(holder,)).start()
    assert available_after_settling(total, timeout_s=60).get("CPU", 0) >= total
    # more than the cluster has: gives up after the timeout and reports what is free
    assert available_after_settling(total + 1, timeout_s=0.5).get("CPU", 0) == total


# input validation before any training --------------------------------------------------

def _bad(tmp_path, table):
    return write_shards(table, tmp_path / "bad", 2)


def test_missing_column(ray_session, catalog, tmp_path):
    ray_session()
    with pytest.raises(ValueError, match=r"modality_dims names 'image' but the input has no 'image_emb' column"):
        fit_distributed(job(tmp_path, _bad(tmp_path, catalog.drop_columns(["image_emb"]))))


def test_wrong_dims(ray_session, catalog, tmp_path):
    ray_session()
    t = catalog.set_column(catalog.schema.get_field_index("text_emb"), "text_emb",
                           embedding_array(np.ones((catalog.num_rows, 5))))
    # every row 5-d: the config contradicts the data, and the error names both
    with pytest.raises(ValueError, match=r"modality_dims\['text'\]=16 contradicts the input, whose 'text_emb' "
                                         r"holds 5-d vectors"):
        fit_distributed(job(tmp_path, _bad(tmp_path, t)))
    # some rows 5-d: the pre-pass counts them and names one
    mixed = pa.concat_tables([catalog.slice(0, 100), t.slice(100)])
    with pytest.raises(ValueError, match=r"wrong dimension \(text_emb: 2900 row\(s\), expected dim 16\)"):
        fit_distributed(job(tmp_path, write_shards(mixed, tmp_path / "mixed", 1)))


def test_all_null_behavior(ray_session, catalog, tmp_path):
    ray_session()
    t = catalog.set_column(catalog.schema.get_field_index("behavior_emb"), "behavior_emb",
                           pa.nulls(catalog.num_rows, pa.list_(pa.float32())))
    with pytest.raises(ValueError, match="null .*in every row"):
        fit_distributed(job(tmp_path, _bad(tmp_path, t)))


def test_empty_input(ray_session, catalog, tmp_path):
    ray_session()
    with pytest.raises(ValueError, match="no rows"):
        fit_distributed(job(tmp_path, _bad(tmp_path, catalog.slice(0, 0))))


def test_nan_rows_are_skipped_and_counted(ray_session, catalog, tmp_path):
    ray_session()
    import ray.data

    from sidserve.jobs.catalog import catalog_prepass

    rows = catalog.slice(0, 500).to_pylist()
    for i in (3, 50, 120):
        rows[i]["image_emb"][1] = float("nan")
    rows[7]["behavior_emb"] = [float("inf")] * 8
    rows[9]["text_emb"] = None
    stats = catalog_prepass(ray.data.from_arrow(pa.Table.from_pylist(rows, schema=catalog.schema)),
                            TokenizerConfig(**TINY))
    assert stats.num_rows == 500 and stats.num_valid == 495
    assert stats.skipped == {"image_emb: NaN or inf value": 3, "behavior_emb: NaN or inf value": 1,
                             "text_emb: null (content modalities are required)": 1}


def test_yaml_config_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("codebook_size: 32\nnum_behaviour_experts: 2\n")
    with pytest.raises(ValueError, match="num_behaviour_experts"):
        load_tokenizer_config(str(path))
    path.write_text("codebook_size: 32\n")
    assert load_tokenizer_config(str(path), epochs=5).epochs == 5


def test_checkpoints_default_beside_the_output_a_uri_beside_a_uri(tmp_path):
    assert TrainJobConfig(output="s3://bucket/models/sid-v1").storage() == "s3://bucket/models/checkpoints"
    assert TrainJobConfig(output="gs://bucket/sid-v1/").storage() == "gs://bucket/checkpoints"
    assert TrainJobConfig(output=str(tmp_path / "m" / "sid")).storage() == str(tmp_path / "m" / "checkpoints")
    assert TrainJobConfig(output="x", storage_path="s3://ck/").storage() == "s3://ck/"


def test_an_existing_model_is_not_overwritten_unless_asked(ray_session, items_dir, fitted, tmp_path):
    ray_session()
    fitted.save_pretrained(str(tmp_path / "model"))
    with pytest.raises(ValueError, match=r"already holds model v[0-9a-f]+; artifacts are immutable.*--overwrite"):
        fit_distributed(job(tmp_path, items_dir))
    assert load_tokenizer(str(tmp_path / "model")).version == fitted.version  # untouched
