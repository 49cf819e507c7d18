"""Resume a downstream model's training after an interruption, bit for bit.

A stage of the evaluation trains for up to an hour; a killed process (a preempted node, a
session that ends) used to lose all of it. ``EpochCheckpoint`` saves, after every epoch,
everything the next epoch reads: the model and optimizer (and scheduler) state, both random
generators (torch's global one drives dropout, a numpy ``Generator`` the batch order and
negatives), the early-stopping state (best weights included) and the history so far. A
resumed run therefore takes the same steps with the same numbers as one that was never
stopped (CPU, same thread count: tested in tests/test_eval_checkpoint.py), so a stage's
result does not depend on whether it was interrupted.

The file is written atomically (temp file + rename) and carries a fingerprint of the
training configuration; a checkpoint written under another configuration is ignored (with a
warning) rather than resumed. The caller removes it once the stage's result is written.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from torch import nn

from sidserve.eval.early_stopping import EarlyStopping
from sidserve.files import atomic_write

log = logging.getLogger(__name__)


class EpochCheckpoint:
    """path: the checkpoint file (None: checkpointing off, every method a no-op).
    fingerprint: a JSON-like dict naming the configuration (seeds included) it belongs to."""

    def __init__(self, path: str | None, fingerprint: dict):
        self.path, self.fingerprint = path, fingerprint
        self._t0 = time.perf_counter()
        self._seconds_before = 0.0
        self.resumed_from: int | None = None  # the first epoch this process ran after a resume

    def resume(self, model: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator,
               stopper: EarlyStopping, sched=None) -> tuple[int, list[dict], bool]:
        """Load a matching checkpoint into the given objects -> (first epoch to run, history so
        far, whether training had already stopped). Without one: (0, [], False), untouched."""
        if self.path is None or not os.path.exists(self.path):
            return 0, [], False
        state = torch.load(self.path, weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring %s: written under another configuration", self.path)
            return 0, [], False
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        stopper.load_state_dict(state["stopper"])
        self._seconds_before = float(state["seconds"])
        self.resumed_from = state["epoch"] + 1
        log.info("resuming %s after epoch %d (%.0f s of training kept)", self.path, state["epoch"],
                 self._seconds_before)
        return state["epoch"] + 1, list(state["history"]), bool(state["stopped"])

    def save(self, epoch: int, model: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator,
             stopper: EarlyStopping, history: list[dict], stopped: bool, sched=None) -> None:
        """Record the state after ``epoch`` (0-based) has run and been evaluated."""
        if self.path is None:
            return
        state = {"fingerprint": self.fingerprint, "epoch": epoch, "stopped": stopped,
                 "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": None if sched is None else sched.state_dict(),
                 "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state,
                 "stopper": stopper.state_dict(), "history": history, "seconds": self.seconds()}
        with atomic_write(self.path) as f:
            torch.save(state, f)

    def seconds(self) -> float:
        """Training time of the stage so far, over every process that worked on it."""
        return self._seconds_before + time.perf_counter() - self._t0

    def summary(self) -> dict:
        return {"resumed_from_epoch": self.resumed_from, "seconds_before_resume": round(self._seconds_before, 2),
                "train_seconds": round(self.seconds(), 2)}

    def remove(self) -> None:
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)
