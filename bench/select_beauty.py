"""Issue 48, item 4: Beauty through `sidserve select`, from Parquet, against `sidserve evaluate`.

Writes the Beauty dataset the way a user would hold it (a Parquet catalog whose `text_emb` and
`meta_emb` are the evaluation's own text embeddings of the items, a Parquet log of user_id,
item_id and an order column), prints the `select` command that evaluates the same candidates
with the same seeds, and, once both have run, compares their validation figures cell by cell:

    python bench/select_beauty.py write --data ../shared/data/amazon-beauty-5core \
        --embeddings /work/eval/full --out /work/select-beauty
    # then the printed `sidserve select ...` command (hours on 2 CPUs: every stage is cached)
    python bench/select_beauty.py compare --evaluation /work/eval/full --select /work/select-beauty/out

(Validation figures only: `compare` reads no test figure, so it can run while a study that
chooses on validation, issue 47, is still blind to test.)

The same code path gives the same figures up to floating point, not only within seed noise:
tests/test_select.py shows it on the Beauty slice (the same SASRec table, the same RQ-Kmeans
SIDs, the same validation figures); `compare` prints the largest difference per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sidserve.eval.data import load_dataset  # noqa: E402

CANDIDATES = "adc_sid_cold_consistency,rqkmeans_tied,rqevidence_tied,opq,rqkmeans,adc_sid"


def write(data: str, embeddings: str, out: str) -> str:
    d = load_dataset(data)
    emb = {m: np.load(os.path.join(embeddings, "embeddings", f"{m}.npy")) for m in ("text", "meta")}
    for m, v in emb.items():
        if v.shape[0] != d.num_items:
            raise ValueError(f"{embeddings}/embeddings/{m}.npy has {v.shape[0]} rows, the dataset {d.num_items} items")
    ids = [it.get("asin") or str(it["item_id"]) for it in d.items]
    os.makedirs(os.path.join(out, "catalog"), exist_ok=True)
    cols = {"item_id": pa.array(ids)}
    for m, v in emb.items():
        cols[f"{m}_emb"] = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float32).ravel()), v.shape[1])
    pq.write_table(pa.table(cols), os.path.join(out, "catalog", "part-0.parquet"))
    users, items, order = [], [], []
    for u, seq in enumerate(d.sequences):  # user ids that sort like the dataset's users
        for t, i in enumerate(seq.tolist()):
            users.append(f"u{u:06d}")
            items.append(ids[i - 1])
            order.append(t)
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": order}), os.path.join(out, "log.parquet"))
    return (f"sidserve select --items {out}/catalog --interactions {out}/log.parquet --output {out}/out "
            f"--sample-users 0 --behavior sasrec --tokenizers {CANDIDATES} --seeds 0,1,2")


def compare(evaluation: str, select: str) -> list[str]:
    """Per candidate and cell: the largest |select - evaluate| over the seeds both ran (matched by
    seed), validation figures. A candidate or seed of the select run that the evaluation lacks is
    an error, not a silent omission."""
    ra = json.load(open(os.path.join(evaluation, "results.json")))
    rb = json.load(open(os.path.join(select, "evaluation", "results.json")))
    a, b = ra["tokenizers"], rb["tokenizers"]
    missing = sorted(set(b) - set(a))
    if missing:
        raise ValueError(f"{evaluation} has no results for {missing}")
    extra = sorted(set(rb["seeds"]) - set(ra["seeds"]))
    if extra:
        raise ValueError(f"{evaluation} has no seeds {extra} (it has {ra['seeds']})")
    pos = [ra["seeds"].index(k) for k in rb["seeds"]]
    lines = [f"seeds {rb['seeds']}",
             "| candidate | task/metric/group | evaluate | select | max abs diff |", "|---|---|---|---|---|"]
    for name in sorted(b):
        for task in ("sid_sasrec", "ranking"):
            metric = "ndcg@10" if task == "sid_sasrec" else "gauc"
            for group in ("all", "head", "tail"):
                x = [a[name][task]["valid_groups"][group][metric]["values"][i] for i in pos]
                y = b[name][task]["valid_groups"][group][metric]["values"]
                diff = max(abs(p - q) for p, q in zip(x, y))
                lines.append(f"| {name} | {task}/{metric}/{group} | {np.mean(x):.4f} | {np.mean(y):.4f} | {diff:.2e} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--data", required=True)
    w.add_argument("--embeddings", required=True, help="an evaluation output dir with embeddings/{text,meta}.npy")
    w.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--evaluation", required=True)
    c.add_argument("--select", required=True)
    args = p.parse_args()
    if args.cmd == "write":
        print(write(args.data, args.embeddings, args.out))
    else:
        print("\n".join(compare(args.evaluation, args.select)))


if __name__ == "__main__":
    main()
