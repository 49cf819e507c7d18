"""The evaluation pipeline, stage by stage, each cached under the output directory so an
interrupted run restarts where it stopped (a stage's result is written atomically last):

    embeddings/{text,meta}.npy          1. sentence embeddings of item text
    sasrec/                             2. SASRec behavioral embeddings + norm/popularity
    tokenizers/<name>/                  3-4. fitted tokenizer, SIDs, quantization metrics
    downstream/<name>/retrieval_seed<k>.json   5. generative retrieval
    downstream/<name>/ranking_seed<k>.json     6. discriminative ranking
    results.json, report.md, plots/     7. aggregation over seeds, head vs tail

``run_config.json`` records what the cache was built from; rerunning the same output
directory with a different dataset or protocol is an error (use a new directory).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sidserve.eval.data import Dataset, load_dataset
from sidserve.eval.metrics import spearman
from sidserve.eval.ranking import (
    RankingConfig,
    evaluate_ranking,
    sample_negatives,
    score,
    train_ranker,
)
from sidserve.eval.retrieval import RetrievalConfig, evaluate_retrieval, rank_items, train_retrieval
from sidserve.eval.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
from sidserve.eval.sid_table import PrefixTrie, SIDTable
from sidserve.eval.tokenizers import (
    ALL_TOKENIZERS,
    DEFAULT_TOKENIZERS,
    TokenizerBudget,
    fit_tokenizer,
)

log = logging.getLogger(__name__)
EVAL_NEGATIVES_SEED = 12345  # one draw of ranking negatives shared by every tokenizer and seed


@dataclass
class EvalConfig:
    data: str  # dataset directory (sequences.txt + items.jsonl)
    output: str  # cache + report directory
    tokenizers: list[str] = field(default_factory=lambda: list(DEFAULT_TOKENIZERS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # downstream model seeds
    quick: bool = False  # subsample users and shrink every stage (tests, smoke runs)
    quick_users: int = 1000  # users kept by --quick
    head_tail_share: float = 0.25  # head = top 25% items by training popularity, tail = bottom 25%
    ranking_negatives: int = 99  # sampled negatives per test user for AUC/GAUC
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    budget: TokenizerBudget = field(default_factory=TokenizerBudget)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    command: str = ""  # the command line, recorded in the report

    def validate(self) -> "EvalConfig":
        unknown = [t for t in self.tokenizers if t not in ALL_TOKENIZERS]
        if unknown:
            raise ValueError(f"unknown tokenizers {unknown}; choose from {ALL_TOKENIZERS}")
        if not self.tokenizers:
            raise ValueError("tokenizers must name at least one tokenizer")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.retrieval.beam_size < 50:
            raise ValueError(f"retrieval.beam_size must be >= 50 (Recall@50 is reported), got {self.retrieval.beam_size}")
        return self

    @classmethod
    def quick_profile(cls, data: str, output: str, **kw) -> "EvalConfig":
        """Small everything: a smoke test of every stage, not a measurement."""
        kw.setdefault("seeds", [0, 1])
        c = cls(data=data, output=output, quick=True, **kw)
        c.sasrec = dataclasses.replace(c.sasrec, epochs=4, batch_size=64)
        c.budget = dataclasses.replace(c.budget, adc_epochs=3, rqvae_epochs=3, batch_size=256)
        c.retrieval = dataclasses.replace(c.retrieval, epochs=1, d_model=32, ff_dim=64, batch_size=128)
        c.ranking = dataclasses.replace(c.ranking, epochs=1, d_model=32, mlp_dim=32, batch_size=256)
        return c


# ---- small helpers ---------------------------------------------------------------------
def _atomic_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
    os.replace(tmp, path)


def _atomic_npy(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


# ---- the pipeline ------------------------------------------------------------------------
class Evaluation:
    def __init__(self, config: EvalConfig):
        self.c = config.validate()
        self.out = config.output
        self.timer = Timer()
        full = load_dataset(config.data)
        self.data: Dataset = full.subsample(config.quick_users, seed=0) if config.quick else full
        self._check_cache()

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def _check_cache(self) -> None:
        key = {"data": os.path.abspath(self.c.data), "quick": self.c.quick,
               "quick_users": self.c.quick_users if self.c.quick else None,
               "users": self.data.num_users, "items": self.data.num_items,
               "sasrec": dataclasses.asdict(self.c.sasrec), "budget": dataclasses.asdict(self.c.budget),
               "retrieval": dataclasses.asdict(self.c.retrieval), "ranking": dataclasses.asdict(self.c.ranking),
               "head_tail_share": self.c.head_tail_share, "ranking_negatives": self.c.ranking_negatives}
        p = self.path("run_config.json")
        if os.path.exists(p):
            old = _read_json(p)
            diff = sorted(k for k in key if old.get(k) != key[k])
            if diff:
                raise ValueError(f"{self.out} holds a run with different settings ({', '.join(diff)}); "
                                 f"use a new --output directory")
        else:
            _atomic_json(p, key)

    def _stage(self, name: str, done: str, fn):
        """Run ``fn`` unless its final file ``done`` exists; time it."""
        if os.path.exists(done):
            log.info("stage %s: cached (%s)", name, done)
            return
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        fn()
        dt = time.perf_counter() - t0
        self.timer.add(name.split(":")[0], dt)
        log.info("stage %s done in %.1f s", name, dt)

    # 1 ---------------------------------------------------------------------------------
    def embeddings(self) -> dict[str, np.ndarray]:
        def run():
            from sidserve.eval.text import embed_texts, load_text_model
            model = load_text_model()
            for modality, texts in self.data.item_texts().items():
                uniq, inv = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
                emb = embed_texts(list(uniq), model=model)[inv.ravel()]
                _atomic_npy(self.path("embeddings", f"{modality}.npy"), emb)
        self._stage("embeddings", self.path("embeddings", "meta.npy"), run)
        return {m: np.load(self.path("embeddings", f"{m}.npy")) for m in ("text", "meta")}

    # 2 ---------------------------------------------------------------------------------
    def behavior(self) -> np.ndarray:
        def run():
            model, history = train_sasrec(self.data.train_sequences(), self.data.num_items, self.c.sasrec,
                                          valid=self.data.targets("valid"))
            emb = model.item_vectors()
            norms = np.linalg.norm(emb, axis=1)
            pop = self.data.popularity()[1:]
            report = {
                "config": dataclasses.asdict(self.c.sasrec),
                "history": history,
                "test": evaluate_sasrec(model, *self.data.targets("test"), ks=(10, 50)),
                "norm_popularity_spearman": spearman(norms, pop),
                "norm_quantiles": np.quantile(norms, [0, 0.25, 0.5, 0.75, 1]).round(6).tolist(),
            }
            _atomic_npy(self.path("sasrec", "item_emb.npy"), emb)
            _atomic_json(self.path("sasrec", "report.json"), report)
        self._stage("sasrec", self.path("sasrec", "report.json"), run)
        return np.load(self.path("sasrec", "item_emb.npy"))

    # 3-4 -------------------------------------------------------------------------------
    def tokenize(self, name: str, items: dict, dims: dict[str, int]) -> SIDTable:
        d = self.path("tokenizers", name)

        def run():
            tk = fit_tokenizer(name, items, dims, items["behavior_emb"].shape[1], self.c.budget,
                               letter_sids=[it.get("letter_sid") for it in self.data.items])
            if tk.tokenizer is not None:
                art = d + ".artifact-tmp"
                shutil.rmtree(art, ignore_errors=True)
                tk.tokenizer.save_pretrained(art)
                shutil.rmtree(os.path.join(d, "artifact"), ignore_errors=True)
                os.makedirs(d, exist_ok=True)
                os.replace(art, os.path.join(d, "artifact"))
            os.makedirs(d, exist_ok=True)
            np.savez(os.path.join(d, "sids.npz"), sid=tk.sid, weights=tk.weights)
            q = dict(tk.quantization)
            q["codebook_size"] = tk.codebook_size
            q["sid_length"] = int(tk.sid.shape[1])
            q["items_sharing_sid"] = float(1 - np.unique(tk.sid, axis=0).shape[0] / tk.sid.shape[0])
            _atomic_json(os.path.join(d, "quantization.json"), q)
        self._stage(f"tokenizers:{name}", os.path.join(d, "quantization.json"), run)
        z = np.load(os.path.join(d, "sids.npz"))
        return SIDTable.build(z["sid"], z["weights"])

    # 5-6 -------------------------------------------------------------------------------
    def retrieval(self, name: str, table: SIDTable, trie: PrefixTrie, seed: int, groups) -> None:
        p = self.path("downstream", name, f"retrieval_seed{seed}.json")

        def run():
            c = dataclasses.replace(self.c.retrieval, seed=seed)
            model, history = train_retrieval(table, self.data.train_sequences(), self.data.targets("valid"), c)
            t0 = time.perf_counter()
            hist, targets = self.data.targets("test")
            ranked = rank_items(model, trie, hist, c.beam_size)
            res = evaluate_retrieval(ranked, targets, groups)
            res["history"] = history
            res["generate_seconds"] = time.perf_counter() - t0
            res["valid_sid_share"] = float((ranked >= 0).mean())
            _atomic_json(p, res)
        self._stage(f"retrieval:{name}:{seed}", p, run)

    def ranking(self, name: str, table: SIDTable, seed: int, groups, negatives: np.ndarray) -> None:
        p = self.path("downstream", name, f"ranking_seed{seed}.json")

        def run():
            c = dataclasses.replace(self.c.ranking, seed=seed)
            model, history = train_ranker(table, self.data.train_sequences(), c)
            hist, targets = self.data.targets("test")
            cand = np.concatenate([targets[:, None], negatives], axis=1)
            res = evaluate_ranking(score(model, hist, cand), targets, groups)
            res["history"] = history
            _atomic_json(p, res)
        self._stage(f"ranking:{name}:{seed}", p, run)

    def negatives(self) -> np.ndarray:
        p = self.path("ranking_negatives.npy")
        if not os.path.exists(p):
            rng = np.random.default_rng(EVAL_NEGATIVES_SEED)
            _atomic_npy(p, sample_negatives(rng, self.data.sequences, self.data.num_items, self.c.ranking_negatives))
        return np.load(p)

    # all -------------------------------------------------------------------------------
    def run(self) -> dict:
        t_start = time.perf_counter()
        content = self.embeddings()
        behavior = self.behavior()
        items = {"item_id": np.arange(1, self.data.num_items + 1), "text_emb": content["text"],
                 "meta_emb": content["meta"], "behavior_emb": behavior}
        dims = {"text": content["text"].shape[1], "meta": content["meta"].shape[1]}
        groups = self.data.popularity_groups(self.c.head_tail_share)
        negatives = self.negatives()
        tables = {name: self.tokenize(name, items, dims) for name in self.c.tokenizers}
        for name, table in tables.items():
            trie = PrefixTrie.build(table)
            for seed in self.c.seeds:
                self.retrieval(name, table, trie, seed, groups)
                self.ranking(name, table, seed, groups, negatives)
        from sidserve.eval.report import write_report
        results = write_report(self, wall_seconds=time.perf_counter() - t_start)
        return results

    def environment(self) -> dict:
        return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.is_available()}


def run_evaluation(config: EvalConfig) -> dict:
    """Run (or resume) the whole evaluation; returns results.json's content."""
    return Evaluation(config).run()


def run_cli(args, command: str = "") -> int:
    """jobs/evaluate.py: build the config from its arguments and run (exit 2 on bad input)."""
    from sidserve.cli import run_job

    def body():
        tokenizers = [t.strip() for t in args.tokenizers.split(",") if t.strip()]
        kw = dict(tokenizers=tokenizers, command=command)
        if args.seeds is not None:
            try:
                kw["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
            except ValueError:
                raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if args.quick:
            c = EvalConfig.quick_profile(args.data, args.output, quick_users=args.quick_users, **kw)
        else:
            c = EvalConfig(data=args.data, output=args.output, **kw)
        if args.retrieval_epochs is not None:
            c.retrieval = dataclasses.replace(c.retrieval, epochs=args.retrieval_epochs)
        r = run_evaluation(c)
        print(f"[sidserve] evaluation of {len(r['tokenizers'])} tokenizers x {len(r['seeds'])} seeds on "
              f"{r['dataset']['name']}: {os.path.join(args.output, 'report.md')}")
        for e in r["tokenizers"].values():
            ret, rk = e["retrieval"]["all"], e["ranking"]["all"]
            print(f"  {e['label']:<32} R@10 {ret['recall@10']['mean']:.4f}  N@10 {ret['ndcg@10']['mean']:.4f}  "
                  f"AUC {rk['auc']['mean']:.4f}  GAUC {rk['gauc']['mean']:.4f}")

    return run_job(body)
