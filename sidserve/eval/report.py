"""Aggregate the cached stage outputs into results.json, report.md and plots/."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from sidserve.collisions import find_overlaps
from sidserve.eval.metrics import mean_std
from sidserve.eval.tokenizers import LABELS

RETRIEVAL_METRICS = ["recall@5", "recall@10", "recall@50", "ndcg@5", "ndcg@10", "ndcg@50"]
RANKING_METRICS = ["auc", "gauc"]
GROUPS = ["all", "head", "tail"]


def _load(path):
    with open(path) as f:
        return json.load(f)


def collect(ev) -> dict:
    out = {}
    for name in ev.c.tokenizers:
        d = ev.path("downstream", name)
        entry = {"label": LABELS[name], "quantization": _load(ev.path("tokenizers", name, "quantization.json")),
                 "retrieval": {}, "ranking": {}}
        # near collisions (issue 8), from the SIDs themselves so cached stages get it too
        sid = np.load(ev.path("tokenizers", name, "sids.npz"))["sid"]
        entry["quantization"]["items_within_hamming_1"] = find_overlaps(sid, 1, max_group_pairs=10_000).overlap_rate
        runs = {"retrieval": [_load(os.path.join(d, f"retrieval_seed{s}.json")) for s in ev.c.seeds],
                "ranking": [_load(os.path.join(d, f"ranking_seed{s}.json")) for s in ev.c.seeds]}
        for task, metrics in (("retrieval", RETRIEVAL_METRICS), ("ranking", RANKING_METRICS)):
            for g in GROUPS:
                entry[task][g] = {m: dict(mean_std([r[g][m] for r in runs[task]]),
                                          values=[r[g][m] for r in runs[task]]) for m in metrics}
                entry[task][g]["users"] = runs[task][0][g]["users"]
        entry["retrieval"]["valid_sid_share"] = float(np.mean([r["valid_sid_share"] for r in runs["retrieval"]]))
        entry["retrieval"]["epochs_run"] = [len(r["history"]) for r in runs["retrieval"]]
        entry["retrieval"]["best_epoch"] = [int(np.argmin([h["valid_loss"] for h in r["history"]]))
                                            for r in runs["retrieval"]]
        out[name] = entry
    return out


def _fmt(ms: dict, digits: int = 4) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def write_report(ev, wall_seconds: float) -> dict:
    tok = collect(ev)
    sasrec = _load(ev.path("sasrec", "report.json"))
    d = ev.data
    results = {
        "command": ev.c.command,
        "dataset": {"name": d.name, "users": d.num_users, "items": d.num_items,
                    "interactions": d.num_interactions, "quick": ev.c.quick},
        "seeds": list(ev.c.seeds),
        "config": {"sasrec": dataclasses.asdict(ev.c.sasrec), "budget": dataclasses.asdict(ev.c.budget),
                   "retrieval": dataclasses.asdict(ev.c.retrieval), "ranking": dataclasses.asdict(ev.c.ranking),
                   "head_tail_share": ev.c.head_tail_share, "ranking_negatives": ev.c.ranking_negatives},
        "environment": ev.environment(),
        "sasrec": {k: sasrec[k] for k in ("test", "norm_popularity_spearman", "norm_quantiles")},
        "tokenizers": tok,
        "stage_seconds_this_invocation": {k: round(v, 1) for k, v in ev.timer.stages.items()},
        "wall_seconds_this_invocation": round(wall_seconds, 1),
    }
    with open(ev.path("results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plots = _plots(ev, tok)
    with open(ev.path("report.md"), "w") as f:
        f.write(_markdown(results, plots))
    return results


def _markdown(r: dict, plots: list[str]) -> str:
    tok = r["tokenizers"]
    ds = r["dataset"]
    L = []
    L.append(f"# SID evaluation on {ds['name']}\n")
    L.append(f"{ds['users']:,} users, {ds['items']:,} items, {ds['interactions']:,} interactions"
             f"{' (--quick subsample: a smoke test, not a measurement)' if ds['quick'] else ''}. "
             f"Leave-one-out split; downstream seeds {r['seeds']} (mean ± sample std over seeds).\n")
    L.append(f"Command: `{r['command']}`\n")
    s = r["sasrec"]
    L.append("## Behavioral embeddings (SASRec)\n")
    L.append(f"Test Recall@10 {s['test']['recall@10']:.4f}, NDCG@10 {s['test']['ndcg@10']:.4f} "
             f"(full-catalog ranking). Spearman correlation of embedding L2 norm with training "
             f"popularity: **{s['norm_popularity_spearman']:.3f}** (norm quantiles {s['norm_quantiles']}).\n")
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
    for g, title in (("all", "all test users"), ("head", "head items (top 25% by popularity)"),
                     ("tail", "long-tail items (bottom 25%)")):
        users = next(iter(tok.values()))["retrieval"][g]["users"]
        L.append(f"## Downstream, {title} ({users:,} users)\n")
        L.append("| tokenizer | " + " | ".join(m.replace("recall", "R").replace("ndcg", "N") for m in RETRIEVAL_METRICS)
                 + " | AUC | GAUC |")
        L.append("|---|" + "---|" * (len(RETRIEVAL_METRICS) + 2))
        for e in tok.values():
            cells = [_fmt(e["retrieval"][g][m]) for m in RETRIEVAL_METRICS]
            cells += [_fmt(e["ranking"][g][m]) for m in RANKING_METRICS]
            L.append(f"| {e['label']} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Plots\n")
    L += [f"![{p}](plots/{p})" for p in plots]
    L.append("\n## Run\n")
    L.append(f"Environment: {r['environment']}. Stage seconds in the last invocation (cached stages "
             f"are not counted): {r['stage_seconds_this_invocation']}; wall {r['wall_seconds_this_invocation']} s.\n")
    L.append("Configuration:\n\n```json\n" + json.dumps(r["config"], indent=1) + "\n```\n")
    return "\n".join(L)


def _plots(ev, tok: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(ev.path("plots"), exist_ok=True)
    names = list(tok)
    labels = [tok[n]["label"] for n in names]
    x = np.arange(len(names))
    files = []

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for ax, (task, m) in zip(axes, [("retrieval", "recall@10"), ("retrieval", "ndcg@10"),
                                    ("ranking", "auc"), ("ranking", "gauc")]):
        mean = [tok[n][task]["all"][m]["mean"] for n in names]
        std = [tok[n][task]["all"][m]["std"] for n in names]
        ax.bar(x, mean, yerr=std, capsize=3, color="tab:blue")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(m)
        lo = min(mean) - 3 * max(max(std), 1e-4)
        ax.set_ylim(max(0.0, lo), None)
    fig.tight_layout()
    fig.savefig(ev.path("plots", "metrics.png"), dpi=110)
    plt.close(fig)
    files.append("metrics.png")

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, (task, m) in zip(axes, [("retrieval", "recall@10"), ("ranking", "gauc")]):
        for j, g in enumerate(["head", "tail"]):
            mean = [tok[n][task][g][m]["mean"] for n in names]
            std = [tok[n][task][g][m]["std"] for n in names]
            ax.bar(x + (j - 0.5) * 0.4, mean, 0.4, yerr=std, capsize=2, label=g)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{m}: head vs long tail")
        ax.legend()
    fig.tight_layout()
    fig.savefig(ev.path("plots", "head_tail.png"), dpi=110)
    plt.close(fig)
    files.append("head_tail.png")

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for n in names:
        q = tok[n]["quantization"]
        pos = np.arange(len(q["entropy_per_position"]))
        axes[0].plot(pos, np.asarray(q["entropy_per_position"]) / np.log(q["codebook_size"]), marker="o",
                     label=tok[n]["label"])
        axes[1].plot(pos, q["utilisation_per_position"], marker="o", label=tok[n]["label"])
    axes[0].set_title("code entropy per position / ln K")
    axes[1].set_title("codebook utilisation per position")
    for ax in axes:
        ax.set_xlabel("SID position")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ev.path("plots", "codebook_usage.png"), dpi=110)
    plt.close(fig)
    files.append("codebook_usage.png")
    return files
