"""Training throughput: in-process fit (with and without collision regulation, and without
the cold-path consistency term) vs Ray
Train with 1 and 2 workers, and the cost of one training step relative to the model's
forward pass on the same batch.

    .venv/bin/python bench/train_throughput.py [--items 20000] [--epochs 5] [--batch-size 1024]

Prints a markdown table (recorded in docs/benchmarks.md). The baseline is the in-process
``SemanticIdTokenizer.fit`` on the same catalog in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time

import numpy as np
import torch


def hardware() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.python_version()}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_vs_forward(config, items, reps: int) -> dict:
    """Median seconds of forward (train mode, all losses) and of a full train_step."""
    from sidserve.items import coerce_items
    from sidserve.tokenizers.adc_sid.model import ADCSIDModel
    from sidserve.tokenizers.adc_sid.training import (
        TrainState,
        compute_catalog_stats,
        init_codebooks,
        to_model_input,
        train_step,
    )

    arrays = coerce_items(items, config)
    stats = compute_catalog_stats(arrays, config)
    model = ADCSIDModel(config)
    model.set_catalog_stats(stats["n_min"], stats["n_max"])
    init_codebooks(model, to_model_input(arrays, np.arange(min(len(arrays), 5000))))
    batch = to_model_input(arrays, np.arange(config.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    state = TrainState.create(0)
    fwd, step, infer = [], [], []
    for _ in range(reps):
        model.train()
        t0 = time.perf_counter()
        model(batch, behavior_dropout=config.behavior_dropout, generator=state.generator).losses["total"].item()
        fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        train_step(model, opt, batch, state)
        step.append(time.perf_counter() - t0)
        model.eval()
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(batch)
            infer.append(time.perf_counter() - t0)
    return {"forward_s": statistics.median(fwd), "step_s": statistics.median(step),
            "inference_s": statistics.median(infer)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()

    import ray

    from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog
    from sidserve.jobs.train import TrainJobConfig, fit_distributed

    config = TokenizerConfig(epochs=args.epochs, batch_size=args.batch_size)
    items = make_synthetic_catalog(args.items, seed=0)
    rows = []

    # 1. step vs forward
    cost = step_vs_forward(config, items, args.reps)

    # 2. in-process fit (the baseline)
    t0 = time.perf_counter()
    tok = SemanticIdTokenizer(config).fit(items)
    wall = time.perf_counter() - t0
    ips = statistics.mean(h["items_per_s"] for h in tok.history_[1:] or tok.history_)
    rows.append(("in-process fit (baseline)", 1, ips, wall))

    # 2b. the same fit with collision regulation (issue 8): per epoch a codes-only pass over
    # the catalog, the overlap group-by, and 64 pairs (128 rows) appended to every batch
    t0 = time.perf_counter()
    tok = SemanticIdTokenizer(config.replace(collision_regulation="adaptive", collision_hamming=1)).fit(items)
    wall = time.perf_counter() - t0
    ips = statistics.mean(h["items_per_s"] for h in tok.history_[1:] or tok.history_)
    rows.append(("in-process fit + collision regulation (adaptive, h=1)", 1, ips, wall))

    # 2c. the paper's model: without the cold-path consistency term (default 0.3 since
    # 2026-12-02), which runs the shared experts once more per warm item, on its content-only input
    t0 = time.perf_counter()
    tok = SemanticIdTokenizer(config.replace(cold_consistency_weight=0.0)).fit(items)
    wall = time.perf_counter() - t0
    ips = statistics.mean(h["items_per_s"] for h in tok.history_[1:] or tok.history_)
    rows.append(("in-process fit, cold_consistency_weight 0 (the paper's model)", 1, ips, wall))

    # 3. Ray Train, 1 and 2 workers
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            _, _, metrics = fit_distributed(TrainJobConfig(
                output=os.path.join(d, "m"), tokenizer=config, num_workers=workers,
                storage_path=os.path.join(d, "ckpt"), demo_items=args.items))
            wall = time.perf_counter() - t0
        epochs = metrics["epochs"]
        ips = statistics.mean(e["items_per_s"] for e in epochs[1:] or epochs)
        rows.append((f"Ray Train, {workers} worker{'s' if workers > 1 else ''}", workers, ips, wall))
    ray.shutdown()

    base = rows[0][2]
    print(f"\nhardware: {hardware()}")
    print(f"catalog: {args.items} synthetic items, {args.epochs} epochs, batch {args.batch_size} per worker, "
          f"K={config.codebook_size}, L={config.sid_length}\n")
    print("| run | workers | items/s (epochs 2+) | vs baseline | wall s (incl. start-up) |")
    print("|---|---|---|---|---|")
    for name, w, ips, wall in rows:
        print(f"| {name} | {w} | {ips:,.0f} | {ips / base:.2f}x | {wall:.1f} |")
    print(f"\nstep cost on one batch of {args.batch_size} (median of {args.reps}):")
    print("| forward (train mode, all losses) | train step (fwd+bwd+AdamW+bookkeeping) | step / forward | inference forward |")
    print("|---|---|---|---|")
    print(f"| {cost['forward_s'] * 1e3:.1f} ms | {cost['step_s'] * 1e3:.1f} ms | "
          f"{cost['step_s'] / cost['forward_s']:.2f} (ideal about 3) | {cost['inference_s'] * 1e3:.1f} ms |")
    print(f"\ndriver peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
