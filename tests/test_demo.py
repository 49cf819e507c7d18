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
    proc = subprocess.run([sys.executable, "jobs/demo.py", "--output", str(tmp_path), "--items", "2000",
                           "--epochs", "1", "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=560, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[demo]")]
    paths = [m.group(1) for line in lines for m in [re.search(r"path=(\S+)", line)] if m]
    assert paths == ["catalog", "full", "content_only"], lines
    tok = load_tokenizer(str(tmp_path / "model"))
    root = SnapshotRoot(str(tmp_path / "snapshots"))
    assert root.summary()["items"] == 2000 and root.summary()["model_version"] == tok.version
    assert f"(model {tok.version})" in proc.stdout  # the service answered with the fitted model
    assert str(tmp_path / "model") in lines[-1] and str(tmp_path / "snapshots") in lines[-1]
