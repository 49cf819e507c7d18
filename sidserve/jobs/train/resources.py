"""What a fit needs from the cluster, checked before Ray Train starts: Ray Train v2 waits
forever for a worker group it cannot place, so a job that cannot fit fails at once with a
message naming the flags to change, and ``cpus_per_worker`` is sized to what is free."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidserve.jobs.train.driver import TrainJobConfig

# CPUs left to Ray Data while the trainers run: a whole one, because what a streamed epoch
# schedules needs one to start (Parquet read tasks default to 1 CPU, and Ray 2.60's DataSource
# V2 adds a file-listing task and footer-reader actors, which need 1 CPU to be placed and 0 to
# run); with 0.5 left, a streamed epoch waited for its first batch forever
DATA_CPUS = 1.0
RESOURCE_SETTLE_S = 10.0  # how long to wait for CPUs still held by work that just ended


def available_after_settling(cpus: float, timeout_s: float = RESOURCE_SETTLE_S) -> dict:
    """``ray.available_resources()`` once ``cpus`` CPUs are free, or after ``timeout_s``.

    Ray returns the CPUs of tasks and actors that just ended asynchronously: a job started
    right after another one (or after a failed Ray Data pass) can see them as still taken.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0) >= cpus or time.monotonic() >= deadline:
            return free
        time.sleep(0.2)


def check_resources(job: TrainJobConfig) -> None:
    """Fail fast (Ray Train v2 would wait forever) and size cpus_per_worker if unset. A Parquet
    catalog is read by the workers themselves (``ingest.ParquetShards``): every free CPU can
    go to them; an in-memory catalog streams through Ray Data, which keeps ``DATA_CPUS``."""
    import ray

    data_cpus = 0.0 if job.items else DATA_CPUS
    total = ray.cluster_resources()
    want = job.num_workers * (job.cpus_per_worker or 1.0) + data_cpus
    free = available_after_settling(min(want, total.get("CPU", 0)))
    if job.cpus_per_worker is None:
        room = (free.get("CPU", 0) - data_cpus) / job.num_workers
        job.cpus_per_worker = 1.0 if room >= 1.0 else max(0.1, round(room, 2))
    if job.cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be > 0, got {job.cpus_per_worker}")
    need_cpu = job.num_workers * job.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ValueError(
            f"--num-workers {job.num_workers} x {job.cpus_per_worker} CPU needs {need_cpu:g} CPUs but the "
            f"cluster has {total.get('CPU', 0):g}; lower --num-workers / --cpus-per-worker or add nodes"
        )
    if job.use_gpu and total.get("GPU", 0) < job.num_workers:
        raise ValueError(
            f"--use-gpu with --num-workers {job.num_workers} needs {job.num_workers} GPUs but the cluster "
            f"has {total.get('GPU', 0):g}"
        )
    if free.get("CPU", 0) < need_cpu + data_cpus:
        raise ValueError(
            f"the job needs {need_cpu:g} free CPUs for {job.num_workers} workers"
            + (f" plus {data_cpus:g} for Ray Data" if data_cpus else "")
            + f", but only {free.get('CPU', 0):g} of {total.get('CPU', 0):g} are free (another job "
            "or a Serve app holds the rest); Ray Train would wait for them forever. Lower "
            "--num-workers / --cpus-per-worker or free the cluster"
        )
