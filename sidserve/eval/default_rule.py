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

# the library's default tokenizer (what ``sidserve train`` fits with no --tokenizer), as the
# evaluation names it; ``sidserve select`` keeps it unless a candidate clearly beats it
LIBRARY_DEFAULT = "adc_sid_cold_consistency"
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


@dataclass
class SelectResult:
    chosen: str  # the tokenizer to use on this catalog
    runner_up: str | None  # the next one (the default when another was chosen)
    default: str  # the library default it was compared against
    # candidate -> (task, metric, group) -> {"diff": mean paired difference, "se": its standard
    # error over seeds (None with one seed), "beats": diff > 2 se}
    cells: dict[str, dict[tuple, dict]] = field(default_factory=dict)
    reason: str = ""


def choose_for_catalog(figures: dict[str, dict[tuple, list[float]]], default: str = LIBRARY_DEFAULT,
                       margin_se: float = 2.0) -> SelectResult:
    """``sidserve select``'s rule (issue 48): keep ``default`` unless another candidate beats it
    on **every** cell of the default's rule (CELLS, validation) by more than ``margin_se``
    standard errors of the paired difference (per seed: candidate - default; se =
    std(ddof=1) / sqrt(seeds)). Among several that do, the one whose smallest margin (in
    standard errors) is largest. With one seed there is no error estimate: nothing can beat
    the default. figures: candidate -> {(task, metric, group): [value per seed]}, seeds in the
    same order for every candidate."""
    if default not in figures:
        raise ValueError(f"the default {default!r} must be among the candidates, got {sorted(figures)}")
    seeds = {len(v) for cells in figures.values() for v in cells.values()}
    if len(seeds) != 1:
        raise ValueError(f"every candidate and cell needs the same number of seeds, got {sorted(seeds)}")
    out, margins = {}, {}
    for name, cells in figures.items():
        if name == default:
            continue
        per = {}
        for cell in CELLS:
            d = np.asarray(cells[cell], np.float64) - np.asarray(figures[default][cell], np.float64)
            se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else None
            diff = float(d.mean())
            if se:
                in_se = diff / se
            else:  # no spread (or one seed): only the sign is known
                in_se = math.copysign(math.inf, diff) if diff else 0.0
            per[cell] = {"diff": diff, "se": se, "in_se": in_se, "beats": se is not None and diff > margin_se * se}
        out[name] = per
        margins[name] = min(c["in_se"] for c in per.values())
    winners = [n for n, per in out.items() if all(c["beats"] for c in per.values())]
    ranked = sorted(out, key=lambda n: (-margins[n], n))
    if winners:
        chosen = max(sorted(winners), key=lambda n: margins[n])
        reason = (f"{chosen} beats the default {default} on every cell by more than {margin_se:g} standard errors "
                  f"of the paired difference (smallest margin {margins[chosen]:.1f} se)")
        return SelectResult(chosen, default, default, out, reason)
    n_seeds = seeds.pop()
    why = ("one seed gives no error estimate, so nothing can beat it" if n_seeds < 2 else
           f"no candidate beats it on every cell by more than {margin_se:g} standard errors")
    return SelectResult(default, ranked[0] if ranked else None, default, out, f"the default {default} is kept: {why}")
