"""Evaluation workers as Ray tasks: ``sidserve select --address ADDR --parallel N``.

The evaluation's own way to share its work (sidserve/eval/pipeline.py): several processes run
the same configuration on one output directory and claim stages by locking their files, each
prerequisite (a behavior table, a tokenizer fit) computed once and waited for by the others.
``--parallel N`` starts those processes on this machine; here they are Ray tasks, placed by Ray
on whichever nodes have ``cpus_per_worker`` CPUs free, so the candidates train side by side on
a cluster. The process that started them works too and writes the report at the end.

What a cluster needs: sidserve (the same version) installed on every node, and the output
directory on storage that every node mounts at the same path (an NFS or similar share with
working file locks). A task checks that it sees *this* run's directory (a token the starting
process wrote, not just a path that exists) and fails at once otherwise, naming its node; a
failed task is logged when it fails, not at the end, and the stages it would have run are run
by the others. A ``cpus_per_worker`` that no node has is refused before anything starts.

A handle (``RayWorker``) has what the pipeline needs of a ``--parallel`` subprocess: ``pid``
(for its log lines), ``wait()`` (exit status: 0, or 1 when the task failed; the pipeline then
says so and goes on) and ``terminate()``. ``wait()`` is called once every stage is written:
a task still running then (or never scheduled) has nothing left to do and is cancelled after
``FINISH_GRACE_S``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid

log = logging.getLogger(__name__)

TOKEN_FILE = "ray_workers.token"  # under the evaluation's output: which run the tasks belong to
FINISH_GRACE_S = 60.0  # once every stage is written: how long a task may take to end on its own
FORWARD_ENV = ("SIDSERVE_", "HF_", "TRANSFORMERS_")  # environment the tasks get from this process


class RayWorker:
    def __init__(self, ref, index: int):
        self.ref = ref  # ObjectRef of the task running run_evaluation(worker=True)
        self.pid = f"ray-task-{index}"
        self.error: str | None = None
        self._lock = threading.Lock()
        ref.future().add_done_callback(self._done)  # a failure is logged when it happens

    def _done(self, fut) -> None:  # on a Ray thread, when the task ends
        err = fut.exception()
        if err is not None:
            self._failed(err)
        else:
            where = fut.result()
            log.info("evaluation task %s finished (host %s, pid %s)", self.pid, where["host"], where["pid"])

    def _failed(self, err: BaseException) -> None:
        """Record and log a failure once (the callback and wait() may both see it first)."""
        with self._lock:
            if self.error is not None:
                return
            self.error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        log.warning("evaluation task %s failed: %s (the other processes run its stages)", self.pid, self.error)

    def wait(self, grace_s: float = FINISH_GRACE_S) -> int:
        import ray

        ready, _ = ray.wait([self.ref], timeout=grace_s)
        if not ready:  # every stage is written: whatever it is doing (or waiting for a CPU) is moot
            log.info("evaluation task %s had not ended %.0f s after every stage was written: cancelled",
                     self.pid, grace_s)
            self.terminate()
            return 0
        try:
            ray.get(self.ref)
            return 0
        except Exception as err:
            self._failed(err)
            return 1

    def terminate(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)


def _work(config, token_path: str, token: str, threads: int) -> dict:
    """On a Ray worker: one more process on the stages of ``config`` (writes no report)."""
    import socket

    import torch

    from sidserve.eval.pipeline import run_evaluation

    seen = None
    if os.path.exists(token_path):
        with open(token_path) as f:
            seen = f.read().strip()
    if seen != token:
        what = "is not visible" if seen is None else "belongs to another run"
        raise ValueError(f"{token_path!r} {what} on node {socket.gethostname()}: --address needs an --output "
                         "directory that every node of the cluster mounts at the same path")
    torch.set_num_threads(threads)
    run_evaluation(config, worker=True)
    return {"host": socket.gethostname(), "pid": os.getpid()}


def largest_node_cpus() -> float:
    import ray

    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def start_workers(config, n: int, cpus_per_worker: int) -> list[RayWorker]:
    """``n`` Ray tasks, each one more evaluation process on ``config`` with ``cpus_per_worker``
    CPUs (and as many torch threads). Ray must be initialised (``ray.init(address=...)``);
    ``config.output`` must be an absolute path on storage every node mounts."""
    import ray

    if n < 1 or cpus_per_worker < 1:
        raise ValueError(f"workers and cpus_per_worker must be >= 1, got {n} and {cpus_per_worker}")
    if not os.path.isabs(config.output) or not os.path.isabs(config.data):
        raise ValueError(f"the tasks run in other working directories: output {config.output!r} and data "
                         f"{config.data!r} must be absolute paths")
    if not ray.is_initialized():
        raise ValueError("start_workers needs a Ray connection: ray.init(address=...) first")
    most = largest_node_cpus()
    if cpus_per_worker > most:
        raise ValueError(f"cpus_per_worker={cpus_per_worker}: no node of the cluster has that many CPUs "
                         f"(the largest has {most:g}); a task could never start")
    token, token_path = uuid.uuid4().hex, os.path.join(config.output, TOKEN_FILE)
    os.makedirs(config.output, exist_ok=True)
    with open(token_path, "w") as f:
        f.write(token)
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
    env.update(OMP_NUM_THREADS=str(cpus_per_worker), MKL_NUM_THREADS=str(cpus_per_worker))
    task = ray.remote(_work).options(num_cpus=cpus_per_worker, max_retries=0, runtime_env={"env_vars": env})
    workers = [RayWorker(task.remote(config, token_path, token, cpus_per_worker), i) for i in range(n)]
    log.info("started %d evaluation tasks on the Ray cluster (%d CPUs each)", n, cpus_per_worker)
    return workers
