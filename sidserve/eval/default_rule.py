"""The rule that names the library's default tokenizer (issue 47; docs/evaluation.md,
"How the default is chosen"), written down before any candidate's test figure is read.

Input: per regime (e.g. Beauty, weak-content Beauty), per candidate, the **validation**
figures of each cell, one value per seed. A cell is (task metric, group): SID-SASRec
NDCG@10 and ranking GAUC, each over all users and over long-tail users.

For each regime x cell, ``best`` is the candidate with the highest seed mean; a candidate's
relative shortfall there is ``(best - mean) / best``, counted as 0 when the gap is under one
standard error of the difference of the two seed means (``sqrt(se_best^2 + se_cand^2)``,
``se = std(ddof=1) / sqrt(seeds)``; with one seed there is no error estimate and every gap
counts). A candidate's score is its **worst** shortfall over every regime x cell; the default
is the eligible candidate with the smallest score, ties (within 1e-12) going to the lower
nightly churn. Every cell is read from validation: test is read once, afterwards, for the
chosen configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# (stage task, metric, group) of every cell the rule reads
CELLS = (("sid_sasrec", "ndcg@10", "all"), ("sid_sasrec", "ndcg@10", "tail"),
         ("ranking", "gauc", "all"), ("ranking", "gauc", "tail"))


@dataclass
class RuleResult:
    default: str  # the chosen candidate
    scores: dict[str, float]  # candidate -> worst relative shortfall (0 = best or tied everywhere)
    # (regime, task, metric, group) -> {"best": name, "shortfall": {candidate: float}}
    cells: dict[tuple, dict] = field(default_factory=dict)
    ineligible: dict[str, str] = field(default_factory=dict)  # candidate -> why it cannot be the default


def _se(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def choose_default(figures: dict[str, dict[str, dict[tuple, list[float]]]], *,
                   churn: dict[str, float] | None = None,
                   ineligible: dict[str, str] | None = None) -> RuleResult:
    """figures: regime -> candidate -> {(task, metric, group): [value per seed]}, validation.

    churn: candidate -> its nightly churn (ties go to the lower; missing = +inf).
    ineligible: candidate -> the reason it fails the floor's other items (it is scored, so
    the report can show where it stands, but never chosen)."""
    churn, ineligible = dict(churn or {}), dict(ineligible or {})
    if not figures:
        raise ValueError("figures must hold at least one regime")
    names = None
    for regime, per in figures.items():
        if names is None:
            names = set(per)
        elif set(per) != names:
            raise ValueError(f"regime {regime!r} has candidates {sorted(per)}, another has {sorted(names)}: "
                             f"every candidate must be measured in every regime")
        for name, cells in per.items():
            missing = [c for c in CELLS if not cells.get(c)]
            if missing:
                raise ValueError(f"candidate {name!r} in regime {regime!r} has no validation figures for {missing}")
    if not names:
        raise ValueError("figures hold no candidate")
    scores = {n: 0.0 for n in sorted(names)}
    out_cells = {}
    for regime, per in figures.items():
        for cell in CELLS:
            means = {n: float(np.mean(per[n][cell])) for n in per}
            best = max(sorted(means), key=means.get)
            if means[best] <= 0:
                raise ValueError(f"the best {cell} in regime {regime!r} is {means[best]}: a relative shortfall "
                                 f"needs a positive best")
            se_best = _se(per[best][cell])
            short = {}
            for n in per:
                gap = means[best] - means[n]
                noise = math.hypot(se_best, _se(per[n][cell]))
                short[n] = 0.0 if gap < noise or gap <= 0 else gap / means[best]
                scores[n] = max(scores[n], short[n])
            out_cells[(regime, *cell)] = {"best": best, "shortfall": short}
    eligible = [n for n in scores if n not in ineligible]
    if not eligible:
        raise ValueError(f"no eligible candidate: {ineligible}")
    lowest = min(scores[n] for n in eligible)
    tied = [n for n in eligible if scores[n] <= lowest + 1e-12]
    default = min(tied, key=lambda n: (churn.get(n, math.inf), n))
    return RuleResult(default=default, scores=scores, cells=out_cells, ineligible=ineligible)


def figures_from_results(results: dict, candidates: list[str] | None = None) -> dict[str, dict[tuple, list[float]]]:
    """One regime's cells from an evaluation's results.json (``valid_groups``, recorded by
    every downstream stage since issue 47); candidates default to every tokenizer reported."""
    tok = results["tokenizers"]
    out = {}
    for name in candidates or list(tok):
        if name not in tok:
            raise ValueError(f"candidate {name!r} is not in the results (reported: {sorted(tok)})")
        cells = {}
        for task, metric, group in CELLS:
            vg = tok[name][task].get("valid_groups")
            if vg is None:
                raise ValueError(f"{name!r}'s {task} stages predate per-group validation figures; rerun them")
            cells[(task, metric, group)] = list(vg[group][metric]["values"])
        out[name] = cells
    return out
