"""What runs on every Ray Train worker: the epoch loop over its shard (the step is
``training.train_step``, the same as the in-process fit), collectives across workers,
collision regulation across shards, the final evaluation pass."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from sidserve.items import ITEM_ID, POPULARITY, ItemArrays, column_name
from sidserve.jobs.catalog import HAS_BEHAVIOR
from sidserve.jobs.train.checkpoint import FINAL_FILE, load_checkpoint, save_checkpoint
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.model.adc_sid import ADCSIDModel
from sidserve.tokenizers.adc_sid.model.io import ModelInput
from sidserve.tokenizers.adc_sid.regulation.pairs import (
    build_pair_set,
    plan_overlaps,
    progress_of,
    refresh_seed,
)
from sidserve.tokenizers.adc_sid.training import (
    CodeStats,
    Sync,
    TrainState,
    freeze_codebooks,
    init_codebooks,
    train_step,
)
from sidserve.tokenizers.config import BEHAVIOR


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

    def gather_object_to_root(self, obj) -> list | None:
        out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def exchange_by_hash(self, values: np.ndarray) -> np.ndarray:
        # one gather per destination (gloo has no all_to_all): worker r receives every worker's
        # values with value % world == r, padded to the longest part
        world, rank = dist.get_world_size(), dist.get_rank()
        values = np.asarray(values, dtype=np.int64)
        dest = values % world  # numpy's % is >= 0 for a positive divisor, negative values included
        parts = [values[dest == r] for r in range(world)]
        sizes = torch.tensor([p.size for p in parts], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(every, sizes)  # every[src][r]: how many src sends to r
        mine = []
        for r in range(world):
            n = [int(every[src][r]) for src in range(world)]
            padded = torch.zeros(max(n), dtype=torch.int64, device=self.device)
            padded[: parts[r].size] = torch.from_numpy(parts[r]).to(self.device)
            bucket = [torch.zeros_like(padded) for _ in range(world)] if rank == r else None
            dist.gather(padded, gather_list=bucket, dst=r)
            if rank == r:
                mine = [b[:k].cpu().numpy() for b, k in zip(bucket, n)]
        return np.concatenate(mine) if mine else np.zeros(0, np.int64)


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


class TrainCallback:
    """Hooks into every worker's epoch loop (``TrainJobConfig.callbacks``): metrics export,
    profiling, or the tests' fault injection and shard recording. Runs on the workers, so a
    callback must be picklable; the default methods do nothing."""

    def on_epoch_start(self, epoch: int, rank: int) -> None:
        """Before the epoch's first batch."""

    def on_pairs(self, epoch: int, rank: int, pair_set) -> None:
        """After a collision-regulation refresh planned this epoch's pairs (``PairSet``)."""

    def on_batch(self, epoch: int, rank: int, batch: dict[str, np.ndarray]) -> None:
        """After the step on ``batch`` (the cleaned rows, numpy columns)."""

    def on_epoch_end(self, epoch: int, rank: int, record: dict[str, Any]) -> None:
        """After the epoch's metrics were reduced over the workers."""


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
    resumed_pairs = None  # (PairSet, steps) of the refresh period a resumed run is inside
    start_epoch, history = 0, []
    state = TrainState.create(tcfg.seed + 7919 * rank)
    partial = None  # this rank's part of the epoch a mid-epoch checkpoint stopped in
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved, history = load_checkpoint(d, model)
        optimizer_state, start_epoch, state.step = saved["optimizer"], saved["epoch"] + 1, saved["step"]
        resumed_pairs = (saved["pair_set"], saved.get("pair_step") or 0) if saved["pair_set"] is not None else None
        # dead-code restarts draw as they would have: this rank's stream (checkpoints from before
        # the per-rank list hold rank 0's only, as do those of another worker count)
        generators = saved.get("generators") or []
        state.generator.set_state(generators[rank] if len(generators) == world else saved["generator"])
        if saved["partial"] is not None:
            if len(saved["partial"]) != world:
                raise ValueError(f"the checkpoint stopped inside epoch {saved['epoch']} with "
                                 f"{len(saved['partial'])} workers; resume it with as many, not {world}")
            partial, start_epoch = saved["partial"][rank], saved["epoch"]
            state.generator.set_state(partial["generator"])
        if rank == 0:
            where = f"step {partial['steps']} of epoch {saved['epoch']}" if partial else f"epoch {saved['epoch']}"
            print(f"[sidserve] resuming from checkpoint after {where}", flush=True)
    elif cfg.get("init_state_ref") is not None:  # warm start from the current model
        state_dict = {k: torch.from_numpy(v.copy()) for k, v in ray.get(cfg["init_state_ref"]).items()}
        model.load_state_dict(state_dict)
        if tcfg.has_behavior:  # this catalog's statistics, not the old model's
            model.set_catalog_stats(cfg["n_min"], cfg["n_max"])
    else:
        sample = ray.get(cfg["sample_ref"])
        init_codebooks(model, batch_to_input(sample, tcfg, "cpu"))  # same sample, same seed: same init

    freeze_codebooks(model)  # train_codebooks=False: before the optimiser and DDP see the parameters
    model.to(device)
    forward = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # usage counters are per worker; train_step reduces them
            find_unused_parameters=not tcfg.use_behavior_gate,
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    shards = cfg.get("shards")  # a Parquet catalog: this worker reads its own rows (ingest.py)
    shard = shards.for_rank(rank, world) if shards is not None else ray.train.get_dataset_shard("train")
    callbacks = cfg.get("callbacks") or []
    every = cfg.get("checkpoint_every_steps")  # mid-epoch checkpoints (None: at epoch ends only)
    pair_set, pair_step = resumed_pairs or (None, 0)
    for epoch in range(start_epoch, tcfg.epochs):
        for cb in callbacks:
            cb.on_epoch_start(epoch, rank)
        t0 = time.perf_counter()
        refresh: dict[str, Any] = {}
        if tcfg.collision_regulation != "off" and (pair_set is None or epoch % tcfg.collision_refresh_every == 0):
            pair_set, refresh = regulation_refresh(model, shard, tcfg, sync, device, epoch)
            pair_step = 0
            for cb in callbacks:
                cb.on_pairs(epoch, rank, pair_set)
        sums: dict[str, float] = {}
        steps = 0
        codes = CodeStats(tcfg)
        batches = iter(shard.iter_batches(batch_size=tcfg.batch_size, batch_format="numpy",
                                          local_shuffle_buffer_size=4 * tcfg.batch_size,
                                          local_shuffle_seed=tcfg.seed + epoch))
        data_s = step_s = 0.0
        resumed_at_step = 0
        if partial is not None:  # pick the epoch up where the mid-epoch checkpoint left it
            steps = resumed_at_step = int(partial["steps"])
            sums, codes = dict(partial["sums"]), codes.restore(partial["codes"])
            data_s, step_s = float(partial["data_s"]), float(partial["step_s"])
            t0 -= float(partial["elapsed_s"])
            for _ in range(steps):  # the same order as before (preserve_order, seeded local shuffle)
                next(batches, None)  # rows the checkpoint has already trained on: read, not trained
            partial = None
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
            for cb in callbacks:
                cb.on_batch(epoch, rank, batch)
            if every and steps % every == 0:
                mid_epoch_checkpoint(model, optimizer, epoch, state, history, sync, rank, {
                    "steps": steps, "sums": dict(sums), "codes": codes.state(), "data_s": data_s,
                    "step_s": step_s, "elapsed_s": time.perf_counter() - t0,
                    "generator": state.generator.get_state()})
        loss_means = sync.mean([sums.get(k, 0.0) / max(steps, 1) for k in sorted(sums)])
        record = dict(zip(sorted(sums), loss_means))
        record.update(codes.reduce(sync))
        record.update(refresh)
        elapsed, data_s, step_s = sync.mean([time.perf_counter() - t0, data_s, step_s])
        record.update(data_wait_s=data_s, step_s=step_s)  # mean over workers: where the epoch went
        record.update(epoch=epoch, steps=steps, items_per_s=record["num_items"] / max(elapsed, 1e-9),
                      started_at_epoch=start_epoch,  # > 0: this attempt resumed from a checkpoint
                      resumed_at_step=resumed_at_step)  # > 0: from one inside this epoch
        history.append(record)
        for cb in callbacks:
            cb.on_epoch_end(epoch, rank, record)
        if rank == 0:
            print("[sidserve] epoch {}/{}  {}".format(epoch + 1, tcfg.epochs, "  ".join(
                f"{k}={record[k]:.4g}" for k in ("recon", "vq", "align", "reg", "gate_sparsity",
                                                  "sparsity_target", "align_w_above_half", "entropy_mean",
                                                  "utilisation_mean", "collision_rate", "collision",
                                                  "catalog_collision_rate", "admissible_share", "items_per_s")
                if k in record)), flush=True)
        flat = {k: v for k, v in record.items() if not isinstance(v, list)}
        # every rank's generator (each draws its own stream, seeded by rank): a restarted rank 1
        # must go on with rank 1's draws, not rank 0's
        generators = sync.gather_object_to_root(state.generator.get_state())
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, optimizer, epoch, state, history, generators=generators,
                                pairs=None if pair_set is None else (pair_set, pair_step))
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
            save_checkpoint(d, model, optimizer, tcfg.epochs - 1, state, history)
            with open(os.path.join(d, FINAL_FILE), "w") as f:
                json.dump(final, f)
            ray.train.report({"final_recon": final["recon"]}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"final_recon": final["recon"]})


def mid_epoch_checkpoint(model, optimizer, epoch: int, state: TrainState, history: list[dict], sync: Sync,
                         rank: int, mine: dict) -> None:
    """Every rank's part of the epoch so far to rank 0 only (each part holds its rank's share of
    the epoch's SID hashes, 8 bytes per item: gathered to every rank, each would hold them all),
    which writes the checkpoint; every rank reports (Ray Train counts each worker's reports)."""
    import ray.train

    parts = sync.gather_object_to_root(mine)
    metrics = {"epoch": epoch, "steps_in_epoch": mine["steps"]}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, model, optimizer, epoch, state, history, partial=parts)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def regulation_refresh(model: ADCSIDModel, shard, tcfg: TokenizerConfig, sync: Sync, device,
                       epoch: int):
    """Collision regulation across workers -> (PairSet, metrics), identical on every rank.

    Pass 1: every worker assigns SIDs to its shard; (item_id, SID) of all workers are
    gathered and sorted by item_id, so the overlaps do not depend on which worker read
    which item. Pass 2: every worker picks from its shard the rows of the items in a
    selected pair and those rows are gathered; the pair set is then built from the
    same inputs everywhere (``sidserve.tokenizers.adc_sid.regulation.pairs``)."""
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
    """Quantization metrics of the trained model over all shards (one inference pass): the
    keys ``SemanticIdTokenizer.evaluate`` writes for an in-process fit (recon, entropy,
    utilisation, collision rate, cold-path agreement, gate statistics), so both artifacts
    carry the same ``fit_metrics``."""
    model.eval()
    codes = CodeStats(tcfg)
    recon_sum, n = 0.0, 0
    nb = tcfg.num_behavior_experts if tcfg.has_behavior else 0
    k = tcfg.sid_length - nb  # shared + content positions: what the content-only path keeps
    r_sum, r_zero, r_count = torch.zeros(nb), torch.zeros(nb), 0
    agree_all, agree_pos = 0.0, torch.zeros(k)
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
        if nb and bool(x.has_behavior.any()):
            warm = x.has_behavior
            raw = (out.behavior_weights * model.weight_scale)[warm]
            r_sum += raw.sum(0).cpu()
            r_zero += (raw == 0).sum(0).cpu().float()
            r_count += int(warm.sum())
            # the same items with their behavior withheld: does the content-only path agree?
            cold = ModelInput({m: v[warm] for m, v in x.content.items()}, x.behavior[warm],
                              torch.zeros_like(warm[warm]),
                              None if x.popularity is None else x.popularity[warm])
            same = out.codes[warm][:, :k] == model(cold, codes_only=True).codes[:, :k]
            agree_all += float(same.all(dim=1).sum())
            agree_pos += same.sum(0).cpu().float()
    report = codes.reduce(sync)
    total_recon, total_n = sync.mean([recon_sum, float(n)])
    report["recon"] = total_recon / max(total_n, 1.0)
    report["gate_mean_per_position"] = []
    if nb:  # over every worker's items with behavior
        sums = sync.mean([*r_sum.tolist(), *r_zero.tolist(), agree_all, *agree_pos.tolist(), float(r_count)])
        count = max(sums[-1], 1e-12)
        mean_r = torch.tensor(sums[:nb]) / count
        report["behavior_weight_mean_raw"] = mean_r.tolist()
        model.set_weight_scale(mean_r)  # behavior_weight_scale="unit_mean"; same on every worker
        report["gate_mean_per_position"] = (mean_r / model.weight_scale.cpu()).round(decimals=6).tolist()
        report["gate_zero_share"] = float(sum(sums[nb:2 * nb]) / (count * nb))
        report["cold_path_agreement"] = sums[2 * nb] / count
        report["cold_path_agreement_per_position"] = [round(v / count, 6) for v in sums[2 * nb + 1:2 * nb + 1 + k]]
    return report
