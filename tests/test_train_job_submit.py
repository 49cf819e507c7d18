"""`ray job submit -- python jobs/train.py` against a real `ray start --head` cluster."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sidserve import SemanticIdTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from local_cluster import free_ports  # noqa: E402  (bench/: the multi-node harness picks ports the same way)

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


def stop_cluster(temp_dir: str) -> None:
    """Stop the one cluster whose session lives under ``temp_dir``: its GCS, raylet and helpers
    name that directory on their command lines, its workers are their children. (``ray stop``
    would stop every Ray cluster on the machine, a benchmark's or another test run's too.)"""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or []):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = {p.pid: p for r in roots for p in [r, *_children(r)]}
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _children(p):
    import psutil

    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_train(tmp_path):
    import ray

    if ray.is_initialized():  # free the 2 CPUs of the session cluster for this one
        ray.shutdown()
    bin_dir = os.path.dirname(sys.executable)
    # its own cluster runs on the CPU the Ray scope leaves (conftest: SCHED_IDLE beside it), so
    # its Train worker group gets more than the suite's 30 s to start
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"}
    ray_cli = os.path.join(bin_dir, "ray")
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    output = tmp_path / "model"
    # its own ports and session directory (short: Ray's socket paths must stay under 108 bytes),
    # so it neither meets nor stops another cluster on this machine
    temp_dir = tempfile.mkdtemp(prefix="sidserve-ray-", dir="/tmp")
    names = ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port")  # another cluster may hold the defaults
    dash_port, *picked = free_ports(len(names) + 1)
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        ports = [f"--{name}={port}" for name, port in zip(names, picked)]
        run([ray_cli, "start", "--head", "--num-cpus=2", *ports, f"--temp-dir={temp_dir}",
             f"--dashboard-port={dash_port}", "--include-dashboard=true", "--disable-usage-stats"], env)
        job_id = f"sidserve-test-{int(time.time())}"
        proc = run([ray_cli, "job", "submit", "--address", dashboard, "--working-dir", ".",
                    "--submission-id", job_id, "--",
                    "python", "jobs/train.py", "--config", str(tmp_path / "tiny.yaml"), "--epochs", "1",
                    "--demo-items", "1000", "--num-workers", "1",
                    "--output", str(output), "--storage-path", str(tmp_path / "ckpt")], env, timeout=540)
        assert "[sidserve] model v" in proc.stdout
        status = run([ray_cli, "job", "status", "--address", dashboard, job_id], env)
        text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        assert f"Job '{job_id}' succeeded" in text, text  # the CLI's wording of JobStatus.SUCCEEDED
        tok = SemanticIdTokenizer.from_pretrained(str(output))
        assert tok.config.codebook_size == 16
        assert (output / "metrics.json").exists()
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
