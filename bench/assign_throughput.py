"""Batch assignment throughput and memory: the Ray Data job (jobs/assign.py) against the
bare ``encode`` of the same model in one process without Ray (the bound), at two catalog
sizes, in one run.

    .venv/bin/python bench/assign_throughput.py [--sizes 100000 1000000] [--workers 2]

Each measurement runs in a fresh subprocess so that peak RSS is its own. The job's figures
are sums over the driver and every process Ray started, sampled every 0.5 s (PSS every 2 s): RSS (counts
pages shared between processes, such as the object store's, once per process) and PSS
(shares them out, so the sum is the memory really in use).
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


def make_inputs(n: int, directory: str, model_dir: str) -> None:
    import pyarrow.parquet as pq

    from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog

    if not os.path.exists(os.path.join(model_dir, "manifest.json")):
        SemanticIdTokenizer(TokenizerConfig(epochs=3)).fit(make_synthetic_catalog(20000, seed=0)) \
            .save_pretrained(model_dir)
    os.makedirs(directory, exist_ok=True)
    chunk = 100_000
    for i, start in enumerate(range(0, n, chunk)):
        t = make_synthetic_catalog(min(chunk, n - start), seed=100 + i)
        ids = [f"item-{start + j:09d}" for j in range(t.num_rows)]
        import pyarrow as pa

        t = t.set_column(0, "item_id", pa.array(ids))
        pq.write_table(t.drop_columns(["cluster"]), os.path.join(directory, f"part-{i:04d}.parquet"))


def child(mode: str, items: str, model: str, out: str, workers: int) -> None:
    """Runs in a subprocess; prints one JSON line."""
    import resource

    t0 = time.perf_counter()
    if mode == "bare":
        import pyarrow.dataset as pads

        from sidserve import load_tokenizer

        tok = load_tokenizer(model)
        n = 0
        t0 = time.perf_counter()
        for batch in pads.dataset(items, format="parquet").to_batches(batch_size=8192):
            n += len(tok.encode(batch, batch_size=8192))
        wall = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        import psutil
        import ray

        from sidserve.jobs.assign import AssignJobConfig, run_assignment

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        peak = {}
        stop = False

        import threading

        def sample():  # peak RSS (every 0.5 s) and PSS (every 2 s) summed over this Ray session
            me = psutil.Process()
            k = 0
            while not stop:
                with_pss = k % 4 == 0  # PSS walks each process's pages: about 0.1 s for all of them
                rss = pss = 0
                for p in psutil.process_iter(["cmdline"]):
                    try:
                        if p.pid == me.pid or any("ray" in c for c in (p.info["cmdline"] or [])[:2]):
                            m = p.memory_full_info() if with_pss else p.memory_info()
                            rss += m.rss
                            pss += m.pss if with_pss else 0
                    except (psutil.Error, TypeError, AttributeError):
                        pass
                peak["rss"] = max(peak.get("rss", 0), rss)
                peak["pss"] = max(peak.get("pss", 0), pss)
                k += 1
                time.sleep(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        s = run_assignment(AssignJobConfig(items=items, model=model, output=out, num_workers=workers))
        wall = time.perf_counter() - t0
        stop = True
        th.join()
        n = s["items"]
        rss = peak["rss"] / 2**20
        print(json.dumps({"stages": s["stage_seconds"], "peak_pss_mib": peak["pss"] / 2**20}))
    print(json.dumps({"mode": mode, "items": n, "wall_s": wall, "items_per_s": n / wall, "peak_rss_mib": rss}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--child", nargs=4)
    args = p.parse_args()
    if args.child:
        mode, items, model, out = args.child
        child(mode, items, model, out, args.workers)
        return

    results = []
    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "model")
        for n in args.sizes:
            items = os.path.join(d, f"items-{n}")
            make_inputs(n, items, model)
            for mode in ("bare", "job"):
                out = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--child", mode,
                                      items, model, os.path.join(d, f"snap-{n}")],
                                     capture_output=True, text=True, check=True).stdout
                lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
                row = lines[-1]
                extra = next((x for x in lines if "stages" in x), {})
                row["stages"] = extra.get("stages")
                row["peak_pss_mib"] = extra.get("peak_pss_mib")
                row["size"] = n
                results.append(row)
                print(json.dumps(row), file=sys.stderr)

    sys.path.insert(0, HERE)
    from train_throughput import hardware

    print(f"\nhardware: {hardware()}; job: {args.workers} encoder actors")
    print("\n| catalog | bare encode, 1 process (bound) | job (Ray Data) | job / bound | peak RSS bare | "
          "peak RSS job (sum) | peak PSS job (sum) |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["size"], r["mode"]): r for r in results}
    for n in args.sizes:
        b, j = by[(n, "bare")], by[(n, "job")]
        print(f"| {n:,} | {b['items_per_s']:,.0f} items/s | {j['items_per_s']:,.0f} items/s ({j['wall_s']:.0f} s) | "
              f"{j['items_per_s'] / b['items_per_s']:.0%} | {b['peak_rss_mib']:,.0f} MiB | {j['peak_rss_mib']:,.0f} MiB | "
              f"{j['peak_pss_mib']:,.0f} MiB |")
    lo = args.sizes[0]
    for hi in args.sizes[1:]:
        print(f"peak memory of the job at {hi:,} / at {lo:,}: RSS sum "
              f"{by[(hi, 'job')]['peak_rss_mib'] / by[(lo, 'job')]['peak_rss_mib']:.2f}x, PSS sum "
              f"{by[(hi, 'job')]['peak_pss_mib'] / by[(lo, 'job')]['peak_pss_mib']:.2f}x")
    print()
    for n in args.sizes:
        print(f"job stages at {n:,} (s): {json.dumps({k: round(v, 1) for k, v in by[(n, 'job')]['stages'].items()})}")


if __name__ == "__main__":
    main()
