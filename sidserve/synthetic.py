"""Synthetic catalog for tests and demos, in the regime ADC-SID targets.

- content embeddings (one per modality) are noisy linear views of a clustered item
  latent, so items of a cluster are close in every content modality;
- popularity is long-tailed (Zipf);
- behavioral embeddings point along a mix of the item's content latent and an
  item-specific collaborative factor; their norm grows with log-popularity and their
  direction is noisy for tail items (few interactions), as with un-normalised SASRec
  embeddings;
- a share of items is cold (behavior null, popularity 0);
- optionally, near-duplicate pairs: two items with almost the same content.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def embedding_array(values: np.ndarray, valid: np.ndarray | None = None) -> pa.ListArray:
    """(N, d) float32 -> list<float32> Arrow array; rows where ``valid`` is False are null."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    n, d = values.shape
    offsets = np.arange(0, (n + 1) * d, d, dtype=np.int32)
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.ravel()), mask=mask)


def make_synthetic_catalog(
    n_items: int = 20000,
    *,
    modality_dims: dict[str, int] | None = None,
    behavior_dim: int | None = 32,
    n_clusters: int = 256,
    latent_dim: int = 16,
    cold_share: float = 0.1,
    near_duplicate_pairs: int = 0,
    zipf_exponent: float = 1.1,
    seed: int = 0,
) -> pa.Table:
    """-> Table: item_id (string), <modality>_emb (list<float32>) per modality,
    behavior_emb (list<float32>, null for cold items), popularity (int64), cluster (int32)."""
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    if not 0 <= cold_share < 1:
        raise ValueError(f"cold_share must be in [0, 1), got {cold_share}")
    if not 0 <= 2 * near_duplicate_pairs <= n_items:
        raise ValueError(f"near_duplicate_pairs={near_duplicate_pairs} needs 2x as many items")
    modality_dims = modality_dims or {"text": 64, "image": 32}
    rng = np.random.default_rng(seed)

    centers = rng.normal(size=(n_clusters, latent_dim))
    cluster = rng.integers(0, n_clusters, size=n_items)
    u = centers[cluster] + 0.6 * rng.normal(size=(n_items, latent_dim))  # (N, r)
    # near duplicates: item 2i+1 copies item 2i's latent with a tiny perturbation
    dup = np.arange(near_duplicate_pairs)
    u[2 * dup + 1] = u[2 * dup] + 0.01 * rng.normal(size=(near_duplicate_pairs, latent_dim))
    cluster[2 * dup + 1] = cluster[2 * dup]

    columns: dict[str, pa.Array] = {
        "item_id": pa.array([f"item-{i:08d}" for i in range(n_items)], pa.string()),
    }
    for m, d in modality_dims.items():
        proj = rng.normal(size=(latent_dim, d)) / np.sqrt(latent_dim)
        e = np.tanh(u @ proj) + 0.05 * rng.normal(size=(n_items, d))
        columns[f"{m}_emb"] = embedding_array(e)

    ranks = rng.permutation(n_items) + 1
    popularity = np.floor(5000.0 / ranks**zipf_exponent).astype(np.int64) + 1
    cold = rng.random(n_items) < cold_share
    popularity[cold] = 0
    if behavior_dim is not None:
        collab = rng.normal(size=(n_items, latent_dim))
        signal = u @ rng.normal(size=(latent_dim, behavior_dim)) + collab @ rng.normal(
            size=(latent_dim, behavior_dim)
        )
        signal /= np.linalg.norm(signal, axis=1, keepdims=True)
        log_pop = np.log1p(popularity)
        noise_scale = 3.0 / (1.0 + log_pop)  # tail items: noisy direction
        noise = rng.normal(size=(n_items, behavior_dim)) / np.sqrt(behavior_dim)
        direction = signal + noise_scale[:, None] * noise
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        norm = 0.5 + 0.6 * log_pop  # richness grows with popularity
        columns["behavior_emb"] = embedding_array(direction * norm[:, None], valid=~cold)
    columns["popularity"] = pa.array(popularity)
    columns["cluster"] = pa.array(cluster.astype(np.int32))
    return pa.table(columns)
