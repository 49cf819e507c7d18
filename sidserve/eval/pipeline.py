"""The evaluation pipeline, stage by stage, each cached under the output directory so an
interrupted run restarts where it stopped (a stage's result is written atomically last).
Longer than 450 lines: ``Evaluation`` is one stage graph (each stage's cache path, what it
waits for, its order and its locks), read top to bottom; its config, constants, report and
plots live in config.py, report.py and plots.py. The stages:

    embeddings/{text,meta}.npy              1. sentence embeddings of item text
    sasrec/<variant>/                       2. ID SASRec (CE, tied / untied; BCE optional):
                                               accuracy, norm vs popularity, item tables
    tokenizers/<name>/[seed<k>/]            3. fitted tokenizer, SIDs, quantization metrics
                                               (one fit per seed: seed k fits with seed k)
    downstream/<name>/sid_sasrec_seed<k>.*  4. SID-SASRec: SASRec over SID-composed items
    downstream/<name>/retrieval_seed<k>.*   5. generative retrieval
    downstream/<name>/ranking_seed<k>.*     6. discriminative ranking
    results.json, report.md, plots/         7. aggregation over seeds, head vs tail,
                                               paired bootstrap, wall time per stage

Seed k is a whole draw of what a tokenizer is judged by: the tokenizer fitted with seed k
(the budget's own seed at ``tokenizers/<name>/``, any other in ``seed<k>/`` below it) and
its downstream models trained with seed k, so the spread over seeds holds the fit-to-fit
variance of the tokenizer, not only the downstream models' (LETTER's published SIDs are one
table for every seed).

Every downstream model stops early on the validation split and restores its best epoch;
the test split is read once per trained model, after training. Per-user test metrics
(``.npz`` beside each stage's ``.json``) feed the paired bootstrap of the report.

``run_config.json`` records what the cache was built from; rerunning the same output
directory with a different dataset or protocol is an error (use a new directory).

A full run takes longer than one machine may live (docs/evaluation.md, "Cost and budget"),
so the cache is made to be kept in git: the output directory gets a ``.gitignore`` that
leaves out only what can be rebuilt or is not read again (the text embeddings, the SASRec
tables that are not e_b, the tokenizer artifacts, temporary files); what remains (every
stage's ``.json``, the compressed per-user ``.npz``, each tokenizer's SIDs, e_b itself and
the per-item norms the report plots) is a few MB. A resumed run reads the text embeddings
and e_b only when some tokenizer is still to be fitted.

Several processes can work on one output directory (``--parallel N`` starts them, each with
``cpus / N`` torch threads: two 1-thread processes train these small models 1.29x faster
than one 2-thread process on 2 CPUs, docs/evaluation.md). A process claims a stage by
locking ``<stage file>.lock`` (flock, sidserve/files.py) until the stage is written; the
kernel drops the lock of a process that dies, so another process takes the stage over. The
prerequisites (text embeddings, SASRec, tokenizer fits, the stages that decide an ablation's
seeds) are waited for; a downstream stage held by another process is skipped and waited for
at the end. The workers of one run share one machine (the locks are local to it), or, as Ray
tasks (sidserve/eval/ray_workers.py, ``sidserve select --parallel N --address``), storage that
every node mounts with working locks.
A downstream stage saves its training state after every epoch (``<stage>.ckpt.pt``,
``sidserve.eval.checkpoint``); whoever takes over a stale lock resumes from it, with the
same result as an uninterrupted run, and loses at most the epoch that was in progress.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch

from sidserve.eval.config import (
    EMBEDDING_SOURCE,
    EVAL_NEGATIVES_SEED,
    HARNESS_VERSION,
    SASREC_VARIANTS,
    VALID_NEGATIVES_SEED,
    EvalConfig,
    checkpoint_path,
    headline,
    pin_run_config,
    read_json,
    valid_metric,
)
from sidserve.eval.data import Dataset, load_dataset
from sidserve.eval.metrics import grouped_means, per_user_auc, recall_ndcg, spearman
from sidserve.eval.ranking import (
    evaluate_ranking,
    sample_negatives,
    score,
    train_ranker,
)
from sidserve.eval.retrieval import rank_items, train_retrieval
from sidserve.eval.sasrec import (
    SIDItems,
    evaluate_sasrec,
    train_sasrec,
)
from sidserve.eval.sid_table import PrefixTrie, SIDTable
from sidserve.eval.tokenizers import (
    ABLATIONS,
    ALL_TOKENIZERS,
    fit_tokenizer,
    legacy_spec,
    uses_sid_weights,
)
from sidserve.eval.tokenizers import embedding_of as variant_embedding
from sidserve.eval.tokenizers import spec as variant_spec
from sidserve.files import try_lock, write_json, write_npy, write_npz

log = logging.getLogger(__name__)
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
        self.report = True  # False in the extra processes of --parallel: the first one reports
        self.workers: list = []  # those processes (Popen or ray_workers.RayWorker), waited for before the report
        self._fit_inputs: dict[str, tuple[dict, dict]] = {}  # e_b table -> (items, dims), read when a fit is due
        self._tables: dict[str, tuple[SIDTable, PrefixTrie]] = {}  # by tokenizer_dir
        self._check_cache()

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def _check_cache(self) -> None:
        key = {"data": os.path.abspath(self.c.data), "quick": self.c.quick,
               "quick_users": self.c.quick_users if self.c.quick else None,
               "users": self.data.num_users, "items": self.data.num_items,
               "sasrec": dataclasses.asdict(self.c.sasrec), "budget": dataclasses.asdict(self.c.budget),
               "retrieval": dataclasses.asdict(self.c.retrieval), "ranking": dataclasses.asdict(self.c.ranking),
               "head_tail_share": self.c.head_tail_share, "ranking_negatives": self.c.ranking_negatives,
               "behavior_embedding": self.c.behavior_embedding, "sid_sasrec_dedup": self.c.sid_sasrec_dedup,
               "tokenizer_fits": "one per seed", "harness": HARNESS_VERSION, "content": self.c.content,
               "behavior_source": self.c.behavior_source}
        pin_run_config(self.path("run_config.json"), key, "a run", defaults={"content": "full",
                                                                             "behavior_source": "sasrec"})
        self._write_gitignore()

    def _write_gitignore(self) -> None:
        """What a kept cache leaves out (module docstring): rebuildable or never read again."""
        variant, which = EMBEDDING_SOURCE[self.c.behavior_embedding]
        lines = ["# written by sidserve.eval.pipeline: what a kept evaluation cache leaves out",
                 "embeddings/*.npy", "tokenizers/**/artifact/", "tokenizers/**/*.artifact-tmp/", "*.tmp-*",
                 "*.lock",  # a stage being run (--parallel): meaningless on another machine
                 "*.ckpt.pt",  # a stage's training state until its result is written (resume)
                 "sasrec/*/*_emb.npy", "# e_b, which the tokenizer fits read, is kept (the variants' too)",
                 *sorted({f"!sasrec/{variant}/{which}_emb.npy"} | {
                     "!sasrec/{}/{}_emb.npy".format(*EMBEDDING_SOURCE[variant_embedding(t, self.c.behavior_embedding)])
                     for t in ALL_TOKENIZERS}),
                 "# drawn again from their fixed seeds (negatives())", "ranking_negatives*.npy"]
        os.makedirs(self.out, exist_ok=True)
        with open(self.path(".gitignore"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def planned_stages(self) -> int:
        """Upper bound on the stages of a run: text embeddings, the SASRec variants, and per
        tokenizer and seed a fit (one for LETTER) and SID-SASRec + retrieval + ranking."""
        variants = len(set(self.c.sasrec_variants) | {EMBEDDING_SOURCE[self.c.behavior_embedding][0]})
        fits = sum(1 if n == "letter" else len(self.c.seeds) for n in self.c.tokenizers)
        return 1 + variants + fits + len(self.c.tasks) * len(self.c.tokenizers) * len(self.c.seeds)

    # how often a process waiting for another's stage looks again (stages take minutes; the
    # tests, whose stages take a second, set it lower)
    poll_seconds = float(os.environ.get("SIDSERVE_EVAL_POLL_S", "20"))

    def _stage(self, name: str, done: str, fn, wait: bool = True) -> bool:
        """Run ``fn`` unless its final file ``done`` exists; time it. ``fn`` returns the
        dict written to ``done`` (its run time is added as ``stage_seconds``). A stage that
        another process holds is waited for, or with ``wait=False`` skipped (-> False)."""
        self._stages_seen = getattr(self, "_stages_seen", {})
        self._stages_seen.setdefault(name, len(self._stages_seen) + 1)
        # progress: stage k of at most N (ablations past their first seed only when close to ADC-SID)
        at = f"[{self._stages_seen[name]}/{self.planned_stages()}]"
        waited = False
        lock = None
        while not os.path.exists(done):
            lock = try_lock(done + ".lock")
            if lock is not None:
                break
            if not wait:
                log.info("%s stage %s: another process is running it", at, name)
                return False
            if not waited:
                log.info("%s stage %s: waiting for the process running it", at, name)
                waited = True
            time.sleep(self.poll_seconds)
        else:
            log.info("%s stage %s: %s (%s)", at, name, "done by another process" if waited else "cached", done)
            return True
        try:
            if os.path.exists(done):  # written between the check and the claim
                return True
            t0 = time.perf_counter()
            log.info("%s stage %s ...", at, name)
            result = fn()
            dt = time.perf_counter() - t0
            if result is not None:
                # over every process that worked on it (a resumed stage: the epochs done before
                # the interruption too; the epoch it interrupted is lost and not counted)
                before = (result.get("early_stopping") or {}).get("seconds_before_resume", 0.0)
                result["stage_seconds"] = round(dt + before, 2)
                result["torch_threads"] = torch.get_num_threads()
                result["pid"] = os.getpid()  # which process of a --parallel run
                write_json(done, result)
            if os.path.exists(checkpoint_path(done)):
                os.remove(checkpoint_path(done))  # the result is written: nothing left to resume
            self.timer.add(name.split(":")[0], dt)
            log.info("stage %s done in %.1f s", name, dt)
            return True
        finally:
            lock.release()

    # 1 ---------------------------------------------------------------------------------
    def content_modalities(self) -> list[str] | None:
        """The modalities a dataset carries as embeddings (``sidserve select``'s layout,
        sidserve.eval.parquet_input), in catalog order; None: embed the item text."""
        d = os.path.join(self.c.data, "embeddings")
        if not os.path.isdir(d):
            return None
        prep = os.path.join(self.c.data, "prepare.json")
        if os.path.exists(prep):
            return list(read_json(prep)["modalities"])
        return sorted(f[:-4] for f in os.listdir(d) if f.endswith(".npy"))

    def embeddings(self) -> dict[str, np.ndarray]:
        own = self.content_modalities()
        if own is not None:  # the catalog's own embeddings: nothing to compute
            out = {m: np.load(os.path.join(self.c.data, "embeddings", f"{m}.npy")) for m in own}
            if self.c.quick and self.data.num_items != len(next(iter(out.values()))):
                raise ValueError("--quick subsamples the items of a dataset with its own embeddings: "
                                 "use sidserve select --sample-users instead")
            return out

        def run():
            from sidserve.eval.text import embed_texts
            for modality, texts in self.data.item_texts(self.c.content).items():
                uniq, inv = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
                emb = embed_texts(list(uniq))[inv.ravel()]
                write_npy(self.path("embeddings", f"{modality}.npy"), emb)
            return {"modalities": ["text", "meta"]}
        done = self.path("embeddings", "done.json")
        if os.path.exists(done) and not all(os.path.exists(self.path("embeddings", f"{m}.npy")) for m in ("text", "meta")):
            os.remove(done)  # a cache restored from git keeps the marker, not the arrays: rebuild them
        self._stage("embeddings", done, run)
        return {m: np.load(self.path("embeddings", f"{m}.npy")) for m in ("text", "meta")}

    # 2 ---------------------------------------------------------------------------------
    def sasrec_variant(self, variant: str, wait: bool = True) -> bool:
        d = self.path("sasrec", variant)

        def run():
            c = dataclasses.replace(self.c.sasrec, **SASREC_VARIANTS[variant])
            model, history = train_sasrec(self.data.train_sequences(), self.data.num_items, c,
                                          valid=self.data.targets("valid"),
                                          checkpoint=checkpoint_path(os.path.join(d, "report.json")))
            test = evaluate_sasrec(model, *self.data.targets("test"), ks=(5, 10, 50), per_user=True)
            write_npz(os.path.join(d, "test_per_user.npz"), **test)
            pop = self.data.popularity()[1:]
            tables = {}
            for which in ("input", "output"):
                emb = model.item_vectors(which)
                write_npy(os.path.join(d, f"{which}_emb.npy"), emb)
                norms = np.linalg.norm(emb, axis=1)
                write_npy(os.path.join(d, f"{which}_norms.npy"), norms.astype(np.float32))  # the report's plot
                tables[which] = {"norm_popularity_spearman": spearman(norms, pop),
                                 "norm_quantiles": np.quantile(norms, [0, 0.25, 0.5, 0.75, 1]).round(6).tolist()}
            return {"variant": variant, "config": dataclasses.asdict(c), "history": history,
                    "early_stopping": model.early_stopping, "tied": c.tied,
                    "valid": {k[len("valid_"):]: v for k, v in history[model.early_stopping["best_epoch"]].items()
                              if k.startswith("valid_")},
                    "test": {k: float(v.mean()) for k, v in test.items()}, "tables": tables}
        return self._stage(f"sasrec:{variant}", os.path.join(d, "report.json"), run, wait=wait)

    def behavior(self, embedding: str | None = None) -> np.ndarray:
        """e_b: the ``embedding`` table (default: the run's ``behavior_embedding``); with
        ``behavior_source`` "catalog", the dataset's own table (NaN rows: no behavior) for
        every tokenizer."""
        if self.c.behavior_source == "catalog":
            p = os.path.join(self.c.data, "behavior.npy")
            if not os.path.exists(p):
                raise ValueError(f"behavior_source 'catalog' needs {p} (a catalog with behavior_emb)")
            return np.load(p)
        for v in self.c.sasrec_variants:
            self.sasrec_variant(v)
        variant, which = EMBEDDING_SOURCE[embedding or self.c.behavior_embedding]
        return np.load(self.path("sasrec", variant, f"{which}_emb.npy"))

    def embedding_of(self, name: str) -> str:
        """The SASRec table tokenizer ``name`` reads as e_b."""
        return variant_embedding(name, self.c.behavior_embedding)

    # 3 ---------------------------------------------------------------------------------
    def fit_inputs(self, embedding: str | None = None) -> tuple[dict, dict]:
        """(items, dims) a fit reads: text embeddings (built when the cache lacks them) and e_b
        (the ``embedding`` table, default the run's); read once per table, and only when some
        fit is still to be done."""
        embedding = embedding or self.c.behavior_embedding
        if embedding not in self._fit_inputs:
            content = self.embeddings()
            behavior = self.behavior(embedding)
            if np.isnan(behavior).any():  # the catalog's table: rows without behavior are cold items
                behavior = [None if np.isnan(row).any() else row for row in behavior]
            items = {"item_id": np.arange(1, self.data.num_items + 1),
                     **{f"{m}_emb": v for m, v in content.items()}, "behavior_emb": behavior,
                     # interactions per item in the training split (richness_signal="popularity")
                     "popularity": self.data.popularity()[1:].astype(np.float64)}
            self._fit_inputs[embedding] = items, {m: v.shape[1] for m, v in content.items()}
        return self._fit_inputs[embedding]

    def fit_seed(self, name: str, seed: int) -> int | None:
        """The seed ``name`` is fitted with for downstream seed ``seed`` (None: LETTER, not fitted)."""
        return None if name == "letter" else seed

    def tokenizer_dir(self, name: str, seed: int) -> str:
        fs = self.fit_seed(name, seed)
        d = self.path("tokenizers", name)
        return d if fs is None or fs == self.c.budget.seed else os.path.join(d, f"seed{fs}")

    def table(self, name: str, seed: int, wait: bool = True) -> tuple[SIDTable, PrefixTrie] | None:
        """Seed ``seed``'s SID table of ``name`` and its prefix trie (fitted first if needed);
        None with ``wait=False`` when another process is fitting it."""
        d = self.tokenizer_dir(name, seed)
        if d not in self._tables:
            got = self.tokenize(name, seed, wait)
            if got is None:
                return None
            self._tables[d] = got
        return self._tables[d]

    def spec(self, name: str) -> dict:
        """What ``name``'s stages depend on beyond ``run_config.json`` (its e_b, config
        overrides, whether downstream models read its weights): kept in each of its stage files."""
        return variant_spec(name, self.c.behavior_embedding)

    def check_spec(self, name: str, done: str) -> None:
        """Refuse the cached stage ``done`` of ``name`` if it was made with another spec (a
        file from before specs were kept has ``legacy_spec``): never mix two versions of a
        tokenizer in one report."""
        had = read_json(done).get("spec", legacy_spec(name, self.c.behavior_embedding))
        if had != self.spec(name):
            raise ValueError(f"{done} was made with {name!r} = {had}, but {name!r} is now {self.spec(name)}: "
                             f"remove tokenizers/{name}/ and downstream/{name}/ (or use a new --output)")

    def tokenize(self, name: str, seed: int, wait: bool = True) -> tuple[SIDTable, PrefixTrie] | None:
        d = self.tokenizer_dir(name, seed)
        fs = self.fit_seed(name, seed)
        items, dims = {}, {}
        if not os.path.exists(os.path.join(d, "quantization.json")):
            items, dims = self.fit_inputs(self.embedding_of(name))

        def run():
            budget = self.c.budget if fs is None else dataclasses.replace(self.c.budget, seed=fs)
            tk = fit_tokenizer(name, items, dims, items["behavior_emb"].shape[1], budget,
                               letter_sids=[it.get("letter_sid") for it in self.data.items])
            if tk.tokenizer is not None:
                art = d + ".artifact-tmp"
                shutil.rmtree(art, ignore_errors=True)
                tk.tokenizer.save_pretrained(art, overwrite=True)  # a rerun of the stage replaces it
                shutil.rmtree(os.path.join(d, "artifact"), ignore_errors=True)
                os.makedirs(d, exist_ok=True)
                os.replace(art, os.path.join(d, "artifact"))
            write_npz(os.path.join(d, "sids.npz"), sid=tk.sid, weights=tk.weights)
            q = dict(tk.quantization)
            q["codebook_size"] = tk.codebook_size
            q["sid_length"] = int(tk.sid.shape[1])
            q["items_sharing_sid"] = float(1 - np.unique(tk.sid, axis=0).shape[0] / tk.sid.shape[0])
            q["fit_seed"] = fs
            q["spec"] = self.spec(name)
            return q
        stage = f"tokenizers:{name}" if d == self.path("tokenizers", name) else f"tokenizers:{name}:seed{fs}"
        if not self._stage(stage, os.path.join(d, "quantization.json"), run, wait=wait):
            return None
        self.check_spec(name, os.path.join(d, "quantization.json"))
        z = np.load(os.path.join(d, "sids.npz"))
        table = SIDTable.build(z["sid"], z["weights"])
        return table, PrefixTrie.build(table)

    # 4-6 -------------------------------------------------------------------------------
    def stage_path(self, name: str, task: str, seed: int, ext: str = "json") -> str:
        return self.path("downstream", name, f"{task}_seed{seed}.{ext}")

    def sid_sasrec(self, name: str, table: SIDTable, seed: int, groups, wait: bool = True) -> bool:
        def run():
            c = dataclasses.replace(self.c.sasrec, seed=seed, loss="ce", tied=True)
            torch.manual_seed(seed)  # the code tables' init: from the seed, not from what this process ran before
            items = SIDItems(table, c.hidden_dim, use_dedup=self.c.sid_sasrec_dedup,
                             use_weights=uses_sid_weights(name))
            model, history = train_sasrec(self.data.train_sequences(), self.data.num_items, c,
                                          valid=self.data.targets("valid"), items=items,
                                          checkpoint=checkpoint_path(self.stage_path(name, "sid_sasrec", seed)))
            hist, targets = self.data.targets("test")
            per_user = evaluate_sasrec(model, hist, targets, ks=(5, 10, 50), per_user=True)
            write_npz(self.stage_path(name, "sid_sasrec", seed, "npz"), **per_user)
            res = grouped_means(per_user, targets, groups)
            v_hist, v_targets = self.data.targets("valid")  # the kept epoch's validation, per group
            res["valid_groups"] = grouped_means(evaluate_sasrec(model, v_hist, v_targets, ks=(10,), per_user=True),
                                                v_targets, groups)
            res.update(history=history, early_stopping=model.early_stopping, fit_seed=self.fit_seed(name, seed))
            return res
        return self._staged(name, "sid_sasrec", seed, run, wait)

    def retrieval(self, name: str, table: SIDTable, trie: PrefixTrie, seed: int, groups, wait: bool = True) -> bool:
        def run():
            c = dataclasses.replace(self.c.retrieval, seed=seed,
                                    use_sid_weights=self.c.retrieval.use_sid_weights and uses_sid_weights(name))
            model, history = train_retrieval(table, self.data.train_sequences(), self.data.targets("valid"), c,
                                             trie=trie,
                                             checkpoint=checkpoint_path(self.stage_path(name, "retrieval", seed)))
            t0 = time.perf_counter()
            hist, targets = self.data.targets("test")
            ranked = rank_items(model, trie, hist, c.beam_size)
            per_user = recall_ndcg(ranked, targets, (5, 10, 50))
            write_npz(self.stage_path(name, "retrieval", seed, "npz"), **per_user)
            res = grouped_means(per_user, targets, groups)
            res.update(history=history, early_stopping=model.early_stopping, fit_seed=self.fit_seed(name, seed),
                       generate_seconds=time.perf_counter() - t0, valid_sid_share=float((ranked >= 0).mean()))
            return res
        return self._staged(name, "retrieval", seed, run, wait)

    def ranking(self, name: str, table: SIDTable, seed: int, groups, negatives: dict, wait: bool = True) -> bool:
        def run():
            c = dataclasses.replace(self.c.ranking, seed=seed,
                                    use_sid_weights=self.c.ranking.use_sid_weights and uses_sid_weights(name))
            v_hist, v_target = self.data.targets("valid")
            model, history = train_ranker(table, self.data.train_sequences(), c,
                                          valid=(v_hist, v_target, negatives["valid"]),
                                          checkpoint=checkpoint_path(self.stage_path(name, "ranking", seed)))
            hist, targets = self.data.targets("test")
            scores = score(model, hist, np.concatenate([targets[:, None], negatives["test"]], axis=1))
            write_npz(self.stage_path(name, "ranking", seed, "npz"), auc=per_user_auc(scores))
            res = evaluate_ranking(scores, targets, groups)
            v_scores = score(model, v_hist, np.concatenate([v_target[:, None], negatives["valid"]], axis=1))
            res["valid_groups"] = evaluate_ranking(v_scores, v_target, groups)  # the kept epoch's, per group
            res.update(history=history, early_stopping=model.early_stopping, fit_seed=self.fit_seed(name, seed))
            return res
        return self._staged(name, "ranking", seed, run, wait)

    def _staged(self, name: str, task: str, seed: int, run, wait: bool) -> bool:
        """``task``'s stage of ``name`` at ``seed``: its result records the spec, a cached one is checked."""
        def with_spec():
            res = run()
            res["spec"] = self.spec(name)
            return res
        done = self.stage_path(name, task, seed)
        ok = self._stage(f"{task}:{name}:{seed}", done, with_spec, wait)
        if ok:
            self.check_spec(name, done)
        return ok

    def negatives(self) -> dict[str, np.ndarray]:
        """Sampled ranking candidates: 'test' avoids each user's whole sequence, 'valid'
        its training + validation items (the test item is not looked at)."""
        out = {}
        for split, seed, seqs in (("test", EVAL_NEGATIVES_SEED, self.data.sequences),
                                  ("valid", VALID_NEGATIVES_SEED, [s[:-1] for s in self.data.sequences])):
            p = self.path(f"ranking_negatives_{split}.npy" if split == "valid" else "ranking_negatives.npy")
            if not os.path.exists(p):
                rng = np.random.default_rng(seed)
                write_npy(p, sample_negatives(rng, seqs, self.data.num_items, self.c.ranking_negatives))
            out[split] = np.load(p)
        return out

    def downstream(self, name: str, seeds: list[int], groups, negatives, wait: bool = True) -> bool:
        """The three tasks of ``name`` at ``seeds`` (each on that seed's fit); False if another
        process holds some of them (``wait=False``: skipped, the caller comes back for them)."""
        ok = True
        for seed in seeds:
            table, trie = self.table(name, seed)
            if "sid_sasrec" in self.c.tasks:
                ok &= self.sid_sasrec(name, table, seed, groups, wait)
            if "retrieval" in self.c.tasks:
                ok &= self.retrieval(name, table, trie, seed, groups, wait)
            if "ranking" in self.c.tasks:
                ok &= self.ranking(name, table, seed, groups, negatives, wait)
        return ok

    def seeds_for(self, name: str) -> list[int]:
        """Seeds that ``name`` needs: every seed, except for an ablation whose first seed
        is more than 2 seed spreads of ADC-SID from ADC-SID on every headline metric, on
        the validation split (the kept epoch's figure)."""
        if name not in ABLATIONS or not self.c.ablation_seeds_adaptive or "adc_sid" not in self.c.tokenizers:
            return list(self.c.seeds)
        first = self.c.seeds[0]
        for task, metric in headline(self.c.tasks).items():  # decided on validation: test is never read to choose
            ref = [valid_metric(read_json(self.stage_path("adc_sid", task, s)), metric) for s in self.c.seeds]
            mine = valid_metric(read_json(self.stage_path(name, task, first)), metric)
            spread = float(np.std(ref, ddof=1)) if len(ref) > 1 else 0.0
            if abs(mine - float(np.mean(ref))) <= 2 * spread:
                return list(self.c.seeds)
        return [first]

    # all -------------------------------------------------------------------------------
    def run(self, report_only: bool = False) -> dict:
        """Run (or resume) every stage, then write the report. ``report_only``: train
        nothing, report what the cache holds (a long run's interim state; stages not
        finished yet are listed as pending)."""
        t_start = time.perf_counter()
        if report_only:
            if not os.path.exists(self.path("sasrec", EMBEDDING_SOURCE[self.c.behavior_embedding][0], "report.json")):
                raise ValueError(f"{self.out} has no finished SASRec stage yet: nothing to report")
            from sidserve.eval.report import write_report
            return write_report(self, wall_seconds=time.perf_counter() - t_start)
        for wait in (False, True):  # with --parallel, the variants train side by side
            for v in self.c.sasrec_variants:
                self.sasrec_variant(v, wait=wait)
        groups = self.data.popularity_groups(self.c.head_tail_share)
        negatives = self.negatives()
        names = self.c.tokenizers
        for wait in (False, True):  # the first seed's fits before any downstream stage, side by side
            for name in names:  # with --parallel; the other seeds' fits when their stages need them
                self.table(name, self.c.seeds[0], wait=wait)
        # every tokenizer at the first seed before any second seed (an interrupted run can
        # already compare them all, the baselines before the ablations), then the other seeds; an ablation gets them only when
        # its first seed is within 2 seed spreads of ADC-SID on some headline metric
        adaptive = self.c.ablation_seeds_adaptive and "adc_sid" in names

        def down(name, seeds, wait):
            return self.downstream(name, seeds, groups, negatives, wait)

        # a stage another process holds is skipped on the way (wait=False) and waited for at the
        # end; the stages that decide an ablation's seeds are waited for when they are needed
        plan = [(name, self.c.seeds[:1]) for name in sorted(names, key=lambda n: n in ABLATIONS)]  # ablations last
        main = [n for n in names if not (adaptive and n in ABLATIONS)]
        plan += [(name, [seed]) for seed in self.c.seeds[1:] for name in main]
        for name, seeds in plan:
            down(name, seeds, wait=False)
        for name in names:
            if name not in main:
                down("adc_sid", self.c.seeds, wait=True)
                down(name, self.c.seeds[:1], wait=True)
                down(name, self.seeds_for(name), wait=False)
        for name, seeds in plan + [(n, self.seeds_for(n)) for n in names if n not in main]:
            down(name, seeds, wait=True)
        if self.report:
            self.wait_for_workers()
        else:
            return {}
        from sidserve.eval.report import write_report
        results = write_report(self, wall_seconds=time.perf_counter() - t_start)
        return results

    def wait_for_workers(self) -> None:
        """Wait for the --parallel processes; their stages are all written by now (this process
        waited for each), so one that failed has lost nothing: say so and go on."""
        for p in self.workers:
            rc = p.wait()
            if rc:
                log.warning("parallel evaluation process %s ended with exit code %d; its stages were "
                            "completed by this one", p.pid, rc)

    def environment(self) -> dict:
        return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.is_available()}


def run_evaluation(config: EvalConfig, report_only: bool = False, parallel: int = 1,
                   worker_argv: list[str] | None = None, worker: bool = False,
                   withhold_test: bool = False, ray_workers: tuple[int, int] | None = None) -> dict:
    """Run (or resume) the whole evaluation; returns results.json's content ({} in a worker).

    withhold_test: results.json as always (test figures included, for the one final read), but
    report.md says only that the figures are withheld, and no plots (a study that chooses on
    validation, issue 47: the people running it do not see test before the choice).

    parallel: processes working on the stages together (this one + parallel - 1 started with
    ``python -m sidserve evaluate <worker_argv> --parallel-worker``), each with cpus / parallel
    torch threads. worker: this is one of those extra processes (it writes no report).
    ray_workers: (n, cpus each): the extra processes are n Ray tasks on the cluster Ray is
    connected to (sidserve/eval/ray_workers.py) instead of local subprocesses."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    threads = max(1, (os.cpu_count() or 1) // parallel)
    if parallel > 1:  # a worker has its share from OMP_NUM_THREADS, set by the process that started it
        torch.set_num_threads(threads)
    ev = Evaluation(config)
    ev.report = not worker
    ev.withhold_test = withhold_test
    if parallel > 1 and not report_only:
        if worker_argv is None:
            raise ValueError("parallel > 1 needs the command line to start the other processes with")
        import subprocess

        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "sidserve", "evaluate", *worker_argv, "--parallel-worker"]
        ev.workers = [subprocess.Popen(cmd, env=env) for _ in range(parallel - 1)]
        log.info("started %d more evaluation processes (%d torch threads each)", parallel - 1, threads)
    try:
        if ray_workers and not report_only:
            from sidserve.eval.ray_workers import start_workers

            ev.workers += start_workers(config, ray_workers[0], ray_workers[1])
        return ev.run(report_only=report_only)
    except BaseException:
        for p in ev.workers:  # do not leave them running on a failed or interrupted run
            try:
                p.terminate()
            except Exception as err:  # (a lost Ray connection): the original error is the one to raise
                log.warning("could not stop evaluation process %s: %s", p.pid, err)
        raise


def run_cli(args, command: str = "") -> int:
    """jobs/evaluate.py: build the config from its arguments and run (exit 2 on bad input)."""
    from sidserve.runner import run_job

    def body():
        kw = dict(command=command)
        if args.tokenizers is not None:
            kw["tokenizers"] = [t.strip() for t in args.tokenizers.split(",") if t.strip()]
        if args.seeds is not None:
            try:
                kw["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
            except ValueError:
                raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if args.quick:
            c = EvalConfig.quick_profile(args.data, args.output, quick_users=args.quick_users, **kw)
        else:
            c = EvalConfig(data=args.data, output=args.output, **kw)
        c.content = getattr(args, "content", "full")
        if getattr(args, "tasks", None) is not None:
            c.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if args.sasrec_variants is not None:
            c.sasrec_variants = [v.strip() for v in args.sasrec_variants.split(",") if v.strip()]
        if args.behavior_embedding is not None:
            c.behavior_embedding = args.behavior_embedding
        if args.retrieval_max_epochs is not None:
            c.retrieval = dataclasses.replace(c.retrieval, max_epochs=args.retrieval_max_epochs)
        if args.history_tokens is not None:
            c.retrieval = dataclasses.replace(c.retrieval, history_tokens=args.history_tokens)
        worker = getattr(args, "parallel_worker", False)
        argv = [a for a in (getattr(args, "evaluate_argv", None) or []) if a != "--parallel-worker"]
        drop = {i for i, a in enumerate(argv) if a == "--parallel"} | \
               {i + 1 for i, a in enumerate(argv) if a == "--parallel"}
        argv = [a for i, a in enumerate(argv) if i not in drop and not a.startswith("--parallel=")]
        r = run_evaluation(c, report_only=args.report_only, parallel=1 if worker else args.parallel,
                           worker_argv=argv, worker=worker, withhold_test=args.withhold_test)
        if worker:
            return
        waiting = f", {len(r['pending'])} pending ({', '.join(r['pending'])})" if r["pending"] else ""
        print(f"[sidserve] evaluation of {len(r['tokenizers'])} tokenizers{waiting} on {r['dataset']['name']} "
              f"(seeds {r['seeds']}): {os.path.join(args.output, 'report.md')}")
        if args.withhold_test:
            print(f"  figures withheld (--withhold-test): {os.path.join(args.output, 'results.json')} has them")
            return
        for v, e in r["sasrec"].items():
            print(f"  ID SASRec ({v}){'':<19} R@10 {e['test']['recall@10']:.4f}  N@10 {e['test']['ndcg@10']:.4f}")
        for e in r["tokenizers"].values():
            figs = []
            if "sid_sasrec" in e:
                figs.append(f"SID-SASRec R@10 {e['sid_sasrec']['all']['recall@10']['mean']:.4f}")
            if "retrieval" in e:
                ret = e["retrieval"]["all"]
                figs.append(f"retrieval R@10 {ret['recall@10']['mean']:.4f}  N@10 {ret['ndcg@10']['mean']:.4f}")
            if "ranking" in e:
                figs.append(f"GAUC {e['ranking']['all']['gauc']['mean']:.4f}")
            print(f"  {e['label']:<32} " + "  ".join(figs))

    return run_job(body)
