"""A catalog's first night and second night, end to end, on one machine: generate a synthetic
catalog (the README's column layout), train ADC-SID on it (Ray Train, one epoch), assign every
item a SID (the snapshot), then a nightly refresh against that snapshot after ``--changed``
of the items changed their embeddings. Wall time and peak memory of each step.

    .venv/bin/python bench/end_to_end.py --items 20000000 [--changed 0.05] [--epochs 1]
        [--workdir DIR]

Each step runs in its own process (killed past ``--timeout``); memory is the peak of PSS
summed over that process and its own Ray cluster (the memory really in use), of RSS summed the
same way, and the sum of each process's kernel-kept peak (VmHWM), as in
``bench/assign_throughput.py``'s ``MemorySampler``. The changed catalog of night 2 re-writes every
``1/changed``-th 100k-row file with new embeddings for the same item ids and hard-links the
others, so exactly that share of items changed. The refresh runs with its defaults (sticky
assignment for ADC-SID, no re-fit): what a nightly job does.
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


def changed_catalog(src: str, dst: str, share: float) -> int:
    """``dst``: ``src`` with every round(1/share)-th file's embeddings drawn anew (same ids,
    same columns); the other files hard-linked. -> rows changed."""
    import pyarrow.parquet as pq

    from sidserve import make_synthetic_catalog

    if os.path.exists(os.path.join(dst, "_DONE")):
        return json.load(open(os.path.join(dst, "_DONE")))["changed"]
    os.makedirs(dst, exist_ok=True)
    every = max(1, round(1 / share))
    files = sorted(f for f in os.listdir(src) if f.endswith(".parquet"))
    changed = 0
    for i, f in enumerate(files):
        if os.path.exists(os.path.join(dst, f)):
            os.remove(os.path.join(dst, f))
        if i % every:
            os.link(os.path.join(src, f), os.path.join(dst, f))
            continue
        old = pq.read_table(os.path.join(src, f))
        new = make_synthetic_catalog(old.num_rows, seed=10_000 + i)  # other embeddings, same layout
        for name in old.column_names:
            if name.endswith("_emb"):
                old = old.set_column(old.column_names.index(name), name, new.column(name))
        pq.write_table(old, os.path.join(dst, f))
        changed += old.num_rows
    with open(os.path.join(dst, "_DONE"), "w") as fh:
        json.dump({"changed": changed}, fh)
    return changed


def step(name: str, argv: list[str], timeout: float) -> dict:
    """Run ``--step name argv`` in a fresh process; -> its JSON line. Past ``timeout`` seconds the
    step and its Ray cluster are killed and the benchmark fails."""
    from train_scale import kill_tree

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--step", name, *argv], stdout=out, stderr=err,
                                text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            raise SystemExit(f"step {name} still running after --timeout {timeout:.0f} s: killed") from None
        out.seek(0), err.seek(0)
        p = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    if p.returncode:
        raise SystemExit(f"step {name} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads([x for x in p.stdout.splitlines() if x.startswith("{")][-1])


def run_step(name: str, argv: list[str]) -> None:
    """One step in this process, measured; prints one JSON line."""
    import ray

    sampler = MemorySampler().start()
    t0 = time.perf_counter()
    out: dict = {}
    if name == "generate":
        n, items = int(argv[0]), argv[1]
        out.update(reused=os.path.exists(os.path.join(items, "_DONE")), items=n)
        make_catalog(n, items)
    elif name == "change":
        out["reused"] = os.path.exists(os.path.join(argv[1], "_DONE"))
        out["changed_rows"] = changed_catalog(argv[0], argv[1], float(argv[2]))
    else:
        reuse = name == "train" and os.path.exists(os.path.join(argv[1], "manifest.json"))
        if not reuse:  # a model trained by an earlier run (--workdir) needs no cluster
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        if name == "train":
            from sidserve.jobs.train.driver import TrainJobConfig, fit_distributed

            items, model, storage, epochs, every = argv
            if reuse:  # --workdir: trained by an earlier run
                from sidserve.tokenizers.registry import load_tokenizer

                load_tokenizer(model)  # a complete artifact, or this step fails here
                out.update(reused=True, model_version=json.load(open(os.path.join(model, "manifest.json"))).get("version"))
                m = None
            else:
                _, version, m = fit_distributed(TrainJobConfig(
                    output=model, items=items, tokenizer={"epochs": int(epochs)}, storage_path=storage,
                    checkpoint_every_steps=int(every) or None, overwrite=True,
                    max_failures=0))  # a restart from a checkpoint would hide in the row's time and memory
            if m is not None:
                out.update(model_version=version, catalog_cached=m["catalog_cached"], ingest=m["ingest"],
                           epoch_items_per_s=m["epochs"][-1]["items_per_s"], items=m["catalog"]["num_valid"])
        elif name == "assign":
            from sidserve.jobs.assign import AssignJobConfig, run_assignment

            items, model, snapshots = argv
            s = run_assignment(AssignJobConfig(items=items, model=model, output=snapshots))
            out.update(items=s["items"], stages=s["stage_seconds"], collision_rate=s.get("collision_rate"))
        elif name == "refresh":
            from sidserve.jobs.refresh import RefreshJobConfig, run_refresh

            items, model, snapshots = argv
            s = run_refresh(RefreshJobConfig(items=items, model=model, output=snapshots))
            out.update(items=s["items"], stages={"prepass": s["prepass"]["seconds"], **s["stage_seconds"]},
                       prepass_stats=s["prepass"], churn=s["churn"]["churn"],
                       sticky=s.get("sticky"), staging_bytes=s.get("staging_bytes"))
        else:
            raise SystemExit(f"unknown step {name}")
    wall = time.perf_counter() - t0
    peak, series = sampler.stop()
    top = max(series, key=lambda x: x[1]) if series else (0, 0, {})
    print(json.dumps({"step": name, "wall_s": wall, "peak_pss_mib": top[1] / MIB, "peak_rss_mib": peak["rss"] / MIB,
                      "hwm_sum_mib": peak["hwm"] / MIB,
                      "peak_shm_mib": peak["shm"] / MIB, "pss_at_peak_mib": {k: v / MIB for k, v in top[2].items()},
                      **out}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--changed", type=float, default=0.05, help="share of items whose embeddings change for night 2")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--checkpoint-every-steps", type=int, default=1000)
    p.add_argument("--workdir", help="keep the catalogs and the trained model here between runs (a rerun after a "
                   "failed assign or refresh does not train again); the snapshots are not kept")
    p.add_argument("--timeout", type=float, default=8 * 3600,
                   help="seconds one step may run before it is killed (training 20M items: hours on 2 CPUs)")
    p.add_argument("--step", nargs="+")
    args = p.parse_args()
    if args.step:
        run_step(args.step[0], args.step[1:])
        return
    if not 0 < args.changed <= 1:
        raise SystemExit(f"--changed must be in (0, 1], got {args.changed}")

    from train_scale import code_revision
    from train_throughput import hardware

    n = args.items
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        d = args.workdir or tmp
        night1, night2 = os.path.join(d, f"items-{n}"), os.path.join(d, f"items-{n}-changed-{args.changed:g}")
        model = os.path.join(d, f"model-{n}-epochs{args.epochs}")
        snaps = os.path.join(tmp, "snapshots")
        plan = [("generate", [str(n), night1]), ("change", [night1, night2, str(args.changed)]),
                ("train", [night1, model, os.path.join(tmp, "ckpt"), str(args.epochs),
                           str(args.checkpoint_every_steps)]),
                ("assign", [night1, model, snaps]), ("refresh", [night2, model, snaps])]
        for name, argv in plan:
            r = step(name, argv, args.timeout)
            r.update(measured_at=time.strftime("%Y-%m-%d %H:%M"), code=code_revision())
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
            if args.workdir:  # each row as it finishes: a later step's failure loses none of them
                with open(os.path.join(args.workdir, "rows.jsonl"), "a") as f:
                    f.write(json.dumps(r) + "\n")

    print(f"\nhardware: {hardware()}; catalog {n:,} items; {args.changed:.0%} changed for night 2; "
          f"train {args.epochs} epoch(s), 2 Ray Train workers; assign/refresh 2 encoder actors")
    print("\nitems/s: the step's items over its wall time. Memory: the step's process and its descendants "
          "(its own Ray cluster). Peaks' sum: each process's own peak RSS (VmHWM) summed, an upper bound "
          "of the RSS sum's peak.")
    print("\n| step | wall | items/s | peak PSS sum | peak RSS sum | peaks' sum (VmHWM) | peak /dev/shm | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        stages = json.dumps({k: round(v) for k, v in (r.get("stages") or {}).items()})
        notes = {"generate": "100k-row Parquet files",
                 "change": f"{r.get('changed_rows', 0):,} rows re-drawn, the rest hard-linked",
                 "train": f"{r.get('ingest', 'ray-data')} ingest, catalog {'cached' if r.get('catalog_cached') else 'streamed'}; "
                          "the epoch alone: "
                          f"{r.get('epoch_items_per_s', 0):,.0f} items/s (the wall adds the pre-pass, the k-means "
                          "sample and the final pass)",
                 "assign": f"stages {stages}",
                 "refresh": f"churn {r.get('churn', 0):.4f}; stages {stages}"}[r["step"]]
        if r.get("reused"):  # --workdir: made by an earlier run, so this run's wall is not its cost
            notes = "reused from --workdir (made by an earlier run; wall not its cost)"
        rate = r["items"] / r["wall_s"] if r.get("items") and not r.get("reused") else None
        print(f"| {r['step']} | {r['wall_s']:,.0f} s | {f'{rate:,.0f}' if rate else '-'} | "
              f"{r['peak_pss_mib']:,.0f} MiB | {r['peak_rss_mib']:,.0f} MiB | {r['hwm_sum_mib']:,.0f} MiB | "
              f"{r['peak_shm_mib']:,.0f} MiB | {notes} |")


if __name__ == "__main__":
    main()
