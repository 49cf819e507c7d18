"""Evaluation workers as Ray tasks: ``sidserve select --address ADDR --parallel N``.

The evaluation's own way to share its work (sidserve/eval/pipeline.py): several processes run
the same configuration on one output directory and claim stages by locking their files, each
prerequisite (a behavior table, a tokenizer fit) computed once and waited for by the others.
``--parallel N`` starts those processes on this machine; here they are Ray tasks, placed by Ray
on whichever nodes have ``cpus_per_worker`` CPUs free, so the candidates train side by side on
a cluster. The process that started them works too and writes the report at the end.

What a cluster needs: the output directory on storage that every node mounts at the same path
(an NFS or similar share with working file locks); a task that cannot see it fails at once with
a message naming its node, and the stages it would have run are run by the others.

A handle (``RayWorker``) has what the pipeline needs of a ``--parallel`` subprocess: ``pid``
(for its log lines), ``wait()`` (exit status: 0, or 1 when the task failed; the pipeline then
says so and goes on, its stages were completed by the others) and ``terminate()``.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class RayWorker:
    def __init__(self, ref, index: int):
        self.ref = ref  # ObjectRef of the task running run_evaluation(worker=True)
        self.pid = f"ray-task-{index}"

    def wait(self) -> int:
        import ray

        try:
            where = ray.get(self.ref)
            log.info("evaluation task %s finished (host %s, pid %s)", self.pid, where["host"], where["pid"])
            return 0
        except Exception as err:  # the task's error: logged here, its stages were done by another process
            log.warning("evaluation task %s failed: %s", self.pid, str(err).splitlines()[-1] if str(err) else err)
            return 1

    def terminate(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)


def _work(config, marker: str, threads: int) -> dict:
    """On a Ray worker: one more process on the stages of ``config`` (writes no report)."""
    import socket

    import torch

    from sidserve.eval.pipeline import run_evaluation

    if not os.path.exists(marker):
        raise ValueError(f"{marker!r} is not visible on node {socket.gethostname()}: --address needs an --output "
                         "directory that every node of the cluster mounts at the same path")
    torch.set_num_threads(threads)
    run_evaluation(config, worker=True)
    return {"host": socket.gethostname(), "pid": os.getpid()}


def start_workers(config, n: int, cpus_per_worker: int, marker: str) -> list[RayWorker]:
    """``n`` Ray tasks, each one more evaluation process on ``config`` with ``cpus_per_worker``
    CPUs (and as many torch threads). Ray must be initialised (``ray.init(address=...)``).
    ``marker``: a file the caller wrote under the output directory; a task that cannot see it
    is on a node without the shared storage."""
    import ray

    if n < 1 or cpus_per_worker < 1:
        raise ValueError(f"workers and cpus_per_worker must be >= 1, got {n} and {cpus_per_worker}")
    if not ray.is_initialized():
        raise ValueError("start_workers needs a Ray connection: ray.init(address=...) first")
    env = {"OMP_NUM_THREADS": str(cpus_per_worker), "MKL_NUM_THREADS": str(cpus_per_worker)}
    task = ray.remote(_work).options(num_cpus=cpus_per_worker, max_retries=0, runtime_env={"env_vars": env})
    workers = [RayWorker(task.remote(config, marker, cpus_per_worker), i) for i in range(n)]
    log.info("started %d evaluation tasks on the Ray cluster (%d CPUs each)", n, cpus_per_worker)
    return workers
