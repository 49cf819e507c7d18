"""Where a nightly refresh's time and memory go, stage by stage: one ``run_refresh`` (its defaults:
sticky assignment for ADC-SID, no re-fit) against the published snapshot of ``--snapshots``, with
PSS summed by role every 2 s (``MemorySampler``, this process and its own Ray cluster).

    .venv/bin/python bench/refresh_stages.py --items NIGHT2 --model MODEL --snapshots ROOT [--version V] [--series]

``ROOT`` is not modified: its published snapshot (or ``--version``) is hard-linked into a temporary root (same
filesystem), the refresh publishes there, and the temporary root is deleted. Prints one JSON line
(wall, peak PSS and the role breakdown at the peak, when it came and in which stage, each stage's
seconds and peak) and with ``--series`` every sample. ``bench/end_to_end.py`` makes such a
snapshot (keep it with ``--workdir``) or run ``sidserve assign`` once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from assign_throughput import MemorySampler  # noqa: E402
from train_scale import code_revision  # noqa: E402

MIB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", required=True, help="tonight's catalog (Parquet)")
    p.add_argument("--model", required=True)
    p.add_argument("--snapshots", required=True, help="a snapshot root (local) with a published snapshot")
    p.add_argument("--version", help="the snapshot of --snapshots to refresh against (default: its published one)")
    p.add_argument("--series", action="store_true", help="also print every sample")
    args = p.parse_args()

    import ray

    from sidserve.jobs.refresh import RefreshJobConfig, run_refresh
    from sidserve.snapshot import SnapshotRoot

    version = args.version or SnapshotRoot(args.snapshots).latest()
    if version is None or not os.path.isdir(os.path.join(args.snapshots, "snapshots", version)):
        raise SystemExit(f"{args.snapshots}: no snapshot {version!r}" if version else
                         f"{args.snapshots}: no published snapshot (LATEST)")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.snapshots))) as root:
        shutil.copytree(os.path.join(args.snapshots, "snapshots", version), os.path.join(root, "snapshots", version),
                        copy_function=os.link)
        with open(os.path.join(root, "LATEST"), "w") as f:
            f.write(version + "\n")
        sampler = MemorySampler().start()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        start = time.perf_counter() - sampler.t0
        r = run_refresh(RefreshJobConfig(items=args.items, model=args.model, output=root))
        wall = time.perf_counter() - sampler.t0
        peak, series = sampler.stop()
        ray.shutdown()
    stages = {"prepass": r["prepass"]["seconds"], **r["stage_seconds"]}
    ends, t = [], start
    for name, seconds in stages.items():
        t += seconds
        ends.append((t, name))

    def stage_of(ts: float) -> str:
        return next((name for end, name in ends if ts < end), "after" if ts >= start else "start")

    stage_peak: dict[str, float] = {}
    for ts, total, _ in series:
        stage_peak[stage_of(ts)] = max(stage_peak.get(stage_of(ts), 0), total / MIB)
    top = max(series, key=lambda x: x[1])
    print(json.dumps({
        "code": code_revision(), "measured_at": time.strftime("%Y-%m-%d %H:%M"), "previous": version,
        "items": r["items"], "wall_s": wall, "peak_pss_mib": top[1] / MIB, "peak_at_s": top[0],
        "peak_stage": stage_of(top[0]), "pss_at_peak_mib": {k: v / MIB for k, v in top[2].items()},
        "peak_rss_mib": peak["rss"] / MIB, "peak_shm_mib": peak["shm"] / MIB, "stage_seconds": stages,
        "stage_peak_pss_mib": stage_peak, "churn": r["churn"]["churn"], "sticky": r.get("sticky")}))
    if args.series:
        for ts, total, roles in series:
            print(f"{ts:7.1f} s {stage_of(ts):>12} {total / MIB:8.0f} MiB  "
                  + " ".join(f"{k}={v / MIB:.0f}" for k, v in sorted(roles.items())))


if __name__ == "__main__":
    main()
