"""What sticky assignment stages per item on a real catalog: of the k best codes per position
that the encoder scores, how many lie within the margin delta of the best (the only ones the
assignment job writes to staging, ``sidserve.jobs.assign.sticky.trim_candidates``), per
position, and the bytes per item before compression, against the k x (4 + 8) bytes per
position of staging every candidate with its float64 score.

    .venv/bin/python bench/sticky_staging.py --data ../shared/data/amazon-beauty-5core \\
        --run docs/evaluation/run [--tokenizer adc_sid] [--candidates 32] [--deltas 0,0.1,0.2,0.3]

Reads a finished ``sidserve evaluate`` output: the fitted tokenizer's artifact
(``tokenizers/<name>/artifact``, kept on the machine that ran it) and the inputs it was fitted
on (text/meta embeddings, the untied SASRec's input table as e_b). Encode only, no training.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset dir (sequences.txt + items.jsonl)")
    ap.add_argument("--run", required=True, help="a `sidserve evaluate` output dir of that dataset")
    ap.add_argument("--tokenizer", default="adc_sid", help="the run's tokenizer whose artifact is read")
    ap.add_argument("--candidates", type=int, default=32, help="codes per position scored (--sticky-candidates)")
    ap.add_argument("--deltas", default="0,0.1,0.2,0.3", help="sticky margins, comma-separated")
    a = ap.parse_args()

    from sidserve import load_tokenizer
    from sidserve.eval.data import load_dataset
    from sidserve.items import ItemArrays
    from sidserve.jobs.assign.sticky import trim_candidates

    artifact = os.path.join(a.run, "tokenizers", a.tokenizer, "artifact")
    paths = [os.path.join(a.run, "embeddings", f"{m}.npy") for m in ("text", "meta")]
    paths.append(os.path.join(a.run, "sasrec", "untied", "input_emb.npy"))
    missing = [p for p in [os.path.join(artifact, "manifest.json"), *paths] if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"error: {a.run} lacks {missing} (run `sidserve evaluate` on this machine first)")
    data = load_dataset(a.data)
    content = {m: np.load(p) for m, p in zip(("text", "meta"), paths)}
    eb = np.load(paths[2]).astype(np.float32)
    pop = data.popularity()[1:].astype(np.float64)
    n = data.num_items
    items = ItemArrays(content, eb, pop > 0, np.array([str(i) for i in range(1, n + 1)], dtype=object), pop)
    tok = load_tokenizer(artifact)
    enc = tok.encode(items, candidates=a.candidates)
    L, k = enc.sid.shape[1], enc.candidates.shape[-1]
    groups = [p["group"] for p in tok.sid_layout]

    print(f"# sticky staging on {data.name} ({n:,} items, {a.tokenizer}, k = {k}, L = {L}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)\n")
    print("| delta | candidates within delta, mean per position (" + ", ".join(groups) + ") | "
          "positions with all k within | staged bytes per item (p99) | every candidate + score |")
    print("|---|---|---|---|---|")
    for delta in (float(x) for x in a.deltas.split(",")):
        codes, counts = trim_candidates(enc.candidates, enc.candidate_scores, delta)
        per_item = 4 * (counts.sum(1) + L)  # int32 codes + one int32 count per position
        print(f"| {delta:g} | {counts.mean():.1f} ({', '.join(f'{c:.1f}' for c in counts.mean(0))}) | "
              f"{(counts == k).mean():.1%} | {per_item.mean():,.0f} ({np.percentile(per_item, 99):,.0f}) | "
              f"{k * L * 12:,} |")


if __name__ == "__main__":
    main()
