"""One training step of the ADC-SID network, shared by the in-process ``fit`` and the
Ray Train job, plus the pieces around it (catalog statistics, batch tensors, codebook
initialisation, dead-code restarts).

Data-parallel callers pass a ``Sync`` whose collectives make lambda updates and
dead-code restarts identical on every worker; the default ``Sync`` is single-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sidserve.ids import hash_codes
from sidserve.items import ItemArrays
from sidserve.metrics import CodeCounter
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.model.adc_sid import ADCSIDModel
from sidserve.tokenizers.adc_sid.model.controller import alignment_strength
from sidserve.tokenizers.adc_sid.model.io import ModelInput
from sidserve.tokenizers.adc_sid.model.sparsity import threshold_step
from sidserve.tokenizers.adc_sid.regulation.pairs import PairBatch, concat_inputs, pair_repulsion
from sidserve.tokenizers.config import BEHAVIOR


class Sync:
    """Collectives used by ``train_step``; identity in one process."""

    def mean(self, values: list[float]) -> list[float]:
        return values

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(n_local, d) -> (n_total, d), same order on every worker."""
        return tensor

    def all_true(self, flag: bool) -> bool:
        """True only if ``flag`` is True on every worker."""
        return flag

    def gather_object(self, obj) -> list:
        """Any picklable object -> [the object of rank 0, rank 1, ...] on every worker."""
        return [obj]

    def gather_object_to_root(self, obj) -> list | None:
        """Any picklable object -> [the object of rank 0, rank 1, ...] on rank 0, None on the
        others: for what only rank 0 writes (a checkpoint), so no worker holds every part."""
        return [obj]

    def exchange_by_hash(self, values: np.ndarray) -> np.ndarray:
        """(n_local,) int64 -> the values of every worker with ``value % world == rank``: equal
        values meet on one worker, and each holds about 1/world of them."""
        return values


@dataclass
class TrainState:
    step: int = 0
    seed: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    last_codes: torch.Tensor | None = None  # (B, L) codes assigned by the last step

    @classmethod
    def create(cls, seed: int) -> "TrainState":
        return cls(step=0, seed=seed, generator=torch.Generator().manual_seed(seed))


class CodeStats:
    """Code counts per position (``metrics.CodeCounter``) and SID hashes seen by one worker."""

    def __init__(self, config: TokenizerConfig):
        self.counter = CodeCounter(config.sid_length, config.codebook_size)
        self.hashes: list[np.ndarray] = []
        self.items = 0

    def add(self, codes: np.ndarray) -> None:
        self.counter.add(codes)
        self.hashes.append(hash_codes(codes))
        self.items += codes.shape[0]

    def state(self) -> dict[str, Any]:
        """What a mid-epoch checkpoint keeps of it (tensors: torch.load(weights_only=True))."""
        hashes = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.int64)
        return {"counts": torch.from_numpy(self.counter.counts.copy()), "hashes": torch.from_numpy(hashes),
                "items": self.items}

    def restore(self, saved: dict[str, Any]) -> "CodeStats":
        self.counter.counts = saved["counts"].numpy().astype(np.int64).copy()
        self.hashes = [saved["hashes"].numpy().copy()]
        self.items = int(saved["items"])
        return self

    def reduce(self, sync: Sync) -> dict[str, Any]:
        counts = sync.sum_(torch.from_numpy(self.counter.counts)).numpy()
        local = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.int64)
        # each worker counts the SIDs of one hash range (equal SIDs meet on one worker), so no
        # worker holds every item's hash: at 1B items that would be 8 GB each (docs/operations.md)
        mine = sync.exchange_by_hash(local)
        _, cnt = np.unique(mine, return_counts=True)
        seen, collided = sync.sum_(torch.tensor([mine.size, int(cnt[cnt > 1].sum())], dtype=torch.int64)).tolist()
        total = CodeCounter(*counts.shape, counts=counts)
        return {
            "num_items": int(seen),
            **total.report(),
            "collision_rate": float(collided / seen) if seen else 0.0,
        }


def compute_catalog_stats(arrays: ItemArrays, config: TokenizerConfig) -> dict:
    """N_min / N_max of behavior norms (eq. 15) and counts, over all given items."""
    n = len(arrays)
    stats = {"num_items": n, "num_with_behavior": int(arrays.has_behavior.sum())}
    stats["null_behavior_share"] = 1.0 - stats["num_with_behavior"] / n if n else 0.0
    if config.has_behavior:
        if stats["num_with_behavior"] == 0:
            raise ValueError(
                "no item has a behavior embedding (behavior_emb is null everywhere): N_min/N_max "
                "cannot be computed; set behavior_dim to null for a content-only tokenizer"
            )
        norms = np.linalg.norm(arrays.behavior[arrays.has_behavior].astype(np.float64), axis=1)
        stats.update(n_min=float(norms.min()), n_max=float(norms.max()))
        check_norm_range(stats["n_min"], stats["n_max"])
    return stats


def check_norm_range(n_min: float, n_max: float) -> None:
    if not n_max > n_min * (1 + 1e-6) + 1e-12:
        raise ValueError(
            f"all behavior embeddings have the same L2 norm ({n_min:.6g}): they look normalised. "
            "ADC-SID reads information richness from un-normalised behavioral embeddings "
            "(e.g. SASRec item embeddings without L2 normalisation)"
        )


def to_model_input(arrays: ItemArrays, idx: np.ndarray | slice | None = None) -> ModelInput:
    """Rows ``idx`` of dense arrays -> ModelInput on the CPU."""
    return ModelInput.from_arrays(arrays if idx is None else arrays.take(idx))


@torch.no_grad()
def assign_codes(model: ADCSIDModel, arrays: ItemArrays, batch_size: int = 8192) -> np.ndarray:
    """(N, L) int32 SIDs of ``arrays`` under the current weights (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    device = model.n_min.device
    out = np.empty((len(arrays), model.config.sid_length), dtype=np.int32)
    for start in range(0, len(arrays), batch_size):
        idx = np.arange(start, min(len(arrays), start + batch_size))
        out[idx] = model(to_model_input(arrays, idx).to(device), codes_only=True).codes.cpu().numpy()
    model.train(was_training)
    return out


@torch.no_grad()
def behavior_weight_sums(model: ADCSIDModel, x: ModelInput) -> tuple[torch.Tensor, int]:
    """-> (sum of R(e_b) per expert over the batch's items with behavior (N_b,), their count),
    as the model reports them before any unit_mean scaling."""
    was_training = model.training
    model.eval()
    out = model(x, codes_only=True)
    model.train(was_training)
    raw = out.behavior_weights * model.weight_scale  # undo a scale already set
    return raw[x.has_behavior].sum(0).cpu(), int(x.has_behavior.sum())


@torch.no_grad()
def set_weight_scale(model: ADCSIDModel, arrays: ItemArrays, batch_size: int = 8192) -> None:
    """behavior_weight_scale="unit_mean": divide reported weights by the catalog's mean R per expert."""
    c = model.config
    if not c.has_behavior or c.behavior_weight_scale != "unit_mean":
        return
    total, count = torch.zeros(c.num_behavior_experts), 0
    device = model.n_min.device
    for start in range(0, len(arrays), batch_size):
        idx = np.arange(start, min(len(arrays), start + batch_size))
        s, n = behavior_weight_sums(model, to_model_input(arrays, idx).to(device))
        total += s
        count += n
    model.set_weight_scale(total / max(count, 1))


@torch.no_grad()
def init_codebooks(model: ADCSIDModel, sample: ModelInput, sync: Sync | None = None) -> None:
    """Read the input statistics of ``sample`` (richness quantiles, reconstruction scales:
    ``ADCSIDModel.fit_input_stats``) and k-means-initialise every codebook on its latents
    (identical on all workers when every worker passes the same sample)."""
    c = model.config
    was_training = model.training
    model.eval()
    model.fit_input_stats(sample)
    out = model(sample)
    for i, book in enumerate(model.codebooks):
        where = model.config.sid_layout[i]
        if c.behavior_quantization != "parallel" and where["group"] == BEHAVIOR and where["index"] > 0:
            out = model(sample)  # a residual level quantizes what the levels before it, now set, left
        z = out.latents[i]
        if z.shape[0] < c.codebook_size:
            raise ValueError(
                f"codebook {i} ({model.config.sid_layout[i]['group']}) needs at least "
                f"codebook_size={c.codebook_size} items to initialise, got {z.shape[0]}"
            )
        book.init_from_kmeans(z, niter=c.kmeans_iters, seed=c.seed + i)
    model.train(was_training)


def warm_start_free(c: TokenizerConfig) -> dict:
    """The config fields a warm start may change (the rest fix the architecture)."""
    return dict(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, train_codebooks=c.train_codebooks)


def freeze_codebooks(model: ADCSIDModel) -> None:
    """train_codebooks=False: codewords get no gradient, so the optimiser (which skips
    parameters without one, weight decay included) and the restarts leave them alone."""
    if not model.config.train_codebooks:
        for book in model.codebooks:
            book.embed.requires_grad_(False)


def train_step(
    model: ADCSIDModel,
    optimizer: torch.optim.Optimizer,
    batch: ModelInput,
    state: TrainState,
    *,
    forward=None,
    sync: Sync | None = None,
    pairs: PairBatch | None = None,
) -> dict[str, float]:
    """One optimisation step -> scalar metrics. ``forward`` is the (possibly DDP-wrapped)
    callable; ``model`` the bare module for lambda and codebook updates. ``pairs``:
    overlapping pairs to repel (collision regulation), appended to the batch."""
    c = model.config
    sync = sync or Sync()
    forward = forward or model
    model.train()
    n = batch.batch_size
    if pairs is not None:
        batch = concat_inputs(batch, pairs.items)
    out = forward(batch, behavior_dropout=c.behavior_dropout, generator=state.generator)
    total = out.losses["total"]
    metrics = {k: float(v.detach()) for k, v in out.losses.items()}
    if pairs is not None:
        repulsion = pair_repulsion(out, batch, n, pairs, c)
        total = total + c.collision_weight * repulsion
        metrics.update(collision=float(repulsion.detach()), total=float(total.detach()))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    state.last_codes = out.codes[:n].detach()
    if c.has_behavior and c.use_behavior_gate and out.gates_raw is not None:
        target, actual = model.sparsity.sparsity_gap(out.gates_raw.detach(), out.n_norm)
        target, actual = sync.mean([target, actual])
        if c.use_sparsity:
            model.sparsity.update_lambda(target, actual)
            logits = model.behavior_gate.last_logits
            if c.sparsity_control == "threshold" and logits is not None and logits.shape[0] > 1:
                gate = model.behavior_gate
                step = threshold_step(logits, gate.threshold, target, c.sparsity_threshold_gain).cpu().tolist()
                gate.threshold.add_(torch.tensor(sync.mean(step)).to(gate.threshold))  # same on every worker
        metrics.update(gate_sparsity=actual, sparsity_target=target, sparsity_lambda=float(model.sparsity.lam))
    if c.has_behavior and out.gates_raw is not None and out.gates_raw.shape[0]:
        # per-expert mean R(e_b) and share of items whose alignment weight w (eq. 17) > 0.5
        for i, v in enumerate(out.gates_raw.detach().mean(0).tolist()):
            metrics[f"gate_mean_expert_{i}"] = v
        w = alignment_strength(out.n_norm.detach(), c.alpha, c.beta)
        metrics["align_w_above_half"] = float((w > 0.5).float().mean())
    state.step += 1
    if state.step % c.restart_every == 0:
        metrics["restarted_codes"] = float(restart_dead_codes(model, out.latents, state, sync))
    return metrics


@torch.no_grad()
def restart_dead_codes(model: ADCSIDModel, latents: list[torch.Tensor], state: TrainState, sync: Sync) -> int:
    """Re-seed codewords used < dead_code_threshold x fair share since the last check with
    latents of the current batch (gathered from all workers, drawn with a generator
    seeded by (seed, step), so every worker makes the same restarts)."""
    c = model.config
    restarted = 0
    gen = torch.Generator().manual_seed(c.seed * 1_000_003 + state.step)
    for book, z in zip(model.codebooks, latents):
        if not book.embed.requires_grad:  # frozen (train_codebooks=False): no restarts either
            book.usage.zero_()
            continue
        book.usage.copy_(sync.sum_(book.usage.clone()))
        z_all = sync.gather(z.detach())
        if z_all.shape[0] == 0:
            book.usage.zero_()
            continue
        restarted += book.restart_dead_codes(z_all, threshold=c.dead_code_threshold, generator=gen)
    return restarted
