"""Checkpoints of the Ray Train fit: one per epoch (rank 0 writes), read back on resume and
at the end (the last one carries the final metrics to the driver). With
``checkpoint_every_steps`` also one every that many steps inside an epoch: it adds each
worker's part of the epoch so far (steps taken, loss sums, code counts and SID hashes, RNG),
so a resumed worker skips the batches already trained on and ends the epoch as if it had
never stopped. With collision regulation, the pair set of the current refresh period and the
steps taken in it: a run resumed inside a period (``collision_refresh_every`` > 1) uses the
pairs an uninterrupted run would, not ones re-planned from a later model."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.model.adc_sid import ADCSIDModel
from sidserve.tokenizers.adc_sid.training import TrainState

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
FINAL_FILE = "final.json"
PARTIAL_FILE = "epoch_so_far.pt"  # mid-epoch checkpoints only: [each rank's part of the epoch]
PAIRS_FILE = "pairs.npz"  # collision regulation: the refresh period's PairSet (plain arrays)


def save_checkpoint(directory: str, model: ADCSIDModel, optimizer, epoch: int, state: TrainState,
                    history: list[dict], partial: list[dict] | None = None, pairs=None,
                    generators: list[torch.Tensor] | None = None) -> None:
    """A checkpoint: weights, optimizer + epoch + step + RNG, the history so far; ``partial``
    (one dict per rank, tensors and plain values): ``epoch`` is still running; ``pairs``:
    (PairSet, steps taken with it) of collision regulation's current refresh period;
    ``generators``: every rank's generator state, by rank (``generator`` is rank 0's)."""
    torch.save(model.state_dict(), os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "step": state.step,
                "generator": state.generator.get_state(), "generators": generators,
                "pair_step": None if pairs is None else int(pairs[1])}, os.path.join(directory, STATE_FILE))
    if pairs is not None:
        np.savez(os.path.join(directory, PAIRS_FILE), **pairs[0].arrays())
    with open(os.path.join(directory, HISTORY_FILE), "w") as f:
        json.dump(history, f)
    if partial is not None:
        torch.save(partial, os.path.join(directory, PARTIAL_FILE))


def load_checkpoint(directory: str, model: ADCSIDModel) -> tuple[dict, list[dict]]:
    """Weights into ``model``; -> (optimizer/epoch/step state, history). The state's
    ``partial`` is the per-rank list of a mid-epoch checkpoint, else None; ``pair_set`` and
    ``pair_step`` collision regulation's refresh period (None without)."""
    model.load_state_dict(torch.load(os.path.join(directory, MODEL_FILE), weights_only=True))
    saved = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
    p = os.path.join(directory, PARTIAL_FILE)
    saved["partial"] = torch.load(p, weights_only=True) if os.path.exists(p) else None
    saved["pair_set"] = None
    p = os.path.join(directory, PAIRS_FILE)
    if os.path.exists(p):
        from sidserve.tokenizers.adc_sid.regulation.pairs import PairSet

        with np.load(p, allow_pickle=False) as z:
            saved["pair_set"] = PairSet.from_arrays({k: z[k] for k in z.files})
    with open(os.path.join(directory, HISTORY_FILE)) as f:
        return saved, json.load(f)


def read_result(directory: str, tcfg: TokenizerConfig) -> tuple[ADCSIDModel, list[dict], dict]:
    """The last checkpoint of a finished run -> (model, per-epoch history, final metrics)."""
    model = ADCSIDModel(tcfg)
    model.load_state_dict(torch.load(os.path.join(directory, MODEL_FILE), weights_only=True))
    with open(os.path.join(directory, HISTORY_FILE)) as f:
        history = json.load(f)
    with open(os.path.join(directory, FINAL_FILE)) as f:
        return model, history, json.load(f)
