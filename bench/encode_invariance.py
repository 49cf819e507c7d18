"""What batch invariance costs: ADC-SID's encode (codes and weights) on the batch-invariant
path (sidserve/tokenizers/invariant.py: exact float64 fixed-point GEMMs, one thread, rows
padded) against the plain float32 forward on the same model and batches, in the same run.

    .venv/bin/python bench/encode_invariance.py [--items 20000] [--dims text=768,image=512]
        [--behavior-dim 64] [--threads 1]

Three paths: the plain float32 forward (not batch-invariant), the batch-invariant encode as
shipped ("auto": float32 where this machine's kernels are checked to compute a row the same in
every batch shape, else fixed point; adc_sid/model/invariant_encode.py) and the batch-invariant
encode forced to exact fixed point. Offline: items/s of 8,192-row calls over the catalog (each
path twice, alternating, the better kept). Online: latency percentiles of single calls of 1, 64
and 333 items (what @serve.batch hands the model), the paths' calls interleaved. Also the share of items
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


def invariant_encode(tok, arrays, rows: np.ndarray, arithmetic: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """What ``encode`` runs (ADCSIDTokenizer._run): the batch-invariant forward, which pads and
    chunks inside (adc_sid/model/invariant_encode.py), in the given arithmetic."""
    from sidserve.tokenizers import invariant
    from sidserve.tokenizers.adc_sid.training import to_model_input

    with torch.inference_mode(), invariant.batch_invariant(arithmetic=arithmetic):
        out = tok.model_(to_model_input(arrays, rows), codes_only=True)
    return out.codes.numpy(), out.behavior_weights.numpy()


def fixed_point_encode(tok, arrays, rows):
    return invariant_encode(tok, arrays, rows, "fixed")


def offline_rate(fn, tok, arrays, batch: int = 8192) -> float:
    n = len(arrays)
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        fn(tok, arrays, np.arange(s, min(n, s + batch)))
    return n / (time.perf_counter() - t0)


def latencies_ms(fns, tok, arrays, size: int, reps: int, rng) -> list[tuple[float, float]]:
    """p50/p99 ms of single calls of ``size`` random items, for each of ``fns``, the calls
    interleaved (fn 1, fn 2, ..., fn 1, ...) so that the machine's drift hits all alike."""
    times = [[] for _ in fns]
    for _ in range(reps):
        rows = rng.choice(len(arrays), size=size, replace=False)
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn(tok, arrays, rows)
            t.append((time.perf_counter() - t0) * 1e3)
    return [(float(np.percentile(t, 50)), float(np.percentile(t, 99))) for t in times]


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

    paths = {"plain float32": plain_encode, "batch-invariant (auto)": invariant_encode,
             "batch-invariant, fixed point": fixed_point_encode}
    fns = list(paths.values())
    from sidserve.tokenizers.adc_sid.model import invariant_encode as ie
    from sidserve.tokenizers.adc_sid.model.encode import _encode

    ie._CHECKS.clear()  # (the fit may have run it)
    t0 = time.perf_counter()
    agree = ie.float32_rows_agree(tok.model_, _encode)  # the once-per-process check, timed
    check_s = time.perf_counter() - t0
    for fn in fns:  # warm every path (and the fixed-point weights) before timing
        fn(tok, arrays, np.arange(64))
    rates = {}
    for _ in range(2):  # each path twice, alternating; the better of two runs
        for name, fn in paths.items():
            rates[name] = max(rates.get(name, 0.0), offline_rate(fn, tok, arrays))
    lat = {size: latencies_ms(fns, tok, arrays, size, args.reps, rng) for size in (1, 64, 333)}
    rows = {}
    for i, (name, fn) in enumerate(paths.items()):
        rows[name] = (rates[name], {size: lat[size][i] for size in lat}, disagreement(fn, tok, arrays, rng))

    base = rows["plain float32"][0]
    from train_throughput import hardware  # bench/ is the script's directory, on sys.path

    print(f"hardware: {hardware()} (plain path: {args.threads} threads; invariant: 1)")
    print(f"auto arithmetic here: {'float32 (rows checked batch-independent)' if agree else 'fixed point'}; "
          f"the check took {check_s * 1e3:.0f} ms (once per process and model shape)")
    print(f"catalog: {args.items} synthetic items, dims {dims}, behavior {args.behavior_dim}, "
          f"K={config.codebook_size}, L={config.sid_length}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("\n| path | offline items/s (8,192-row calls) | vs plain | p50 / p99 ms, 1 item | 64 items | 333 items "
          "| items whose SID differs across batchings | whose weight bits differ |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (rate, lat, bad) in rows.items():
        cells = " | ".join(f"{lat[s][0]:.2f} / {lat[s][1]:.2f}" for s in (1, 64, 333))
        one = lat[1][0] / rows["plain float32"][1][1][0]
        cells = cells.replace(" | ", f" ({one:.2f}x) | ", 1)
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {cells} | {bad[0]:.4%} | {bad[1]:.4%} |")


if __name__ == "__main__":
    main()
