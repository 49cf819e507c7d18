"""What batch invariance costs: ADC-SID's encode (codes and weights) on the batch-invariant
path (sidserve/tokenizers/invariant.py: exact float64 fixed-point GEMMs, one thread, rows
padded) against the plain float32 forward on the same model and batches, in the same run.

    .venv/bin/python bench/encode_invariance.py [--items 20000] [--dims text=768,image=512]
        [--behavior-dim 64] [--threads 1]

Offline: items/s of 8,192-row calls over the catalog. Online: latency percentiles of single
calls of 1, 64 and 333 items (what @serve.batch hands the model). Also the share of items
whose SID or weight bits differ between the whole-catalog call and random batch sizes, for
each path (the defect the invariant path removes). Prints a markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch


def parse_dims(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, _, dim = part.partition("=")
        if not dim.isdigit():
            raise SystemExit(f"--dims: expected name=int pairs, got {part!r}")
        out[name] = int(dim)
    return out


def plain_encode(tok, arrays, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 forward, as encode ran before the invariant path."""
    from sidserve.tokenizers.adc_sid.training import to_model_input

    with torch.inference_mode():
        out = tok.model_(to_model_input(arrays, rows), codes_only=True)
    return out.codes.numpy(), out.behavior_weights.numpy()


def invariant_encode(tok, arrays, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What ``encode`` runs (ADCSIDTokenizer._run): rows padded, invariant.CHUNK_ROWS per call."""
    from sidserve.tokenizers import invariant
    from sidserve.tokenizers.adc_sid.training import to_model_input

    sid, weights = [], []
    with torch.inference_mode(), invariant.batch_invariant():
        for s in range(0, len(rows), invariant.CHUNK_ROWS):
            chunk = rows[s:s + invariant.CHUNK_ROWS]
            out = tok.model_(to_model_input(arrays, chunk[invariant.padded_rows(len(chunk))]), codes_only=True)
            sid.append(out.codes[:len(chunk)].numpy())
            weights.append(out.behavior_weights[:len(chunk)].numpy())
    return np.concatenate(sid), np.concatenate(weights)


def offline_rate(fn, tok, arrays, batch: int = 8192) -> float:
    n = len(arrays)
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        fn(tok, arrays, np.arange(s, min(n, s + batch)))
    return n / (time.perf_counter() - t0)


def latencies_ms(fn, tok, arrays, size: int, reps: int, rng) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        rows = rng.choice(len(arrays), size=size, replace=False)
        t0 = time.perf_counter()
        fn(tok, arrays, rows)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def disagreement(fn, tok, arrays, rng) -> tuple[float, float]:
    """(share of items whose SID differs, share whose weight bits differ) between one
    whole-catalog pass (8,192-row calls) and random call sizes 1..512 in a random order."""
    n = len(arrays)
    sid0, w0 = np.empty((n, tok.config.sid_length), np.int64), np.empty((n, tok.config.num_behavior_experts), np.float32)
    for s in range(0, n, 8192):
        rows = np.arange(s, min(n, s + 8192))
        sid0[rows], w0[rows] = fn(tok, arrays, rows)
    perm, i = rng.permutation(n), 0
    bad_sid = np.zeros(n, bool)
    bad_w = np.zeros(n, bool)
    while i < n:
        rows = perm[i:i + int(rng.integers(1, 513))]
        sid, w = fn(tok, arrays, rows)
        bad_sid[rows] = (sid != sid0[rows]).any(1)
        bad_w[rows] = (w.view(np.uint32) != w0[rows].view(np.uint32)).any(1)
        i += len(rows)
    return float(bad_sid.mean()), float(bad_w.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20000, help="catalog size")
    p.add_argument("--dims", default="text=768,image=512", help="content modality dims")
    p.add_argument("--behavior-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the plain path (the invariant path always runs on one)")
    p.add_argument("--reps", type=int, default=50, help="calls per online latency figure")
    args = p.parse_args()

    from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog
    from sidserve.items import coerce_items

    torch.set_num_threads(args.threads)
    dims = parse_dims(args.dims)
    catalog = make_synthetic_catalog(args.items, modality_dims=dims, behavior_dim=args.behavior_dim,
                                     n_clusters=64, cold_share=0.2, seed=0)
    config = TokenizerConfig(modality_dims=dims, behavior_dim=args.behavior_dim, epochs=1)
    tok = SemanticIdTokenizer(config).fit(catalog)
    tok.model_.eval()
    arrays = coerce_items(catalog, config)
    rng = np.random.default_rng(0)

    rows = {}
    for name, fn in (("plain float32", plain_encode), ("batch-invariant", invariant_encode)):
        torch.set_num_threads(args.threads)
        rate = offline_rate(fn, tok, arrays)
        lat = {size: latencies_ms(fn, tok, arrays, size, args.reps, rng) for size in (1, 64, 333)}
        bad = disagreement(fn, tok, arrays, rng)
        rows[name] = (rate, lat, bad)

    base = rows["plain float32"][0]
    from train_throughput import hardware  # bench/ is the script's directory, on sys.path

    print(f"hardware: {hardware()} (plain path: {args.threads} threads; invariant: 1)")
    print(f"catalog: {args.items} synthetic items, dims {dims}, behavior {args.behavior_dim}, "
          f"K={config.codebook_size}, L={config.sid_length}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("\n| path | offline items/s (8,192-row calls) | vs plain | p50 / p99 ms, 1 item | 64 items | 333 items "
          "| items whose SID differs across batchings | whose weight bits differ |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (rate, lat, bad) in rows.items():
        cells = " | ".join(f"{lat[s][0]:.2f} / {lat[s][1]:.2f}" for s in (1, 64, 333))
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {cells} | {bad[0]:.4%} | {bad[1]:.4%} |")


if __name__ == "__main__":
    main()
