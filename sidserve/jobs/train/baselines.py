"""Fitting a baseline tokenizer (RQ-Kmeans, OPQ, RQ-VAE) through the training job.

    pre-pass (Ray Data)   the same validation and statistics as ADC-SID's fit
    sample (Ray Data)     one uniform sample of the cleaned catalog, at most ``sample_size``
                          rows, streamed: the catalog is never held whole
    fit (one Ray task)    on a GPU when ``use_gpu`` (faiss-gpu k-means, RQ-VAE in torch)
    artifact              save_pretrained + metrics.json, the format ADC-SID's job writes

k-means needs on the order of K x 256 points per level (faiss' own cap), so a bounded sample
loses nothing a full pass would give; the sample size is recorded in metrics.json.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from sidserve.jobs.catalog import HAS_BEHAVIOR, CatalogStats, clean_batch, input_prepass


def _fit(kind: str, config: dict[str, Any], sample: dict[str, np.ndarray], device: str):
    """Runs in a Ray task: fit on ``device``, hand the tokenizer back on the CPU."""
    import logging

    from sidserve.tokenizers.registry import tokenizer_class

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cls = tokenizer_class(kind)
    tok = cls(cls.config_class.from_dict(config)).to(device)
    t0 = time.perf_counter()
    tok.fit(sample)
    seconds = time.perf_counter() - t0
    return tok.to("cpu"), seconds


def sample_clean(clean_ds, stats: CatalogStats, size: int, seed: int) -> dict[str, np.ndarray]:
    """A uniform sample of about ``min(size, num_valid)`` cleaned rows (Bernoulli per row, so
    every file contributes in proportion; capped at ``size``)."""
    n = min(size, stats.num_valid)
    fraction = min(1.0, 1.02 * n / stats.num_valid)
    ds = clean_ds if fraction >= 1.0 else clean_ds.random_sample(fraction, seed=seed)
    return ds.limit(n).take_batch(n, batch_format="numpy")


def fit_sampled(job, ds, config, inputs: dict[str, Any], t0: float):
    """TrainJobConfig with a baseline ``tokenizer_type`` -> (tokenizer, version, metrics)."""
    import ray

    if job.sample_size < config.codebook_size:
        raise ValueError(f"sample_size={job.sample_size} is smaller than codebook_size={config.codebook_size}")
    stats = input_prepass(config, items=job.items, ds=ds, columns=job.columns)
    print(f"[sidserve] pre-pass: {stats.num_rows} rows, {stats.num_valid} usable, "
          f"{sum(stats.skipped.values())} skipped {stats.skipped or ''} ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    cfg, config_class = config.to_dict(), type(config)
    clean = ds.map_batches(lambda t: clean_batch(t, config_class.from_dict(cfg)), batch_format="pyarrow",
                           batch_size=4096, num_cpus=0.25)
    sample = sample_clean(clean, stats, job.sample_size, config.seed)
    sample.pop(HAS_BEHAVIOR, None)
    n = len(next(iter(sample.values())))
    if n < config.codebook_size:
        raise ValueError(f"{n} usable items are too few for codebook_size={config.codebook_size}")
    print(f"[sidserve] fitting {job.tokenizer_type} on a sample of {n} of {stats.num_valid} items"
          f"{' on a GPU' if job.use_gpu else ''}", flush=True)
    task = ray.remote(_fit).options(num_cpus=1, num_gpus=1 if job.use_gpu else 0)
    tok, fit_s = ray.get(task.remote(job.tokenizer_type, cfg, sample, "cuda" if job.use_gpu else "cpu"))
    final = tok.stats_["fit_metrics"]
    tok.stats_["catalog"] = stats.to_dict()
    tok.inputs_ = inputs
    metrics = {
        "catalog": stats.to_dict(), "final": final, "sample_size": n, "fit_seconds": fit_s,
        "fit_items_per_s": n / max(fit_s, 1e-9), "use_gpu": job.use_gpu, "wall_s": time.perf_counter() - t0,
    }
    print(f"[sidserve] {job.tokenizer_type} fitted in {fit_s:.1f} s ({n / max(fit_s, 1e-9):,.0f} items/s)",
          flush=True)
    source = {"items": job.items or f"synthetic demo catalog ({job.demo_items} items)",
              "num_rows": stats.num_rows, "num_valid": stats.num_valid, "sample_size": n}
    version = tok.save_pretrained(job.output, source=source, overwrite=job.overwrite,
                                  extra_files={"metrics.json": json.dumps(metrics, indent=2).encode()})
    print(f"[sidserve] model {version} written to {job.output}", flush=True)
    return tok, version, metrics
