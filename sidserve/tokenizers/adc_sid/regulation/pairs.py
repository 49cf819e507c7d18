"""Collision regulation during training (AdaSID-style, issue 8): from the current SIDs
of the whole catalog to the overlapping pairs that every training step repels.

Each refresh (every ``collision_refresh_every`` epochs):

    codes (N, L) of every item, current model  --find_overlaps-->  overlapping pairs
    plan_overlaps      sample <= collision_max_pairs pairs; the positions each pair shares
    build_pair_set     content compatibility, load and schedule -> a weight per pair
                       (needs the content of the items in a pair only)
    PairSet.batch      the pairs each step appends to its batch (collision-aware batches:
                       both items of a pair are in the same forward pass), disjoint
                       across data-parallel ranks

and in every step ``pair_repulsion`` adds collision_weight * mean_p w_p * (margin
repulsion of the pair's latents at the positions it shares) to the loss.

Weights (``sidserve.tokenizers.adc_sid.regulation.repulsion``): adaptive w = (1 - compat) * load * schedule,
with stage 1 (compat, semantic relaxation) and stage 2 (load and schedule, adaptive
pressure) switchable for ablations; static w = 1 for every overlap.

The in-process fit and the Ray Train job call the same functions on the same inputs
(the job gathers codes and pair content from all workers first), so every worker holds
the same pair set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sidserve.items import ItemArrays
from sidserve.metrics import entropy_per_position, utilisation_per_position
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.model.io import ModelInput, ModelOutput
from sidserve.tokenizers.adc_sid.regulation.overlaps import find_overlaps
from sidserve.tokenizers.adc_sid.regulation.repulsion import (
    compatibility,
    load_factor,
    progress_schedule,
    repulsion,
)


def content_signature(arrays: ItemArrays) -> np.ndarray:
    """(N, sum d_m) float32: each content modality unit-normalised, divided by sqrt(M), so
    the cosine of two signatures is the mean of the per-modality cosines."""
    parts = []
    for v in arrays.content.values():
        v = np.asarray(v, dtype=np.float32)
        parts.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
    return np.concatenate(parts, axis=1) / np.float32(math.sqrt(len(parts)))


def expected_region_size(num_items: int, codebook_size: int, sid_length: int, hamming: int) -> float:
    """Size of an item's region (itself + the items within Hamming ``hamming``) if the N
    items used the K^L code space uniformly; at least 2: a lone pair is the baseline load."""
    p = sum(math.comb(sid_length, k) * (1 / codebook_size) ** (sid_length - k) * (1 - 1 / codebook_size) ** k
            for k in range(hamming + 1))
    return max(2.0, 1.0 + (num_items - 1) * p)


@dataclass
class OverlapPlan:
    """The overlaps of one refresh, as global item indices (P pairs)."""

    a: np.ndarray  # (P,) int64
    b: np.ndarray  # (P,) int64
    shared: np.ndarray  # (P, L) bool: positions where both have the same (non-missing) code
    region: np.ndarray  # (P,) int64 size of the crowded region the pair came from
    expected_region: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def needed(self) -> np.ndarray:
        """Sorted unique item indices whose content the pair set needs."""
        return np.unique(np.concatenate([self.a, self.b]))


def plan_overlaps(codes: np.ndarray, config: TokenizerConfig, *, seed: int) -> OverlapPlan:
    """codes: (N, L) current SIDs of every item -> the pairs to regulate and the per-epoch
    collision metrics (collision rate exact and within h, groups, utilisation, entropy)."""
    codes = np.asarray(codes)
    c = config
    n, L = codes.shape
    ov = find_overlaps(codes, c.collision_hamming, max_group_pairs=c.collision_max_pairs, seed=seed)
    pairs, region = ov.pairs, ov.region_size
    rng = np.random.default_rng(seed)
    if pairs.shape[0] > c.collision_max_pairs:
        keep = np.sort(rng.choice(pairs.shape[0], size=c.collision_max_pairs, replace=False))
        pairs, region = pairs[keep], region[keep]
    ca, cb = codes[pairs[:, 0]], codes[pairs[:, 1]]
    shared = (ca == cb) & (ca != c.missing_code)
    # a pair whose only shared codes are the missing-behavior code has no latent to repel
    useful = shared.any(axis=1)
    pairs, region, shared = pairs[useful], region[useful], shared[useful]
    util = utilisation_per_position(codes, c.codebook_size)
    ent = entropy_per_position(codes, c.codebook_size)
    groups = ov.group_sizes
    metrics = {
        # of the whole catalog's assignment at the start of the epoch
        "catalog_collision_rate": ov.exact_collision_rate,
        f"catalog_collision_rate_h{c.collision_hamming}": ov.overlap_rate,
        "catalog_collision_groups": int(groups.size),
        "catalog_collision_group_mean": float(groups.mean()) if groups.size else 0.0,
        "catalog_collision_group_max": int(groups.max()) if groups.size else 0,
        "catalog_utilisation_mean": float(util.mean()),
        "catalog_utilisation_per_position": util.round(6).tolist(),
        "catalog_entropy_mean": float(ent.mean()),
        "catalog_entropy_per_position": ent.round(6).tolist(),
        "overlap_pairs": int(ov.pairs.shape[0]),
        "overlap_pairs_complete": bool(ov.complete),
        "regulated_pairs": int(pairs.shape[0]),
    }
    expected = expected_region_size(n, c.codebook_size, L, c.collision_hamming)
    return OverlapPlan(pairs[:, 0].copy(), pairs[:, 1].copy(), shared, region, expected, metrics)


@dataclass
class PairBatch:
    """The pairs one step appends to its batch: items = 2p rows (a sides, then b sides)."""

    items: ModelInput
    weight: torch.Tensor  # (p,) float32
    shared: torch.Tensor  # (p, L) bool

    @property
    def num_pairs(self) -> int:
        return self.weight.shape[0]


@dataclass
class PairSet:
    """The regulated pairs of one refresh with their weights; rows index ``items``."""

    items: ItemArrays  # M items that are in a pair
    a: np.ndarray  # (P,) int64 rows of items
    b: np.ndarray  # (P,) int64
    weight: np.ndarray  # (P,) float32
    shared: np.ndarray  # (P, L) bool
    seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._order = np.random.default_rng(self.seed).permutation(len(self))  # (P,) the seeded shuffle

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no objects, no pickle) that ``from_arrays`` rebuilds this from: a
        training checkpoint keeps the pair set so that a run resumed inside a refresh period
        uses the pairs an uninterrupted run would (not ones re-planned from a later model)."""
        it = self.items
        out = {"a": self.a, "b": self.b, "weight": self.weight, "shared": self.shared,
               "seed": np.asarray([self.seed], np.int64), "has_behavior": it.has_behavior,
               "metrics": np.frombuffer(json.dumps(self.metrics).encode(), np.uint8)}
        out.update({f"content/{m}": v for m, v in it.content.items()})
        if it.behavior is not None:
            out["behavior"] = it.behavior
        if it.item_ids is not None:
            out["item_ids"] = np.asarray([str(x) for x in it.item_ids], dtype=np.str_)
        if it.popularity is not None:
            out["popularity"] = it.popularity
        return out

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> PairSet:
        items = ItemArrays({k.split("/", 1)[1]: v for k, v in d.items() if k.startswith("content/")},
                           d.get("behavior"), d["has_behavior"],
                           d["item_ids"].astype(object) if "item_ids" in d else None, d.get("popularity"))
        return cls(items, d["a"], d["b"], d["weight"], d["shared"], int(d["seed"][0]),
                   json.loads(bytes(d["metrics"]).decode()))

    def batch(self, step: int, per_batch: int, rank: int = 0, world: int = 1) -> PairBatch | None:
        """Pairs for ``step`` of this refresh period: rank r cycles through its share
        (pairs r, r + world, ... of a seeded shuffle), ``per_batch`` at a time."""
        order = self._order[rank::world]
        if order.size == 0:
            return None
        start = (step * per_batch) % order.size
        pick = np.take(order, np.arange(start, start + min(per_batch, order.size)), mode="wrap")
        rows = np.concatenate([self.a[pick], self.b[pick]])
        return PairBatch(
            items=ModelInput.from_arrays(self.items.take(rows)),
            weight=torch.from_numpy(self.weight[pick]),
            shared=torch.from_numpy(self.shared[pick]),
        )


def build_pair_set(plan: OverlapPlan, items: ItemArrays, rows: np.ndarray, config: TokenizerConfig,
                   *, progress: float, seed: int) -> PairSet:
    """plan + the content of its items -> weighted pairs.

    items: the items of ``plan.needed`` (any order); rows: (M,) the global index of each
    row of ``items``. progress: share of training done, in [0, 1]."""
    c = config
    row_of = {int(g): i for i, g in enumerate(np.asarray(rows))}
    missing = [int(g) for g in plan.needed if int(g) not in row_of]
    if missing:
        raise ValueError(f"build_pair_set: the content of items {missing[:5]} is missing")
    a = np.array([row_of[int(g)] for g in plan.a], dtype=np.int64)
    b = np.array([row_of[int(g)] for g in plan.b], dtype=np.int64)
    sig = torch.from_numpy(content_signature(items))
    compat = compatibility(sig[a], sig[b], c.collision_compat_threshold, c.collision_compat_temperature) \
        if len(a) else torch.zeros(0)
    schedule = progress_schedule(progress, 1.0, c.collision_schedule_floor)
    load = load_factor(torch.from_numpy(plan.region), plan.expected_region, c.collision_load_cap) \
        if len(a) else torch.zeros(0)
    if c.collision_regulation == "static":
        weight = torch.ones(len(a))
    else:
        weight = (1.0 - compat) if c.collision_relaxation else torch.ones(len(a))
        if c.collision_adaptive_pressure:
            weight = weight * load * schedule
    metrics = {
        "admissible_share": float((compat > 0.5).float().mean()) if len(a) else 0.0,
        "collision_pair_weight_mean": float(weight.mean()) if len(a) else 0.0,
        "collision_load_mean": float(load.mean()) if len(a) else 0.0,
        "collision_schedule": float(schedule) if c.collision_regulation == "adaptive"
        and c.collision_adaptive_pressure else 1.0,
    }
    return PairSet(items, a, b, weight.float().numpy(), plan.shared, seed=seed, metrics=metrics)


def concat_inputs(x: ModelInput, y: ModelInput) -> ModelInput:
    """Rows of ``x`` then rows of ``y`` (same modalities), on ``x``'s device."""
    dev = x.has_behavior.device
    return ModelInput(
        {m: torch.cat([x.content[m], y.content[m].to(dev)]) for m in x.content},
        None if x.behavior is None else torch.cat([x.behavior, y.behavior.to(dev)]),
        torch.cat([x.has_behavior, y.has_behavior.to(dev)]),
        None if x.popularity is None or y.popularity is None
        else torch.cat([x.popularity, y.popularity.to(dev)]),
    )


def pair_repulsion(out: ModelOutput, batch: ModelInput, offset: int, pairs: PairBatch,
                   config: TokenizerConfig) -> torch.Tensor:
    """Scalar: mean over pairs of w_p * mean over the positions the pair shares of
    relu(cos(z_a, z_b) - (1 - margin)), on the latents of the forward pass ``out`` over
    ``batch`` whose rows offset.. offset + 2p are the pair items (a sides, then b sides)."""
    p = pairs.num_pairs
    dev = batch.has_behavior.device
    rows_a = torch.arange(offset, offset + p, device=dev)
    rows_b = rows_a + p
    # behavioral codebooks see only rows with behavior: batch row -> latent row
    latent_row = torch.cumsum(batch.has_behavior.long(), 0) - 1
    k = config.sid_length - (config.num_behavior_experts if config.has_behavior else 0)
    shared = pairs.shared.to(dev)
    weight = pairs.weight.to(dev)
    per_pos = []
    for pos, z in enumerate(out.latents):
        ia, ib = (rows_a, rows_b) if pos < k else (latent_row[rows_a], latent_row[rows_b])
        ia, ib = ia.clamp(min=0), ib.clamp(min=0)  # masked below where a side has no behavior
        per_pos.append(repulsion(z[ia], z[ib], config.collision_margin))
    hinge = torch.stack(per_pos, dim=1) * shared  # (p, L)
    per_pair = hinge.sum(1) / shared.sum(1).clamp(min=1)
    return (weight * per_pair).mean()


def progress_of(epoch: int, epochs: int) -> float:
    """Share of training done at the start of ``epoch``: 0 at the first, 1 at the last."""
    return epoch / max(1, epochs - 1)


def refresh_seed(config: TokenizerConfig, epoch: int) -> int:
    return config.seed * 1_000_003 + epoch


def refresh_pair_set(codes: np.ndarray, arrays: ItemArrays, config: TokenizerConfig,
                     epoch: int) -> tuple[PairSet, dict[str, Any]]:
    """In one process: codes (N, L) of all of ``arrays`` -> the pair set of this refresh
    and its metrics (``plan_overlaps`` + ``build_pair_set`` metrics)."""
    seed = refresh_seed(config, epoch)
    plan = plan_overlaps(codes, config, seed=seed)
    needed = plan.needed
    pair_set = build_pair_set(plan, arrays.take(needed), needed, config,
                              progress=progress_of(epoch, config.epochs), seed=seed)
    return pair_set, {**plan.metrics, **pair_set.metrics}
