"""Choosing the downstream models' settings on the validation split only.

``select`` trains one downstream model with the given overrides on the training part of
every sequence and scores it on the validation targets; the test targets are never
read. Each call appends one JSON line (settings, validation metrics, epochs, seconds) to
a selection log, so the choices behind the defaults are on record
(docs/evaluation/selection.jsonl) and can be re-run on another catalog.

    python jobs/selection.py --data ../shared/data/amazon-beauty-5core --model sasrec --set dropout=0.5
    python jobs/selection.py --data ... --model retrieval --sids letter --set lr=1e-3
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from sidserve.eval.data import load_dataset
from sidserve.eval.metrics import spearman
from sidserve.eval.ranking import RankingConfig, sample_negatives, train_ranker
from sidserve.eval.retrieval import RetrievalConfig, train_retrieval
from sidserve.eval.sasrec import SASRecConfig, SIDItems, train_sasrec
from sidserve.eval.sid_table import SIDTable
from sidserve.eval.tokenizers import parse_letter_sids

MODELS = {"sasrec": SASRecConfig, "sid_sasrec": SASRecConfig, "retrieval": RetrievalConfig,
          "ranking": RankingConfig}


def parse_overrides(pairs: list[str], config_cls) -> dict:
    """['lr=1e-3', 'tied=false'] -> typed fields of ``config_cls``; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    defaults = config_cls()
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        if key not in fields:
            raise ValueError(f"unknown {config_cls.__name__} field {key!r}; fields: {sorted(fields)}")
        kind = type(getattr(defaults, key))
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError(f"{key} must be true or false, got {raw!r}")
            out[key] = raw.lower() == "true"
        else:
            try:
                out[key] = kind(raw)
            except ValueError:
                raise ValueError(f"{key} must be a {kind.__name__}, got {raw!r}") from None
    return out


def _sids(data, sids: str) -> SIDTable:
    if sids == "letter":
        return SIDTable.build(parse_letter_sids([it.get("letter_sid") for it in data.items]))
    if not os.path.isfile(sids):
        raise ValueError(f"--sids must be 'letter' or a sids.npz written by the evaluation, got {sids!r}")
    z = np.load(sids)
    return SIDTable.build(z["sid"], z["weights"])


def select(data_dir: str, model: str, overrides: dict, sids: str = "letter", log_path: str | None = None) -> dict:
    """Train ``model`` with ``overrides`` and return its validation result (no test)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    data = load_dataset(data_dir)
    train, valid = data.train_sequences(), data.targets("valid")
    c = MODELS[model](**overrides)
    t0 = time.perf_counter()
    result: dict = {"model": model, "data": data.name, "overrides": overrides}
    if model == "sasrec":
        m, history = train_sasrec(train, data.num_items, c, valid=valid)
        pop = data.popularity()[1:]
        result["norm_popularity_spearman"] = {
            w: spearman(np.linalg.norm(m.item_vectors(w), axis=1), pop) for w in ("input", "output")}
    elif model == "sid_sasrec":
        result["sids"] = sids
        m, history = train_sasrec(train, data.num_items, c, valid=valid, items=SIDItems(_sids(data, sids), c.hidden_dim))
    elif model == "retrieval":
        result["sids"] = sids
        m, history = train_retrieval(_sids(data, sids), train, valid, c)
    else:
        result["sids"] = sids
        neg = sample_negatives(np.random.default_rng(54321), [s[:-1] for s in data.sequences], data.num_items, 99)
        m, history = train_ranker(_sids(data, sids), train, c, valid=(*valid, neg))
    best = m.early_stopping["best_epoch"]
    result.update(early_stopping=m.early_stopping,
                  valid={k[len("valid_"):]: v for k, v in history[best].items() if k.startswith("valid_")},
                  seconds=round(time.perf_counter() - t0, 1),
                  seconds_per_epoch=round(float(np.mean([h["seconds"] for h in history])), 1))
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result
