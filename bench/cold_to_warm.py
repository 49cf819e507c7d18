"""Cold -> warm agreement of ADC-SID's shared code (issue 20.6) against
``cold_consistency_weight``, on an evaluation run's own inputs.

A new item is tokenized on the content-only path; when its first interactions arrive the
refresh tokenizes it on the full path, with sticky assignment against the previous snapshot
(which held the cold SID). The figure is the share of items with behavior whose shared code
is the one the content-only path gave them, per popularity bucket (training interactions),
with plain assignment and with sticky assignment at each margin
(``sidserve.eval.churn.cold_to_warm``). Each weight is one ADC-SID fit with the
evaluation's budget (K = 100, L = 6) on the evaluation's text/meta embeddings and behavioral
embedding (the untied SASRec's input table) over the full training split; weight 0 reuses the
run's own fitted ``adc_sid`` when its artifact is there.

    .venv/bin/python bench/cold_to_warm.py --data ../shared/data/amazon-beauty-5core \\
        --run docs/evaluation/run --weights 0,0.1,0.3 --deltas 0.05,0.1,0.2,0.3 [--json OUT]

No downstream model is trained here: the quality of a weight is the evaluation's
``adc_sid_cold_consistency`` variant (``sidserve evaluate --tokenizers adc_sid_cold_consistency``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset dir (sequences.txt + items.jsonl)")
    ap.add_argument("--run", required=True, help="a finished-embeddings `sidserve evaluate` output dir of that dataset")
    ap.add_argument("--weights", default="0,0.1,0.3", help="cold_consistency_weight values, comma-separated")
    ap.add_argument("--deltas", default="0.05,0.1,0.2,0.3", help="sticky margins (cosine), comma-separated")
    ap.add_argument("--candidates", type=int, default=100, help="codes per position scored for stickiness")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()

    from sidserve.eval.churn import cold_to_warm
    from sidserve.eval.data import load_dataset
    from sidserve.eval.tokenizers import TokenizerBudget, _adc_config
    from sidserve.items import ItemArrays
    from sidserve.tokenizers.adc_sid.tokenizer import SemanticIdTokenizer

    weights = [float(x) for x in a.weights.split(",")]
    deltas = [float(x) for x in a.deltas.split(",")]
    paths = {m: os.path.join(a.run, "embeddings", f"{m}.npy") for m in ("text", "meta")}
    paths["behavior"] = os.path.join(a.run, "sasrec", "untied", "input_emb.npy")
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"error: {a.run} lacks {missing} (run `sidserve evaluate` on it first)")
    data = load_dataset(a.data)
    content = {m: np.load(paths[m]) for m in ("text", "meta")}
    eb = np.load(paths["behavior"]).astype(np.float32)
    n = data.num_items
    if any(v.shape[0] != n for v in (*content.values(), eb)):
        raise SystemExit(f"error: {a.run} holds embeddings of another catalog (the dataset has {n} items)")
    pop = data.popularity()[1:].astype(np.float64)
    items = ItemArrays(content, eb, pop > 0, np.array([str(i) for i in range(1, n + 1)], dtype=object), pop)
    dims = {m: v.shape[1] for m, v in content.items()}

    rows, seconds = {}, {}
    for w in weights:
        t0 = time.perf_counter()
        own = os.path.join(a.run, "tokenizers", "adc_sid", "artifact")
        if w == 0 and os.path.exists(os.path.join(own, "manifest.json")):
            tok = SemanticIdTokenizer.from_pretrained(own)
        else:
            tok = SemanticIdTokenizer(_adc_config(dims, eb.shape[1], TokenizerBudget(),
                                                  cold_consistency_weight=w)).fit(items)
        rows[f"{w:g}"] = cold_to_warm(tok, items, deltas, a.candidates)
        seconds[f"{w:g}"] = round(time.perf_counter() - t0, 1)

    buckets = list(next(iter(next(iter(rows.values())).values())))
    print(f"# cold -> warm agreement of the shared code ({data.name}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs)\n")
    print("| cold_consistency_weight | assignment | " + " | ".join(buckets) + " |")
    print("|---|---|" + "---|" * len(buckets))
    for w, t in rows.items():
        for name, r in t.items():
            print(f"| {w} | {name} | " + " | ".join(f"{r[b]:.3f}" for b in buckets) + " |")
    print(f"\nseconds per weight (fit + encode): {seconds}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"agreement": rows, "seconds": seconds, "deltas": deltas, "candidates": a.candidates}, f, indent=1)


if __name__ == "__main__":
    main()
