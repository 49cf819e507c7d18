"""`sidserve select` (issue 48) on a catalog built so that one candidate must lead: it picks
that one, with the candidates' evaluation processes as Ray tasks on a cluster (`--address`).

The catalog: items lie on content "chains" (a direction per chain, a step along it per
position) and every user walks one chain forward, so an item's content says exactly what
comes next; its behavior_emb is Gaussian noise that says nothing. Content-only OPQ then gives
every item codes that carry its chain and place on it, while the library default spends its
three behavioral positions on the noise: OPQ has to beat it on every cell of the rule, on
every seed, by far more than the 2-standard-error margin.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from sidserve.eval.default_rule import CELLS, LIBRARY_DEFAULT

sys.path.insert(0, os.path.join(ROOT, "bench"))
from local_cluster import LocalCluster  # noqa: E402  (bench/: the multi-node harness)


def write_chain_catalog(root, chains=30, per_chain=20, users=1000, dim=32, seed=0):
    """-> (catalog dir, log path): content that predicts the next item, behavior that is noise."""
    rng = np.random.default_rng(seed)
    direction, step = rng.standard_normal((chains, dim)), rng.standard_normal((chains, dim))
    place = np.arange(per_chain) / per_chain
    text = (direction[:, None, :] + 2.0 * place[None, :, None] * step[:, None, :]).reshape(-1, dim)
    text += 0.05 * rng.standard_normal(text.shape)
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    noise = rng.standard_normal((text.shape[0], 16)).astype(np.float32)
    ids = [f"it{i:04d}" for i in range(text.shape[0])]

    def fsl(v):
        return pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])

    os.makedirs(root / "catalog")
    pq.write_table(pa.table({"item_id": ids, "text_emb": fsl(text), "behavior_emb": fsl(noise)}),
                   root / "catalog" / "part-0.parquet")
    weight = 1.0 / np.arange(1, chains + 1) ** 0.8  # popular and thin chains: a head and a tail
    weight /= weight.sum()
    rows = {"user_id": [], "item_id": [], "timestamp": []}
    for u in range(users):
        chain, length = rng.choice(chains, p=weight), int(rng.integers(5, 11))
        start = int(rng.integers(0, per_chain - length + 1))
        for t in range(length):
            rows["user_id"].append(f"u{u:05d}")
            rows["item_id"].append(ids[chain * per_chain + start + t])
            rows["timestamp"].append(t)
    pq.write_table(pa.table(rows), root / "log.parquet")
    return str(root / "catalog"), str(root / "log.parquet")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_select_picks_the_candidate_the_catalog_favours_running_on_a_ray_cluster(tmp_path, caplog):
    import ray

    catalog, log = write_chain_catalog(tmp_path)
    out = str(tmp_path / "out")
    if ray.is_initialized():  # this test connects to its own cluster below
        ray.shutdown()
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=2)
        # --output relative to the command's directory: the tasks, in Ray's working directories,
        # still find it
        p = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "select_tokenizer.py"), "--items", catalog,
                            "--interactions", log, "--output", "out", "--quick", "--sample-users", "0",
                            "--tokenizers", f"{LIBRARY_DEFAULT},opq", "--seeds", "0,1", "--behavior", "catalog",
                            "--address", cluster.address, "--parallel", "2"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=540,
                           env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        failed_task_is_reported_and_an_impossible_size_refused(cluster.address, tmp_path, caplog)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
    s = json.load(open(os.path.join(out, "selection.json")))
    assert s["chosen"] == "opq" and s["runner_up"] == LIBRARY_DEFAULT, s["reason"]
    cells = s["cells"]["opq"]
    assert set(cells) == {"/".join(c) for c in CELLS} and all(c["beats"] for c in cells.values())
    # on every seed, not only on average: per cell, OPQ's value above the default's
    for task, metric, group in CELLS:
        mine = s["valid"]["opq"][f"{task}/{metric}/{group}"]["values"]
        theirs = s["valid"][LIBRARY_DEFAULT][f"{task}/{metric}/{group}"]["values"]
        assert all(a > b for a, b in zip(mine, theirs)), (task, metric, group, mine, theirs)
    # the evaluation process ran as a Ray task on the cluster and ended cleanly (how many stages
    # it took before this process had done them depends on how fast its worker started)
    assert "started 1 evaluation tasks on the Ray cluster" in p.stderr
    assert "evaluation task ray-task-0 finished" in p.stderr, p.stderr[-3000:]
    stages = {(os.path.basename(d), f) for d, _, fs in os.walk(os.path.join(out, "evaluation", "downstream"))
              for f in fs if f.endswith(".json")}
    assert stages == {(n, f"{t}_seed{k}.json") for n in (LIBRARY_DEFAULT, "opq") for t in ("sid_sasrec", "ranking")
                      for k in (0, 1)}


def failed_task_is_reported_and_an_impossible_size_refused(address, tmp_path, caplog):
    """On the same cluster, from this process: a task that fails is logged with its reason when
    it fails and its handle says so; a task size no node has is refused before anything starts."""
    import logging

    import ray

    from sidserve.eval.config import EvalConfig
    from sidserve.eval.ray_workers import start_workers

    ray.init(address=address, log_to_driver=False)
    config = EvalConfig(data=str(tmp_path / "no-such-dataset"), output=str(tmp_path / "ev"))
    with pytest.raises(ValueError, match="cpus_per_worker=64: no node of the cluster has that many CPUs"):
        start_workers(config, 1, 64)
    with caplog.at_level(logging.INFO, logger="sidserve.eval.ray_workers"):
        (worker,) = start_workers(config, 1, 1)
        assert worker.wait() == 1
    assert "no-such-dataset" in worker.error and "evaluation task ray-task-0 failed" in caplog.text


def test_an_evaluation_task_checks_it_sees_this_runs_output(tmp_path):
    from sidserve.eval.config import EvalConfig
    from sidserve.eval.ray_workers import _work, start_workers

    with pytest.raises(ValueError, match="is not visible on node .*every node of the cluster mounts"):
        _work(None, str(tmp_path / "missing" / "ray_workers.token"), "abc", 1)
    (tmp_path / "ray_workers.token").write_text("another run's token")
    with pytest.raises(ValueError, match="belongs to another run on node"):
        _work(None, str(tmp_path / "ray_workers.token"), "abc", 1)
    with pytest.raises(ValueError, match="must be absolute paths"):
        start_workers(EvalConfig(data="data", output="out"), 1, 1)
