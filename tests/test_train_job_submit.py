"""`ray job submit -- python jobs/train.py` against a real `ray start --head` cluster."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidserve import SemanticIdTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = """\
modality_dims: {text: 64, image: 32}
behavior_dim: 32
codebook_size: 16
hidden_dim: 32
latent_dim: 16
expert_hidden_dim: 32
batch_size: 256
kmeans_init_samples: 2000
"""


def run(cmd, env, timeout=300, check=True):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_train(tmp_path):
    import ray

    if ray.is_initialized():  # free the 2 CPUs of the session cluster for this one
        ray.shutdown()
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    ray_cli = os.path.join(bin_dir, "ray")
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    output = tmp_path / "model"
    run([ray_cli, "start", "--head", "--num-cpus=2", "--dashboard-port=8265", "--include-dashboard=true",
         "--disable-usage-stats"], env)
    try:
        job_id = f"sidserve-test-{int(time.time())}"
        proc = run([ray_cli, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
                    "--submission-id", job_id, "--",
                    "python", "jobs/train.py", "--config", str(tmp_path / "tiny.yaml"), "--epochs", "2",
                    "--demo-items", "3000", "--num-workers", "2", "--cpus-per-worker", "0.5",
                    "--output", str(output), "--storage-path", str(tmp_path / "ckpt")], env, timeout=540)
        assert "[sidserve] model v" in proc.stdout
        status = run([ray_cli, "job", "status", "--address", "http://127.0.0.1:8265", job_id], env)
        text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        assert f"Job '{job_id}' succeeded" in text, text  # the CLI's wording of JobStatus.SUCCEEDED
        tok = SemanticIdTokenizer.from_pretrained(str(output))
        assert tok.config.codebook_size == 16
        assert (output / "metrics.json").exists()
    finally:
        run([ray_cli, "stop", "--force"], env, check=False)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cli_exits_nonzero_with_message_on_bad_config(tmp_path):
    (tmp_path / "bad.yaml").write_text("codebook_size: 16\nnum_behaviour_experts: 2\n")
    proc = subprocess.run([sys.executable, "jobs/train.py", "--config", str(tmp_path / "bad.yaml"),
                           "--output", str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "num_behaviour_experts" in proc.stderr


def test_the_working_dir_package_is_the_code_only(tmp_path):
    """What `ray job submit --working-dir .` uploads (Ray's own packaging, honouring .gitignore
    and .rayignore): the package and the job scripts, not the git history or the evaluation
    caches committed under docs/ (which would grow it towards Ray's 512 MiB upload limit)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    create_package(str(ROOT), tmp_path / "pkg.zip", include_gitignore=True)
    names = zipfile.ZipFile(tmp_path / "pkg.zip").namelist()
    assert {"jobs/train.py", "sidserve/__init__.py", "pyproject.toml", "constraints.txt"} <= set(names)
    assert any(n.startswith("deploy/") for n in names)
    heavy = [n for n in names if n.split("/")[0] in {".git", "docs", "tests", "bench", ".venv"}]
    assert not heavy, heavy[:10]
