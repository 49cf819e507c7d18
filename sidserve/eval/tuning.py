"""Choosing the downstream models' settings on the validation split only.

``tune`` trains one downstream model with the given overrides on the training part of
every sequence and scores it on the validation targets; the test targets are never
read. Each call appends one JSON line (settings, validation metrics, epochs, seconds) to
a tuning log, so the choices behind the defaults are on record
(docs/evaluation/tuning.jsonl) and can be re-run on another catalog.

    python jobs/tune.py --data ../shared/data/amazon-beauty-5core --model sasrec --set dropout=0.5
    python jobs/tune.py --data ... --model retrieval --sids letter --set lr=1e-3
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import torch

from sidserve.eval.data import load_dataset
from sidserve.eval.metrics import spearman
from sidserve.eval.ranking import RankingConfig, sample_negatives, train_ranker
from sidserve.eval.retrieval import RetrievalConfig, train_retrieval
from sidserve.eval.sasrec import SASRecConfig, SIDItems, train_sasrec
from sidserve.eval.sid_table import SIDTable
from sidserve.eval.tokenizers import parse_letter_sids

VALID_NEGATIVES_DRAW = 54321  # the validation negatives of every ranking trial (one fixed draw)
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


def _sids(data, sids: str, table: SIDTable | None = None) -> SIDTable:
    if table is not None:
        return table
    if sids == "letter":
        return SIDTable.build(parse_letter_sids([it.get("letter_sid") for it in data.items]))
    if not os.path.isfile(sids):
        raise ValueError(f"--sids must be 'letter' or a sids.npz written by the evaluation, got {sids!r}")
    z = np.load(sids)
    return SIDTable.build(z["sid"], z["weights"])


def fit_candidate(eval_cache: str, name: str, overrides: dict, behavior_embedding: str | None = None,
                  seed: int = 0, data=None) -> tuple[SIDTable, dict]:
    """Fit tokenizer ``name`` (an evaluation tokenizer, e.g. 'adc_sid') with TokenizerConfig
    ``overrides`` on the inputs an evaluation cached in ``eval_cache`` (its sentence
    embeddings and SASRec item table) -> (its SIDs, its quantization metrics).

    behavior_embedding: the SASRec table read as e_b; None: the embedding variant's own
    (``rqkmeans_tied``: tied), else the evaluation's default, ``untied-input``."""
    from sidserve.eval.config import EMBEDDING_SOURCE
    from sidserve.eval.tokenizers import (
        EMBEDDING_VARIANTS,
        TokenizerBudget,
        embedding_of,
        fit_tokenizer,
    )

    if name in EMBEDDING_VARIANTS and behavior_embedding not in (None, embedding_of(name, None)):
        raise ValueError(f"tokenizer {name!r} reads the {embedding_of(name, None)!r} table as e_b; behavior_embedding="
                         f"{behavior_embedding!r} contradicts it (use {EMBEDDING_VARIANTS[name][0]!r})")
    behavior_embedding = behavior_embedding or embedding_of(name, "untied-input")
    if behavior_embedding not in EMBEDDING_SOURCE:
        raise ValueError(f"behavior_embedding must be one of {list(EMBEDDING_SOURCE)}, got {behavior_embedding!r}")
    variant, which = EMBEDDING_SOURCE[behavior_embedding]
    paths = {m: os.path.join(eval_cache, "embeddings", f"{m}.npy") for m in ("text", "meta")}
    paths["behavior"] = os.path.join(eval_cache, "sasrec", variant, f"{which}_emb.npy")
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{eval_cache} is not an evaluation cache with these inputs: missing {missing}")
    arrays = {m: np.load(p) for m, p in paths.items()}
    items = {"item_id": np.arange(1, len(arrays["text"]) + 1), "text_emb": arrays["text"],
             "meta_emb": arrays["meta"], "behavior_emb": arrays["behavior"]}
    if data is not None:  # training-split interactions per item (richness_signal="popularity")
        items["popularity"] = data.popularity()[1:].astype(np.float64)
    dims = {"text": arrays["text"].shape[1], "meta": arrays["meta"].shape[1]}
    tk = fit_tokenizer(name, items, dims, arrays["behavior"].shape[1], TokenizerBudget(seed=seed, overrides=overrides))
    quant = {k: v for k, v in tk.quantization.items() if not isinstance(v, dict)}
    history = getattr(tk.tokenizer, "history_", None)
    if history:
        last = history[-1]
        quant["last_epoch"] = {k: v for k, v in last.items() if k.startswith(("gate_", "sparsity_", "align_w"))}
    return SIDTable.build(tk.sid, tk.weights), quant


def valid_negatives(data) -> np.ndarray:
    """(U, 99) validation negatives of every ranking trial: one fixed draw of items outside
    each user's training + validation items."""
    return sample_negatives(np.random.default_rng(VALID_NEGATIVES_DRAW), [s[:-1] for s in data.sequences],
                            data.num_items, 99)


def valid_by_group(model: str, m, data, table: SIDTable, c) -> dict:
    """The trained SID model (best epoch restored) on every validation target, overall and for
    the users whose validation item is a head / tail item by training popularity (the
    evaluation's groups): where a tokenizer wins or loses, on validation. SID-SASRec: Recall /
    NDCG@10 over the catalog; retrieval: the same from a beam search over all validation users;
    ranking: AUC / GAUC against the trial's 99 validation negatives."""
    from sidserve.eval.metrics import grouped_means, recall_ndcg
    from sidserve.eval.ranking import evaluate_ranking, score
    from sidserve.eval.retrieval import rank_items
    from sidserve.eval.sasrec import evaluate_sasrec
    from sidserve.eval.sid_table import PrefixTrie

    hist, targets = data.targets("valid")
    groups = data.popularity_groups(0.25)
    if model == "sid_sasrec":
        return grouped_means(evaluate_sasrec(m, hist, targets, ks=(10,), per_user=True), targets, groups)
    if model == "retrieval":
        ranked = rank_items(m, PrefixTrie.build(table), hist, c.beam_size)
        return grouped_means(recall_ndcg(ranked, targets, (10,)), targets, groups)
    neg = valid_negatives(data)
    return evaluate_ranking(score(m, hist, np.concatenate([targets[:, None], neg], axis=1)), targets, groups)


def tune(data_dir: str, model: str, overrides: dict, sids: str = "letter", log_path: str | None = None,
           tokenizer: dict | None = None, sid_weights: bool | None = None) -> dict:
    """Train ``model`` with ``overrides`` and return its validation result (no test).

    tokenizer: {"name", "eval_cache", "overrides", "behavior_embedding"} fits that
    tokenizer candidate first and uses its SIDs (instead of ``sids``).
    sid_weights: sid_sasrec scales behavioral code embeddings by R(e_b) (True) or by 1 (False);
    None: as the evaluation does for the tokenizer candidate (``tokenizers.uses_sid_weights``:
    ADC-SID at 1), else True. Retrieval and ranking take ``use_sid_weights`` from ``overrides``,
    or as the evaluation does for the candidate."""
    from sidserve.eval.tokenizers import uses_sid_weights
    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    data = load_dataset(data_dir)
    train, valid = data.train_sequences(), data.targets("valid")
    evaluation_weights = uses_sid_weights(tokenizer["name"]) if tokenizer is not None else True
    if sid_weights is None:
        sid_weights = evaluation_weights
    if model in ("retrieval", "ranking") and "use_sid_weights" not in overrides:
        overrides = {**overrides, "use_sid_weights": evaluation_weights}
    c = MODELS[model](**overrides)
    t0 = time.perf_counter()
    result: dict = {"model": model, "data": data.name, "overrides": overrides}
    table = None
    if tokenizer is not None:
        if model == "sasrec":
            raise ValueError("a tokenizer candidate needs a SID model: sid_sasrec, retrieval or ranking")
        table, quant = fit_candidate(tokenizer["eval_cache"], tokenizer["name"], tokenizer.get("overrides", {}),
                                     tokenizer.get("behavior_embedding"), data=data)
        result["tokenizer"] = {**tokenizer, "quantization": quant}
        sids = f"tokenizer:{tokenizer['name']}"
    if model == "sasrec":
        m, history = train_sasrec(train, data.num_items, c, valid=valid)
        pop = data.popularity()[1:]
        result["norm_popularity_spearman"] = {
            w: spearman(np.linalg.norm(m.item_vectors(w), axis=1), pop) for w in ("input", "output")}
    elif model == "sid_sasrec":
        result.update(sids=sids, sid_weights="r" if sid_weights else "one")
        torch.manual_seed(c.seed)  # SIDItems' init: from the seed, not from what ran before
        items = SIDItems(_sids(data, sids, table), c.hidden_dim, use_weights=sid_weights)
        m, history = train_sasrec(train, data.num_items, c, valid=valid, items=items)
    elif model == "retrieval":
        result["sids"] = sids
        m, history = train_retrieval(_sids(data, sids, table), train, valid, c)
    else:
        result["sids"] = sids
        neg = valid_negatives(data)
        m, history = train_ranker(_sids(data, sids, table), train, c, valid=(*valid, neg))
    best = m.early_stopping["best_epoch"]
    if model != "sasrec":
        result["valid_by_group"] = valid_by_group(model, m, data, _sids(data, sids, table), c)
    result.update(early_stopping=m.early_stopping,
                  valid={k[len("valid_"):]: v for k, v in history[best].items() if k.startswith("valid_")},
                  seconds=round(time.perf_counter() - t0, 1),
                  seconds_per_epoch=round(float(np.mean([h["seconds"] for h in history])), 1))
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result
