"""The two-night stability report (sidserve/eval/stability.py writes it): ``stability.md``'s
table and the churn / quality plot."""

from __future__ import annotations

import json
import logging

from sidserve.eval.stability_config import STICKY_KINDS, TOKENIZER_TEXT

log = logging.getLogger(__name__)


def render(r: dict) -> str:
    seeds = r["config"].get("downstream_seeds", [0])
    lines = [f"# Two nights on {r['dataset']['name']}: SID churn after a re-fit",
             "",
             f"Night 1 misses each user's last {r['holdout']} training interaction(s): "
             f"{r['new_interaction_share']:.1%} of night 2's interactions are new, "
             f"{r['items_unseen_night1']} items have behavior on night 2 only, and "
             f"{r.get('items_first_trained_night2', '?')} items' e_b rows are trained on night 2 only "
             + ("(night 1's tied SASRec had no training pair with them: their row moved only as a softmax negative). "
                if r["config"].get("tied") else
                "(night 1's SASRec saw them only as a sequence's last item: their night-1 row is its random init). ")
             + f"Tokenizer: {TOKENIZER_TEXT[r['config'].get('tokenizer', 'adc_sid_untied')]}. Churn: share "
             "of items whose SID changed between the nights, over the whole catalog and over the "
             f"{r['items_both_nights']} items with interactions on both nights. Every seed of "
             f"{seeds} fits its own tokenizers (night 1's and night 2's) and trains the downstream models "
             "(SID-SASRec on night 2, full-catalog ranking, and the ranker's GAUC): figures are means, "
             "+- the sample standard deviation over the seeds; 'vs cold': the relative difference of the mean "
             "validation NDCG@10 to the same mode's cold re-fit. Night 1's SASRec is early-stopped on each "
             "user's first held-out (night-2) interaction: night 2's data chooses only its epoch count.",
             "",
             "| setting | churn | churn, items on both nights | per position (both nights) | "
             "churn by popularity (night 2; both nights) | codes kept (unscored) | valid N@10 | vs cold | "
             "test R@10 | test N@10 | valid GAUC | test GAUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(d, part, k):
        if not d:
            return ""
        return f"{d[part][k]:.4f}" + (f" +- {d['std'][part][k]:.4f}" if len(seeds) > 1 else "")

    for name, s in r["settings"].items():
        d = s.get("downstream") or {}
        cold = r["settings"].get(name.split("/")[0] + "/cold", {}).get("downstream")
        b = s["both_nights"]  # items new on night 2 always change: the buckets are over the others
        pops = ", ".join(f"{k}: {v['churn']:.3f}" for k, v in b["by_popularity"].items())
        rel = (f"{d['valid']['ndcg@10'] / cold['valid']['ndcg@10'] - 1:+.1%}"
               if d and cold and cold["valid"]["ndcg@10"] > 0 else "")
        cells = [cell(d, "valid", "ndcg@10"), rel, cell(d, "test", "recall@10"), cell(d, "test", "ndcg@10"),
                 cell(d, "gauc", "valid"), cell(d, "gauc", "test")]
        spread = len(seeds) > 1 and "churn_std" in s
        churn = f"{s['churn']:.4f}" + (f" +- {s['churn_std']:.4f}" if spread else "")
        both = f"{b['churn']:.4f}" + (f" +- {b['churn_std']:.4f}" if spread else "")
        kept = "" if s["codes_kept"] is None else f"{s['codes_kept']:.0f}"
        if s.get("codes_unscored") is not None:
            kept += f" ({s['codes_unscored']:.0f})"
        lines.append(f"| {name} | {churn} | {both} | {' / '.join(f'{x:.3f}' for x in b['per_position'])} | "
                     f"{pops} | {kept} | {' | '.join(cells)} |")
    t = r.get("cold_to_warm") or {}
    if t:
        buckets = list(next(iter(t.values())))
        lines += ["", "**Cold -> warm** (night 1's model, its items with behavior): share whose shared SID "
                  "positions keep the code the content-only path gave them, per popularity bucket (night 1).", "",
                  "| assignment | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
        lines += [f"| {name} | " + " | ".join(f"{row[b]:.3f}" for b in buckets) + " |" for name, row in t.items()]
    lines += ["", f"Wall time {r['wall_seconds']:.0f} s; stages (s): {json.dumps(r['stage_seconds'])}", ""]
    return "\n".join(lines)


def _churn(setting: dict) -> float:
    """The churn a plot shows: over the items with interactions on both nights."""
    return setting["both_nights"]["churn"]


def plot(r: dict, path: str) -> None:
    """Left: churn against delta per (embedding mode, tokenizer), the cold re-fits dashed.
    Right: night 2's validation NDCG@10 against churn for every setting with a downstream model
    (the trade-off; chosen on validation, so the plot shows no test figure)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in r["config"]["modes"]:
        for kind in STICKY_KINDS:  # residual k-means has "none" only: the others find no points
            pts = sorted((float(k.split()[-1]), _churn(v)) for k, v in r["settings"].items()
                         if k.startswith(f"{mode}/{kind}+sticky"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{mode}: {kind} + sticky")
        cold = r["settings"].get(f"{mode}/cold")
        if cold:
            ax.axhline(_churn(cold), ls="--", alpha=0.5, color="gray")
    ax.set_xlabel("sticky margin delta (cosine; residual k-means: relative distortion)")
    ax.set_ylabel("churn (share of items on both nights whose SID changed)")
    ax.set_title("churn vs delta (dashed: cold re-fits)")
    ax.legend(fontsize=6)
    for name, v in r["settings"].items():
        d = v.get("downstream")
        if d:
            bx.errorbar(_churn(v), d["valid"]["ndcg@10"], yerr=d["std"]["valid"]["ndcg@10"], fmt="o", ms=4)
            bx.annotate(name, (_churn(v), d["valid"]["ndcg@10"]), fontsize=6)
    bx.set_xlabel("churn, items on both nights")
    bx.set_ylabel("night-2 SID-SASRec valid NDCG@10")
    bx.set_title("quality vs churn")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
