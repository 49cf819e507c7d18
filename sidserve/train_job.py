"""Distributed fitting on Ray Train (``jobs/train.py``).

    pre-pass (Ray Data)   validate the whole input, N_min/N_max, counts, skipped rows
    k-means sample        one sample on the driver, the same object for every worker
    TorchTrainer          N workers, each streams its shard of the cleaned dataset
                          (get_dataset_shard), DDP; the step is ``training.train_step``,
                          the same as the in-process fit
    checkpoints           every epoch via ray.train.report (rank 0 writes); a restarted
                          worker group or a rerun with --resume continues from the last one
    collision regulation  (when on) every refresh epoch: SIDs of all shards gathered by
                          item_id, the same overlapping pairs planned on every rank, each
                          rank repels a disjoint share (``regulation_refresh``)
    artifact              SemanticIdTokenizer.save_pretrained + metrics.json

Per-epoch metrics (every loss term, utilisation and entropy per SID position and the
collision rate of the codes assigned during the epoch, items/s) go to the job log, to
``ray.train.report`` and to ``metrics.json``; the final metrics come from an evaluation
pass over every worker's shard with the trained model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import yaml

from sidserve.catalog import HAS_BEHAVIOR, CatalogStats, catalog_prepass, clean_batch
from sidserve.config import BEHAVIOR, TokenizerConfig
from sidserve.items import ITEM_ID, POPULARITY, ItemArrays, column_name
from sidserve.model.adc_sid import ADCSIDModel, ModelInput
from sidserve.regulation import build_pair_set, plan_overlaps, progress_of, refresh_seed
from sidserve.training import CodeStats, Sync, TrainState, init_codebooks, train_step

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


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
    num_workers: int = 2  # Ray Train workers (data-parallel)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float | None = None  # CPUs per worker; None: 1, or less on a small cluster
    # so that Ray Data keeps DATA_CPUS for reading (Train holding every CPU starves Data forever)
    storage_path: str | None = None  # checkpoints (shared storage on multi-node clusters)
    name: str | None = None  # run name under storage_path
    resume: bool = False  # continue the run `name` from its last checkpoint
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    demo_items: int = 20000  # size of the synthetic demo catalog
    cache_clean: bool | None = None  # keep the cleaned catalog in the object store; None: if small
    init_model: str | None = None  # warm start: weights of this artifact instead of k-means init
    # test-only hooks, never set from the CLI
    # {"epoch": e, "rank": r, "marker": path}, or a list of them: die once at each
    fault_injection: dict | list[dict] | None = None
    record_shards_dir: str | None = None  # each worker writes the item ids of its epoch-0 shard

    def __post_init__(self):
        if self.name is None:  # a new run each time unless named (and then --resume continues it)
            base = os.path.basename(os.path.normpath(self.output)) or "model"
            self.name = f"sidserve-{base}-{time.strftime('%Y%m%d-%H%M%S')}"

    def storage(self) -> str:
        path = self.storage_path or os.path.join(os.path.dirname(os.path.abspath(self.output)), "checkpoints")
        return path if "://" in path else os.path.abspath(path)


def load_config_options(path: str | None, kind: str = "adc-sid", **overrides) -> dict[str, Any]:
    """A YAML file of config fields + flag overrides -> a mapping of the ``kind`` tokenizer's
    config fields (unknown keys are errors naming them; the input fields may be absent)."""
    import dataclasses

    from sidserve.base import tokenizer_class

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


# collectives -----------------------------------------------------------------------


class DistSync(Sync):
    """torch.distributed collectives (gloo or nccl) for train_step."""

    def __init__(self, device: torch.device):
        self.device = device

    def mean(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / dist.get_world_size()).tolist()

    def sum_(self, tensor):
        t = tensor.to(self.device, copy=True)
        dist.all_reduce(t)
        return t.to(tensor.device)

    def gather(self, tensor):
        local = tensor.to(self.device)
        n = torch.tensor([local.shape[0]], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(tensor.device)

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather_object(self, obj) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out


# batches -----------------------------------------------------------------------------


def batch_to_input(batch: dict[str, np.ndarray], config: TokenizerConfig, device) -> ModelInput:
    """A numpy batch of the cleaned dataset -> ModelInput on ``device``."""
    def t(x):  # Ray hands out read-only views: copy into a writable tensor
        return torch.from_numpy(np.array(x, copy=True, order="C")).to(device)

    return ModelInput(
        {m: t(np.asarray(batch[column_name(m)], dtype=np.float32)) for m in config.content_modalities},
        t(np.asarray(batch[column_name(BEHAVIOR)], dtype=np.float32)) if config.has_behavior else None,
        t(np.asarray(batch[HAS_BEHAVIOR], dtype=bool)),
        t(np.asarray(batch[POPULARITY], dtype=np.float64)) if POPULARITY in batch else None,
    )


# the worker loop ----------------------------------------------------------------------


def _save_checkpoint(directory: str, model: ADCSIDModel, optimizer, epoch: int, state: TrainState,
                     history: list[dict]) -> None:
    torch.save(model.state_dict(), os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "step": state.step,
                "generator": state.generator.get_state()}, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, "history.json"), "w") as f:
        json.dump(history, f)


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    tcfg = TokenizerConfig.from_dict(cfg["tokenizer"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    sync: Sync = DistSync(device) if world > 1 else Sync()
    torch.manual_seed(tcfg.seed)

    model = ADCSIDModel(tcfg)
    if tcfg.has_behavior:
        model.set_catalog_stats(cfg["n_min"], cfg["n_max"])
    optimizer_state = None
    start_epoch, history = 0, []
    state = TrainState.create(tcfg.seed + 7919 * rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), weights_only=True))
            saved = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
            with open(os.path.join(d, "history.json")) as f:
                history = json.load(f)
        optimizer_state, start_epoch, state.step = saved["optimizer"], saved["epoch"] + 1, saved["step"]
        if rank == 0:
            print(f"[sidserve] resuming from checkpoint after epoch {saved['epoch']}", flush=True)
    elif cfg.get("init_state_ref") is not None:  # warm start from the current model
        state_dict = {k: torch.from_numpy(v.copy()) for k, v in ray.get(cfg["init_state_ref"]).items()}
        model.load_state_dict(state_dict)
        if tcfg.has_behavior:  # this catalog's statistics, not the old model's
            model.set_catalog_stats(cfg["n_min"], cfg["n_max"])
    else:
        sample = ray.get(cfg["sample_ref"])
        init_codebooks(model, batch_to_input(sample, tcfg, "cpu"))  # same sample, same seed: same init

    model.to(device)
    forward = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # usage counters are per worker; train_step reduces them
            find_unused_parameters=not tcfg.use_behavior_gate,
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    shard = ray.train.get_dataset_shard("train")
    faults = cfg.get("fault_injection") or []
    faults = [faults] if isinstance(faults, dict) else faults
    pair_set, pair_step = None, 0
    for epoch in range(start_epoch, tcfg.epochs):
        fault = next((f for f in faults if f["epoch"] == epoch and f["rank"] == rank), None)
        if fault and not os.path.exists(fault["marker"]):
            # test hook: die hard mid-run, once. Wait first: the controller collects the
            # previous report (and its checkpoint) on its next poll (every 2 s by default)
            time.sleep(fault.get("delay_s", 6.0))
            open(fault["marker"], "w").close()
            print(f"[sidserve] fault injection: worker {rank} dies in epoch {epoch}", flush=True)
            os._exit(1)
        t0 = time.perf_counter()
        refresh: dict[str, Any] = {}
        if tcfg.collision_regulation != "off" and (pair_set is None or epoch % tcfg.collision_refresh_every == 0):
            pair_set, refresh = regulation_refresh(model, shard, tcfg, sync, device, epoch)
            pair_step = 0
            if cfg.get("record_shards_dir") and len(pair_set):  # test hook: same pairs on every rank?
                ids = pair_set.items.item_ids
                with open(os.path.join(cfg["record_shards_dir"], f"rank-{rank}-pairs-epoch-{epoch}.json"), "w") as f:
                    json.dump({"pairs": [[ids[a], ids[b]] for a, b in zip(pair_set.a, pair_set.b)],
                               "weight": pair_set.weight.tolist()}, f)
        sums: dict[str, float] = {}
        steps = 0
        codes = CodeStats(tcfg)
        seen: list[np.ndarray] = []
        batches = iter(shard.iter_batches(batch_size=tcfg.batch_size, batch_format="numpy",
                                          local_shuffle_buffer_size=4 * tcfg.batch_size,
                                          local_shuffle_seed=tcfg.seed + epoch))
        data_s = step_s = 0.0
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            data_s += time.perf_counter() - t_wait
            # every worker takes the same number of steps, or the collectives would hang
            if not sync.all_true(batch is not None and len(batch[HAS_BEHAVIOR]) > 1):
                break
            t_step = time.perf_counter()
            x = batch_to_input(batch, tcfg, device)
            pairs = None
            if pair_set is not None:  # same number of steps on every rank; a rank may get no pairs
                pairs = pair_set.batch(pair_step, tcfg.collision_pairs_per_batch, rank, world)
                pair_step += 1
            metrics = train_step(model, optimizer, x, state, forward=forward, sync=sync, pairs=pairs)
            codes.add(state.last_codes.cpu().numpy())
            step_s += time.perf_counter() - t_step
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            if cfg.get("record_shards_dir") and epoch == start_epoch and ITEM_ID in batch:
                seen.append(np.asarray(batch[ITEM_ID]).astype(str))
        if seen:
            path = os.path.join(cfg["record_shards_dir"], f"rank-{rank}-epoch-{epoch}.txt")
            with open(path, "w") as f:
                f.write("\n".join(np.concatenate(seen)))
        loss_means = sync.mean([sums.get(k, 0.0) / max(steps, 1) for k in sorted(sums)])
        record = dict(zip(sorted(sums), loss_means))
        record.update(codes.reduce(sync))
        record.update(refresh)
        elapsed, data_s, step_s = sync.mean([time.perf_counter() - t0, data_s, step_s])
        record.update(data_wait_s=data_s, step_s=step_s)  # mean over workers: where the epoch went
        record.update(epoch=epoch, steps=steps, items_per_s=record["num_items"] / max(elapsed, 1e-9),
                      started_at_epoch=start_epoch)  # > 0: this attempt resumed from a checkpoint
        history.append(record)
        if rank == 0:
            print("[sidserve] epoch {}/{}  {}".format(epoch + 1, tcfg.epochs, "  ".join(
                f"{k}={record[k]:.4g}" for k in ("recon", "vq", "align", "reg", "gate_sparsity",
                                                  "sparsity_target", "align_w_above_half", "entropy_mean",
                                                  "utilisation_mean", "collision_rate", "collision",
                                                  "catalog_collision_rate", "admissible_share", "items_per_s")
                if k in record)), flush=True)
        flat = {k: v for k, v in record.items() if not isinstance(v, list)}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(d, model, optimizer, epoch, state, history)
                ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(flat)

    # final metrics: the trained model over every worker's whole shard
    final = evaluate_shard(model, shard, tcfg, sync, device)
    if rank == 0:
        print("[sidserve] final  " + "  ".join(f"{k}={final[k]:.4g}" for k in
              ("recon", "entropy_mean", "utilisation_mean", "collision_rate")), flush=True)
    if rank == 0:  # the final checkpoint carries the final metrics to the driver
        with tempfile.TemporaryDirectory() as d:
            _save_checkpoint(d, model, optimizer, tcfg.epochs - 1, state, history)
            with open(os.path.join(d, "final.json"), "w") as f:
                json.dump(final, f)
            ray.train.report({"final_recon": final["recon"]}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"final_recon": final["recon"]})


def regulation_refresh(model: ADCSIDModel, shard, tcfg: TokenizerConfig, sync: Sync, device,
                       epoch: int):
    """Collision regulation across workers -> (PairSet, metrics), identical on every rank.

    Pass 1: every worker assigns SIDs to its shard; (item_id, SID) of all workers are
    gathered and sorted by item_id, so the overlaps do not depend on which worker read
    which item. Pass 2: every worker picks from its shard the rows of the items in a
    selected pair and those rows are gathered; the pair set is then built from the
    same inputs everywhere (``sidserve.regulation``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    model.eval()
    # ids as Arrow strings (about 4 bytes + the id per item, not numpy's fixed-width
    # unicode), codes in the narrowest dtype: this is what every worker holds for the
    # whole catalog
    code_dtype = np.int16 if tcfg.codebook_size < np.iinfo(np.int16).max else np.int32
    ids, codes = [], []
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=tcfg.batch_size, batch_format="numpy"):
            if ITEM_ID not in batch:
                raise ValueError("collision regulation needs an item_id column to match items across workers")
            codes.append(model(batch_to_input(batch, tcfg, device), codes_only=True).codes.cpu().numpy()
                         .astype(code_dtype))
            ids.append(pa.array(np.asarray(batch[ITEM_ID]).astype(str), pa.string()))
    model.train()
    L = tcfg.sid_length
    local = (pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
             np.concatenate(codes) if codes else np.zeros((0, L), code_dtype))
    parts = sync.gather_object(local)
    all_ids = pa.concat_arrays([p[0] for p in parts])
    all_codes = np.concatenate([p[1] for p in parts])
    order = pc.sort_indices(all_ids)  # by id: the same catalog order on every rank
    all_ids, all_codes = all_ids.take(order), all_codes[order.to_numpy()]
    if len(all_ids) > 1:
        same = pc.equal(all_ids.slice(1), all_ids.slice(0, len(all_ids) - 1)).to_numpy(zero_copy_only=False)
        if same.any():
            dup = all_ids[int(np.flatnonzero(same)[0]) + 1].as_py()
            raise ValueError(f"collision regulation needs unique item ids; {dup!r} appears more than once")
    seed = refresh_seed(tcfg, epoch)
    plan = plan_overlaps(all_codes, tcfg, seed=seed)
    needed = all_ids.take(pa.array(plan.needed, pa.int64()))
    mine: list[dict[str, np.ndarray]] = []
    for batch in shard.iter_batches(batch_size=tcfg.batch_size, batch_format="numpy"):
        batch_ids = pa.array(np.asarray(batch[ITEM_ID]).astype(str), pa.string())
        keep = pc.is_in(batch_ids, value_set=needed).to_numpy(zero_copy_only=False)
        if keep.any():
            mine.append({k: np.asarray(v)[keep] for k, v in batch.items()})
    picked = {k: np.concatenate([m[k] for m in mine]) for k in mine[0]} if mine else None
    rows = [p for p in sync.gather_object(picked) if p is not None]
    got = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else None
    if got is None:
        items = ItemArrays({m: np.zeros((0, d), np.float32) for m, d in tcfg.modality_dims.items()},
                           np.zeros((0, tcfg.behavior_dim), np.float32) if tcfg.has_behavior else None,
                           np.zeros(0, bool))
        index = np.zeros(0, np.int64)
    else:
        items = ItemArrays({m: np.asarray(got[column_name(m)], np.float32) for m in tcfg.content_modalities},
                           np.asarray(got[column_name(BEHAVIOR)], np.float32) if tcfg.has_behavior else None,
                           np.asarray(got[HAS_BEHAVIOR], bool), np.asarray(got[ITEM_ID]).astype(str))
        got_ids = pa.array(np.asarray(got[ITEM_ID]).astype(str), pa.string())
        index = pc.index_in(got_ids, value_set=all_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    pair_set = build_pair_set(plan, items, index, tcfg, progress=progress_of(epoch, tcfg.epochs), seed=seed)
    return pair_set, {**plan.metrics, **pair_set.metrics}


@torch.no_grad()
def evaluate_shard(model: ADCSIDModel, shard, tcfg: TokenizerConfig, sync: Sync, device) -> dict[str, Any]:
    """Quantization metrics of the trained model over all shards (one inference pass)."""
    model.eval()
    codes = CodeStats(tcfg)
    recon_sum, n = 0.0, 0
    nb = tcfg.num_behavior_experts if tcfg.has_behavior else 0
    r_sum, r_count = torch.zeros(nb), 0
    batches = iter(shard.iter_batches(batch_size=tcfg.batch_size, batch_format="numpy"))
    while True:
        batch = next(batches, None)
        if batch is None:
            break
        x = batch_to_input(batch, tcfg, device)
        out = model(x)
        codes.add(out.codes.cpu().numpy())
        recon_sum += float(out.recon.sum())
        n += out.recon.shape[0]
        if nb:
            r_sum += (out.behavior_weights * model.weight_scale)[x.has_behavior].sum(0).cpu()
            r_count += int(x.has_behavior.sum())
    report = codes.reduce(sync)
    total_recon, total_n = sync.mean([recon_sum, float(n)])
    report["recon"] = total_recon / max(total_n, 1.0)
    if nb:  # mean R(e_b) per expert over every worker's items with behavior
        sums = sync.mean([*r_sum.tolist(), float(r_count)])
        mean_r = torch.tensor(sums[:nb]) / max(sums[nb], 1e-12)
        report["behavior_weight_mean_raw"] = mean_r.tolist()
        model.set_weight_scale(mean_r)  # behavior_weight_scale="unit_mean"; same on every worker
    return report


# the driver ---------------------------------------------------------------------------


CACHE_FRACTION = 0.25  # cache the cleaned catalog when it takes < this share of the object store
DATA_CPUS = 0.5  # CPUs left to Ray Data's read/clean tasks while the trainers run
RESOURCE_SETTLE_S = 10.0  # how long to wait for CPUs still held by work that just ended


def _available_after_settling(cpus: float, timeout_s: float = RESOURCE_SETTLE_S) -> dict:
    """``ray.available_resources()`` once ``cpus`` CPUs are free, or after ``timeout_s``.

    Ray returns the CPUs of tasks and actors that just ended asynchronously: a job started
    right after another one (or after a failed Ray Data pass) can see them as still taken.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0) >= cpus or time.monotonic() >= deadline:
            return free
        time.sleep(0.2)


def _check_resources(job: TrainJobConfig) -> None:
    """Fail fast (Ray Train v2 would wait forever) and size cpus_per_worker if unset."""
    import ray

    total = ray.cluster_resources()
    want = job.num_workers * (job.cpus_per_worker or 1.0) + DATA_CPUS
    free = _available_after_settling(min(want, total.get("CPU", 0)))
    if job.cpus_per_worker is None:
        room = (free.get("CPU", 0) - DATA_CPUS) / job.num_workers
        job.cpus_per_worker = 1.0 if room >= 1.0 else max(0.1, round(room, 2))
    if job.cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be > 0, got {job.cpus_per_worker}")
    need_cpu = job.num_workers * job.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ValueError(
            f"--num-workers {job.num_workers} x {job.cpus_per_worker} CPU needs {need_cpu:g} CPUs but the "
            f"cluster has {total.get('CPU', 0):g}; lower --num-workers / --cpus-per-worker or add nodes"
        )
    if job.use_gpu and total.get("GPU", 0) < job.num_workers:
        raise ValueError(
            f"--use-gpu with --num-workers {job.num_workers} needs {job.num_workers} GPUs but the cluster "
            f"has {total.get('GPU', 0):g}"
        )
    if free.get("CPU", 0) < need_cpu + DATA_CPUS:
        raise ValueError(
            f"the job needs {need_cpu:g} free CPUs for {job.num_workers} workers plus {DATA_CPUS:g} for "
            f"Ray Data, but only {free.get('CPU', 0):g} of {total.get('CPU', 0):g} are free (another job "
            "or a Serve app holds the rest); Ray Train would wait for them forever. Lower "
            "--num-workers / --cpus-per-worker or free the cluster"
        )


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
    import ray.data

    if job.items:
        return ray.data.read_parquet(job.items)
    table = demo_catalog(job)
    step = max(1, table.num_rows // 8)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])


def resolve_inputs(job: TrainJobConfig, ds):
    """Rename mapped columns, find the inputs in the data and complete/check the config.

    -> (dataset with standard column names, validated config, InputSpec, inferred field names).
    """
    from sidserve.base import tokenizer_class
    from sidserve.inputs import PEEK_ROWS, check_config, infer_inputs, reconcile, renames

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


def _kmeans_sample(clean_ds, stats: CatalogStats, config: TokenizerConfig) -> dict[str, np.ndarray]:
    n = min(config.kmeans_init_samples, stats.num_valid)
    fraction = min(1.0, 1.5 * n / stats.num_valid)
    ds = clean_ds if fraction >= 1.0 else clean_ds.random_sample(fraction, seed=config.seed)
    sample = ds.limit(n).take_batch(n, batch_format="numpy")
    if len(sample[HAS_BEHAVIOR]) < config.codebook_size:
        raise ValueError(
            f"{stats.num_valid} usable items are too few for codebook_size={config.codebook_size}"
        )
    return sample


def fit_distributed(job: TrainJobConfig):
    """Pre-pass, TorchTrainer fit, artifact. Returns (tokenizer, version, metrics)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from sidserve.base import tokenizer_class
    from sidserve.tokenizer import SemanticIdTokenizer

    tokenizer_class(job.tokenizer_type)  # an unknown type fails before anything starts
    if job.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {job.num_workers}")
    if not ray.is_initialized():
        ray.init()
    name, storage = job.name, job.storage()
    if job.tokenizer_type == "adc-sid":
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
        _check_resources(job)
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
        from sidserve.baseline_job import fit_sampled

        return fit_sampled(job, ds, tcfg, inputs, t0)
    stats = catalog_prepass(ds, tcfg)
    print(f"[sidserve] pre-pass: {stats.num_rows} rows, {stats.num_valid} usable, "
          f"{sum(stats.skipped.values())} skipped {stats.skipped or ''}, "
          f"null behavior {stats.null_behavior_share:.1%}, N_min={stats.n_min}, N_max={stats.n_max} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if tcfg.has_behavior:
        from sidserve.training import check_norm_range

        check_norm_range(stats.n_min, stats.n_max)
    if tcfg.collision_regulation != "off" and ITEM_ID not in ds.schema().names:
        raise ValueError("collision_regulation needs an item_id column in the input (to match colliding "
                         "items across workers); the input has none")
    cfg_dict = tcfg.to_dict()
    clean = ds.map_batches(lambda t: clean_batch(t, TokenizerConfig.from_dict(cfg_dict)),
                           batch_format="pyarrow", batch_size=4096, num_cpus=0.25)
    row_bytes = 4 * (sum(tcfg.modality_dims.values()) + (tcfg.behavior_dim or 0)) + 64
    fits = stats.num_valid * row_bytes < CACHE_FRACTION * ray.cluster_resources().get("object_store_memory", 0)
    if job.cache_clean if job.cache_clean is not None else fits:
        # small enough: clean once and keep it in the object store instead of re-reading
        # and re-validating the input every epoch; larger catalogs stream each epoch
        clean = clean.materialize()
    sample = _kmeans_sample(clean, stats, tcfg)

    init_state = None
    if job.init_model:
        from sidserve.base import load_tokenizer

        previous = load_tokenizer(job.init_model)
        if not isinstance(previous, SemanticIdTokenizer) or previous.config.replace(
                epochs=tcfg.epochs, batch_size=tcfg.batch_size, lr=tcfg.lr) != tcfg:
            raise ValueError(f"--init-model {job.init_model}: not an ADC-SID model with this config; "
                             "a warm start needs the same architecture")
        init_state = ray.put(previous._tensors())
    loop_config = {
        "tokenizer": cfg_dict, "n_min": stats.n_min, "n_max": stats.n_max,
        "sample_ref": ray.put(sample), "fault_injection": job.fault_injection,
        "record_shards_dir": job.record_shards_dir, "init_state_ref": init_state,
    }
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
        datasets={"train": clean},
    )
    result = trainer.fit()  # raises ray.train.TrainingFailedError once max_failures is spent
    with result.checkpoint.as_directory() as d:
        model = ADCSIDModel(tcfg)
        model.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), weights_only=True))
        with open(os.path.join(d, "history.json")) as f:
            history = json.load(f)
        with open(os.path.join(d, "final.json")) as f:
            final = json.load(f)
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
        "use_gpu": job.use_gpu,
        "wall_s": time.perf_counter() - t0,
        "run": {"name": name, "storage_path": storage},
    }
    source = {"items": job.items or f"synthetic demo catalog ({job.demo_items} items)",
              "num_rows": stats.num_rows, "num_valid": stats.num_valid}
    version = tok.save_pretrained(job.output, source=source,
                                  extra_files={"metrics.json": json.dumps(metrics, indent=2).encode()})
    print(f"[sidserve] model {version} written to {job.output}", flush=True)
    return tok, version, metrics




def run_cli(args) -> int:
    """``sidserve train`` / jobs/train.py: build the job from parsed flags and run it (exit code 2
    on bad input)."""
    from sidserve.cli import run_job
    from sidserve.inputs import parse_columns

    def body():
        job = TrainJobConfig(
            output=args.output, items=args.items, tokenizer_type=args.tokenizer,
            tokenizer=load_config_options(args.config, args.tokenizer, epochs=args.epochs,
                                          batch_size=args.batch_size),
            columns=parse_columns(args.column), sample_size=args.sample_size,
            num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
            storage_path=args.storage_path, name=args.name, resume=args.resume,
            max_failures=args.max_failures, demo_items=args.demo_items,
        )
        tok, version, metrics = fit_distributed(job)
        if job.items is None:  # the demo: show what the artifact gives a few items
            from sidserve.base import load_tokenizer

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
