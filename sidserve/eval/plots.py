"""The evaluation report's plots (sidserve/eval/report.py links them from report.md)."""

from __future__ import annotations

import os

import numpy as np

from sidserve.eval.config import read_json


def write_plots(ev, tok: dict, sasrec: dict) -> list[str]:
    """The report's figures under ``<output>/plots/``; returns their paths relative to the output."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(ev.path("plots"), exist_ok=True)
    names = list(tok)
    labels = [tok[n]["label"] for n in names]
    x = np.arange(len(names))
    files = []

    tasks = ev.c.tasks  # the downstream tasks this run trains
    panels = [(t, m) for t, m in (("sid_sasrec", "recall@10"), ("sid_sasrec", "ndcg@10"), ("retrieval", "recall@10"),
                                  ("retrieval", "ndcg@10"), ("ranking", "gauc")) if t in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(22, 4.5), squeeze=False)
    for ax, (task, m) in zip(axes[0], panels):
        mean = [tok[n][task]["all"][m]["mean"] for n in names]
        std = [tok[n][task]["all"][m]["std"] or 0.0 for n in names]  # one seed: no error bar
        ax.bar(x, mean, yerr=std, capsize=3, color="tab:blue")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{task} {m}")
        lo = min(mean) - 3 * max(max(std), 1e-4)
        ax.set_ylim(max(0.0, lo), None)
    fig.tight_layout()
    fig.savefig(ev.path("plots", "metrics.png"), dpi=110)
    plt.close(fig)
    files.append("metrics.png")

    split = [(t, m) for t, m in (("sid_sasrec", "recall@10"), ("retrieval", "recall@10"), ("ranking", "gauc"))
             if t in tasks]
    fig, axes = plt.subplots(1, len(split), figsize=(20, 4.5), squeeze=False)
    for ax, (task, m) in zip(axes[0], split):
        for j, g in enumerate(["head", "tail"]):
            mean = [tok[n][task][g][m]["mean"] for n in names]
            std = [tok[n][task][g][m]["std"] or 0.0 for n in names]
            ax.bar(x + (j - 0.5) * 0.4, mean, 0.4, yerr=std, capsize=2, label=g)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{task} {m}: head vs long tail")
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

    # embedding norm vs training popularity, per SASRec variant and table
    pop = ev.data.popularity()[1:]
    tables = [(v, w) for v, r in sasrec.items() for w in (("input",) if r["tied"] else ("input", "output"))]
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4.2), squeeze=False)
    for ax, (v, w) in zip(axes[0], tables):
        kept = ev.path("sasrec", v, f"{w}_norms.npy")  # a kept cache has the norms, not every table
        norms = np.load(kept) if os.path.exists(kept) else np.linalg.norm(
            np.load(ev.path("sasrec", v, f"{w}_emb.npy")), axis=1)
        ax.scatter(pop + 1, norms, s=2, alpha=0.3)  # + 1: items never seen in training stay on the plot
        ax.set_xscale("log")
        rho = sasrec[v]["tables"][w]["norm_popularity_spearman"]
        ax.set_title(f"SASRec {v}, {w} table: Spearman {rho:.2f}", fontsize=9)
        ax.set_xlabel("training interactions + 1 (log)")
        ax.set_ylabel("L2 norm")
    fig.tight_layout()
    fig.savefig(ev.path("plots", "norm_vs_popularity.png"), dpi=110)
    plt.close(fig)
    files.append("norm_vs_popularity.png")

    # learning curves: the validation metric per epoch, first seed of each tokenizer
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.2))
    for v, rep in sasrec.items():
        axes[0].plot([h["valid_ndcg@10"] for h in rep["history"]], marker=".", label=f"ID SASRec {v}")
    for n in names:
        s0 = tok[n]["seeds"][0]
        for ax, task, key in ((axes[1], "sid_sasrec", "valid_ndcg@10"),
                              (axes[2], "retrieval", f"valid_{ev.c.retrieval.valid_metric}"),
                              (axes[3], "ranking", "valid_gauc")):
            if task not in tasks:
                continue
            hist = read_json(ev.stage_path(n, task, s0))["history"]
            ax.plot([h[key] for h in hist], marker=".", label=tok[n]["label"])
    for ax, title in zip(axes, ["ID SASRec valid NDCG@10", "SID-SASRec valid NDCG@10",
                                f"retrieval valid {ev.c.retrieval.valid_metric}", "ranking valid GAUC"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(ev.path("plots", "learning_curves.png"), dpi=110)
    plt.close(fig)
    files.append("learning_curves.png")
    return files
