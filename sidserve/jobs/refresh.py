"""The nightly refresh (``jobs/refresh.py``): statistics, optional warm-started re-fit,
assignment, churn against the previous snapshot, publish, and job metrics pushed to a
Prometheus Pushgateway.

Metrics (job label ``sidserve_refresh``; a success replaces the group, a failure only
adds ``sidserve_refresh_last_failure_timestamp_seconds`` so the last success stays):

    sidserve_refresh_input_rows / _items / _rejects / _new_items / _removed_items
    sidserve_refresh_churn_ratio            share of common items whose SID changed
    sidserve_refresh_churn_ceiling          --churn-alert: the SidserveChurnHigh threshold
    sidserve_refresh_churn_ratio_by_popularity{bucket}
    sidserve_refresh_collision_rate         share of items whose SID is shared
    sidserve_refresh_duration_seconds
    sidserve_refresh_last_success_timestamp_seconds
    sidserve_refresh_snapshot_info{version, model_version}   always 1
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, pushadd_to_gateway

from sidserve.jobs.assign import AssignJobConfig, input_renames, run_assignment
from sidserve.jobs.assign.encode import catalog_dataset
from sidserve.jobs.catalog import parquet_prepass
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.registry import load_tokenizer

log = logging.getLogger(__name__)
JOB_LABEL = "sidserve_refresh"
# the refresh's sticky margin for ADC-SID (cosine), chosen on the two-night Beauty measurement
# (docs/stability.md); --sticky-delta overrides it, 0 assigns plainly
STICKY_DELTA = 0.3


@dataclass
class RefreshJobConfig:
    items: str  # tonight's catalog (Parquet file/dir/URI)
    model: str  # current model artifact
    output: str  # snapshot root
    refit: bool = False  # re-fit warm-started from ``model`` before assigning
    refit_output: str | None = None  # where the re-fitted model goes (default: <model>-refit-<time>)
    refit_epochs: int | None = None  # epochs of the re-fit (default: the model's config)
    # ADC-SID re-fit: "frozen" keeps the current model's codewords and re-fits only the
    # encoders (codebook anchoring: fewer SID changes); None = the model's train_codebooks
    refit_codebooks: str | None = None
    num_workers: int = 2  # trainers (refit) and encoder actors (assignment)
    use_gpu: bool = False
    pushgateway: str | None = None  # host:port of a Prometheus Pushgateway
    rows_per_partition: int = 100_000  # rows per grouping task of the assignment (AssignJobConfig)
    keep_snapshots: int | None = None  # retention (AssignJobConfig.keep_snapshots)
    reserve_nights: int = 30  # keys held for absent items (AssignJobConfig.reserve_nights)
    # sticky assignment margin (AssignJobConfig.sticky_delta); "auto": STICKY_DELTA for ADC-SID
    # (docs/stability.md: churn 89% -> 2% over one night of Beauty), plain for the baselines
    # (residual ones cannot keep a code alone; OPQ's scores are on another scale, unmeasured)
    sticky_delta: float | str | None = "auto"
    sticky_candidates: int = 32  # codes per position scored for it (AssignJobConfig.sticky_candidates)
    max_churn: float | None = None  # refuse to publish above this churn (AssignJobConfig.max_churn)
    # churn above which SidserveChurnHigh fires: pushed with the metrics (sidserve_refresh_churn_ceiling),
    # so each deployment sets its own ceiling without editing the alert rules
    churn_alert: float = 0.2
    columns: dict[str, str] | None = None  # modality -> input column; None: the model's own mapping
    sample_size: int = 200_000  # a baseline re-fit's sample (TrainJobConfig.sample_size)


def push_success(gateway: str, summary: dict[str, Any]) -> None:
    reg = CollectorRegistry()

    def gauge(name: str, doc: str, value: float, **labels) -> None:
        g = Gauge(f"{JOB_LABEL}_{name}", doc, list(labels), registry=reg)
        (g.labels(**labels) if labels else g).set(value)

    gauge("input_rows", "Input rows of the last successful refresh", summary["input_rows"])
    gauge("items", "Items in the published snapshot", summary["items"])
    gauge("rejects", "Rejected input rows", summary["rejects"])
    gauge("new_items", "Items not in the previous snapshot", summary["churn"]["new"])
    gauge("removed_items", "Items of the previous snapshot no longer present", summary["churn"]["removed"])
    gauge("churn_ratio", "Share of common items whose SID changed", summary["churn"]["churn"])
    gauge("churn_ceiling", "Churn above which SidserveChurnHigh fires (--churn-alert)", summary["churn_ceiling"])
    gauge("collision_rate", "Share of items whose SID is shared with another item", summary["collision_rate"])
    gauge("duration_seconds", "Wall time of the refresh", summary["duration_s"])
    gauge("last_success_timestamp_seconds", "Unix time of the last successful refresh", time.time())
    by_pop = Gauge(f"{JOB_LABEL}_churn_ratio_by_popularity", "Churn per popularity bucket", ["bucket"],
                   registry=reg)
    for bucket, v in summary["churn"]["by_popularity"].items():
        by_pop.labels(bucket=bucket).set(v["churn"])
    info = Gauge(f"{JOB_LABEL}_snapshot_info", "The published snapshot", ["version", "model_version"],
                 registry=reg)
    info.labels(version=summary["version"], model_version=summary["model_version"]).set(1)
    push_to_gateway(gateway, job=JOB_LABEL, registry=reg)


def push_failure(gateway: str) -> None:
    reg = CollectorRegistry()
    Gauge(f"{JOB_LABEL}_last_failure_timestamp_seconds", "Unix time of the last failed refresh",
          registry=reg).set(time.time())
    pushadd_to_gateway(gateway, job=JOB_LABEL, registry=reg)


def resolve_sticky(delta: float | str | None, tokenizer_type: str, independent_positions: bool = True) -> float | None:
    """The margin a refresh assigns with: ``"auto"`` -> STICKY_DELTA for adc-sid with parallel
    behavioral codes (its positions independent), None (plain assignment) for the other
    tokenizers and for residual behavioral codes; a number or None as given."""
    if delta == "auto":
        return STICKY_DELTA if tokenizer_type == "adc-sid" and independent_positions else None
    if delta is not None and (isinstance(delta, str) or not delta >= 0):
        raise ValueError(f"sticky_delta must be 'auto', None or a number >= 0, got {delta!r}")
    return delta


def run_refresh(job: RefreshJobConfig) -> dict[str, Any]:
    import ray

    if job.refit_codebooks not in (None, "train", "frozen"):
        raise ValueError(f"refit_codebooks must be 'train', 'frozen' or None, got {job.refit_codebooks!r}")
    resolve_sticky(job.sticky_delta, "adc-sid")  # a bad value fails before anything runs
    if job.refit_codebooks is not None and not job.refit:
        raise ValueError(f"refit_codebooks={job.refit_codebooks!r} needs refit=True (--refit)")
    t0 = time.perf_counter()
    try:
        if not ray.is_initialized():
            ray.init()
        tok = load_tokenizer(job.model)
        prepass = None
        columns = job.columns if job.columns is not None else (getattr(tok, "inputs_", None) or {}).get("columns", {})
        adc = isinstance(tok.config, TokenizerConfig)
        if adc:
            t_prepass = time.perf_counter()
            names = list(catalog_dataset(job.items).schema.names)
            stats = parquet_prepass(job.items, tok.config, renames=input_renames(job.columns, tok, names))
            prepass = {**stats.to_dict(), "seconds": time.perf_counter() - t_prepass}
            model_range = (tok.catalog_stats_.get("n_min"), tok.catalog_stats_.get("n_max"))
            log.info("pre-pass: %s; model trained on N_min/N_max %s", prepass, model_range)
        model_uri = job.model
        if job.refit:
            import dataclasses

            from sidserve.jobs.train import TrainJobConfig, fit_distributed

            model_uri = job.refit_output or f"{job.model.rstrip('/')}-refit-{time.strftime('%Y%m%d-%H%M%S')}"
            cfg = tok.config
            if job.refit_epochs:
                if not any(f.name == "epochs" for f in dataclasses.fields(cfg)):
                    raise ValueError(f"--refit-epochs: a {tok.tokenizer_type} model has no epochs")
                cfg = dataclasses.replace(cfg, epochs=job.refit_epochs)
            if job.refit_codebooks is not None:
                if not adc:
                    raise ValueError(f"--refit-codebooks: a {tok.tokenizer_type} model is re-fitted from scratch, "
                                     "it has no codebooks to anchor")
                cfg = dataclasses.replace(cfg, train_codebooks=job.refit_codebooks == "train")
            # ADC-SID continues from the current weights; a baseline is fitted anew with its config
            fit_distributed(TrainJobConfig(output=model_uri, items=job.items, tokenizer=cfg,
                                           tokenizer_type=tok.tokenizer_type, columns=dict(columns),
                                           sample_size=job.sample_size, num_workers=job.num_workers,
                                           use_gpu=job.use_gpu, init_model=job.model if adc else None))
        summary = run_assignment(AssignJobConfig(items=job.items, model=model_uri, output=job.output,
                                                 num_workers=job.num_workers, use_gpu=job.use_gpu,
                                                 rows_per_partition=job.rows_per_partition,
                                                 keep_snapshots=job.keep_snapshots,
                                                 reserve_nights=job.reserve_nights,
                                                 sticky_delta=resolve_sticky(job.sticky_delta, tok.tokenizer_type,
                                                                              tok.independent_positions),
                                                 sticky_candidates=job.sticky_candidates, max_churn=job.max_churn,
                                                 columns=job.columns))
        summary["prepass"] = prepass
        summary["churn_ceiling"] = job.churn_alert
        summary["refit_model"] = model_uri if job.refit else None
        summary["duration_s"] = time.perf_counter() - t0
    except Exception:
        if job.pushgateway:
            try:
                push_failure(job.pushgateway)
            except OSError as err:  # the job's own error matters more; say both
                log.error("could not push the failure to %s: %s", job.pushgateway, err)
        raise
    summary["push_failures"] = 0
    if job.pushgateway:
        try:
            push_success(job.pushgateway, summary)
        except OSError as err:
            # the snapshot is published: a failing exit code would make the CronJob run (and
            # publish) again. Say it and count it; the metrics' staleness alert covers the rest
            summary["push_failures"] = 1
            log.error("refresh %s published, but pushing its metrics to %s failed: %s",
                      summary["version"], job.pushgateway, err)
    return summary


def run_cli(args) -> int:
    """``sidserve refresh`` / jobs/refresh.py: run the refresh (exit code 2 on bad input)."""
    from sidserve.inputs import parse_columns
    from sidserve.runner import run_job

    def body():
        s = run_refresh(RefreshJobConfig(
            items=args.items, model=args.model, output=args.output, refit=args.refit,
            refit_output=args.refit_output, refit_epochs=args.refit_epochs,
            refit_codebooks=args.refit_codebooks, num_workers=args.num_workers,
            use_gpu=args.use_gpu, rows_per_partition=args.rows_per_partition,
            columns=parse_columns(args.column) or None, sample_size=args.sample_size,
            keep_snapshots=args.keep_snapshots, reserve_nights=args.reserve_nights,
            sticky_delta="auto" if args.sticky_delta is None else args.sticky_delta, sticky_candidates=args.sticky_candidates, max_churn=args.max_churn, churn_alert=args.churn_alert,
            pushgateway=args.pushgateway or os.environ.get("SIDSERVE_PUSHGATEWAY")))
        c = s["churn"]
        print(f"[sidserve] refresh published {s['version']} at {args.output} (model {s['model_version']}): "
              f"{s['items']} items, {s['rejects']} rejects, churn {c['churn']:.4f} of {c['common']} common "
              f"items, {c['new']} new, {c['removed']} removed, collision rate {s['collision_rate']:.4f}, "
              f"{s['duration_s']:.1f} s" + (", metrics NOT pushed (see the log)" if s["push_failures"] else ""))

    return run_job(body)
