"""`make demo`'s pipeline (jobs/demo.py), smaller: fit, assign, serve, tokenize."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from sidserve import load_tokenizer
from sidserve.snapshot import SnapshotRoot

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_the_whole_story(tmp_path):
    import ray

    if ray.is_initialized():  # the demo starts its own local cluster: free the 2 CPUs
        ray.shutdown()
    # the reader a user gets: Ray's default Parquet reader, not the one conftest picks for speed
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_USE_DATASOURCE_V2"}
    # smaller than the README's: 2,000 items, 1 epoch, one Train worker and one encoder actor
    # (each worker more is a process importing torch: seconds of the suite's 2 CPUs)
    proc = subprocess.run([sys.executable, "jobs/demo.py", "--output", str(tmp_path), "--items", "2000",
                           "--epochs", "1", "--num-workers", "1", "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=560, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    terminal = (proc.stdout + proc.stderr).splitlines()
    assert len(terminal) <= 40, terminal  # what a user sees: the demo's own lines, nothing of Ray's
    assert not [line for line in terminal if re.search(r"WARNING|Failed|Traceback|Error", line)], terminal
    log = tmp_path / "demo.log"
    assert str(log) in terminal[0] and log.stat().st_size > 0  # Ray's lines went where the demo said
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[demo]")]
    answers = [line for line in lines if "path=" in line]
    paths = [re.search(r"path=(\S+)", line).group(1) for line in answers]
    assert paths == ["catalog", "full", "content_only"], lines
    weights = [[float(w) for w in re.search(r"behavior_weights=\[([^\]]*)\]", line).group(1).split(",")]
               for line in answers]
    assert any(w > 0 for w in weights[0]), answers[0]  # the popular item's behavior counts
    assert all(w == 0 for w in weights[2]), answers[2]  # a cold item has none
    assert "top decile" in answers[0] and "cold" in answers[2]
    tok = load_tokenizer(str(tmp_path / "model"))
    root = SnapshotRoot(str(tmp_path / "snapshots"))
    assert root.summary()["items"] == 2000 and root.summary()["model_version"] == tok.version
    assert f"(model {tok.version})" in proc.stdout  # the service answered with the fitted model
    assert str(tmp_path / "model") in lines[-1] and str(tmp_path / "snapshots") in lines[-1]


def test_demo_questions_are_a_popular_a_thin_and_a_cold_item():
    import numpy as np

    from sidserve.demo import pick_items
    from sidserve.synthetic import make_synthetic_catalog

    catalog = make_synthetic_catalog(3000, seed=0)
    rows = pick_items(catalog)
    pop = catalog.column("popularity").to_numpy()
    has_b = catalog.column("behavior_emb").is_valid().to_numpy(zero_copy_only=False)
    warm_pop = pop[has_b]
    assert has_b[rows["popular"]] and (warm_pop < pop[rows["popular"]]).mean() >= 0.9  # top decile
    assert has_b[rows["thin"]] and pop[rows["thin"]] == warm_pop.min()
    assert not has_b[rows["cold"]]
    with pytest.raises(ValueError, match="warm and cold"):
        pick_items(catalog.filter(np.asarray(has_b)))
