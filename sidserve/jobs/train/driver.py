"""The driver of the fit: flags and YAML -> a job, inputs from the data, resources,
the pre-pass and k-means sample, the TorchTrainer, the artifact."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from sidserve.items import ITEM_ID
from sidserve.jobs.catalog import HAS_BEHAVIOR, CatalogStats, clean_batch, input_prepass
from sidserve.jobs.train.checkpoint import read_result
from sidserve.jobs.train.resources import check_resources
from sidserve.jobs.train.worker import train_loop
from sidserve.tokenizers.adc_sid.config import TokenizerConfig

log = logging.getLogger(__name__)


@dataclass
class TrainJobConfig:
    output: str  # artifact directory or URI
    items: str | None = None  # Parquet file/dir/URI; None = built-in synthetic demo catalog
    # a config object is used as given (its input dims checked against the data); a mapping of
    # config fields (YAML + flags) or None is completed from the data: modality_dims and
    # behavior_dim (and a baseline's use_behavior) from the input's <modality>_emb columns
    tokenizer: Any = None
    tokenizer_type: str = "adc-sid"  # adc-sid | rq-kmeans | rq-vae | opq
    columns: dict[str, str] = field(default_factory=dict)  # modality -> input column, when not <m>_emb
    # baselines (rq-kmeans, opq, rq-vae) are fitted on one uniform sample of the cleaned catalog
    # of at most this many rows, streamed from the input (k-means needs ~K x 256 points per level)
    sample_size: int = 200_000
    overwrite: bool = False  # replace an artifact already at ``output`` (artifacts are immutable)
    num_workers: int = 2  # Ray Train workers (data-parallel)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float | None = None  # CPUs per worker; None: 1, or less on a small cluster
    # (an in-memory catalog: so that Ray Data keeps resources.DATA_CPUS; Train holding every CPU starves it)
    storage_path: str | None = None  # checkpoints (shared storage on multi-node clusters)
    name: str | None = None  # run name under storage_path
    resume: bool = False  # continue the run `name` from its last checkpoint
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    # also checkpoint every this many steps inside an epoch (None: at epoch ends only): one epoch
    # over 10M items is about 25 minutes on 2 CPUs (docs/benchmarks.md), more than a preempted
    # node should cost. Not with collision regulation (its pairs are planned at the epoch start)
    checkpoint_every_steps: int | None = None
    demo_items: int = 20000  # size of the synthetic demo catalog
    # an in-memory catalog (the demo's; a Parquet one is read by the workers every epoch): keep
    # the cleaned rows in the object store; None: if they take under CACHE_FRACTION of it
    cache_clean: bool | None = None
    init_model: str | None = None  # warm start: weights of this artifact instead of k-means init
    # worker hooks (sidserve.jobs.train.worker.TrainCallback), picklable; run on every worker
    callbacks: list = field(default_factory=list)

    def __post_init__(self):
        if self.name is None:  # a new run each time unless named (and then --resume continues it)
            base = os.path.basename(os.path.normpath(self.output)) or "model"
            self.name = f"sidserve-{base}-{time.strftime('%Y%m%d-%H%M%S')}"

    def storage(self) -> str:
        """Checkpoint storage: ``storage_path``, else ``checkpoints`` beside ``output`` (a URI
        beside a URI output: s3://b/models/sid-v1 -> s3://b/models/checkpoints)."""
        if self.storage_path:
            path = self.storage_path
        elif "://" in self.output:
            scheme, _, rest = self.output.rstrip("/").partition("://")
            parent = rest.rsplit("/", 1)[0] if "/" in rest else rest
            path = f"{scheme}://{parent}/checkpoints"
        else:
            path = os.path.join(os.path.dirname(os.path.abspath(self.output)), "checkpoints")
        return path if "://" in path else os.path.abspath(path)


def load_config_options(path: str | None, kind: str = "adc-sid", **overrides) -> dict[str, Any]:
    """A YAML file of config fields + flag overrides -> a mapping of the ``kind`` tokenizer's
    config fields (unknown keys are errors naming them; the input fields may be absent)."""
    import dataclasses

    from sidserve.tokenizers.registry import tokenizer_class

    data: dict[str, Any] = {}
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config must be a mapping of config fields")
        data.update(loaded)
    config_class = tokenizer_class(kind).config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    data.update({k: v for k, v in overrides.items() if v is not None})  # flags win over the YAML
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {kind} config key(s) {unknown}{' in ' + path if path else ''}; "
                         f"known keys: {sorted(known)}")
    return data


def load_tokenizer_config(path: str | None, **overrides) -> TokenizerConfig:
    """A YAML file of TokenizerConfig fields (unknown keys are errors) + CLI overrides."""
    return TokenizerConfig.from_dict(load_config_options(path, "adc-sid", **overrides))


CACHE_FRACTION = 0.25  # cache the cleaned catalog when it takes < this share of the object store
def demo_catalog(job: TrainJobConfig):
    """The built-in synthetic catalog, with the dimensions the job's config names (or the defaults)."""
    from sidserve.synthetic import make_synthetic_catalog

    t = job.tokenizer
    given = (t if isinstance(t, dict) else vars(t)) if t is not None else {}
    default = TokenizerConfig()
    return make_synthetic_catalog(job.demo_items, modality_dims=given.get("modality_dims", default.modality_dims),
                                  behavior_dim=given.get("behavior_dim", default.behavior_dim),
                                  seed=given.get("seed", default.seed))


def _read_items(job: TrainJobConfig):
    """The catalog as a dataset whose rows keep the input's order through every stage: the
    k-means sample (the first rows of a seeded sample) and the data order of each epoch are
    then the same on every run, so a run resumed from a checkpoint ends where an uninterrupted
    one does (test_a_resumed_run_equals_an_uninterrupted_one). Cost: a slow block holds back
    the ones behind it."""
    import ray.data

    if job.items:
        # the read fuses with the 0.25-CPU cleaning step only with the same CPU request
        ds = ray.data.read_parquet(job.items, num_cpus=0.25)
    else:
        table = demo_catalog(job)
        step = max(1, table.num_rows // 8)
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    ds.context.execution_options.preserve_order = True  # this dataset's own copy of the context
    return ds


def resolve_inputs(job: TrainJobConfig, ds):
    """Rename mapped columns, find the inputs in the data and complete/check the config.

    -> (dataset with standard column names, validated config, InputSpec, inferred field names).
    """
    from sidserve.inputs import PEEK_ROWS, check_config, infer_inputs, reconcile, renames
    from sidserve.tokenizers.registry import tokenizer_class

    schema = ds.schema()
    if schema is None:
        raise ValueError("the input has no rows (empty dataset)")
    mapping = renames(job.columns, list(schema.names))
    if mapping:
        ds = ds.rename_columns(mapping)
    schema = ds.schema().base_schema
    peek = None
    if any(f.name.endswith("_emb") and not isinstance(f.type, pa.FixedSizeListType) for f in schema):
        import ray

        blocks = [t for t in ray.get(ds.limit(PEEK_ROWS).to_arrow_refs()) if t.num_rows]
        if not blocks:
            raise ValueError("the input has no rows")
        peek = pa.concat_tables(blocks)
    spec = infer_inputs(schema, peek, job.columns)
    config_class = tokenizer_class(job.tokenizer_type).config_class
    if job.tokenizer is None or isinstance(job.tokenizer, dict):
        options, inferred = reconcile(job.tokenizer, spec)
        if job.tokenizer_type != "adc-sid" and "use_behavior" not in options:
            # a behavior-aware baseline when the catalog has behavior (what docs/evaluation.md measures)
            options["use_behavior"] = options.get("behavior_dim") is not None
            inferred.append("use_behavior")
        config = config_class.from_dict(options)
    else:
        if not isinstance(job.tokenizer, config_class):
            raise ValueError(f"tokenizer_type {job.tokenizer_type!r} takes a {config_class.__name__}, "
                             f"got a {type(job.tokenizer).__name__}")
        check_config(job.tokenizer, spec)
        config, inferred = job.tokenizer.validate(), []
    if inferred:
        log.info("inputs inferred from the data: %s", {k: getattr(config, k) for k in inferred})
        print("[sidserve] inputs from the data: " + ", ".join(f"{k}={getattr(config, k)}" for k in inferred)
              + (f" (columns {job.columns})" if job.columns else ""), flush=True)
    return ds, config, spec, inferred


def _kmeans_sample(clean, stats: CatalogStats, config: TokenizerConfig) -> dict[str, np.ndarray]:
    """At most ``kmeans_init_samples`` cleaned rows, drawn uniformly: ``clean`` is the workers'
    ``ParquetShards`` (one task per unit) or the cleaned Ray Dataset of an in-memory catalog."""
    from sidserve.jobs.train.ingest import ParquetShards, sample_rows

    n = min(config.kmeans_init_samples, stats.num_valid)
    if isinstance(clean, ParquetShards):
        sample = sample_rows(clean, stats.num_valid, n, config.seed)
    else:
        fraction = min(1.0, 1.5 * n / stats.num_valid)
        ds = clean if fraction >= 1.0 else clean.random_sample(fraction, seed=config.seed)
        sample = ds.limit(n).take_batch(n, batch_format="numpy")
    if len(sample.get(HAS_BEHAVIOR, ())) < config.codebook_size:
        raise ValueError(
            f"{stats.num_valid} usable items are too few for codebook_size={config.codebook_size}"
        )
    return sample


def _refuse_existing_artifact(uri: str) -> None:
    from sidserve.artifact import read_manifest

    try:
        held = read_manifest(uri)["version"]
    except (ValueError, OSError):
        return  # nothing there (or not an artifact): the fit may write
    raise ValueError(f"{uri!r} already holds model {held}; artifacts are immutable: choose a new --output "
                     "or pass --overwrite to replace it")


def fit_distributed(job: TrainJobConfig):
    """Pre-pass, TorchTrainer fit, artifact. Returns (tokenizer, version, metrics)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from sidserve.tokenizers.adc_sid.tokenizer import SemanticIdTokenizer
    from sidserve.tokenizers.adc_sid.training import warm_start_free
    from sidserve.tokenizers.registry import tokenizer_class

    tokenizer_class(job.tokenizer_type)  # an unknown type fails before anything starts
    if not job.overwrite:  # before any work, not after an hour of training
        _refuse_existing_artifact(job.output)
    if job.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {job.num_workers}")
    if job.checkpoint_every_steps is not None and job.checkpoint_every_steps < 1:
        raise ValueError(f"--checkpoint-every-steps must be >= 1, got {job.checkpoint_every_steps}")
    if not ray.is_initialized():
        ray.init()
    name, storage = job.name, job.storage()
    if job.tokenizer_type == "adc-sid":
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
        check_resources(job)
        run_dir = os.path.join(storage, name)
        if "://" not in storage and os.path.exists(run_dir) and not job.resume:
            raise ValueError(
                f"a run named {name!r} already exists in {storage}; pass --resume to continue it "
                "or --name to start a new one"
            )
        if job.resume and "://" not in storage and not os.path.exists(run_dir):
            raise ValueError(f"--resume: no run named {name!r} in {storage}")
        print(f"[sidserve] run {name!r} in {storage} (resume with --name {name} --resume): "
              f"{job.num_workers} workers x {job.cpus_per_worker:g} CPU{' + 1 GPU' if job.use_gpu else ''}",
              flush=True)
    t0 = time.perf_counter()
    ds, tcfg, spec, inferred = resolve_inputs(job, _read_items(job))
    inputs = {"columns": dict(job.columns), "inferred": inferred}
    if job.tokenizer_type != "adc-sid":
        from sidserve.jobs.train.baselines import fit_sampled

        return fit_sampled(job, ds, tcfg, inputs, t0)
    stats = input_prepass(tcfg, items=job.items, ds=ds, columns=job.columns)
    print(f"[sidserve] pre-pass: {stats.num_rows} rows, {stats.num_valid} usable, "
          f"{sum(stats.skipped.values())} skipped {stats.skipped or ''}, "
          f"null behavior {stats.null_behavior_share:.1%}, N_min={stats.n_min}, N_max={stats.n_max} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if tcfg.has_behavior:
        from sidserve.tokenizers.adc_sid.training import check_norm_range

        check_norm_range(stats.n_min, stats.n_max)
    if job.checkpoint_every_steps and tcfg.collision_regulation != "off":
        raise ValueError(f"--checkpoint-every-steps with collision_regulation={tcfg.collision_regulation!r}: "
                         "the regulation plans each epoch's pairs from the model at the epoch's start, which a "
                         "mid-epoch resume no longer has; checkpoint at epoch ends (leave it unset)")
    if tcfg.collision_regulation != "off" and ITEM_ID not in ds.schema().names:
        raise ValueError("collision_regulation needs an item_id column in the input (to match colliding "
                         "items across workers); the input has none")
    cfg_dict = tcfg.to_dict()
    cached, datasets, shards = False, {}, None
    if job.items:  # the workers read their own row groups (ingest.py): nothing through the object store
        from sidserve.inputs import renames
        from sidserve.jobs.assign.encode import catalog_dataset
        from sidserve.jobs.train.ingest import ParquetShards

        mapping = renames(job.columns, list(catalog_dataset(job.items).schema.names)) if job.columns else {}
        # split by valid rows (the pre-pass counted them per read unit): uneven rejects across
        # the shards would otherwise leave rows untrained every epoch
        clean = shards = ParquetShards.plan(job.items, tcfg, renames=mapping, valid_rows=stats.unit_valid or None)
    else:  # an in-memory catalog (the demo's): Ray Data's streaming split
        clean = ds.map_batches(lambda t: clean_batch(t, TokenizerConfig.from_dict(cfg_dict)),
                               batch_format="pyarrow", batch_size=4096, num_cpus=0.25)
        row_bytes = 4 * (sum(tcfg.modality_dims.values()) + (tcfg.behavior_dim or 0)) + 64
        fits = stats.num_valid * row_bytes < CACHE_FRACTION * ray.cluster_resources().get("object_store_memory", 0)
        cached = job.cache_clean if job.cache_clean is not None else fits
        if cached:
            # small enough: clean once and keep it in the object store instead of re-reading
            # and re-validating the input every epoch; larger catalogs stream each epoch
            clean = clean.materialize()
        datasets = {"train": clean}
    # a warm start loads every codeword from the model it starts from: no k-means, no sample
    sample = None if job.init_model else _kmeans_sample(clean, stats, tcfg)

    init_state = None
    if job.init_model:
        from sidserve.tokenizers.registry import load_tokenizer

        previous = load_tokenizer(job.init_model)
        if not isinstance(previous, SemanticIdTokenizer) or previous.config.replace(
                **warm_start_free(tcfg)) != tcfg:
            raise ValueError(f"--init-model {job.init_model}: not an ADC-SID model with this config; "
                             "a warm start needs the same architecture")
        init_state = ray.put(previous._tensors())
    loop_config = {
        "tokenizer": cfg_dict, "n_min": stats.n_min, "n_max": stats.n_max,
        "sample_ref": None if sample is None else ray.put(sample), "callbacks": list(job.callbacks),
        "init_state_ref": init_state, "checkpoint_every_steps": job.checkpoint_every_steps,
        "shards": shards,
    }
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the workers' shards in input order too (see _read_items)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers, use_gpu=job.use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    result = trainer.fit()  # raises ray.train.TrainingFailedError once max_failures is spent
    with result.checkpoint.as_directory() as d:
        model, history, final = read_result(d, tcfg)
    catalog = stats.to_dict()
    tok = SemanticIdTokenizer.from_model(model, {**catalog, "n_min": stats.n_min, "n_max": stats.n_max},
                                         history)
    tok.stats_["fit_metrics"] = final
    tok.inputs_ = inputs
    metrics = {
        "catalog": catalog,
        "epochs": history,
        "final": final,
        "num_workers": job.num_workers,
        "cpus_per_worker": job.cpus_per_worker,
        "use_gpu": job.use_gpu,
        # how the workers got their rows: "parquet" (each reads its own row groups every epoch,
        # ingest.py) or "ray-data" (an in-memory catalog's streaming split)
        "ingest": "parquet" if shards is not None else "ray-data",
        # the cleaned catalog kept in the object store (True) or read again every epoch (False)
        "catalog_cached": bool(cached),
        # rows the codebooks were initialised from (0: a warm start, initialised from init_model)
        "kmeans_sample": 0 if sample is None else int(len(sample[HAS_BEHAVIOR])),
        "wall_s": time.perf_counter() - t0,
        "run": {"name": name, "storage_path": storage},
    }
    source = {"items": job.items or f"synthetic demo catalog ({job.demo_items} items)",
              "num_rows": stats.num_rows, "num_valid": stats.num_valid}
    version = tok.save_pretrained(job.output, source=source, overwrite=job.overwrite,
                                  extra_files={"metrics.json": json.dumps(metrics, indent=2).encode()})
    print(f"[sidserve] model {version} written to {job.output}", flush=True)
    return tok, version, metrics


def run_cli(args) -> int:
    """``sidserve train`` / jobs/train.py: build the job from parsed flags and run it (exit code 2
    on bad input)."""
    from sidserve.inputs import parse_columns
    from sidserve.runner import run_job

    def body():
        job = TrainJobConfig(
            output=args.output, items=args.items, tokenizer_type=args.tokenizer,
            tokenizer=load_config_options(args.config, args.tokenizer, epochs=args.epochs,
                                          batch_size=args.batch_size),
            columns=parse_columns(args.column), sample_size=args.sample_size,
            num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
            storage_path=args.storage_path, name=args.name, resume=args.resume,
            max_failures=args.max_failures, demo_items=args.demo_items, overwrite=args.overwrite,
            checkpoint_every_steps=args.checkpoint_every_steps,
        )
        tok, version, metrics = fit_distributed(job)
        if job.items is None:  # the demo: show what the artifact gives a few items
            from sidserve.tokenizers.registry import load_tokenizer

            items = demo_catalog(job).slice(0, 40)
            enc = load_tokenizer(job.output).encode(items)
            rows = list(range(3)) + [int(i) for i in np.flatnonzero(enc.path == "content_only")[:1]]
            print("[sidserve] SIDs of demo items (layout: " +
                  ", ".join(f"{e['group']}{e['index']}" for e in tok.sid_layout) + "):")
            for i in rows:
                print(f"    {enc.item_id[i]}  sid={enc.sid_str[i]:<22} path={enc.path[i]:<12} "
                      f"behavior_weights={[round(float(w), 3) for w in enc.behavior_weights[i]]}")
        final = metrics["final"]
        print(f"[sidserve] final: recon={final['recon']:.4f} entropy={final['entropy_mean']:.3f} "
              f"utilisation={final['utilisation_mean']:.3f} collision_rate={final['collision_rate']:.4f}; "
              f"artifact {version} at {job.output} (metrics.json inside)")

    return run_job(body)
