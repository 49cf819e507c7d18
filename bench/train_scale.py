"""Training at scale: the Ray Train fit (``sidserve train``, 2 workers) for one epoch on
synthetic catalogs of several sizes, in one run: items/s, wall time, peak memory summed over
the driver and every Ray process (PSS, by role), the object store's peak (/dev/shm), and how
the workers got their rows (a Parquet catalog: each reads its own row groups every epoch).

    .venv/bin/python bench/train_scale.py --sizes 1000000 10000000 [--workdir DIR]
        [--epochs 1] [--checkpoint-every-steps 1000] [--kill-after-checkpoint]

``--kill-after-checkpoint``: the largest size is also run a second time, killed (SIGKILL to
the driver and every Ray process) once its first mid-epoch checkpoint is in storage, and
resumed with ``--resume`` in a fresh process and a fresh Ray cluster, as a resubmitted job
would be; the table gives both parts and the step the resumed epoch started from.

The kill waits until Ray Train has *registered* a mid-epoch checkpoint (it is named in the
run's ``checkpoint_manager_snapshot.json``, which is what ``--resume`` reads), not merely
until one is written; the resumed run must start inside the epoch (``resumed_at_step`` > 0),
run as many steps as the uninterrupted one and cover as many items, or the benchmark fails;
the table gives both runs' final reconstruction and collision rate side by side. Fits run with ``max_failures=0``: a Ray Train restart from a checkpoint
fails the benchmark instead of hiding inside an "uninterrupted" row. A size with fewer
steps per epoch than ``--checkpoint-every-steps`` never checkpoints mid-epoch: kill a larger one.

Catalogs: ``bench/assign_throughput.py``'s (the README's column layout, dims 64 + 32 + 32,
100k-row Parquet files), kept in ``--workdir`` between runs with every finished fit's row
(``rows.jsonl``, with when and on which commit it was measured): a rerun after a failure reuses
those rows instead of repeating fits of an hour; delete the file to measure everything again. The model: ADC-SID with the
public settings (K=100, L=6) and its default batch size, ``--epochs`` epochs.

Ratios are against the smallest size (the first of ``--sizes``), read the same way: the workers
read a Parquet catalog of any size the same way (sidserve/jobs/train/ingest.py).

Memory, from ``MemorySampler``: the child process and its descendants only (its own Ray
cluster), PSS and RSS sums sampled, and the sum of each process's kernel-kept peak (VmHWM),
which no sampling interval can miss (an upper bound of the peak RSS sum). Each child has a
``--timeout``; past it the child and its Ray processes are killed and the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from assign_throughput import MemorySampler, make_catalog  # noqa: E402

MIB = 2**20


def child(items: str, out: str, storage: str, name: str, epochs: int, every: int | None, resume: bool) -> None:
    """One fit in this (sub)process; prints one JSON line."""
    import ray

    from sidserve.jobs.train.driver import TrainJobConfig, fit_distributed

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, configure_logging=False)
    sampler = MemorySampler().start()
    t0 = time.perf_counter()
    _, _, m = fit_distributed(TrainJobConfig(
        output=out, items=items, tokenizer={"epochs": epochs}, storage_path=storage, name=name, resume=resume,
        checkpoint_every_steps=every, overwrite=True, max_failures=0))  # a silent restart from a checkpoint would hide inside an "uninterrupted" row
    wall = time.perf_counter() - t0
    peak, series = sampler.stop()
    top = max(series, key=lambda x: x[1])
    names = sorted({r for _, _, roles in series for r in roles})
    print(json.dumps({
        "wall_s": wall, "items": m["catalog"]["num_valid"], "epochs": m["epochs"],
        "final": {k: m["final"][k] for k in ("recon", "entropy_mean", "utilisation_mean", "collision_rate")},
        "ingest": m["ingest"], "catalog_cached": m["catalog_cached"], "kmeans_sample": m["kmeans_sample"],
        "cpus_per_worker": m.get("cpus_per_worker"),
        "peak_pss_mib": top[1] / MIB, "peak_rss_mib": peak["rss"] / MIB, "hwm_sum_mib": peak["hwm"] / MIB,
        "peak_shm_mib": peak["shm"] / MIB,
        "pss_at_peak_mib": {r: top[2].get(r, 0) / MIB for r in names},
        "role_peak_pss_mib": {r: max(x[2].get(r, 0) for x in series) / MIB for r in names}}))


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (its Ray cluster: GCS, raylet, workers) at once, as
    a lost node would lose them; other Ray clusters on the machine are left alone."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run_child(args: list[str], timeout: float, kill_when=None) -> dict | None:
    """The child in a new session, polled every 2 s: ``kill_when()`` True -> kill it and its Ray
    cluster, return None; past ``timeout`` seconds -> kill it all and fail."""
    resume = args[:1] == ["--resume"]
    cmd = [sys.executable, __file__, *(["--resume"] if resume else []), "--child", *args[resume:]]
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a long log cannot block the child
        p = subprocess.Popen(cmd, stdout=out, text=True, start_new_session=True)
        t0 = time.perf_counter()
        while p.poll() is None:
            if kill_when is not None and kill_when():
                kill_tree(p.pid)
                return None
            if time.perf_counter() - t0 > timeout:
                kill_tree(p.pid)
                raise SystemExit(f"child {cmd} still running after --timeout {timeout:.0f} s: killed")
            time.sleep(2)
        if p.returncode:
            raise SystemExit(f"child {cmd} failed with exit code {p.returncode}")
        out.seek(0)
        return json.loads([x for x in out.read().splitlines() if x.startswith("{")][-1])


def code_revision() -> str:
    """The repository's commit, with "+changes" when sidserve/ or bench/ differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "sidserve", "bench"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


def registered_mid_epoch_checkpoint(run_dir: str) -> bool:
    """True once Ray Train's checkpoint manager has registered a mid-epoch checkpoint of the run
    (the snapshot ``--resume`` restores from names it, and its directory holds the partial-epoch
    state). A checkpoint only written, not yet registered, would be lost by a kill."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from sidserve.jobs.train.checkpoint import PARTIAL_FILE

    try:
        with open(os.path.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)) as f:
            snapshot = json.load(f)
    except (OSError, ValueError):  # not written yet, or being written
        return False
    return any("steps_in_epoch" in r.get("metrics", {})
               and os.path.exists(os.path.join(run_dir, r["checkpoint_dir_name"], PARTIAL_FILE))
               for r in snapshot.get("checkpoint_results", []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--checkpoint-every-steps", type=int, default=1000)
    p.add_argument("--kill-after-checkpoint", action="store_true",
                   help="also kill the largest size's fit after its first mid-epoch checkpoint and resume it")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds one fit may run before it is killed")
    p.add_argument("--workdir", help="keep catalogs here between runs instead of a temp dir, and every "
                   "finished fit's row in its rows.jsonl: a rerun reuses the rows of the fits it would repeat "
                   "(same size, catalog holding, kill, epochs, checkpoint interval) and says so")
    p.add_argument("--child", nargs=6)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if args.child:
        items, out, storage, name, epochs, every = args.child
        child(items, out, storage, name, int(epochs), int(every) or None, args.resume)
        return
    if sorted(args.sizes) != args.sizes:
        raise SystemExit(f"--sizes must be ascending (the first is the baseline), got {args.sizes}")

    from train_throughput import hardware

    rows = []
    earlier = {}  # key -> a row an earlier invocation measured in this workdir
    rows_file = os.path.join(args.workdir, "rows.jsonl") if args.workdir else None
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        if os.path.exists(rows_file):
            with open(rows_file) as f:
                earlier = {r["key"]: r for r in map(json.loads, f) if "key" in r}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        d = args.workdir or tmp
        storage = os.path.join(tmp, "ckpt")

        def fit(n: int, run: str, kill: bool = False) -> None:
            name = f"scale-{n}{'-killed' if kill else ''}"
            key = f"{name}-epochs{args.epochs}-every{args.checkpoint_every_steps}-parquet-ingest"
            if key in earlier:  # a fit of hours is not run again after a later one failed
                rows.append(earlier[key])
                print(f"[bench] {key}: the row measured at {earlier[key]['measured_at']} "
                      f"(code {earlier[key]['code']}), from {rows_file}", file=sys.stderr)
                return
            common = [os.path.join(d, f"items-{n}"), os.path.join(tmp, f"model-{name}"), storage, name,
                      str(args.epochs), str(args.checkpoint_every_steps)]
            if kill:
                t0 = time.perf_counter()
                run_child(common, args.timeout,
                          kill_when=lambda: registered_mid_epoch_checkpoint(os.path.join(storage, name)))
                run = f"killed after {time.perf_counter() - t0:.0f} s, resumed"
                common = ["--resume", *common]  # a fresh process and Ray cluster, as a resubmitted job
            r = run_child(common, args.timeout)
            r.update(size=n, run=run)
            if not kill and any(e.get("started_at_epoch") or e.get("resumed_at_step") for e in r["epochs"]):
                raise SystemExit(f"the {n:,} fit '{run}' resumed from a checkpoint: not an uninterrupted run")
            r.update(key=key, measured_at=time.strftime("%Y-%m-%d %H:%M"), code=code_revision())
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
            if rows_file:  # each row as it finishes: a later fit's failure loses none of them
                with open(rows_file, "a") as f:
                    f.write(json.dumps(r) + "\n")

        for n in args.sizes:
            make_catalog(n, os.path.join(d, f"items-{n}"))
            fit(n, "uninterrupted")
        if args.kill_after_checkpoint:
            n = args.sizes[-1]
            fit(n, "", kill=True)
            resumed, whole = rows[-1], next(r for r in rows if r["size"] == n)
            first, again = whole["epochs"][0], resumed["epochs"][resumed["epochs"][-1]["started_at_epoch"]]
            if not again.get("resumed_at_step"):
                raise SystemExit(f"the killed {n:,} fit did not resume inside its epoch: {again}")
            if again["steps"] != first["steps"]:
                raise SystemExit(f"the resumed epoch ran {again['steps']} steps, the uninterrupted one "
                                 f"{first['steps']}")
            if resumed["items"] != whole["items"]:
                raise SystemExit(f"the resumed fit covered {resumed['items']:,} items, the uninterrupted one "
                                 f"{whole['items']:,}")

    print(f"\nhardware: {hardware()}; 2 Ray Train workers; {args.epochs} epoch(s); "
          f"{', '.join(sorted({str(r.get('cpus_per_worker')) for r in rows}))} CPU per worker; "
          f"mid-epoch checkpoints every {args.checkpoint_every_steps} steps")
    print("\nMemory: the fit's own processes (driver + its Ray cluster). PSS: the memory really in use. "
          "Peaks' sum: each process's own peak RSS (VmHWM), summed (an upper bound of the RSS sum's peak). "
          "It counts every process the run ever had, exited ones too (Ray Data's short-lived read actors, "
          "idle workers restarted), so it grows with a run's length, not only its memory: the ratio is on "
          "PSS alone. Ratio: against the smallest size.")
    print("\n| catalog | run | ingest | epoch items/s | steps (resumed at) | wall (s) | peak PSS sum | "
          "vs smallest | peak RSS sum | peaks' sum (VmHWM) | peak /dev/shm | k-means sample | recon | "
          "collision rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = rows[0]
        last = r["epochs"][-1]
        held = r.get("ingest", "ray-data") + (", cached" if r["catalog_cached"] else "")
        print(f"| {r['size']:,} | {r['run']} | {held} | "
              f"{last['items_per_s']:,.0f} | {last['steps']} ({last.get('resumed_at_step', 0)}) | {r['wall_s']:,.0f} | "
              f"{r['peak_pss_mib']:,.0f} MiB | {r['peak_pss_mib'] / base['peak_pss_mib']:.2f}x | "
              f"{r['peak_rss_mib']:,.0f} MiB | {r['hwm_sum_mib']:,.0f} MiB | {r['peak_shm_mib']:,.0f} MiB | "
              f"{r['kmeans_sample']:,} | {r['final']['recon']:.4f} | {r['final']['collision_rate']:.4f} |")
    names = sorted({k for r in rows for k in r["role_peak_pss_mib"]})
    print("\n| catalog | run | " + " | ".join(f"{k}: at peak (own peak)" for k in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['size']:,} | {r['run']} | " + " | ".join(
            f"{r['pss_at_peak_mib'].get(k, 0):,.0f} ({r['role_peak_pss_mib'].get(k, 0):,.0f})" for k in names) + " |")
    print("\nMeasured: " + "; ".join(f"{r['size']:,} {r['run']} at {r['measured_at']} (code {r['code']})"
                                      for r in rows))
    print("\nper epoch (data wait / step seconds, mean over workers):")
    for r in rows:
        print(f"  {r['size']:,} {r['run']}: " + ", ".join(
            f"epoch {e['epoch']}: {e['data_wait_s']:.0f} / {e['step_s']:.0f}" for e in r["epochs"]))


if __name__ == "__main__":
    main()
