"""``sidserve select``: which tokenizer gives the best SIDs on *your* catalog (issue 48).

    sidserve select --items catalog/ --interactions log.parquet --output select-out/

The evaluation's own pipeline (sidserve/eval/pipeline.py, docs/evaluation.md) on a user's
Parquet inputs: the catalog and log become an evaluation dataset (sidserve/eval/parquet_input.py:
the catalog's embeddings as content, the leave-one-out or a global time split), every candidate
tokenizer is fitted and judged by the downstream models the default's rule reads (SID-SASRec and
the ranker, on the training part, early-stopped on validation), one run per seed, and the rule
(sidserve/eval/default_rule.py, ``choose_for_catalog``) decides on validation: the library
default is kept unless another candidate beats it on every cell of the rule by more than 2
standard errors of the paired difference. Test is read once, for the chosen candidate and the
runner-up, after the choice.

Output:

    dataset/              the prepared inputs (prepare.json says what was dropped and why)
    evaluation/           the evaluation's cache and its full report (every group, plots)
    report.md             the decision: validation per cell, the rule's verdict, test of two
    selection.json        the same, machine-readable
    tokenizer.yaml        the chosen configuration: `sidserve train --tokenizer T --config` it
    behavior_emb.parquet  the behavioral table learned from the log (no behavior_emb given)

Every stage is cached: a killed run resumes where it stopped with the same command. With
``parallel`` (``--parallel N [--address ADDR]``) N evaluation processes share the stages: this
one and N - 1 Ray tasks (sidserve/eval/ray_workers.py), on storage every node mounts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from sidserve.eval.default_rule import (
    CELLS,
    LIBRARY_DEFAULT,
    choose_for_catalog,
    figures_from_results,
)

# candidates by default: the library default, ADC-SID as the paper specifies it, RQ-Kmeans over
# [content; behavior], content-only OPQ and RQ-VAE (the evaluation's names)
DEFAULT_CANDIDATES = [LIBRARY_DEFAULT, "adc_sid", "rqkmeans", "opq", "rqvae"]
# --sample-users default: a Beauty-sized log (22k users, 12k items) costs ~700 s per candidate and
# seed for SID-SASRec + ranker on 2 CPUs (docs/evaluation.md, "Cost"); 5,000 users (~1/4 of the
# users, ~2/3 of the items) brings 5 candidates x 3 seeds to about an hour (an estimate from the
# stage times, docs/evaluation.md; the README says how to check it on your machine)
SAMPLE_USERS = 5000
TRAIN_TYPES = {"adc-sid", "rq-kmeans", "rq-vae", "opq"}  # what `sidserve train --tokenizer` fits
_CELL_NAMES = {("sid_sasrec", "ndcg@10"): "SID-SASRec NDCG@10", ("ranking", "gauc"): "ranking GAUC"}


@dataclass
class SelectConfig:
    items: str  # the catalog (Parquet), as sidserve train reads it
    interactions: str  # the log (Parquet): user_id, item_id, order column
    output: str  # cache + report directory
    tokenizers: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the rule's standard errors need >= 2
    split: str = "loo"  # "loo" (per user: last = test, second to last = validation) or "time"
    order_column: str = "timestamp"  # the log's column that orders a user's interactions
    columns: dict[str, str] = field(default_factory=dict)  # --column renames, as in sidserve train
    sample_users: int | None = SAMPLE_USERS  # users kept (None: all); bounds the cost
    max_unknown_share: float = 0.05  # log rows naming items the catalog lacks: above this, an error
    # e_b: "auto" = the catalog's behavior_emb when it has one, else a SASRec trained on the log's
    # training part; "sasrec" / "catalog" force one
    behavior: str = "auto"
    quick: bool = False  # the evaluation's small models: a smoke run (tests), not a measurement
    command: str = ""
    # evaluation processes in all, as in `evaluate --parallel`: this one and parallel - 1 Ray tasks
    # (sidserve/eval/ray_workers.py), the candidates' fits and downstream models side by side.
    # 1: this process alone, no Ray
    parallel: int = 1
    address: str | None = None  # the Ray cluster for them (None: what ray.init() finds: RAY_ADDRESS, a
    # `ray start` cluster on this machine, else a new local one)
    cpus_per_worker: int = 1  # CPUs (and torch threads) each task asks Ray for

    def validate(self) -> "SelectConfig":
        from sidserve.eval.tokenizers import ALL_TOKENIZERS

        if self.behavior not in ("auto", "sasrec", "catalog"):
            raise ValueError(f"behavior must be 'auto', 'sasrec' or 'catalog', got {self.behavior!r}")
        unknown = [t for t in self.tokenizers if t not in ALL_TOKENIZERS]
        if unknown:
            raise ValueError(f"unknown tokenizers {unknown}; choose from {ALL_TOKENIZERS}")
        if "letter" in self.tokenizers:
            raise ValueError("'letter' is LETTER's published Beauty SIDs, not a tokenizer that fits your catalog")
        if LIBRARY_DEFAULT not in self.tokenizers:
            raise ValueError(f"the library default {LIBRARY_DEFAULT!r} must be a candidate: the rule compares every "
                             "candidate with it")
        if len(self.tokenizers) < 2:
            raise ValueError(f"select needs the default and at least one other candidate, got {self.tokenizers}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.parallel < 1 or self.cpus_per_worker < 1:
            raise ValueError(f"parallel and cpus_per_worker must be >= 1, got {self.parallel} and "
                             f"{self.cpus_per_worker}")
        if self.address and self.parallel < 2:
            raise ValueError(f"--address {self.address!r} with --parallel {self.parallel}: say how many evaluation "
                             "processes to run (--parallel N >= 2: this one and N - 1 Ray tasks)")
        return self


def run_select(c: SelectConfig) -> dict:
    """Prepare, evaluate (cached, resumable), choose, report; returns selection.json's content."""
    from sidserve.eval.config import EvalConfig
    from sidserve.eval.parquet_input import catalog_has_behavior, prepare

    c.validate()
    if c.behavior == "catalog" and not catalog_has_behavior(c.items, c.columns):
        raise ValueError(f"--behavior catalog: {c.items!r} has no behavior_emb column")
    prep = prepare(c.items, c.interactions, os.path.join(c.output, "dataset"), split=c.split,
                   order_column=c.order_column, columns=c.columns, sample_users=c.sample_users,
                   max_unknown_share=c.max_unknown_share)
    source = c.behavior
    if source == "auto":
        source = "catalog" if prep["behavior_dim"] else "sasrec"
    # absolute: Ray tasks (--parallel) run in other working directories
    data, out = os.path.abspath(os.path.join(c.output, "dataset")), os.path.abspath(os.path.join(c.output, "evaluation"))
    kw = dict(tokenizers=list(c.tokenizers), seeds=list(c.seeds), command=c.command)
    if c.quick:
        ec = EvalConfig.quick_profile(data, out, quick_users=prep["users_kept"], **kw)
    else:
        ec = EvalConfig(data=data, output=out, **kw)
    ec.tasks = ["sid_sasrec", "ranking"]  # what the rule reads
    ec.behavior_source = source
    results = _evaluate(c, ec)
    if results["pending"]:
        raise ValueError(f"the evaluation did not finish {results['pending']}: rerun the same command to resume")
    decision = choose_for_catalog(figures_from_results(results, list(c.tokenizers)))
    selection = _selection(c, prep, source, results, decision)
    with open(os.path.join(c.output, "selection.json"), "w") as f:
        json.dump(selection, f, indent=2)
    _write_yaml(os.path.join(c.output, "tokenizer.yaml"), out, selection)
    if source == "sasrec":
        _write_behavior(os.path.join(c.output, "behavior_emb.parquet"), data, out, ec.behavior_embedding)
    with open(os.path.join(c.output, "report.md"), "w") as f:
        f.write(_markdown(selection))
    return selection


def _evaluate(c: SelectConfig, ec) -> dict:
    """The evaluation, in this process alone or beside ``c.parallel`` Ray tasks."""
    from sidserve.eval.pipeline import run_evaluation

    if c.parallel < 2:
        return run_evaluation(ec)
    import ray
    import torch

    started = not ray.is_initialized()
    if started:
        ray.init(address=c.address, log_to_driver=False) if c.address else ray.init(log_to_driver=False)
    elif c.address:
        here = ray.get_runtime_context().gcs_address
        if c.address != "auto" and c.address != here:
            raise ValueError(f"--address {c.address!r}: this process is already connected to the Ray cluster at "
                             f"{here!r}; its tasks would go there")
    torch.set_num_threads(c.cpus_per_worker)  # one of the N processes, the same share as each task
    try:
        return run_evaluation(ec, ray_workers=(c.parallel - 1, c.cpus_per_worker))
    finally:
        if started:
            ray.shutdown()


def _tokenizer_config(out: str, name: str) -> dict:
    with open(os.path.join(out, "tokenizers", name, "artifact", "config.json")) as f:
        return json.load(f)


def _selection(c: SelectConfig, prep: dict, source: str, results: dict, decision) -> dict:
    tok = results["tokenizers"]
    groups = ("all", "head", "tail")
    valid = {n: {f"{t}/{m}/{g}": {"mean": float(np.mean(v)), "values": v}
                 for t, m in dict.fromkeys((t, m) for t, m, _ in CELLS)
                 for g in groups for v in [tok[n][t]["valid_groups"][g][m]["values"]]}
             for n in c.tokenizers}
    read = [n for n in (decision.chosen, decision.runner_up) if n]
    test = {n: {f"{t}/{m}/{g}": tok[n][t][g][m] for t, m in dict.fromkeys((t, m) for t, m, _ in CELLS) for g in groups}
            for n in read}
    cfg = _tokenizer_config(os.path.join(c.output, "evaluation"), decision.chosen)
    return {
        "command": c.command, "inputs": prep, "behavior_source": source, "seeds": list(c.seeds),
        "candidates": list(c.tokenizers), "default": decision.default, "chosen": decision.chosen,
        "runner_up": decision.runner_up, "reason": decision.reason,
        "cells": {n: {"/".join(k): v for k, v in per.items()} for n, per in decision.cells.items()},
        "valid": valid, "test": test, "labels": {n: tok[n]["label"] for n in c.tokenizers},
        "tokenizer_type": cfg["tokenizer_type"],
    }


def _write_yaml(path: str, out: str, selection: dict) -> None:
    """The chosen fit's config without its input dimensions (train reads them from the catalog)."""
    import yaml

    name = selection["chosen"]
    cfg = _tokenizer_config(out, name)
    fields = {k: v for k, v in cfg["config"].items() if k not in ("modality_dims", "behavior_dim")}
    ttype = cfg["tokenizer_type"]
    head = [f"# chosen by `sidserve select` ({name}: {selection['reason']})"]
    if ttype in TRAIN_TYPES:
        head.append(f"# sidserve train --items CATALOG --tokenizer {ttype} --config {os.path.basename(path)}")
    else:
        head.append(f"# {ttype} is not a `sidserve train --tokenizer` type yet: fit it with the library "
                    f"({ttype} in sidserve.tokenizers)")
    with open(path, "w") as f:
        f.write("\n".join(head) + "\n")
        yaml.safe_dump(fields, f, sort_keys=False)


def _write_behavior(path: str, data: str, out: str, embedding: str) -> None:
    """The SASRec table the candidates read as e_b, keyed by the catalog's item ids, so that
    ``sidserve train`` can read it as behavior_emb (join it into the catalog on item_id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sidserve.eval.config import EMBEDDING_SOURCE

    variant, which = EMBEDDING_SOURCE[embedding]
    table = np.load(os.path.join(out, "sasrec", variant, f"{which}_emb.npy")).astype(np.float32)
    with open(os.path.join(data, "items.jsonl")) as f:
        ids = [json.loads(line)["id"] for line in f if line.strip()]
    if len(ids) != table.shape[0]:
        raise ValueError(f"{len(ids)} items but a behavior table of {table.shape[0]} rows")
    d = table.shape[1]
    col = pa.FixedSizeListArray.from_arrays(pa.array(table.ravel()), d)
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.string()), "behavior_emb": col}), path)


def _fmt(v: dict) -> str:
    vals = v["values"]
    sd = f" ± {np.std(vals, ddof=1):.4f}" if len(vals) > 1 else ""
    return f"{v['mean']:.4f}{sd}"


def _figures_table(first: str, rows: dict, labels: dict) -> list[str]:
    """A markdown table: one row per tokenizer of ``rows`` ({name: {"task/metric/group": figures}})."""
    keys = list(next(iter(rows.values())))
    out = [f"| {first} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    return out + [f"| {labels[n]} | " + " | ".join(_fmt(v[k]) for k in keys) + " |" for n, v in rows.items()]


def _markdown(s: dict) -> str:
    p, labels = s["inputs"], s["labels"]
    L = [f"# Which tokenizer for this catalog: {labels[s['chosen']]} (`{s['chosen']}`)\n",
         f"Command: `{s['command']}`\n",
         f"**Decision**: {s['reason']}. Runner-up: `{s['runner_up']}`.\n",
         "## Inputs\n",
         f"{p['log_rows']:,} interactions ({p['unknown_item_rows']:,} naming items missing from the catalog: dropped); "
         f"{p['users']:,} users, {p['users_dropped_too_short']:,} dropped as too short for the `{p['split']}` split, "
         f"{p['users_kept']:,} kept (--sample-users {p['inputs']['sample_users']}); {p['items']:,} of the catalog's "
         f"{p['catalog_items']:,} items touched by them; content modalities {p['modalities']}.\n"]
    if s["behavior_source"] == "catalog":
        L.append("e_b: **the catalog's own behavior_emb**. If it was trained on the whole log (validation and test "
                 "interactions included), it has seen the targets: behavior-fused tokenizers are favoured. Use "
                 "`--behavior sasrec` for a table learned here on the training part only.\n")
    else:
        L.append("e_b: a SASRec trained here on the training part of the log (`behavior_emb.parquet`: join it into "
                 "the catalog on item_id for `sidserve train`).\n")
    L.append("## The rule, on validation\n")
    L.append(f"Seeds {s['seeds']}. The library default `{s['default']}` is kept unless a candidate beats it on "
             "every cell below by more than 2 standard errors of the paired difference over seeds. Per cell: "
             "candidate - default (mean over seeds), in standard errors.\n")
    cells = [c for c in next(iter(s["cells"].values()))] if s["cells"] else []
    L.append("| candidate | " + " | ".join(cells) + " | beats on all |")
    L.append("|---|" + "---|" * (len(cells) + 1))
    for n, per in s["cells"].items():
        row = []
        for c in cells:
            v = per[c]
            se = "n/a" if v["se"] is None else f"{v['in_se']:+.1f} se"
            row.append(f"{v['diff']:+.4f} ({se}){' ✓' if v['beats'] else ''}")
        L.append(f"| {labels[n]} | " + " | ".join(row) + f" | {'yes' if all(v['beats'] for v in per.values()) else 'no'} |")
    L.append("")
    L.append("Validation, mean ± sd over seeds, per group (head: top 25% items by training popularity, tail: bottom "
             "25%):\n")
    L += _figures_table("candidate", s["valid"], labels)
    L.append("\n## Test (read once, after the choice: the chosen and the runner-up)\n")
    L += _figures_table("tokenizer", s["test"], labels)
    L.append("\nEvery figure of every candidate, per group, with plots: [evaluation/report.md](evaluation/report.md).\n")
    L.append("## Use it\n")
    if s["tokenizer_type"] in TRAIN_TYPES:
        L.append(f"`sidserve train --items CATALOG --tokenizer {s['tokenizer_type']} --config tokenizer.yaml`\n")
    return "\n".join(L)


def run_cli(args) -> int:
    from sidserve.inputs import parse_columns
    from sidserve.runner import run_job

    def body():
        kw = {}
        if args.tokenizers:
            kw["tokenizers"] = [t.strip() for t in args.tokenizers.split(",") if t.strip()]
        if args.seeds:
            try:
                kw["seeds"] = [int(x) for x in args.seeds.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        c = SelectConfig(items=args.items, interactions=args.interactions, output=args.output, split=args.split,
                         order_column=args.order_column, columns=parse_columns(args.column),
                         sample_users=None if args.sample_users == 0 else args.sample_users,
                         max_unknown_share=args.max_unknown_share, behavior=args.behavior, quick=args.quick,
                         command=getattr(args, "command_line", ""), parallel=args.parallel, address=args.address,
                         cpus_per_worker=args.cpus_per_worker, **kw)
        s = run_select(c)
        print(f"[sidserve] select: {s['chosen']} ({s['reason']}); report {os.path.join(args.output, 'report.md')}, "
              f"config {os.path.join(args.output, 'tokenizer.yaml')}")

    return run_job(body)

