"""Where the exactness guarantee can break: a fingerprint of the machine an encode ran on.

Online = offline holds bit for bit for one CPU instruction set and torch build
(sidserve/tokenizers/invariant.py): across ISAs, or CPU against GPU, the transcendental
kernels may differ in their last bit, and ADC-SID's float32 mode (sidserve/tokenizers/adc_sid/model/invariant_encode.py)
is not the same arithmetic as its fixed point. So every snapshot (written by the assignment job's
encoders) and every loaded model (a serving replica) records ``environment(tok)``: the torch
version, the CPU capability torch dispatches to, the device, the arithmetic, and ``probe_hash``, a hash of the
model's encoding of a fixed probe set. Two encodes that agree on the probe hash computed the
same bits on the probe; a replica whose hash differs from its snapshot's may answer an item
differently from the snapshot, and says so (GET /v1/model, ``sidserve_probe_mismatch``, the
SidserveProbeMismatch alert).

The probe is a function of the model's input contract only (its dimensions), drawn from a fixed
seed: items near codeword borders are what a last-bit difference flips, so the probe is large
enough (PROBE_ITEMS) that a different kernel path shows, and small enough to cost milliseconds.
"""

from __future__ import annotations

import hashlib

import numpy as np

PROBE_ITEMS = 256  # items encoded per probe
PROBE_SEED = 20261207  # fixed: the probe must be the same set everywhere


def probe_items(tok) -> dict:
    """A fixed item dict for ``tok``'s inputs: standard normal content, behavior on 3 of 4
    items (cold rows None), popularity 0-200 where behavior exists."""
    cfg = tok.config
    rng = np.random.default_rng(PROBE_SEED)
    items = {"item_id": np.array([f"probe-{i}" for i in range(PROBE_ITEMS)], dtype=object)}
    for m, d in cfg.modality_dims.items():
        items[f"{m}_emb"] = rng.standard_normal((PROBE_ITEMS, d)).astype(np.float32)
    warm = np.arange(PROBE_ITEMS) % 4 != 3
    if getattr(cfg, "behavior_dim", None):
        beh = rng.standard_normal((PROBE_ITEMS, cfg.behavior_dim)).astype(np.float32)
        items["behavior_emb"] = [row if w else None for row, w in zip(beh, warm)]
    items["popularity"] = np.where(warm, rng.integers(1, 200, PROBE_ITEMS), 0).astype(np.float64)
    return items


def probe_hash(tok) -> str:
    """sha256 (first 16 hex digits) of the probe's SIDs and behavioral weights, as encoded by
    ``tok`` where it is (its device, this process's torch)."""
    enc = tok.encode(probe_items(tok))
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(enc.sid, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(enc.behavior_weights, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def environment(tok, device: str = "cpu") -> dict:
    """What an encode's bits depend on, and its probe hash."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": device if device == "cpu" else f"{device}:{torch.cuda.get_device_name()}",
            "arithmetic": tok.arithmetic() if hasattr(tok, "arithmetic") else "fixed point",
            "model_version": tok.version, "probe_hash": probe_hash(tok)}
