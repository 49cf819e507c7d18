"""Two nights on real interactions: how much SIDs churn when the tokenizer is re-fitted on new
behavior, and what the stability mechanisms buy (issue 20).

Night 1 sees each user's training sequence without its last ``holdout`` interactions; night 2
sees the whole training split. Validation and test (the evaluation's leave-one-out targets)
stay unseen both nights, so night 2's SIDs are judged the way docs/evaluation.md judges
tokenizers (SID-SASRec, full-catalog Recall@10 / NDCG@10).

Both nights compute behavioral embeddings as a production system would, from a CE SASRec: the
table ADC-SID reads as e_b in the evaluation (``tokenizer``: ``adc_sid``, the evaluation's
configuration, reads the tied table with richness from popularity and its codes at weight 1
downstream; ``adc_sid_untied``, the paper's, the untied input table with richness from its
norm and R(e_b) as weights), in one of three ways on night 2:

    scratch      a new SASRec trained on night 2 (same seed): its space is unrelated to night 1's
    warm         night 1's SASRec trained on night 2's interactions
    procrustes   the scratch table rotated onto night 1's by orthogonal Procrustes over the items
                 both nights know (norms are kept: the paper's configuration reads them as richness)

and tokenizes night 2 in four ways: ``cold`` (a re-fit from scratch, the baseline), ``none``
(night 1's model as it is, a refresh without ``--refit``), ``warm`` (a re-fit from night 1's
model, ``refresh --refit``) and ``anchored`` (the warm re-fit with night 1's codewords frozen,
``--refit-codebooks frozen``); the last three also with sticky assignment at each margin delta
(``sidserve.jobs.assign.sticky``: an item keeps night 1's code at a position unless the new
best beats it by more than delta in cosine).

Churn is the share of items whose SID changed between the nights (every catalog item has a SID
both nights: an item unseen on night 1 is tokenized on the content-only path), overall, over
the items with interactions on both nights, per SID position and per popularity bucket (night
2's training interactions; the refresh job's buckets). Each seed of ``downstream_seeds`` is
a whole replicate, as the evaluation's seeds are: it fits night 1's tokenizer and night 2's
re-fits with that seed and trains night 2's downstream models with it; churn and quality are
reported as mean, sample standard deviation and per-seed values (two fits of the same
tokenizer differ by several percent in SID-SASRec accuracy, more than the differences a
stability setting is judged by). The SASRecs that give e_b are trained once per night.

Every stage is cached under ``output`` (downstream models also per epoch, so an interrupted
one resumes); ``run_config.json`` pins what the cache's names do not say (data, holdout,
budgets, harness version) and a run with other values is refused. The ``.gitignore`` leaves
out only what is rebuilt (the content embeddings) or temporary, so the cache can be committed
and a long run resumed on another machine; the report is ``stability.md`` +
``stability.json`` (+ ``churn_vs_delta.png`` when matplotlib is installed), and per-user
arrays of every downstream model sit beside its result (``.npz``) for paired tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import torch

from sidserve.eval.churn import (
    churn_table,
    cold_to_warm,
    input_rows_trained,
    mean_tree,
    procrustes,
    split_nights,
    summarize_seeds,
)
from sidserve.eval.data import Dataset, load_dataset
from sidserve.eval.stability_config import (
    GITIGNORE,
    RESIDUAL,
    STABILITY_VERSION,
    StabilityConfig,
)
from sidserve.eval.stability_report import plot, render
from sidserve.eval.tokenizers import family_overrides, spec, uses_sid_weights
from sidserve.files import atomic_write, write_json, write_npz

log = logging.getLogger(__name__)
# ---- the run -------------------------------------------------------------------------------

class TwoNights:
    def __init__(self, c: StabilityConfig):
        self.c = c.validate()
        full = load_dataset(c.data)
        self.data: Dataset = full.subsample(c.quick_users, seed=0) if c.quick else full
        self.night2 = self.data.train_sequences()
        self.night1, self.new_share = split_nights(self.night2, c.holdout)
        n = self.data.num_items
        self.pop1 = np.bincount(np.concatenate(self.night1), minlength=n + 1)[1:]
        self.pop2 = np.bincount(np.concatenate(self.night2), minlength=n + 1)[1:]
        # whose e_b row each night's SASRec learns from the item's own interactions (untied: the
        # others keep their random init; tied: they move only as softmax negatives)
        self.trained1 = input_rows_trained(self.night1, n, c.sasrec.max_len, c.tied())
        self.trained2 = input_rows_trained(self.night2, n, c.sasrec.max_len, c.tied())
        self.timings: dict[str, float] = {}
        self._check_cache()

    def _check_cache(self) -> None:
        """A cache is keyed by setting names and seeds; what those names do not say (data,
        holdout, the SASRec and tokenizer budgets, the harness's code) is pinned in
        ``run_config.json``, and a run with other values is refused rather than mixed in."""
        from sidserve.eval.config import HARNESS_VERSION, pin_run_config

        key = {"data": os.path.abspath(self.c.data), "quick": self.c.quick,
               "quick_users": self.c.quick_users if self.c.quick else None, "holdout": self.c.holdout,
               "seed": self.c.seed, "sasrec": dataclasses.asdict(self.c.sasrec),
               "budget": dataclasses.asdict(self.c.budget), "harness": HARNESS_VERSION,
               "stability": STABILITY_VERSION,
               # what the tokenizer's name stands for (its e_b table, config fields, downstream
               # weights): a change of ADC_EVAL under the same name is a different run
               "tokenizer": {"name": self.c.tokenizer, **spec(self.c.tokenizer, "untied-input")}}
        p = self.path("run_config.json")
        if not os.path.exists(p) and any(os.path.exists(self.path(d)) for d in ("behavior", "tokenizers", "downstream")):
            raise ValueError(f"{self.c.output} holds a stability cache from before run_config.json (its settings and "
                             "code version are unknown); use a new --output directory")
        pin_run_config(p, key, "a stability run")
        if self.c.behavior_from:
            from sidserve.eval.stability_parts import adopt_nights
            adopt_nights(self, key, self.c.tied())

    def path(self, *parts: str) -> str:
        return os.path.join(self.c.output, *parts)

    def _cached(self, name: str, file: str, fn):
        """np.load(file) when cached, else fn() -> dict of arrays saved there."""
        p = self.path(file)
        if not os.path.exists(p):
            t0 = time.perf_counter()
            log.info("stage %s ...", name)
            arrays = fn()
            write_npz(p, compressed=False, **arrays)
            self.timings[name] = round(time.perf_counter() - t0, 1)
            log.info("stage %s done in %.1f s", name, self.timings[name])
        return dict(np.load(p))

    # behavior ------------------------------------------------------------------------
    def content(self) -> dict[str, np.ndarray]:
        def run():
            if self.c.content_from:
                out = {m: np.load(os.path.join(self.c.content_from, "embeddings", f"{m}.npy")) for m in ("text", "meta")}
                if any(v.shape[0] != self.data.num_items for v in out.values()):
                    raise ValueError(f"--content-from {self.c.content_from}: embeddings of "
                                     f"{[v.shape[0] for v in out.values()]} items, the dataset has {self.data.num_items}")
                return out
            from sidserve.eval.text import embed_texts
            out = {}
            for m, texts in self.data.item_texts().items():
                uniq, inv = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
                out[m] = embed_texts(list(uniq))[inv.ravel()]
            return out
        return self._cached("content embeddings", "embeddings.npz", run)

    def _sasrec(self, seqs, valid, name: str, init=None):
        """A night's SASRec, saving its state after every epoch under behavior/ so an interrupted
        run resumes it (the file goes once the night's e_b is cached)."""
        from sidserve.eval.sasrec import train_sasrec

        c = dataclasses.replace(self.c.sasrec, seed=self.c.seed, loss="ce", tied=self.c.tied())
        ckpt = self.path("behavior", f"{name}.ckpt.pt")
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        model = train_sasrec(seqs, self.data.num_items, c, valid=valid, init=init, checkpoint=ckpt)[0]
        if os.path.exists(ckpt):
            os.remove(ckpt)
        return model

    def night1_valid(self):
        """Night 1's early stopping target: each user's first held-out interaction."""
        users = [u for u, s in enumerate(self.night2) if s.size > self.c.holdout and self.night1[u].size]
        return [self.night1[u] for u in users], np.array([self.night2[u][-self.c.holdout] for u in users])

    def behavior(self) -> dict[str, np.ndarray]:
        """night1 (N, d) and night2_<mode> (N, d) e_b tables, the SASRec's input table (the only
        one when tied; rows of unseen items unused)."""
        state = {}

        model1_path = self.path("behavior", "night1_model.pt")

        def night1():
            state["model1"] = self._sasrec(self.night1, self.night1_valid(), "night1")
            # the warm start continues from exactly this model, also on a resumed run
            with atomic_write(model1_path) as f:
                torch.save(state["model1"].state_dict(), f)
            return {"emb": state["model1"].item_vectors("input")}

        def night2_scratch():
            return {"emb": self._sasrec(self.night2, self.data.targets("valid"), "scratch").item_vectors("input")}

        e1 = self._cached("sasrec night 1", "behavior/night1.npz", night1)["emb"]
        out = {"night1": e1}
        if "scratch" in self.c.modes or "procrustes" in self.c.modes:
            out["scratch"] = self._cached("sasrec night 2 (scratch)", "behavior/scratch.npz", night2_scratch)["emb"]
        if "warm" in self.c.modes:
            def night2_warm():
                if "model1" not in state:  # night 1 came from the cache
                    state["model1"] = self._night1_model(model1_path)
                return {"emb": self._sasrec(self.night2, self.data.targets("valid"), "warm",
                                            init=state["model1"]).item_vectors("input")}
            out["warm"] = self._cached("sasrec night 2 (warm)", "behavior/warm.npz", night2_warm)["emb"]
        if "procrustes" in self.c.modes:
            both = np.flatnonzero(self.trained1 & self.trained2)  # rows both SASRecs trained
            out["procrustes"] = out["scratch"] @ procrustes(out["scratch"], e1, both)
        return out

    def _night1_model(self, path: str):
        """Night 1's SASRec for the warm start: exactly the one that gave night 1's e_b, saved
        beside it (training it again on another machine or thread count need not reproduce it)."""
        from sidserve.eval.sasrec import IDItems, SASRec

        if not os.path.exists(path):
            raise ValueError(f"{path} is missing: the warm start must continue from the SASRec that gave night 1's "
                             "cached e_b; delete behavior/, tokenizers/ and downstream/ together to train both "
                             "nights again (fits and downstream models built on the old e_b would be reused)")
        c = dataclasses.replace(self.c.sasrec, seed=self.c.seed, loss="ce", tied=self.c.tied())
        model = SASRec(IDItems(self.data.num_items, c.hidden_dim, c.tied), c)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()

    def items(self, content: dict, emb: np.ndarray, popularity: np.ndarray):
        from sidserve.items import ItemArrays

        n = self.data.num_items
        return ItemArrays({m: content[m] for m in ("text", "meta")}, emb.astype(np.float32), popularity > 0,
                          np.array([str(i) for i in range(1, n + 1)], dtype=object), popularity.astype(np.float64))

    # tokenizers ----------------------------------------------------------------------
    def fits(self, content: dict, beh: dict, seed: int) -> tuple[object, np.ndarray, dict[str, dict]]:
        """Night 1's tokenizer fitted with ``seed``, its SIDs of night 1, and every night-2
        setting's SIDs (its own re-fits with ``seed``): (tok1, sid1, {name: {"sid", "weights",
        "codes_kept"}}). Fits are cached (``tokenizers/``; seeds other than the run's named)."""
        from sidserve.eval.tokenizers import _adc_config
        from sidserve.jobs.assign.sticky import sticky_codes
        from sidserve.tokenizers.adc_sid.tokenizer import SemanticIdTokenizer

        if self.c.tokenizer in RESIDUAL:
            from sidserve.eval.stability_parts import residual_fits
            return residual_fits(self, content, beh, seed)
        dims = {m: content[m].shape[1] for m in ("text", "meta")}
        config = _adc_config(dims, beh["night1"].shape[1], dataclasses.replace(self.c.budget, seed=seed),
                             family_overrides(self.c.tokenizer))
        tag = "" if seed == self.c.seed else f"-seed{seed}"

        def fitted(name, cfg, items, init=None):
            d = self.path("tokenizers", name + tag)
            if not os.path.exists(os.path.join(d, "manifest.json")):
                t0 = time.perf_counter()
                SemanticIdTokenizer(cfg).fit(items, init=init).save_pretrained(d, overwrite=True)
                self.timings[f"fit {name}{tag}"] = round(time.perf_counter() - t0, 1)
            return SemanticIdTokenizer.from_pretrained(d)

        items1 = self.items(content, beh["night1"], self.pop1)
        tok1 = fitted("night1", config, items1)
        sid1 = tok1.encode(items1).sid
        k = min(self.c.candidates, config.codebook_size)
        settings: dict[str, dict] = {}
        for mode in self.c.modes:
            items2 = self.items(content, beh[mode], self.pop2)
            cold = fitted(f"{mode}-cold", config, items2).encode(items2)
            settings[f"{mode}/cold"] = {"sid": cold.sid, "weights": cold.behavior_weights}
            for kind in self.c.sticky_kinds():
                tok = tok1 if kind == "none" else fitted(
                    f"{mode}-{kind}", config.replace(train_codebooks=kind != "anchored"), items2, init=tok1)
                enc = tok.encode(items2, candidates=k)
                settings[f"{mode}/{kind}"] = {"sid": enc.sid, "weights": enc.behavior_weights}
                for delta in self.c.deltas:
                    codes, kept, unscored = sticky_codes(enc.sid, enc.candidates, enc.candidate_scores, sid1,
                                                         delta, config.codebook_size)
                    # unscored: replaced codes that a larger --candidates might have kept
                    settings[f"{mode}/{kind}+sticky {delta:g}"] = {
                        "sid": codes, "weights": enc.behavior_weights, "codes_kept": int(kept.sum()),
                        "codes_unscored": int(unscored.sum())}
        assert list(settings) == self.c.setting_names()
        return tok1, sid1, settings

    def run(self) -> dict:
        t_start = time.perf_counter()
        os.makedirs(self.c.output, exist_ok=True)
        with open(self.path(".gitignore"), "w") as f:
            f.write(GITIGNORE)
        content = self.content()
        beh = self.behavior()
        both = (self.pop1 > 0) & (self.pop2 > 0)
        per_seed_rows: dict[str, dict[int, dict]] = {n: {} for n in self.c.setting_names()}
        transitions = {}
        for seed in self.c.seeds():
            tok1, sid1, settings = self.fits(content, beh, seed)
            for name, s in settings.items():
                row = churn_table(sid1, s["sid"], self.pop2, both)
                row.update(codes_kept=s.get("codes_kept"), codes_unscored=s.get("codes_unscored"), collision_rate=float(
                    1 - np.unique(s["sid"], axis=0).shape[0] / s["sid"].shape[0]))
                if self.wants_downstream(name):
                    row["downstream"] = self.downstream(name, s["sid"], s["weights"], tok1, seed)
                    rk = self.ranking(name, s["sid"], s["weights"], tok1, seed)
                    row["downstream"]["gauc"] = {"valid": rk["valid"], "test": rk["test"]}
                    row["downstream"]["ranking_early_stopping"] = rk.get("early_stopping")
                per_seed_rows[name][seed] = row
            transitions[seed] = cold_to_warm(tok1, self.items(content, beh["night1"], self.pop1), self.c.deltas,
                                             min(self.c.candidates, tok1.codebook_size))
        rows = {}
        for name, runs in per_seed_rows.items():
            churn_only = [{k: v for k, v in r.items() if k != "downstream"} for r in runs.values()]
            row = mean_tree(churn_only)  # over the seeds' fits
            row["churn_std"] = float(np.std([r["churn"] for r in churn_only], ddof=1)) if len(runs) > 1 else 0.0
            row["both_nights"]["churn_std"] = (float(np.std([r["both_nights"]["churn"] for r in churn_only], ddof=1))
                                               if len(runs) > 1 else 0.0)
            row["churn_per_seed"] = {str(k): r["churn"] for k, r in runs.items()}
            if all("downstream" in r for r in runs.values()):
                row["downstream"] = summarize_seeds({k: r["downstream"] for k, r in runs.items()})
            rows[name] = row
        result = {
            "cold_to_warm": mean_tree(list(transitions.values())),
            "dataset": {"name": self.data.name, "users": self.data.num_users, "items": self.data.num_items,
                        "quick": self.c.quick},
            "holdout": self.c.holdout, "new_interaction_share": round(self.new_share, 4),
            "items_unseen_night1": int(((self.pop1 == 0) & (self.pop2 > 0)).sum()),
            "items_both_nights": int(both.sum()),
            # e_b rows night 1's SASRec left at their init and night 2's trains: behavior new that night too
            "items_first_trained_night2": int((~self.trained1 & self.trained2).sum()),
            "config": {"tokenizer": self.c.tokenizer, "tied": self.c.tied(), "modes": self.c.modes, "deltas": self.c.deltas, "candidates": self.c.candidates,
                       "downstream_modes": self.c.downstream_modes, "downstream_deltas": self.c.downstream_deltas,
                       "downstream_settings": self.c.downstream_settings,
                       "downstream_seeds": self.c.seeds(), "seeds_fit_tokenizers": True,
                       "sasrec": dataclasses.asdict(dataclasses.replace(self.c.sasrec, tied=self.c.tied())),
                       "budget": dataclasses.asdict(self.c.budget)},
            "settings": rows, "stage_seconds": self.timings,
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        }
        write_json(self.path("stability.json"), result)
        with open(self.path("stability.md"), "w") as f:
            f.write(render(result))
        plot(result, self.path("churn_vs_delta.png"))
        return result

    def wants_downstream(self, name: str) -> bool:
        """Every plain re-fit of a downstream mode, and its sticky variants at downstream_deltas
        (or exactly the settings listed in downstream_settings)."""
        if self.c.downstream_settings is not None:
            return name in self.c.downstream_settings
        mode, setting = name.split("/")
        if mode not in self.c.downstream_modes:
            return False
        if "+sticky " not in setting:
            return True
        return float(setting.split()[-1]) in self.c.downstream_deltas

    def _result_path(self, name: str, suffix: str, seed: int, ext: str = "json") -> str:
        """downstream/<setting><suffix>.<ext>: a sticky setting's file names its candidate count
        (other k, other SIDs); a seed other than the run's own seed is named too."""
        key = name.replace("/", "_").replace(" ", "_") + (f"_k{self.c.candidates}" if "+sticky" in name else "")
        key += "" if seed == self.c.seed else f"_seed{seed}"
        return self.path("downstream", f"{key}{suffix}.{ext}")

    def _cached_result(self, name: str, suffix: str, seed: int, fn) -> dict:
        """The cached result if there is one, else fn(checkpoint path) timed and written there
        (atomically; the training checkpoint is removed once the result is written)."""
        p = self._result_path(name, suffix, seed)
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
        t0 = time.perf_counter()
        ckpt = self._result_path(name, suffix, seed, "ckpt.pt")
        res = fn(ckpt)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(p, res)
        if os.path.exists(ckpt):
            os.remove(ckpt)
        return res

    def sid_table(self, sid: np.ndarray, weights: np.ndarray, tok):
        from sidserve.eval.sid_table import SIDTable
        from sidserve.tokenizers.config import BEHAVIOR

        w = np.ones(sid.shape, np.float32)
        # ADC-SID's R(e_b) where the evaluation reads it; every code at weight 1 otherwise (as the
        # evaluation reads ADC_EVAL and the residual baselines)
        if uses_sid_weights(self.c.tokenizer) and self.c.tokenizer not in RESIDUAL:
            w[:, [q["position"] for q in tok.sid_layout if q["group"] == BEHAVIOR]] = weights
        return SIDTable.build(sid, w)

    def ranking(self, name: str, sid: np.ndarray, weights: np.ndarray, tok, seed: int) -> dict:
        """The evaluation's ranker (AUC/GAUC over 99 sampled negatives, the evaluation's draws)
        trained on night 2 with these SIDs: validation and test GAUC (cached per setting)."""
        from sidserve.eval.config import EVAL_NEGATIVES_SEED, VALID_NEGATIVES_SEED
        from sidserve.eval.metrics import per_user_auc
        from sidserve.eval.ranking import (
            RankingConfig,
            evaluate_ranking,
            sample_negatives,
            score,
            train_ranker,
        )

        def run(ckpt):
            neg = {split: sample_negatives(np.random.default_rng(draws), seqs, self.data.num_items, 99)
                   for split, draws, seqs in (("test", EVAL_NEGATIVES_SEED, self.data.sequences),
                                             ("valid", VALID_NEGATIVES_SEED, [q[:-1] for q in self.data.sequences]))}
            c = RankingConfig(seed=seed, max_epochs=3 if self.c.quick else RankingConfig.max_epochs)
            v_hist, v_target = self.data.targets("valid")
            model, history = train_ranker(self.sid_table(sid, weights, tok), self.night2, c,
                                          valid=(v_hist, v_target, neg["valid"]), checkpoint=ckpt)
            res, per_user = {}, {}
            for split in ("valid", "test"):
                hist, targets = self.data.targets(split)
                scores = score(model, hist, np.concatenate([targets[:, None], neg[split]], axis=1))
                res[split] = evaluate_ranking(scores, targets, {})["all"]["gauc"]
                per_user[f"{split}_auc"] = per_user_auc(scores)
            write_npz(self._result_path(name, "_ranking", seed, "npz"), **per_user)  # paired tests
            res.update(early_stopping=model.early_stopping, history=history)
            return res

        return self._cached_result(name, "_ranking", seed, run)

    def downstream(self, name: str, sid: np.ndarray, weights: np.ndarray, tok, seed: int) -> dict:
        """SID-SASRec on night 2's training split with these SIDs: validation and test
        Recall@10 / NDCG@10 (cached per setting)."""
        from sidserve.eval.sasrec import SIDItems, evaluate_sasrec, train_sasrec

        def run(ckpt):
            c = dataclasses.replace(self.c.sasrec, seed=seed, loss="ce", tied=True)
            torch.manual_seed(seed)  # SIDItems' init: from the seed, not from what ran before
            model, history = train_sasrec(self.night2, self.data.num_items, c, valid=self.data.targets("valid"),
                                          items=SIDItems(self.sid_table(sid, weights, tok), c.hidden_dim),
                                          checkpoint=ckpt)
            res, per_user = {}, {}
            for split in ("valid", "test"):
                users = evaluate_sasrec(model, *self.data.targets(split), ks=(10,), per_user=True)
                res[split] = {k: float(v.mean()) for k, v in users.items()}
                per_user.update({f"{split}_{k}": v for k, v in users.items()})
            write_npz(self._result_path(name, "", seed, "npz"), **per_user)  # paired tests
            res.update(early_stopping=model.early_stopping, history=history)
            return res

        return self._cached_result(name, "", seed, run)

