"""Training at scale: the Ray Train fit (``sidserve train``, 2 workers) for one epoch on
synthetic catalogs of several sizes, in one run: items/s, wall time, peak memory summed over
the driver and every Ray process (PSS, by role), the object store's peak (/dev/shm), and
whether the cleaned catalog was cached in the object store or streamed each epoch.

    .venv/bin/python bench/train_scale.py --sizes 1000000 10000000 [--workdir DIR]
        [--epochs 1] [--checkpoint-every-steps 1000] [--kill-after-checkpoint]

``--kill-after-checkpoint``: the largest size is also run a second time, killed (SIGKILL to
the driver and every Ray process) once its first mid-epoch checkpoint is in storage, and
resumed with ``--resume`` in a fresh process and a fresh Ray cluster, as a resubmitted job
would be; the table gives both parts and the step the resumed epoch started from.

Catalogs: ``bench/assign_throughput.py``'s (the README's column layout, dims 64 + 32 + 32,
100k-row Parquet files), kept in ``--workdir`` between runs. The model: ADC-SID with the
public settings (K=100, L=6) and its default batch size, ``--epochs`` epochs. The baseline of
each ratio is the smallest size in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
        checkpoint_every_steps=every, overwrite=True))
    wall = time.perf_counter() - t0
    peak, series = sampler.stop()
    top = max(series, key=lambda x: x[1])
    names = sorted({r for _, _, roles in series for r in roles})
    print(json.dumps({
        "wall_s": wall, "items": m["catalog"]["num_valid"], "epochs": m["epochs"],
        "catalog_cached": m["catalog_cached"], "kmeans_sample": m["kmeans_sample"],
        "peak_pss_mib": top[1] / MIB, "peak_rss_mib": peak["rss"] / MIB, "peak_shm_mib": peak["shm"] / MIB,
        "pss_at_peak_mib": {r: top[2].get(r, 0) / MIB for r in names},
        "role_peak_pss_mib": {r: max(x[2].get(r, 0) for x in series) / MIB for r in names}}))


def run_child(args: list[str], kill_when=None) -> dict | None:
    """The child in a new session; ``kill_when()`` polled every 2 s: True -> kill it all."""
    resume = args[:1] == ["--resume"]
    cmd = [sys.executable, __file__, *(["--resume"] if resume else []), "--child", *args[resume:]]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    if kill_when is not None:
        while p.poll() is None:
            if kill_when():
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                # Ray's own processes outlive their driver: stop them as a lost node would
                subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"],
                               capture_output=True)
                return None
            time.sleep(2)
    out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"child {cmd} failed with exit code {p.returncode}")
    return json.loads([x for x in out.splitlines() if x.startswith("{")][-1])


def has_mid_epoch_checkpoint(run_dir: str) -> bool:
    from sidserve.jobs.train.checkpoint import PARTIAL_FILE

    for _root, _dirs, files in os.walk(run_dir):
        if PARTIAL_FILE in files:
            return True
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--checkpoint-every-steps", type=int, default=1000)
    p.add_argument("--kill-after-checkpoint", action="store_true",
                   help="also kill the largest size's fit after its first mid-epoch checkpoint and resume it")
    p.add_argument("--workdir", help="keep catalogs here between runs instead of a temp dir")
    p.add_argument("--child", nargs=6)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if args.child:
        items, out, storage, name, epochs, every = args.child
        child(items, out, storage, name, int(epochs), int(every) or None, args.resume)
        return

    from train_throughput import hardware

    rows = []
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        d = args.workdir or tmp
        for n in args.sizes:
            items = os.path.join(d, f"items-{n}")
            make_catalog(n, items)
            common = [items, os.path.join(tmp, f"model-{n}"), os.path.join(tmp, "ckpt"), f"scale-{n}",
                      str(args.epochs), str(args.checkpoint_every_steps)]
            r = run_child(common)
            r.update(size=n, run="uninterrupted")
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
        if args.kill_after_checkpoint:
            n = args.sizes[-1]
            name = f"scale-{n}-killed"
            common = [os.path.join(d, f"items-{n}"), os.path.join(tmp, f"model-{n}-killed"),
                      os.path.join(tmp, "ckpt"), name, str(args.epochs), str(args.checkpoint_every_steps)]
            t0 = time.perf_counter()
            run_child(common, kill_when=lambda: has_mid_epoch_checkpoint(os.path.join(tmp, "ckpt", name)))
            killed_after = time.perf_counter() - t0
            r = run_child(["--resume", *common])  # a fresh process and cluster: --resume
            r.update(size=n, run=f"killed after {killed_after:.0f} s, resumed")
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)

    print(f"\nhardware: {hardware()}; 2 Ray Train workers; {args.epochs} epoch(s); "
          f"mid-epoch checkpoints every {args.checkpoint_every_steps} steps")
    base = rows[0]
    print("\n| catalog | run | cleaned catalog | epoch items/s | steps (resumed at) | wall (s) | peak PSS sum | "
          "vs smallest | peak RSS sum | peak /dev/shm | k-means sample |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        last = r["epochs"][-1]
        print(f"| {r['size']:,} | {r['run']} | {'cached' if r['catalog_cached'] else 'streamed'} | "
              f"{last['items_per_s']:,.0f} | {last['steps']} ({last.get('resumed_at_step', 0)}) | {r['wall_s']:,.0f} | "
              f"{r['peak_pss_mib']:,.0f} MiB | {r['peak_pss_mib'] / base['peak_pss_mib']:.2f}x | "
              f"{r['peak_rss_mib']:,.0f} MiB | {r['peak_shm_mib']:,.0f} MiB | {r['kmeans_sample']:,} |")
    names = sorted({k for r in rows for k in r["role_peak_pss_mib"]})
    print("\n| catalog | run | " + " | ".join(f"{k}: at peak (own peak)" for k in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['size']:,} | {r['run']} | " + " | ".join(
            f"{r['pss_at_peak_mib'].get(k, 0):,.0f} ({r['role_peak_pss_mib'].get(k, 0):,.0f})" for k in names) + " |")
    print("\nper epoch (data wait / step seconds, mean over workers):")
    for r in rows:
        print(f"  {r['size']:,} {r['run']}: " + ", ".join(
            f"epoch {e['epoch']}: {e['data_wait_s']:.0f} / {e['step_s']:.0f}" for e in r["epochs"]))


if __name__ == "__main__":
    main()
