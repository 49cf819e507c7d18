"""Aggregate the cached stage outputs into results.json, report.md and plots/.

Every figure is read from the stage files, so a report written after a resumed run
covers all stages, cached or not (wall time per stage included). Comparisons between
tokenizers carry a paired bootstrap over test users beside the seed spread.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import numpy as np

from sidserve.eval.config import TASKS, headline, read_json, valid_metric
from sidserve.eval.metrics import mean_std, paired_bootstrap
from sidserve.eval.plots import write_plots
from sidserve.eval.tokenizers import ABLATIONS, LABELS
from sidserve.tokenizers.adc_sid.regulation.overlaps import find_overlaps

RETRIEVAL_METRICS = ["recall@5", "recall@10", "recall@50", "ndcg@5", "ndcg@10", "ndcg@50"]
RANKING_METRICS = ["auc", "gauc"]
TASK_METRICS = {"sid_sasrec": RETRIEVAL_METRICS, "retrieval": RETRIEVAL_METRICS, "ranking": RANKING_METRICS}
GROUPS = ["all", "head", "tail"]
# (task, metric in results, per-user array in the stage's .npz): the comparisons tested
SIGNIFICANCE = [("sid_sasrec", "ndcg@10", "ndcg@10"), ("retrieval", "recall@10", "recall@10"),
                ("retrieval", "ndcg@10", "ndcg@10"), ("ranking", "gauc", "auc")]
# the validation figures every stage records at its kept epoch (what may be compared to choose)
VALID_METRICS = {"sid_sasrec": ["recall@10", "ndcg@10"], "retrieval": ["recall@10", "ndcg@10"], "ranking": ["gauc"]}
# published figures on Beauty's leave-one-out split, full-catalog ranking, for orientation
ANCHORS = {
    "sasrec_ce": {"recall@10": 0.0688, "source": "SASRec with full-softmax CE (published; ~0.08 in a RecBole run)"},
    "sasrec_bce": {"recall@10": 0.0605, "source": "SASRec (BCE) in the TIGER paper's table"},
    "tiger": {"recall@5": 0.0454, "recall@10": 0.0648, "ndcg@5": 0.0321, "ndcg@10": 0.0384,
              "source": "TIGER paper (RQ-VAE SIDs, 4+4-layer T5, d 128)"},
}


def seeds_present(ev, name: str, task: str) -> list[int]:
    files = glob.glob(ev.path("downstream", name, f"{task}_seed*.json"))
    return sorted(int(re.search(r"_seed(\d+)\.json$", f).group(1)) for f in files)


def pending(ev) -> list[str]:
    """Tokenizers of the config without a fitted tokenizer or any finished downstream seed."""
    return [n for n in ev.c.tokenizers
            if not os.path.exists(ev.path("tokenizers", n, "quantization.json"))
            or not all(seeds_present(ev, n, t) for t in ev.c.tasks)]


def collect(ev) -> dict:
    out = {}
    waiting = pending(ev)
    for name in ev.c.tokenizers:
        if name in waiting:
            continue
        ev.check_spec(name, ev.path("tokenizers", name, "quantization.json"))  # never report a stale variant
        entry = {"label": LABELS[name], "quantization": read_json(ev.path("tokenizers", name, "quantization.json")),
                 "spec": ev.spec(name)}
        # near collisions (issue 8), from the SIDs themselves so cached stages get it too
        sid = np.load(ev.path("tokenizers", name, "sids.npz"))["sid"]
        entry["quantization"]["items_within_hamming_1"] = find_overlaps(sid, 1, max_group_pairs=10_000).overlap_rate
        # the seeds every task has finished (a resumed run may be part-way through one)
        seeds = sorted(set.intersection(*(set(seeds_present(ev, name, t)) for t in ev.c.tasks)))
        entry["seeds"] = seeds
        for task in ev.c.tasks:  # the tasks this run trains (--tasks)
            metrics = TASK_METRICS[task]
            for s in seeds:
                ev.check_spec(name, ev.stage_path(name, task, s))
            runs = [read_json(ev.stage_path(name, task, s)) for s in seeds]
            t = {}
            for g in GROUPS:
                t[g] = {m: dict(mean_std([r[g][m] for r in runs]), values=[r[g][m] for r in runs]) for m in metrics}
                t[g]["users"] = runs[0][g]["users"]
            t["valid"] = {m: dict(mean_std(v), values=v)
                          for m in VALID_METRICS[task] for v in [[valid_metric(r, m) for r in runs]]}
            if all("valid_groups" in r for r in runs):  # stages since issue 47: validation per group
                t["valid_groups"] = {g: {m: dict(mean_std(v), values=v) for m in VALID_METRICS[task]
                                         for v in [[r["valid_groups"][g][m] for r in runs]]} for g in GROUPS}
            t["best_epoch"] = [r["early_stopping"]["best_epoch"] for r in runs]
            t["epochs_run"] = [r["early_stopping"]["epochs_run"] for r in runs]
            t["stage_seconds"] = [r.get("stage_seconds") for r in runs]
            if task == "retrieval":
                t["valid_sid_share"] = float(np.mean([r["valid_sid_share"] for r in runs]))
                t["generate_seconds"] = [r["generate_seconds"] for r in runs]
            entry[task] = t
        out[name] = entry
    return out


def per_user(ev, name: str, task: str, key: str, seeds: list[int]) -> np.ndarray:
    """(U,) the per-user test metric of ``name``, averaged over ``seeds``."""
    arrs = [np.load(ev.stage_path(name, task, s, "npz"))[key] for s in seeds]
    return np.mean(arrs, axis=0)


def significance(ev, tok: dict) -> list[dict]:
    """Paired bootstrap of each tokenizer against ADC-SID (when evaluated) and against the
    best tokenizer of each tested metric, the best by its **validation** mean (the test
    figures compared here do not choose what they are compared with)."""
    rows = []
    for task, metric, key in SIGNIFICANCE:
        if task not in ev.c.tasks:
            continue
        means = {n: e[task]["valid"][metric]["mean"] for n, e in tok.items()}
        best = max(means, key=means.get)
        refs = [r for r in dict.fromkeys(["adc_sid", best]) if r in tok]
        for ref in refs:
            b = per_user(ev, ref, task, key, tok[ref]["seeds"])
            for name in tok:
                if name == ref or (ref != refs[0] and name == refs[0]):  # self, or the mirror of a row above
                    continue
                bs = paired_bootstrap(per_user(ev, name, task, key, tok[name]["seeds"]), b,
                                      num_samples=ev.c.bootstrap_samples,
                                      seed=0)
                rows.append({"task": task, "metric": metric, "a": name, "b": ref, "b_is_best": ref == best,
                             "a_std": tok[name][task]["all"][metric]["std"],
                             "b_std": tok[ref][task]["all"][metric]["std"], **bs})
    return rows


def ablations(tok: dict, tasks=TASKS) -> list[dict]:
    """The paper's Table 3 read on the **validation** split: each ablation's headline metrics
    (the kept epoch of each model, mean over its seeds) against the full model's.

    ``spreads`` is the gap in units of the full model's seed spread (sample std; None with one
    seed), the unit the run's rule for extra seeds uses; ``loses_all``: below the full model on
    every headline metric, the direction Table 3 reports. Test figures are not read here."""
    if "adc_sid" not in tok:
        return []
    full = tok["adc_sid"]
    rows = []
    for name in ABLATIONS:
        if name not in tok:
            continue
        e = tok[name]
        cells = {}
        for task, metric in headline(tasks).items():
            f, a = full[task]["valid"][metric], e[task]["valid"][metric]
            diff = a["mean"] - f["mean"]
            cells[task] = {"metric": metric, "full": f["mean"], "full_std": f["std"], "ablation": a["mean"],
                           "ablation_std": a["std"], "diff": diff,
                           "spreads": diff / f["std"] if f["std"] else None}
        rows.append({"name": name, "seeds": e["seeds"], "full_seeds": full["seeds"], "tasks": cells,
                     "loses_all": all(c["diff"] < 0 for c in cells.values())})
    return rows


def stage_seconds(ev) -> dict[str, float]:
    """Seconds per stage kind summed over every stage file of the run (cached or not)."""
    total: dict[str, float] = {}

    def add(kind, path):
        if os.path.exists(path):
            s = read_json(path).get("stage_seconds")
            if s is not None:
                total[kind] = total.get(kind, 0.0) + s
    add("embeddings", ev.path("embeddings", "done.json"))
    for v in ev.c.sasrec_variants:
        add("sasrec", ev.path("sasrec", v, "report.json"))
    for name in ev.c.tokenizers:
        add("tokenizers", ev.path("tokenizers", name, "quantization.json"))
        for task in TASK_METRICS:
            for f in glob.glob(ev.path("downstream", name, f"{task}_seed*.json")):
                add(task, f)
    return {k: round(v, 1) for k, v in total.items()}


def write_report(ev, wall_seconds: float) -> dict:
    tok = collect(ev)
    waiting = pending(ev)
    sasrec = {v: read_json(ev.path("sasrec", v, "report.json")) for v in ev.c.sasrec_variants
              if os.path.exists(ev.path("sasrec", v, "report.json"))}
    d = ev.data
    secs = stage_seconds(ev)
    results = {
        "command": ev.c.command,
        "dataset": {"name": d.name, "users": d.num_users, "items": d.num_items,
                    "interactions": d.num_interactions, "quick": ev.c.quick, "content": ev.c.content},
        "seeds": list(ev.c.seeds),
        "config": {"sasrec": dataclasses.asdict(ev.c.sasrec), "budget": dataclasses.asdict(ev.c.budget),
                   "retrieval": dataclasses.asdict(ev.c.retrieval), "ranking": dataclasses.asdict(ev.c.ranking),
                   "head_tail_share": ev.c.head_tail_share, "ranking_negatives": ev.c.ranking_negatives,
                   "sasrec_variants": ev.c.sasrec_variants, "behavior_embedding": ev.c.behavior_embedding,
                   "sid_sasrec_dedup": ev.c.sid_sasrec_dedup, "bootstrap_samples": ev.c.bootstrap_samples,
                   "behavior_source": ev.c.behavior_source},
        "environment": ev.environment(),
        "anchors": ANCHORS,
        "sasrec": {v: {k: r[k] for k in ("test", "valid", "early_stopping", "tables", "tied", "stage_seconds")}
                   for v, r in sasrec.items()},
        "tokenizers": tok,
        "pending": waiting,
        "significance": significance(ev, tok) if tok else [],
        "ablations": ablations(tok, ev.c.tasks),
        "tasks": list(ev.c.tasks),
        "stage_seconds_total": secs,
        "compute_seconds_total": round(sum(secs.values()), 1),
        "stage_seconds_this_invocation": {k: round(v, 1) for k, v in ev.timer.stages.items()},
        "wall_seconds_this_invocation": round(wall_seconds, 1),
    }
    with open(ev.path("results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if getattr(ev, "withhold_test", False):
        with open(ev.path("report.md"), "w") as f:
            f.write("# Evaluation report withheld\n\nThis run was made with `--withhold-test`: its figures, "
                    "test included, are in results.json, kept for the one final read of a study that chooses "
                    f"on validation (docs/evaluation.md). Stages pending: {', '.join(waiting) or 'none'}.\n")
        return results
    plots = write_plots(ev, tok, sasrec) if tok else []
    with open(ev.path("report.md"), "w") as f:
        f.write(_markdown(results, plots))
    return results


def _fmt(ms: dict, digits: int = 4) -> str:
    """mean ± sample std; the mean alone for a single seed (its spread is unknown, not 0)."""
    if ms["std"] is None:
        return f"{ms['mean']:.{digits}f}"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _std(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _cells(e: dict, task: str, g: str, metrics) -> list[str]:
    """Table cells of one task's metrics; '-' for a task the run did not train (--tasks)."""
    return [_fmt(e[task][g][m]) if task in e else "-" for m in metrics]


def _markdown(r: dict, plots: list[str]) -> str:
    tok = r["tokenizers"]
    tasks = r.get("tasks", list(TASKS))
    ds = r["dataset"]
    L = []
    weak = " (weak content: three title words and the first category)" if ds.get("content") == "weak" else ""
    L.append(f"# SID evaluation on {ds['name']}{weak}\n")
    L.append(f"{ds['users']:,} users, {ds['items']:,} items, {ds['interactions']:,} interactions"
             f"{' (--quick subsample: a smoke test, not a measurement)' if ds['quick'] else ''}. "
             f"Leave-one-out split; seeds {r['seeds']} (seed k: the tokenizer fitted with seed k and its "
             f"downstream models trained with seed k, so the spread holds both; LETTER's published SIDs are one "
             f"table; mean ± sample std over the seeds each tokenizer ran, listed per row; a row of one seed shows its mean alone; the quantization "
             f"figures are the first seed's fit). Every downstream model stops early on the validation split "
             f"and restores its best epoch; test is read once per trained model.\n")
    L.append(f"Command: `{r['command']}`\n")
    if tasks != list(TASKS):
        L.append(f"Downstream tasks trained: {', '.join(tasks)} (`--tasks`); the others' columns show '-'.\n")
    if r["pending"]:
        L.append(f"**Interim report**: not finished yet (no fitted tokenizer or no completed seed): "
                 f"{', '.join(r['pending'])}. Rows below have the seeds listed in their `seeds` column.\n")

    L.append("## Behavioral embeddings: ID SASRec\n")
    default = r["config"]["behavior_embedding"]
    own = [f"{e['label']} (`{e['spec']['embedding']}`"
           + "".join(f", {k}={v}" for k, v in e["spec"]["overrides"].items() if k == "richness_signal")
           + (", its codes read at weight 1 downstream" if not e["spec"]["sid_weights"] else "") + ")"
           for e in r["tokenizers"].values()
           if e["spec"]["embedding"] not in (None, default) or not e["spec"]["sid_weights"]]
    if r["config"].get("behavior_source") == "catalog":
        L.append("**e_b is the catalog's own behavior_emb** (`sidserve select`), for every tokenizer; the SASRec "
                 "tables below are the ceiling reference only.\n")
    L.append(f"The tokenizers receive `{default}` as e_b"
             + (f", except {'; '.join(own)}" if own else "") + ". Full-catalog ranking, "
             f"history items excluded. Anchors: {ANCHORS['sasrec_ce']['source']}: R@10 "
             f"{ANCHORS['sasrec_ce']['recall@10']}; {ANCHORS['sasrec_bce']['source']}: "
             f"{ANCHORS['sasrec_bce']['recall@10']}.\n")
    L.append("| variant | valid R@10 | valid N@10 | test R@10 | test N@10 | test R@50 | best epoch / run "
             "| Spearman(norm, pop.) input table | output table | seconds |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for v, e in r["sasrec"].items():
        es, t = e["early_stopping"], e["tables"]
        out_s = "= input (tied)" if e["tied"] else f"{t['output']['norm_popularity_spearman']:.3f}"
        L.append(f"| {v} | {e['valid']['recall@10']:.4f} | {e['valid']['ndcg@10']:.4f} | {e['test']['recall@10']:.4f} | "
                 f"{e['test']['ndcg@10']:.4f} | {e['test']['recall@50']:.4f} | {es['best_epoch']} / {es['epochs_run']} | "
                 f"{t['input']['norm_popularity_spearman']:.3f} | {out_s} | {e.get('stage_seconds', 0):.0f} |")
    L.append("")

    if not tok:
        return "\n".join(L)
    L.append("## Quantization\n")
    L.append("| tokenizer | K | L | recon | entropy | utilisation | collision rate | items sharing a SID "
             "| items within Hamming 1 |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for e in tok.values():
        q = e["quantization"]
        recon = f"{q['recon']:.4f}" if "recon" in q else "n/a"
        L.append(f"| {e['label']} | {q['codebook_size']} | {q['sid_length']} | {recon} | {q['entropy_mean']:.4f} | "
                 f"{q['utilisation_mean']:.4f} | {q['collision_rate']:.4f} | {q['items_sharing_sid']:.4f} | "
                 f"{q['items_within_hamming_1']:.4f} |")
    L.append("\nrecon is each tokenizer's own reconstruction MSE per input element: ADC-SID over its "
             "modality embeddings, the baselines over their concatenated inputs; it is comparable "
             "within a family, not across. Entropy is per position in nats (max ln K).\n")

    gated = {n: e for n, e in tok.items() if "gate_zero_share" in e["quantization"]}
    if gated:
        L.append("**Behavioral gates** (ADC-SID variants; items with behavior): share of gate outputs "
                 "that are 0, mean R(e_b) per behavioral position, and at the last training epoch the "
                 "realised gate sparsity against its target and the share of items whose alignment "
                 "weight w exceeds 0.5.\n")
        L.append("| tokenizer | gates at 0 | mean R(e_b) per position | sparsity / target (last epoch) "
                 "| w > 0.5 |")
        L.append("|---|---|---|---|---|")
        for e in gated.values():
            q = e["quantization"]
            last = q.get("last_epoch", {})
            sp = (f"{last['gate_sparsity']:.3f} / {last['sparsity_target']:.3f}"
                  if "gate_sparsity" in last and "sparsity_target" in last else "n/a")
            w = f"{last['align_w_above_half']:.3f}" if "align_w_above_half" in last else "n/a"
            means = ", ".join(f"{v:.3f}" for v in q.get("behavior_weight_mean_per_position", []))
            L.append(f"| {e['label']} | {q['gate_zero_share']:.3f} | {means} | {sp} | {w} |")
        L.append("")

    ceiling = ", ".join(f"{v} R@10 {e['test']['recall@10']:.4f} / N@10 {e['test']['ndcg@10']:.4f}"
                        for v, e in r["sasrec"].items())
    for g, title in (("all", "all test users"), ("head", "head items (top 25% by popularity)"),
                     ("tail", "long-tail items (bottom 25%)")):
        users = next(iter(tok.values()))[tasks[0]][g]["users"]
        L.append(f"## Downstream, {title} ({users:,} users)\n")
        if g == "all":
            L.append(f"SID-SASRec: SASRec whose item vectors are sums of SID code embeddings; its ceiling "
                     f"is the ID SASRec ({ceiling}). Retrieval anchor: {ANCHORS['tiger']['source']} "
                     f"R@10 {ANCHORS['tiger']['recall@10']} / N@10 {ANCHORS['tiger']['ndcg@10']}.\n")
        L.append("| tokenizer | seeds | SID-SASRec R@10 | SID-SASRec N@10 | retrieval R@5 | R@10 | R@50 | N@10 "
                 "| N@50 | AUC | GAUC |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for e in tok.values():
            cells = _cells(e, "sid_sasrec", g, ("recall@10", "ndcg@10"))
            cells += _cells(e, "retrieval", g, ("recall@5", "recall@10", "recall@50", "ndcg@10", "ndcg@50"))
            cells += _cells(e, "ranking", g, RANKING_METRICS)
            L.append(f"| {e['label']} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
        L.append("")

    L.append("## Downstream, validation (the kept epoch of each model)\n")
    L.append("What choices may read: the validation split's figures at the epoch early stopping kept "
             f"(retrieval: {r['config']['retrieval']['valid_users']:,} sampled validation users).\n")
    L.append("| tokenizer | seeds | SID-SASRec R@10 | SID-SASRec N@10 | retrieval R@10 | retrieval N@10 | GAUC |")
    L.append("|---|---|---|---|---|---|---|")
    for e in tok.values():
        cells = [c for t in VALID_METRICS for c in _cells(e, t, "valid", VALID_METRICS[t])]
        L.append(f"| {e['label']} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    L.append("")

    if r.get("ablations"):
        L += _ablation_markdown(r["ablations"], tok, tasks)

    L.append("## Significance (paired bootstrap over test users)\n")
    L.append(f"diff = mean(A) - mean(B) of the per-user metric (each tokenizer's seeds averaged per user), "
             f"95% percentile interval of {r['config']['bootstrap_samples']} resamples of users, two-sided p. "
             f"GAUC is the mean per-user AUC (one positive, the same number of negatives per user). "
             f"B is ADC-SID or the best tokenizer on that metric by its validation mean (marked *). "
             f"Seed spreads beside it.\n")
    L.append("| task | metric | A | B | diff | 95% CI | p | std A | std B |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for s in r["significance"]:
        L.append(f"| {s['task']} | {s['metric']} | {tok[s['a']]['label']} | {tok[s['b']]['label']}"
                 f"{' *' if s['b_is_best'] else ''} | {s['diff']:+.4f} | [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}] | "
                 f"{s['p_value']:.3g} | {_std(s['a_std'])} | {_std(s['b_std'])} |")
    L.append("")

    L.append("## Training to convergence\n")
    L.append("Best epoch (0-based) / epochs run per seed; the run stops after `patience` epochs without a "
             "better validation metric (SID-SASRec: NDCG@10; retrieval: "
             f"{r['config']['retrieval']['valid_metric']} on {r['config']['retrieval']['valid_users']} validation "
             "users; ranking: GAUC).\n")
    L.append("| tokenizer | SID-SASRec | retrieval | ranking | retrieval s / run | generate s |")
    L.append("|---|---|---|---|---|---|")
    for e in tok.values():
        cells = [", ".join(f"{b}/{n}" for b, n in zip(e[t]["best_epoch"], e[t]["epochs_run"])) if t in e else "-"
                 for t in TASK_METRICS]
        if "retrieval" in e:
            rs = [s for s in e["retrieval"]["stage_seconds"] if s is not None]
            cells += [f"{np.mean(rs) if rs else float('nan'):.0f}", f"{np.mean(e['retrieval']['generate_seconds']):.0f}"]
        else:
            cells += ["-", "-"]
        L.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    L.append("")

    L.append("## Plots\n")
    L += [f"![{p}](plots/{p})" for p in plots]
    L.append("\n## Run\n")
    L.append(f"Compute seconds per stage, all stages of this output directory: {r['stage_seconds_total']} "
             f"(total {r['compute_seconds_total']} s). This invocation: {r['stage_seconds_this_invocation']}; "
             f"wall {r['wall_seconds_this_invocation']} s. Environment: {r['environment']}.\n")
    L.append("Configuration:\n\n```json\n" + json.dumps(r["config"], indent=1) + "\n```\n")
    return "\n".join(L)


_TASK_NAMES = {"sid_sasrec": "SID-SASRec", "retrieval": "retrieval", "ranking": "ranking"}
_METRIC_NAMES = {"ndcg@10": "N@10", "recall@10": "R@10", "gauc": "GAUC"}


def _ablation_markdown(rows: list[dict], tok: dict, tasks=TASKS) -> list[str]:
    full = tok["adc_sid"]
    head = headline(tasks)
    L = ["## Ablations (the paper's Table 3), on the validation split\n",
         "Each ablation's validation figure (kept epoch, mean over its seeds) minus the full model's "
         f"(mean over its {len(full['seeds'])} seeds); in brackets the gap in units of the full model's seed "
         "spread. Table 3's direction is every ablation below the full model on every metric. Test is not "
         "read for this.\n",
         "| variant | seeds | " + " | ".join(f"{_TASK_NAMES[t]} valid {_METRIC_NAMES[m]}" for t, m in head.items()) +
         " | below the full model on all |",
         "|---|---|" + "---|" * len(head) + "---|"]
    L.append(f"| {full['label']} (full model) | {len(full['seeds'])} | " +
             " | ".join(_fmt(full[t]["valid"][m]) for t, m in head.items()) + " | |")
    for row in rows:
        cells = []
        for c in row["tasks"].values():
            sp = "" if c["spreads"] is None else f", {c['spreads']:+.1f} spreads"
            cells.append(f"{c['ablation']:.4f} ({c['diff']:+.4f}{sp})")
        L.append(f"| {tok[row['name']]['label']} | {len(row['seeds'])} | " + " | ".join(cells) +
                 f" | {'yes' if row['loses_all'] else 'no'} |")
    L.append("")
    return L
