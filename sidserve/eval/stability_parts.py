"""Parts of the two-night simulation (sidserve/eval/stability.py) kept in their own file:

* ``residual_fits``: the fits for residual k-means (issue 47, item 3): no warm re-fit exists
  for k-means, so night 2 is a cold re-fit or night 1's model as it is (a refresh without
  --refit), the latter also with sticky assignment of whole SIDs (the assignment job's rule:
  sidserve.jobs.assign.sticky.trim_paths / sticky_from_paths);
* ``run_cli``: ``sidserve stability``'s arguments to a run;
* ``adopt_nights``: another run's night tables (``--behavior-from``), when it trained the same
  SASRecs on the same data, so a second tokenizer is measured on the same nights without
  training them again."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np


def residual_fits(run, content: dict, beh: dict, seed: int) -> tuple[object, np.ndarray, dict[str, dict]]:
    """``fits`` for residual k-means: night 1's fit, night 2's cold re-fit, and night 1's
    model on night 2's inputs ("none", a refresh without --refit), plain and with sticky
    assignment of whole SIDs at each delta (the assignment job's path rule)."""
    from sidserve.eval.tokenizers import fit_tokenizer
    from sidserve.items import coerce_items
    from sidserve.jobs.assign.sticky import sticky_from_paths, trim_paths
    from sidserve.tokenizers.base import BaseTokenizer

    tag = "" if seed == run.c.seed else f"-seed{seed}"
    budget = dataclasses.replace(run.c.budget, seed=seed)

    def fitted(name, night_items):
        d = run.path("tokenizers", name + tag)
        if not os.path.exists(os.path.join(d, "manifest.json")):
            t0 = time.perf_counter()
            dims = {m: content[m].shape[1] for m in ("text", "meta")}
            tk = fit_tokenizer(run.c.tokenizer, night_items, dims, beh["night1"].shape[1], budget)
            tk.tokenizer.save_pretrained(d, overwrite=True)
            run.timings[f"fit {name}{tag}"] = round(time.perf_counter() - t0, 1)
        return BaseTokenizer.from_pretrained(d)

    def as_dict(emb, popularity):  # what fit_tokenizer reads: cold items (no interaction) without e_b
        seen = popularity > 0
        return {"item_id": np.arange(1, run.data.num_items + 1), "text_emb": content["text"],
                "meta_emb": content["meta"], "popularity": popularity.astype(np.float64),
                "behavior_emb": [row if s else None for row, s in zip(emb.astype(np.float32), seen)]}

    items1 = as_dict(beh["night1"], run.pop1)
    tok1 = fitted("night1", items1)
    sid1 = tok1.encode(items1).sid
    k = min(run.c.candidates, tok1.codebook_size)
    settings: dict[str, dict] = {}
    for mode in run.c.modes:
        items2 = as_dict(beh[mode], run.pop2)
        cold = fitted(f"{mode}-cold", items2).encode(items2)
        settings[f"{mode}/cold"] = {"sid": cold.sid, "weights": cold.behavior_weights}
        enc = tok1.encode(items2, candidates=k)
        settings[f"{mode}/none"] = {"sid": enc.sid, "weights": enc.behavior_weights}
        for delta in run.c.deltas:
            codes, counts = trim_paths(enc.paths, enc.path_scores, delta)
            sid, kept, unscored = sticky_from_paths(enc.sid, codes, counts, k, sid1.astype(np.int64))
            settings[f"{mode}/none+sticky {delta:g}"] = {
                "sid": sid, "weights": enc.behavior_weights, "codes_kept": int(kept.sum()),
                "codes_unscored": int(unscored.sum())}
        # the same rule with the previous SID scored directly (what an encoder handed each item's
        # previous SID can do): kept where it explains at most delta less of the item's input
        # energy than tonight's SID, whether or not the beam found it
        x = tok1.features(coerce_items(items2, tok1.config)).astype(np.float64)
        cent = tok1.centroids_.astype(np.float64)
        energy = np.maximum((x * x).sum(1), 1e-300)

        def score(p, x=x, cent=cent, energy=energy):
            r = x - sum(cent[lv][p[:, lv]] for lv in range(p.shape[1]))
            return -(r * r).sum(1) / energy
        gap = score(enc.sid.astype(np.int64)) - score(sid1.astype(np.int64))
        moved = (sid1 != enc.sid).any(1)
        for delta in run.c.deltas:
            keep = (gap <= delta) & moved
            settings[f"{mode}/none+direct {delta:g}"] = {
                "sid": np.where(keep[:, None], sid1, enc.sid).astype(np.int32), "weights": enc.behavior_weights,
                "codes_kept": int((keep[:, None] & (sid1 != enc.sid)).sum()), "codes_unscored": 0}
    assert list(settings) == run.c.setting_names()
    return tok1, sid1, settings


# what the nights' SASRecs depend on (run_config.json keys): another run's tables are reused
# only when all of them agree (the tokenizer's table, tied or untied, is compared separately)
NIGHT_KEYS = ("data", "quick", "quick_users", "holdout", "seed", "sasrec", "harness", "stability")


def adopt_nights(run, key: dict, tied: bool) -> None:
    """Copy ``run.c.behavior_from``'s night tables (night1, and each mode's) into this run's
    behavior/ where it has none, after checking that that run trained the same SASRecs."""
    src = run.c.behavior_from
    with open(os.path.join(src, "run_config.json")) as f:
        theirs = json.load(f)
    differ = [k for k in NIGHT_KEYS if theirs.get(k) != key.get(k)]
    their_table = theirs.get("tokenizer", {}).get("embedding")
    if differ or (their_table == "tied") != tied:
        raise ValueError(f"--behavior-from {src}: its nights were trained otherwise ({differ or 'tied/untied table'} "
                         "differ); run without it")
    os.makedirs(run.path("behavior"), exist_ok=True)
    for name in ["night1", *run.c.modes]:
        name = "scratch" if name == "procrustes" else name
        have, there = run.path("behavior", f"{name}.npz"), os.path.join(src, "behavior", f"{name}.npz")
        if not os.path.exists(have):
            if not os.path.exists(there):
                raise ValueError(f"--behavior-from {src} has no behavior/{name}.npz")
            shutil.copy(there, have)


def run_cli(args) -> int:
    """``sidserve stability`` / jobs/stability.py: the arguments -> StabilityConfig -> the run."""
    from sidserve.eval.stability import TwoNights
    from sidserve.eval.stability_config import StabilityConfig
    from sidserve.eval.stability_report import render
    from sidserve.runner import run_job

    def body():
        make = StabilityConfig.quick_profile if args.quick else StabilityConfig
        c = make(data=args.data, output=args.output, holdout=args.holdout,
                 modes=args.modes.split(","), deltas=[float(x) for x in args.deltas.split(",")],
                 downstream_modes=[m for m in args.downstream_modes.split(",") if m],
                 downstream_deltas=[float(x) for x in args.downstream_deltas.split(",") if x],
                 candidates=args.candidates,
                 downstream_settings=[x.strip() for x in args.downstream_settings.split(",")]
                 if args.downstream_settings else None,
                 downstream_seeds=[int(x) for x in args.downstream_seeds.split(",")] if args.downstream_seeds else None,
                 content_from=args.content_from, tokenizer=args.tokenizer,
                 behavior_from=getattr(args, "behavior_from", None))
        r = TwoNights(c).run()
        print(render(r))

    return run_job(body)
