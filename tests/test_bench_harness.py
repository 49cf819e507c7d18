"""The scale benchmarks' own logic at small sizes (the runs themselves are hours: bench/, not
the suite): when a killed fit may be killed, what memory is counted, what a kill stops."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from assign_throughput import MemorySampler  # noqa: E402
from train_scale import kill_tree, registered_mid_epoch_checkpoint  # noqa: E402


def _snapshot(run_dir, results):
    """A checkpoint manager snapshot as Ray Train writes it, built with Ray's own schema (so a
    renamed field in a new Ray fails here, not in a five-hour benchmark)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    state = _CheckpointManagerState(
        checkpoint_results=[_TrainingResultState(checkpoint_dir_name=d, metrics=m) for d, m in results],
        checkpoint_report_indices=list(range(len(results))), pending_training_results=[],
        pending_validation_specs=[], current_report_index=len(results), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    with open(os.path.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME), "w") as f:
        f.write(state.model_dump_json())
    return os.path.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)


def test_a_fit_is_killed_only_once_a_mid_epoch_checkpoint_is_registered(tmp_path):
    from sidserve.jobs.train.checkpoint import PARTIAL_FILE

    run = tmp_path / "run"
    run.mkdir()
    assert not registered_mid_epoch_checkpoint(str(run))  # nothing reported yet
    (run / "checkpoint_0").mkdir()
    (run / "checkpoint_1").mkdir()
    (run / "checkpoint_1" / PARTIAL_FILE).write_bytes(b"x")  # written, not yet registered
    path = _snapshot(str(run), [("checkpoint_0", {"epoch": 0, "recon": 1.0})])  # an epoch end only
    assert not registered_mid_epoch_checkpoint(str(run))
    _snapshot(str(run), [("checkpoint_0", {"epoch": 0}), ("checkpoint_1", {"epoch": 1, "steps_in_epoch": 4})])
    assert registered_mid_epoch_checkpoint(str(run))
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])  # caught while Ray rewrites it
    assert not registered_mid_epoch_checkpoint(str(run))
    # registered, but its directory already deleted (num_to_keep): nothing to resume from
    _snapshot(str(run), [("checkpoint_2", {"epoch": 1, "steps_in_epoch": 8})])
    assert not registered_mid_epoch_checkpoint(str(run))


ALLOC_THEN_IDLE = ("import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); del b; "
                   "print('freed', flush=True); time.sleep(3)")


@pytest.mark.timeout(60)
def test_the_sampler_keeps_a_peak_shorter_than_its_interval():
    """A child that holds 300 MiB for a few milliseconds, then idles: its RSS at any sample is
    small, but the kernel's VmHWM keeps the peak, and the child is counted (a descendant)."""
    sampler = MemorySampler().start()
    p = subprocess.Popen([sys.executable, "-c", ALLOC_THEN_IDLE], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "freed"
    time.sleep(1.5)  # at least one sample of the idle child
    peak, series = sampler.stop()
    p.wait()
    assert peak["hwm"] >= 300 * 2**20
    assert peak["hwm"] >= peak["rss"] > 0
    assert series and all(total == sum(roles.values()) for _, total, roles in series)


@pytest.mark.timeout(60)
def test_kill_tree_stops_the_child_and_what_it_started(tmp_path):
    pidfile = tmp_path / "grandchild"
    code = ("import subprocess, sys, time; "
            f"g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pidfile)!r}, 'w').write(str(g.pid)); time.sleep(300)")
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    kill_tree(p.pid)
    p.wait(timeout=10)  # kill_tree reaped it already (its exit status went there)
    for pid in (p.pid, grandchild):
        for _ in range(100):  # gone, or a zombie until init reaps it
            try:
                if open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z":
                    break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"process {pid} still running after kill_tree")


def test_end_to_end_labels_reused_catalogs(tmp_path):
    """With --workdir, a catalog made by an earlier run is marked reused, not timed as made."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "end_to_end.py"), "--step", "generate",
                          "1000", str(tmp_path / "items")], capture_output=True, text=True, timeout=120)
    first = json.loads(out.stdout.splitlines()[-1])
    again = subprocess.run(out.args, capture_output=True, text=True, timeout=120)
    second = json.loads(again.stdout.splitlines()[-1])
    assert first["reused"] is False and second["reused"] is True
    assert first["items"] == second["items"] == 1000


def test_end_to_end_reuses_a_trained_model_from_the_workdir(fitted, tmp_path):
    """A 20M rerun after a failed assign or refresh must not train again: a complete model in
    --workdir is loaded, marked reused (its wall is not a training cost), never overwritten."""
    model = str(tmp_path / "model")
    fitted.save_pretrained(model)
    before = json.load(open(os.path.join(model, "manifest.json")))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "end_to_end.py"), "--step", "train",
                          str(tmp_path / "no-catalog-needed"), model, str(tmp_path / "ckpt"), "1", "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["reused"] is True and r["model_version"] == before["version"]
    assert json.load(open(os.path.join(model, "manifest.json"))) == before
    assert not os.path.exists(tmp_path / "ckpt")  # nothing trained
