"""The ``sidserve`` command: one command line for every stage.

    sidserve train    --items catalog/ --output model/ [--tokenizer adc-sid|rq-kmeans|rq-vae|opq]
    sidserve assign   --items catalog/ --model model/ --output snapshots/
    sidserve refresh  --items catalog/ --model model/ --output snapshots/ [--refit]
    sidserve serve    --model model/ --snapshot snapshots/ [--local]
    sidserve evaluate --data ../shared/data/amazon-beauty-5core --output eval/
    sidserve select   --items catalog/ --interactions log.parquet --output select/
    sidserve demo     [--in-process]

``jobs/*.py`` are the same commands as ``ray job submit`` entry points (``python
jobs/train.py ...`` = ``sidserve train ...``). Each subcommand's ``--help`` lists its options
with their defaults. Model fields go in one YAML (``--config``; an unknown key is an error
naming it) and/or as flags; with no config the input dimensions come from the data.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from sidserve.runner import configure_logging, run_job
from sidserve.tokenizers.registry import BUILTIN

TOKENIZERS = list(BUILTIN)  # the built-in types, in the registry's order (adc-sid first)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (unless its help already says it, or it has none)
    and keeps the docstrings' layout."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if ("default" not in help_ and action.default not in (None, False, [], argparse.SUPPRESS)
                and action.option_strings):
            help_ += " (default: %(default)s)"
        return help_


# ---- train ---------------------------------------------------------------------------

def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", help="Parquet file/dir or URI (default: the built-in synthetic demo catalog)")
    p.add_argument("--output", default="outputs/model", help="artifact directory or URI")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="adc-sid",
                   help="what to fit; see docs/evaluation.md (`sidserve evaluate`) for how they compare")
    p.add_argument("--config", help="YAML of the tokenizer's config fields (unknown keys are errors); "
                                    "modality_dims/behavior_dim default to what the input holds")
    p.add_argument("--column", action="append", default=[], metavar="MODALITY=COLUMN",
                   help="read modality MODALITY from COLUMN (e.g. text=title_vec; behavior=cf_vec); repeatable")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (ADC-SID)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (baselines: a GPU for the fit)")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs per worker (default: 1, or less on a small cluster; the workers read a Parquet "
                        "catalog themselves, the in-memory demo leaves Ray Data 1 CPU)")
    p.add_argument("--epochs", type=int, help="overrides the config's epochs (ADC-SID, rq-vae)")
    p.add_argument("--batch-size", type=int, help="per-worker batch size; overrides the config")
    p.add_argument("--sample-size", type=int, default=200_000,
                   help="baselines: rows of the uniform sample they are fitted on")
    p.add_argument("--storage-path", help="checkpoint storage (default: <output>/../checkpoints)")
    p.add_argument("--name", help="run name under --storage-path (default: sidserve-<output>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue run --name from its last checkpoint")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts")
    p.add_argument("--checkpoint-every-steps", type=int,
                   help="ADC-SID: also checkpoint every N steps inside an epoch (long epochs on large catalogs)")
    p.add_argument("--demo-items", type=int, default=20000, help="size of the demo catalog (no --items)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model already at --output (refused otherwise: artifacts are immutable)")


def train(args: argparse.Namespace) -> int:
    from sidserve.jobs.train import run_cli

    return run_cli(args)


# ---- assign / refresh ------------------------------------------------------------------

def _add_snapshot_args(p: argparse.ArgumentParser, items_help: str, model_help: str) -> None:
    """What assign and refresh share: the catalog, the model, the snapshot root, the scale."""
    p.add_argument("--items", required=True, help=items_help)
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--output", required=True, help="snapshot root dir or URI")
    p.add_argument("--column", action="append", default=[], metavar="MODALITY=COLUMN",
                   help="read MODALITY from COLUMN (default: the mapping the model was fitted with)")
    p.add_argument("--num-workers", type=int, default=2, help="encoder actors (refresh: and re-fit trainers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per encoder actor (refresh: and per trainer)")
    p.add_argument("--rows-per-partition", type=int, default=100_000,
                   help="rows per grouping task (bounds its memory; fewer, larger partitions write fewer files)")
    p.add_argument("--keep-snapshots", type=int,
                   help="retention: keep the N newest rollback targets (complete, not refused by --max-churn; the "
                        "published one always); older refused or incomplete snapshots go too; default: keep all")
    p.add_argument("--reserve-nights", type=int, default=30,
                   help="nights an absent or rejected item's (sid, dedup) key stays reserved for it (0: freed at once)")
    p.add_argument("--sticky-delta", type=float,
                   help="keep an item's previous code at a position unless the new best scores more than this "
                        "above it (cosine for adc-sid; 0: plain assignment); default: assign: plain, "
                        "refresh: 0.3 for adc-sid (docs/stability.md), plain for the baselines")
    p.add_argument("--sticky-candidates", type=int, default=32,
                   help="best codes per position scored for --sticky-delta; a previous code outside them is "
                        "replaced (more: fewer such replacements, larger staging rows)")
    p.add_argument("--max-churn", type=float,
                   help="refuse to publish a snapshot whose churn is above this share (LATEST stays); default: no limit")


def add_assign_args(p: argparse.ArgumentParser) -> None:
    _add_snapshot_args(p, "catalog Parquet file/dir or URI", "tokenizer artifact dir or URI (any tokenizer)")
    p.add_argument("--batch-size", type=int, default=8192, help="rows per encode call")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs per encoder actor (default: 1, or the cluster's CPUs / --num-workers when fewer)")


def assign(args: argparse.Namespace) -> int:
    from sidserve.jobs.assign import run_cli

    return run_cli(args)


def add_refresh_args(p: argparse.ArgumentParser) -> None:
    _add_snapshot_args(p, "tonight's catalog: Parquet file/dir or URI", "current tokenizer artifact (any tokenizer)")
    p.add_argument("--refit", action="store_true",
                   help="re-fit first: ADC-SID warm-started from --model, a baseline from scratch with its config")
    p.add_argument("--refit-output", help="artifact of the re-fitted model (default: <model>-refit-<time>)")
    p.add_argument("--refit-epochs", type=int, help="epochs of the re-fit (default: the model's)")
    p.add_argument("--refit-codebooks", choices=["train", "frozen"],
                   help="ADC-SID re-fit: 'frozen' keeps the current codewords and re-fits only the encoders "
                        "(fewer SID changes; docs/operations.md); default: the model's train_codebooks")
    p.add_argument("--sample-size", type=int, default=200_000, help="baselines: rows the re-fit samples")
    p.add_argument("--pushgateway", help="host:port of a Pushgateway (default: $SIDSERVE_PUSHGATEWAY)")
    p.add_argument("--churn-alert", type=float, default=0.2,
                   help="churn above which the SidserveChurnHigh alert fires (pushed as sidserve_refresh_churn_ceiling)")


def refresh(args: argparse.Namespace) -> int:
    from sidserve.jobs.refresh import run_cli

    return run_cli(args)


# ---- serve ---------------------------------------------------------------------------

def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model artifact (default: $SIDSERVE_MODEL_URI, else the "
                                                 "model of the published snapshot)")
    p.add_argument("--snapshot", default=None, help="snapshot root for catalog lookups "
                                                    "(default: $SIDSERVE_SNAPSHOT_ROOT; '' for none)")
    p.add_argument("--snapshot-poll-s", type=float, default=30.0, help="seconds between checks of LATEST")
    p.add_argument("--local", action="store_true", help="plain uvicorn in this process, no Ray")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")


def serve(args: argparse.Namespace) -> int:
    user_config = {"model_uri": args.model, "snapshot_root": args.snapshot,
                   "snapshot_poll_s": args.snapshot_poll_s}
    if args.local:
        from sidserve.serving.local import serve_local

        return run_job(lambda: serve_local(user_config, args.host, args.port))
    import ray
    from ray import serve as ray_serve

    from sidserve.serving.deployment import SidServe

    ray.init(address=args.address)
    ray_serve.start(http_options={"host": args.host, "port": args.port})
    ray_serve.run(SidServe.options(user_config=user_config).bind(), name="sidserve", route_prefix="/",
                  blocking=True)
    return 0


# ---- evaluate ------------------------------------------------------------------------

def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset dir with sequences.txt and items.jsonl")
    p.add_argument("--output", required=True, help="cache + report dir (results.json, report.md, plots/)")
    p.add_argument("--tokenizers", help="comma-separated (default: adc_sid, its four ablations, rqvae, rqkmeans, "
                                        "opq); 'letter' adds LETTER's published SIDs")
    p.add_argument("--seeds", help="comma-separated seeds, each a tokenizer fit and its downstream models (default: 0,1,2; "
                        "--quick: 0,1)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the stages cached so far (pending ones are listed)")
    p.add_argument("--withhold-test", action="store_true",
                   help="show no figures: report.md and the summary say only that they are withheld; results.json "
                        "keeps them, test included, for a study's one final read (choose on validation first)")
    p.add_argument("--quick", action="store_true", help="subsampled smoke run of every stage")
    p.add_argument("--quick-users", type=int, default=1000, help="users kept by --quick")
    p.add_argument("--tasks", help="comma-separated downstream tasks to train per tokenizer and seed, of "
                   "sid_sasrec, retrieval, ranking (default: all three; the default tokenizer's rule reads "
                   "sid_sasrec and ranking)")
    p.add_argument("--content", choices=["full", "weak"], default="full",
                   help="item content: full (title, brand, categories) or weak (the title's first three words and "
                        "the first category: a catalog whose content says little; issue 47)")
    p.add_argument("--sasrec-variants", help="ID SASRec models to train: tied, untied, bce (default: tied,untied)")
    p.add_argument("--behavior-embedding", choices=["tied", "untied-input", "untied-output", "bce"],
                   help="SASRec table handed to the tokenizers as e_b (default: untied-input)")
    p.add_argument("--retrieval-max-epochs", type=int, help="upper bound on the retrieval model's epochs")
    p.add_argument("--history-tokens", choices=["item", "codes"],
                   help="retrieval history: one token per item (default) or one per SID code (TIGER)")
    p.add_argument("--parallel", type=int, default=1,
                   help="processes sharing the stages, each with cpus/N torch threads (2 on 2 CPUs: 1.29x faster)")
    p.add_argument("--parallel-worker", action="store_true", help=argparse.SUPPRESS)


def evaluate(args: argparse.Namespace) -> int:
    from sidserve.eval.pipeline import run_cli

    # the command line after "evaluate": what --parallel starts its other processes with
    args.evaluate_argv = args.argv[1:] if args.argv[:1] == ["evaluate"] else args.argv
    return run_cli(args, command=f"{args.prog} " + shlex.join(args.argv))


# ---- select ----------------------------------------------------------------------------

def add_select_args(p: argparse.ArgumentParser) -> None:
    from sidserve.select import DEFAULT_CANDIDATES, SAMPLE_USERS

    p.add_argument("--items", required=True, help="the catalog (Parquet file/dir or URI) sidserve train reads")
    p.add_argument("--interactions", required=True,
                   help="the interaction log (Parquet): user_id, item_id and an order column")
    p.add_argument("--output", required=True, help="cache + report dir (report.md, tokenizer.yaml)")
    p.add_argument("--tokenizers", help=f"comma-separated candidates (default: {','.join(DEFAULT_CANDIDATES)}; the "
                                        "first is the library default, always compared against)")
    p.add_argument("--seeds", help="comma-separated seeds, each a fit and its downstream models (default: 0,1,2)")
    p.add_argument("--split", choices=["loo", "time"], default="loo",
                   help="loo: per user, last = test, second to last = validation; time: two global cuts of the "
                        "order column (its 90%% and 95%% quantiles)")
    p.add_argument("--order-column", default="timestamp", help="the log column that orders interactions")
    p.add_argument("--column", action="append", default=[], metavar="MODALITY=COLUMN",
                   help="read modality MODALITY from COLUMN, as in sidserve train; repeatable")
    p.add_argument("--sample-users", type=int, default=SAMPLE_USERS,
                   help="users kept (0: all): bounds the cost, about an hour on 2 CPUs at the default")
    p.add_argument("--max-unknown-share", type=float, default=0.05,
                   help="share of log rows naming items the catalog lacks above which the ids are taken to disagree")
    p.add_argument("--behavior", choices=["auto", "sasrec", "catalog"], default="auto",
                   help="e_b: the catalog's behavior_emb (catalog), a SASRec trained here on the log's training "
                        "part (sasrec), auto: the catalog's when it has one")
    p.add_argument("--quick", action="store_true", help="small downstream models: a smoke run, not a measurement")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="evaluation processes in all, as in evaluate: this one and N - 1 Ray tasks (candidates train "
                        "side by side); 1: this process alone, no Ray")
    p.add_argument("--address", help="the Ray cluster for --parallel's tasks (default: what ray.init() finds: "
                                     "RAY_ADDRESS, a `ray start` cluster here, else a new local one); sidserve "
                                     "installed on every node, --output on storage every node mounts")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per --parallel task")


def select(args: argparse.Namespace) -> int:
    from sidserve.select import run_cli

    args.command_line = f"{args.prog} " + shlex.join(args.argv)
    return run_cli(args)


# ---- stability -------------------------------------------------------------------------

def add_stability_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset dir with sequences.txt and items.jsonl")
    p.add_argument("--output", required=True, help="cache + report dir (stability.md, stability.json)")
    p.add_argument("--holdout", type=int, default=1,
                   help="interactions per user night 1 does not see (the newest of its training part)")
    p.add_argument("--modes", default="scratch,warm,procrustes",
                   help="night 2's behavioral embeddings: scratch, warm, procrustes (comma-separated)")
    p.add_argument("--deltas", default="0,0.05,0.1,0.2,0.3", help="sticky margins to measure (cosine)")
    p.add_argument("--downstream-modes", default="warm",
                   help="modes whose settings get a SID-SASRec on night 2 (empty: churn only)")
    p.add_argument("--candidates", type=int, default=32,
                   help="codes per position scored for the sticky comparison (the assignment job's default: 32)")
    p.add_argument("--downstream-deltas", default="0.3",
                   help="sticky margins (among --deltas) whose settings get the SID-SASRec too")
    p.add_argument("--downstream-settings",
                   help="exactly these settings get the SID-SASRec, comma-separated (e.g. "
                        "'warm/cold,warm/none+sticky 0.3'); overrides --downstream-modes/--downstream-deltas")
    p.add_argument("--downstream-seeds",
                   help="seeds, comma-separated (default: 0): each fits every tokenizer and trains night 2's "
                        "downstream models; the report gives mean +- std over them")
    p.add_argument("--content-from", help="an `evaluate` output dir of the same dataset: reuse its text embeddings")
    p.add_argument("--behavior-from", help="another stability run of the same data and SASRec settings: reuse its "
                                           "night tables (behavior/) instead of training the nights again")
    p.add_argument("--tokenizer", default="adc_sid",
                   choices=["adc_sid", "adc_sid_cold_consistency", "adc_sid_untied", "rqkmeans_tied",
                            "rqevidence_tied"],
                   help="ADC-SID as the evaluation runs it (tied SASRec table, richness from popularity, codes at "
                        "weight 1), the library's default (the same plus cold-path consistency 0.3) or the paper's "
                        "configuration (untied input table, norm, R(e_b) weights); or residual k-means over the "
                        "tied table, plain or evidence-weighted (night 2: cold re-fit, or night 1's model with "
                        "sticky assignment of whole SIDs; --deltas in relative distortion)")
    p.add_argument("--quick", action="store_true", help="subsampled smoke run")


def stability(args: argparse.Namespace) -> int:
    from sidserve.eval.stability_parts import run_cli

    return run_cli(args)


# ---- demo ----------------------------------------------------------------------------

def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="outputs", help="directory for the catalog, model, snapshots "
                                                       "(--in-process: the model directory)")
    p.add_argument("--items", type=int, default=20000, help="synthetic catalog size")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="--in-process: catalog and fit seed")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers and encoder actors")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keep-serving", action="store_true", help="leave the service running at the end")
    p.add_argument("--in-process", action="store_true", help="only fit + encode in this process, no Ray (30 s)")


def demo(args: argparse.Namespace) -> int:
    if not args.in_process:
        from sidserve.demo import DemoConfig, run_demo

        return run_job(lambda: run_demo(DemoConfig(output=args.output, items=args.items, epochs=args.epochs,
                                                   num_workers=args.num_workers, port=args.port,
                                                   keep_serving=args.keep_serving)))
    return run_job(lambda: _demo_in_process(args))


def _demo_in_process(args: argparse.Namespace) -> None:
    import json

    from sidserve import SemanticIdTokenizer, TokenizerConfig, make_synthetic_catalog

    t0 = time.perf_counter()
    items = make_synthetic_catalog(args.items, seed=args.seed)
    print(f"demo catalog: {items.num_rows} synthetic items "
          f"({sum(v is None for v in items.column('behavior_emb').to_pylist())} cold)")
    tok = SemanticIdTokenizer(TokenizerConfig(epochs=args.epochs, seed=args.seed)).fit(items)
    version = tok.save_pretrained(args.output, source="sidserve demo (synthetic catalog)", overwrite=True)
    enc = SemanticIdTokenizer.from_pretrained(args.output).encode(items.slice(0, 5))
    print("first items:")
    for i in range(len(enc)):
        print(f"  {enc.item_id[i]}  sid={enc.sid_str[i]:<24} path={enc.path[i]:<12} "
              f"behavior_weights={[round(float(w), 3) for w in enc.behavior_weights[i]]}")
    m = tok.stats_["fit_metrics"]
    keys = ("entropy_mean", "utilisation_mean", "collision_rate", "recon", "cold_path_agreement")
    print("metrics:", json.dumps({k: round(m[k], 4) for k in keys}))
    print(f"model {version} written to {args.output} in {time.perf_counter() - t0:.1f} s")


COMMANDS = {
    "train": (add_train_args, train, "fit a tokenizer (ADC-SID on Ray Train; baselines on a streamed sample)"),
    "assign": (add_assign_args, assign, "assign every item its SID and publish a snapshot (Ray Data)"),
    "refresh": (add_refresh_args, refresh, "nightly: optional re-fit, assignment, churn report, publish"),
    "serve": (add_serve_args, serve, "run POST /tokenize (Ray Serve, or --local under uvicorn)"),
    "evaluate": (add_evaluate_args, evaluate, "compare tokenizers on real interactions (docs/evaluation.md)"),
    "select": (add_select_args, select, "choose the tokenizer for your catalog from your interaction log "
                                        "(the evaluation's pipeline on your Parquet inputs)"),
    "stability": (add_stability_args, stability, "two nights on real interactions: SID churn after a re-fit "
                                                 "and what warm re-fits and sticky assignment buy"),
    "demo": (add_demo_args, demo, "the whole pipeline on the synthetic catalog on a local Ray"),
}


def build_parser(prog: str = "sidserve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (add, func, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=_Formatter)
        add(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.prog, args.argv = "sidserve", argv
    configure_logging()
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def job_main(command: str) -> int:
    """``python jobs/<command>.py ARGS`` = ``sidserve <command> ARGS`` (the ray job submit entry points)."""
    argv = sys.argv[1:]
    prog = f"python {os.path.relpath(sys.argv[0])}" if sys.argv and sys.argv[0] else f"sidserve {command}"
    parser = argparse.ArgumentParser(prog=prog, description=COMMANDS[command][2], formatter_class=_Formatter)
    COMMANDS[command][0](parser)
    args = parser.parse_args(argv)
    args.prog, args.argv = prog, argv
    configure_logging()
    try:
        return COMMANDS[command][1](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
