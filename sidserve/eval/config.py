"""What an evaluation run is (``EvalConfig``), the constants its cache names depend on, and
the small rules the pipeline (sidserve/eval/pipeline.py) and the report share: which
validation figure a stage kept, where a stage checkpoints, and pinning a cache's settings."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from sidserve.eval.data import CONTENT
from sidserve.eval.ranking import RankingConfig
from sidserve.eval.retrieval import RetrievalConfig
from sidserve.eval.sasrec import SASRecConfig
from sidserve.eval.tokenizers import ALL_TOKENIZERS, DEFAULT_TOKENIZERS, TokenizerBudget
from sidserve.eval.tokenizers import embedding_of as variant_embedding
from sidserve.files import write_json

EVAL_NEGATIVES_SEED = 12345  # one draw of ranking negatives shared by every tokenizer and seed
VALID_NEGATIVES_SEED = 54321  # the validation draw (early stopping of the ranker)
# ID SASRec variants: loss and table tying; each is trained once (seed 0)
SASREC_VARIANTS = {"tied": {"loss": "ce", "tied": True}, "untied": {"loss": "ce", "tied": False},
                   "bce": {"loss": "bce", "tied": True}}
# which variant and table each EMBEDDINGS choice reads
EMBEDDING_SOURCE = {"tied": ("tied", "input"), "untied-input": ("untied", "input"),
                    "untied-output": ("untied", "output"), "bce": ("bce", "input")}
TASKS = ("sid_sasrec", "retrieval", "ranking")
# changes whenever a code change moves the figures a cache holds (not caught by the settings
# below): a cache written before it is refused instead of mixed with new stages.
# 2: SASRec masks padding keys (before, scoring at full width differed from training's trimmed batches)
HARNESS_VERSION = 2
# the metrics whose seed spread decides whether an ablation gets every seed
HEADLINE = {"sid_sasrec": "ndcg@10", "retrieval": "recall@10", "ranking": "gauc"}


def headline(tasks) -> dict[str, str]:
    """HEADLINE restricted to the tasks a run trains."""
    return {t: m for t, m in HEADLINE.items() if t in tasks}


@dataclass
class EvalConfig:
    data: str  # dataset directory (sequences.txt + items.jsonl)
    output: str  # cache + report directory
    tokenizers: list[str] = field(default_factory=lambda: list(DEFAULT_TOKENIZERS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # downstream model seeds
    # ablations run the first seed; the rest only where a headline metric is within
    # 2 seed spreads of ADC-SID's (a difference the seeds cannot yet tell apart)
    ablation_seeds_adaptive: bool = True
    quick: bool = False  # subsample users and shrink every stage (tests, smoke runs)
    quick_users: int = 1000  # users kept by --quick
    # the items' content regime (sidserve.eval.data.CONTENT): "weak" keeps three title words and
    # the first category, the stand-in for catalogs whose content says little (issue 47)
    content: str = "full"
    # downstream tasks trained per tokenizer and seed (TASKS): the default tokenizer's rule reads
    # SID-SASRec and ranking only, so its study skips retrieval, a third of the compute (issue 47)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    # where e_b comes from: "sasrec" (the run's SASRec tables, trained on the training split) or
    # "catalog" (the dataset's behavior.npy, a user's own behavior_emb: sidserve select)
    behavior_source: str = "sasrec"
    head_tail_share: float = 0.25  # head = top 25% items by training popularity, tail = bottom 25%
    ranking_negatives: int = 99  # sampled negatives per test user for AUC/GAUC
    sasrec_variants: list[str] = field(default_factory=lambda: ["tied", "untied"])  # ID SASRec models trained
    # the table handed to the tokenizers as e_b: the untied model's input table, whose norm
    # tracks popularity; its accuracy is within the tied one's (docs/evaluation.md, "Selection")
    behavior_embedding: str = "untied-input"
    sid_sasrec_dedup: bool = False  # SID-SASRec: add the dedup code's embedding to the item vector
    bootstrap_samples: int = 2000  # paired bootstrap resamples of users
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    budget: TokenizerBudget = field(default_factory=TokenizerBudget)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    command: str = ""  # the command line, recorded in the report

    def validate(self) -> "EvalConfig":
        unknown = [t for t in self.tokenizers if t not in ALL_TOKENIZERS]
        if unknown:
            raise ValueError(f"unknown tokenizers {unknown}; choose from {ALL_TOKENIZERS}")
        if self.content not in CONTENT:
            raise ValueError(f"content must be one of {CONTENT}, got {self.content!r}")
        if self.behavior_source not in ("sasrec", "catalog"):
            raise ValueError(f"behavior_source must be 'sasrec' or 'catalog', got {self.behavior_source!r}")
        bad_tasks = [t for t in self.tasks if t not in TASKS]
        if bad_tasks or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must name distinct ones of {list(TASKS)}, got {self.tasks}")
        self.tasks = [t for t in TASKS if t in self.tasks]  # one order for stages and reports
        if not self.tokenizers:
            raise ValueError("tokenizers must name at least one tokenizer")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.retrieval.beam_size < 50:
            raise ValueError(f"retrieval.beam_size must be >= 50 (Recall@50 is reported), got {self.retrieval.beam_size}")
        bad = [v for v in self.sasrec_variants if v not in SASREC_VARIANTS]
        if bad or not self.sasrec_variants:
            raise ValueError(f"sasrec_variants must name some of {list(SASREC_VARIANTS)}, got {self.sasrec_variants}")
        if self.behavior_embedding not in EMBEDDING_SOURCE:
            raise ValueError(f"behavior_embedding must be one of {list(EMBEDDING_SOURCE)}, got {self.behavior_embedding!r}")
        need = EMBEDDING_SOURCE[self.behavior_embedding][0]
        if need not in self.sasrec_variants:
            raise ValueError(f"behavior_embedding={self.behavior_embedding!r} needs the {need!r} SASRec variant; "
                             f"sasrec_variants is {self.sasrec_variants}")
        for t in self.tokenizers:
            table = variant_embedding(t, self.behavior_embedding)
            if EMBEDDING_SOURCE[table][0] not in self.sasrec_variants:
                raise ValueError(f"tokenizer {t!r} reads the {table!r} table, which needs the "
                                 f"{EMBEDDING_SOURCE[table][0]!r} SASRec variant; "
                                 f"sasrec_variants is {self.sasrec_variants}")
        self.sasrec.validate()
        self.retrieval.validate()
        return self

    @classmethod
    def quick_profile(cls, data: str, output: str, **kw) -> "EvalConfig":
        """Small everything: a smoke test of every stage, not a measurement."""
        kw.setdefault("seeds", [0, 1])
        kw.setdefault("bootstrap_samples", 200)
        c = cls(data=data, output=output, quick=True, **kw)
        c.sasrec = dataclasses.replace(c.sasrec, max_epochs=4, patience=2, batch_size=64, max_len=20)
        c.budget = dataclasses.replace(c.budget, adc_epochs=3, rqvae_epochs=3, batch_size=256)
        c.retrieval = dataclasses.replace(c.retrieval, max_epochs=2, patience=1, d_model=32, ff_dim=64,
                                          batch_size=128, valid_users=100, warmup_steps=10)
        c.ranking = dataclasses.replace(c.ranking, max_epochs=2, patience=1, d_model=32, mlp_dim=32, batch_size=256)
        return c


# ---- small helpers ---------------------------------------------------------------------
def valid_metric(stage: dict, metric: str) -> float:
    """The validation ``metric`` of a downstream stage's kept (early-stopped) epoch, from its
    per-epoch history: what a decision between runs may read (its ``all`` figures are test)."""
    best = stage["early_stopping"]["best_epoch"]
    for rec in stage["history"]:
        if rec["epoch"] == best and f"valid_{metric}" in rec:
            return float(rec[f"valid_{metric}"])
    raise ValueError(f"the stage's history has no valid_{metric} at its kept epoch {best}")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def pin_run_config(path: str, key: dict, what: str, defaults: dict | None = None) -> None:
    """Write ``key`` (what a cache's results depend on) to ``path``, or, when a cache is there
    already, refuse it if any value differs: results of other settings are never mixed in.
    ``defaults``: the value a cache written before a key existed had for it."""
    if os.path.exists(path):
        old = read_json(path)
        defaults = defaults or {}
        diff = sorted(k for k in key if old.get(k, defaults.get(k)) != key[k])
        if diff:
            raise ValueError(f"{os.path.dirname(path)} holds {what} with different settings ({', '.join(diff)}); "
                             f"use a new --output directory")
    else:
        write_json(path, key)


def checkpoint_path(done: str) -> str:
    """Where the stage whose result is ``done`` keeps its per-epoch training state."""
    return os.path.splitext(done)[0] + ".ckpt.pt"
