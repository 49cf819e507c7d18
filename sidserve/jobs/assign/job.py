"""The assignment job's driver: configuration, the catalog read, the four stages in order,
verification, summary and the atomic publish through LATEST."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from sidserve.artifact import safe_name, write_bytes
from sidserve.items import ITEM_ID, POPULARITY
from sidserve.jobs.assign.dedup import dedup_partition
from sidserve.jobs.assign.encode import EncodeAndScatter, input_renames, plan_units, read_unit
from sidserve.jobs.assign.publish import ensure_nonempty_dir
from sidserve.jobs.assign.resolve import resolve_partition
from sidserve.jobs.assign.shuffle import (
    MANIFEST_SCHEMA,
    collect_manifest,
    index_manifest,
    read_manifests,
    run_tasks,
    scatter_previous,
    staging_files,
)
from sidserve.jobs.assign.stats import reduce_stats
from sidserve.jobs.catalog import check_schema
from sidserve.snapshot import (
    ITEMS_SCHEMA,
    REJECTS_SCHEMA,
    RESERVATIONS_SCHEMA,
    SUMMARY,
    SnapshotRoot,
    new_version,
)
from sidserve.tokenizers.registry import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class AssignJobConfig:
    items: str  # Parquet file/dir/URI of the catalog
    model: str  # tokenizer artifact dir/URI
    output: str  # snapshot root dir/URI
    num_workers: int = 2  # encoder actors
    use_gpu: bool = False  # one GPU per encoder actor
    # logical CPUs per encoder actor (CPU runs); None: 1, or the cluster's CPUs / num_workers when
    # fewer (asking for more than the cluster has would leave the extra actors pending)
    cpus_per_worker: float | None = None
    batch_size: int = 8192  # rows per encode call
    version: str | None = None  # snapshot version (default: time + random suffix)
    # rows an encoder actor reads and encodes at a time (one staging file each): bounds its memory
    # (65,536 rows of 128 float32s: 32 MiB of input)
    rows_per_task: int = 65536
    rows_per_partition: int = 100_000  # rows one grouping task holds: bounds its memory
    # retention: snapshots kept (the newest; the published one always); None keeps all. Staging
    # left by runs that died (untouched for a day) is deleted either way
    keep_snapshots: int | None = None
    # nights an absent (or rejected) item's (sid, dedup) key stays reserved for it: no other
    # item takes it meanwhile, and the item gets it back when it returns with the same SID.
    # A month covers seasonal delistings and a few nights of bad upstream data; 0 frees a key
    # the first night its item is missing (before reservations existed)
    reserve_nights: int = 30
    # sticky assignment (sidserve/jobs/assign/sticky.py): an item keeps its previous code at a
    # position unless the new best scores more than this above it (cosine for ADC-SID; OPQ:
    # 2 x.c - |c|^2); None or 0 = the plain assignment (0 would keep a previous code only on an
    # exact tie, which gives the plain snapshot: it runs as None, without the candidate encode).
    # Needs a tokenizer with independent positions
    sticky_delta: float | None = None
    # best codes per position the encoder reports for the comparison; a previous code outside
    # them is replaced (on Beauty 8 floored churn at 18%, 32 at 2.5%: docs/stability.md)
    sticky_candidates: int = 32
    # refuse to publish a snapshot whose churn (share of common items whose SID changed) is
    # above this; LATEST stays on the previous snapshot and the job fails naming both numbers
    max_churn: float | None = None
    # modality -> input column (--column); None: the mapping the model was fitted with, for the
    # columns the input has under those names
    columns: dict[str, str] | None = None


def encoder_cpus(job: AssignJobConfig) -> float:
    """CPUs each encoder actor asks for: ``cpus_per_worker``, or 1 (fewer on a cluster with
    fewer CPUs than ``num_workers``). Raises if the actors cannot all fit in the cluster."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if job.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if gpus < job.num_workers:
            raise ValueError(f"--use-gpu with --num-workers {job.num_workers} needs {job.num_workers} GPUs but the "
                             f"cluster has {gpus:g}")
        return job.cpus_per_worker or 0.0
    cpus = job.cpus_per_worker if job.cpus_per_worker is not None else min(1.0, total / job.num_workers)
    if cpus <= 0 or job.num_workers * cpus > total + 1e-9:
        raise ValueError(f"--num-workers {job.num_workers} x {cpus:g} CPU per encoder needs "
                         f"{job.num_workers * cpus:g} CPUs but the cluster has {total:g}; lower --num-workers "
                         "or --cpus-per-worker, or add nodes")
    return cpus


def encoder_actors(job: AssignJobConfig, n_units: int) -> int:
    """Encoder actors a run starts: ``num_workers``, but no more than read units (each unit is
    one call: a catalog of one unit, up to ``rows_per_task`` rows, would otherwise start actors
    that import torch and load the model for nothing)."""
    return max(1, min(job.num_workers, n_units))


def encode_and_scatter(units: list[dict], job: AssignJobConfig, staging: str, n_parts: int, read_columns: list[str],
                       renames: dict[str, str], candidates: int = 0):
    """Stage A: each unit read, encoded and scattered by an encoder actor; -> the manifest of
    what they wrote (shuffle.MANIFEST_SCHEMA). ``candidates``: best codes per position to
    report (sticky assignment)."""
    import ray.data

    cpus = encoder_cpus(job)
    actors = encoder_actors(job, len(units))
    out = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        EncodeAndScatter, fn_constructor_kwargs={
            "model_uri": job.model, "use_gpu": job.use_gpu, "batch_size": job.batch_size,
            "staging": staging, "n_parts": n_parts, "candidates": candidates, "items_uri": job.items,
            "read_columns": read_columns, "renames": renames, "rows_per_task": job.rows_per_task,
            "delta": job.sticky_delta},
        batch_size=1, batch_format="pyarrow",
        # all actors from the start: with min_size 1 alone, Ray Data's autoscaler kept one actor
        # for a whole 1M run (docs/benchmarks.md); one that cannot be placed stays pending
        # without holding the others up
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors),
        num_gpus=1 if job.use_gpu else None, num_cpus=cpus or None,
    )
    return collect_manifest(out)


def scatter_previous_units(uri: str, columns: list[str], staging: str, n_parts: int, rows_per_read: int) -> list:
    """The previous snapshot's rows under ``uri`` (its items or reservations) written to staging
    split by item_id partition -> their manifests (MANIFEST_SCHEMA tables).

    One 1-CPU task per read unit (``plan_units``) reads its own row groups, as the encoders do:
    no row passes through the object store. Through a Ray Data read (0.5-CPU tasks, blocks in
    the store) this step was the refresh's peak at 20M items on 2 CPUs: 6.2 GiB PSS, against
    ~3 GiB in the rest of the job (docs/benchmarks.md)."""
    import pyarrow as pa

    units, _ = plan_units(uri, rows_per_read)
    write = scatter_previous(staging, n_parts)

    def scatter_unit(unit: dict) -> pa.Table:
        from sidserve.artifact import resolve

        # the unit's rows whole (item_id, SID, dedup: ~50 bytes a row), so one staging file per unit
        rows = pa.concat_tables(list(read_unit(resolve(uri)[0], unit, rows_per_read, columns)))
        return write(rows).cast(MANIFEST_SCHEMA)

    return run_tasks(scatter_unit, units)


def encoder_environments(staging: SnapshotRoot) -> dict[str, Any]:
    """The environments the encoder actors recorded (one file each) -> {"encoders": the distinct
    ones, "probe_hash": theirs when they all agree (else None: the snapshot's rows were computed
    by encoders that differ in their last bits, e.g. GPU and CPU actors mixed)}."""
    import pyarrow.fs as pafs

    infos = staging.fs.get_file_info(pafs.FileSelector(staging.join("environment"), allow_not_found=True))
    envs = []
    for info in infos:
        with staging.fs.open_input_stream(info.path) as f:
            env = json.loads(f.read())
        if env not in envs:
            envs.append(env)
    hashes = {e["probe_hash"] for e in envs}
    return {"encoders": envs, "probe_hash": hashes.pop() if len(hashes) == 1 else None}


def run_assignment(job: AssignJobConfig) -> dict[str, Any]:
    """Encode, dedup, write and publish a snapshot. Returns its summary."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray
    import ray.data

    if job.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {job.num_workers}")
    for name in ("rows_per_partition", "rows_per_task", "batch_size"):
        if getattr(job, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(job, name)}")
    if not isinstance(job.reserve_nights, int) or job.reserve_nights < 0:
        raise ValueError(f"reserve_nights must be an int >= 0, got {job.reserve_nights!r}")
    if job.sticky_delta is not None and not job.sticky_delta >= 0:
        raise ValueError(f"sticky_delta must be >= 0, got {job.sticky_delta!r}")
    if job.sticky_candidates < 1:
        raise ValueError(f"sticky_candidates must be >= 1, got {job.sticky_candidates!r}")
    if job.max_churn is not None and not 0 <= job.max_churn <= 1:
        raise ValueError(f"max_churn must be in [0, 1], got {job.max_churn!r}")
    if job.sticky_delta == 0:  # documented as the plain assignment: no candidate encode, no comparison
        job = dataclasses.replace(job, sticky_delta=None)
    if job.version is not None:
        root = SnapshotRoot(job.output)
        if root.fs.get_file_info(root.join("snapshots", safe_name(job.version, "version"))).type \
                != pafs.FileType.NotFound:
            raise ValueError(f"snapshot version {job.version!r} already exists under {root.uri_of('snapshots')}: "
                             "snapshots are immutable (it could be the published one or a rollback target); "
                             "choose a new version")
    t0 = time.perf_counter()
    tok = load_tokenizer(job.model)  # verifies the manifest before any work (and before Ray starts)
    sticky = job.sticky_delta is not None
    if sticky and tok.sticky_unit is None:
        raise ValueError(f"--sticky-delta: this {tok.tokenizer_type} model is residual (a position's code depends on "
                         "the codes before it: rq-vae, or adc-sid with behavior_quantization residual / "
                         "residual_input), so a code cannot be kept alone and it offers no alternative whole SIDs; "
                         "sticky assignment needs independent positions (adc-sid with parallel behavioral codes, "
                         "or opq) or residual k-means (rq-kmeans, rq-evidence: whole SIDs are kept)")
    candidates = min(job.sticky_candidates, tok.codebook_size) if sticky else 0
    if not ray.is_initialized():
        ray.init()
    model_version = tok.version
    root = SnapshotRoot(job.output)
    version = job.version or new_version()
    previous = root.latest()
    staging = root.staging_dir(version)
    snap = root.snapshot_dir(version)
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = time.perf_counter() - t0 - sum(stages.values())

    units, schema = plan_units(job.items, job.rows_per_task)  # footers only
    n_input = sum(u["rows"] for u in units)
    if not n_input:
        raise ValueError(f"{job.items}: the input has no rows")
    names = list(schema.names)
    mapping = input_renames(job.columns, tok, names)
    renamed = [mapping.get(c, c) for c in names]
    check_schema(renamed, tok.config)
    if ITEM_ID not in renamed:
        raise ValueError(f"input is missing required column 'item_id'; it has {sorted(renamed)}")
    read_columns = [c for c, r in zip(names, renamed) if r == ITEM_ID or r == POPULARITY or r.endswith("_emb")]
    n_parts = max(1, -(-n_input // job.rows_per_partition))

    # A. encode, each call's rows written split by item_id partition
    enc_manifest = encode_and_scatter(units, job, staging, n_parts, read_columns, mapping, candidates)
    encoded_rows = pc.sum(enc_manifest.column("rows")).as_py() or 0
    if encoded_rows != n_input:
        raise RuntimeError(f"encoded {encoded_rows} rows, the input has {n_input}")
    environment = encoder_environments(SnapshotRoot(staging))
    prev_manifests = []
    if previous is not None:  # its items' keys, and the keys it held for absent items
        for sub, cols in (("items", ["item_id", "sid_str", "dedup"]),
                          ("reservations", ["item_id", "sid_str", "dedup", "nights_absent"])):
            if sub == "reservations" and not root.count_reservations(previous):
                continue  # none held (or a snapshot from before reservations)
            prev_manifests += scatter_previous_units(f"{root.snapshot_dir(previous)}/{sub}", cols, staging, n_parts,
                                                     job.rows_per_partition)
    prev_manifest = pa.concat_tables([MANIFEST_SCHEMA.empty_table(), *prev_manifests])
    lap("encode")
    log.info("encoded %d rows into %d partitions in %.1f s", n_input, n_parts, stages["encode"])

    # B. resolve duplicates and previous assignments, one item_id partition per task
    common = {"staging": staging, "snapshot": snap, "n_parts": n_parts, "reserve_nights": job.reserve_nights,
              "sticky_delta": job.sticky_delta, "sticky_candidates": candidates, "sid_length": len(tok.sid_layout),
              "missing_code": tok.codebook_size, "sticky_unit": tok.sticky_unit}
    stage_root = SnapshotRoot(staging)
    index = stage_root.join("index")  # each partition's segment list (index_manifest)
    cur_files = index_manifest(enc_manifest, n_parts, stage_root.fs, index, "encoded")
    prev_files = index_manifest(prev_manifest, n_parts, stage_root.fs, index, "previous")
    specs = [{**common, "part": p, "current": cur_files[p], "previous": prev_files[p]} for p in range(n_parts)]
    resolved = run_tasks(resolve_partition, specs)
    lap("resolve")

    # C. dedup, one SID partition per task, written straight to the snapshot with its statistics
    sid_manifest = read_manifests(stage_root.fs, [r["manifest"] for r in resolved])
    sid_files = index_manifest(sid_manifest, n_parts, stage_root.fs, index, "resolved")
    L, K = len(tok.sid_layout), tok.codebook_size
    specs = [{**common, "part": q, "files": sid_files[q], "model_version": model_version, "sid_length": L,
              "codebook_size": K} for q in range(n_parts)]
    deduped = run_tasks(dedup_partition, specs)
    removed = sum(r["removed"] for r in resolved)
    stats = reduce_stats([{"s": r["stats"]} for r in deduped], L, K, removed)
    lap("dedup+write")

    # D. verify what was written, then publish
    for sub, schema in (("items", ITEMS_SCHEMA), ("rejects", REJECTS_SCHEMA), ("reservations", RESERVATIONS_SCHEMA)):
        ensure_nonempty_dir(root, version, sub, schema)  # an empty side has no part file
    items_ds = pads.dataset(root.join("snapshots", version, "items"), filesystem=root.fs, format="parquet")
    n_items = items_ds.count_rows()
    n_rejects = pads.dataset(root.join("snapshots", version, "rejects"), filesystem=root.fs,
                             format="parquet").count_rows()
    reasons: dict[str, int] = {}
    for r in resolved:
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    if n_items + n_rejects != n_input:
        raise RuntimeError(f"row counts do not reconcile: {n_input} input != {n_items} items + {n_rejects} rejects")
    if n_items != sum(r["items"] for r in deduped) or n_rejects != sum(r["rejects"] for r in resolved):
        raise RuntimeError(f"the snapshot holds {n_items} items and {n_rejects} rejects, the tasks wrote "
                           f"{sum(r['items'] for r in deduped)} and {sum(r['rejects'] for r in resolved)}")
    if not items_ds.schema.remove_metadata().equals(ITEMS_SCHEMA):
        raise RuntimeError(f"written schema {items_ds.schema} != expected {ITEMS_SCHEMA}")
    n_reserved = root.count_reservations(version)
    if n_reserved != sum(r["reservations"] for r in deduped):
        raise RuntimeError(f"the snapshot holds {n_reserved} reservations, the tasks wrote "
                           f"{sum(r['reservations'] for r in deduped)}")
    if stats["items"] != n_items:
        raise RuntimeError(f"statistics saw {stats['items']} items, the snapshot has {n_items}")
    lap("verify")

    summary = {
        "version": version, "previous_version": previous, "model_version": model_version,
        "model": job.model, "items_uri": job.items, "input_rows": n_input, "items": n_items,
        "rejects": n_rejects, "rejects_by_reason": reasons, "sid_layout": tok.sid_layout,
        "reservations": n_reserved, "reservations_expired": sum(r["expired"] for r in resolved),
        "reserve_nights": job.reserve_nights,
        "sticky": sticky_summary(job, resolved),
        **{k: v for k, v in stats.items() if k != "items"},
        "partitions": n_parts,
        "encoder_actors": encoder_actors(job, len(units)),
        # files the groupings wrote to staging (each: one per map call, not per map call x partition),
        # besides one manifest per resolve task and 3 index files
        "staging_files": {"encoded": staging_files(enc_manifest), "previous": staging_files(prev_manifest),
                          "resolved": staging_files(sid_manifest)},
        "staging_bytes": {name: pc.sum(m.column("nbytes")).as_py() or 0 for name, m in
                          (("encoded", enc_manifest), ("previous", prev_manifest), ("resolved", sid_manifest))},
        "duration_s": time.perf_counter() - t0,
        "created_at": time.time(),  # unix seconds: replicas export the served snapshot's age
        # torch, CPU capability, device and probe hash of the encoders (sidserve/tokenizers/probe.py):
        # replicas whose probe hash differs say so (GET /v1/model, sidserve_probe_mismatch)
        "environment": environment,
        "stage_seconds": stages,
        # CPU-side seconds summed over the grouping tasks (reading their segments, and in all)
        "task_seconds": {name: {k: sum(r["seconds"][k] for r in results) for k in ("read", "total")}
                         for name, results in (("resolve", resolved), ("dedup+write", deduped))},
    }
    write_bytes(root.fs, root.join("snapshots", version, SUMMARY), json.dumps(summary, indent=2).encode())
    if job.max_churn is not None and summary["churn"]["churn"] > job.max_churn:
        reason = (f"churn {summary['churn']['churn']:.4f} ({summary['churn']['changed']} of "
                  f"{summary['churn']['common']} items present both nights changed SID) is above --max-churn "
                  f"{job.max_churn}")
        root.refuse(version, reason)  # never published, never kept by retention as a rollback target
        raise ChurnRefused(f"{reason}: snapshot {version} is written but not published; LATEST stays {previous}")
    root.publish(version, expected=previous)  # fails if another run published meanwhile
    try:
        root.fs.delete_dir(root.join("_staging", version))
    except OSError:  # leftovers are harmless: nothing reads _staging
        log.warning("could not delete %s", staging)
    summary["pruned"] = root.prune(job.keep_snapshots)
    if any(summary["pruned"].values()):
        log.info("retention: deleted %s", summary["pruned"])
    summary["duration_s"] = time.perf_counter() - t0
    return summary


class ChurnRefused(RuntimeError):
    """A snapshot's churn is above ``max_churn``: it was not published."""


def sticky_summary(job: AssignJobConfig, resolved: list[dict]) -> dict | None:
    if job.sticky_delta is None:
        return None
    per = [r["sticky"]["kept_per_position"] for r in resolved if r.get("sticky")]
    kept = [sum(col) for col in zip(*per)] if per else []
    return {"delta": job.sticky_delta, "codes_kept": sum(kept), "kept_per_position": kept,
            "unscored": sum(r["sticky"]["unscored"] for r in resolved if r.get("sticky"))}


def run_cli(args) -> int:
    """``sidserve assign`` / jobs/assign.py: run the assignment (exit code 2 on bad input)."""
    from sidserve.inputs import parse_columns
    from sidserve.runner import run_job

    def body():
        s = run_assignment(AssignJobConfig(
            items=args.items, model=args.model, output=args.output, num_workers=args.num_workers,
            use_gpu=args.use_gpu, batch_size=args.batch_size, rows_per_partition=args.rows_per_partition,
            cpus_per_worker=args.cpus_per_worker,
            columns=parse_columns(args.column) or None, keep_snapshots=args.keep_snapshots,
            reserve_nights=args.reserve_nights, sticky_delta=args.sticky_delta,
            sticky_candidates=args.sticky_candidates, max_churn=args.max_churn))
        print(f"[sidserve] snapshot {s['version']} published at {args.output}: {s['items']} items, "
              f"{s['rejects']} rejects, collision rate {s['collision_rate']:.4f}, "
              f"churn {s['churn']['churn']:.4f} ({s['duration_s']:.1f} s)")

    return run_job(body)
