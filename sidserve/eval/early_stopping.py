"""Early stopping on a validation metric, keeping the best epoch's weights.

Every downstream model of the evaluation trains until its validation metric has not
improved for ``patience`` evaluations (or ``max_epochs`` is reached), but not before
``min_epochs`` (a noisy metric on a slowly rising curve can sit on a plateau for
``patience`` epochs early on), then restores the weights of the best evaluation. Test data
is never looked at while training.
"""

from __future__ import annotations

import copy
import math

from torch import nn


class EarlyStopping:
    """Track a validation metric; ``update`` returns True when training should stop.

    mode: 'max' (accuracy-like) or 'min' (loss-like); an evaluation improves on the best
    when it is better by more than ``min_delta``. The best state is a deep copy of the
    model's ``state_dict`` taken at that evaluation.
    """

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0, min_epochs: int = 0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_epochs < 0:
            raise ValueError(f"min_epochs must be >= 0, got {min_epochs}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.patience, self.mode, self.min_delta, self.min_epochs = patience, mode, min_delta, min_epochs
        self.best_value = -math.inf if mode == "max" else math.inf
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.bad_evaluations = 0

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(self, epoch: int, value: float, model: nn.Module) -> bool:
        """Record the validation ``value`` of ``epoch`` (0-based); True = stop now: ``patience``
        evaluations without improvement, and at least ``min_epochs`` epochs run."""
        if self.improved(value):
            self.best_value, self.best_epoch = float(value), epoch
            self.best_state = copy.deepcopy(model.state_dict())
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        return self.bad_evaluations >= self.patience and epoch + 1 >= self.min_epochs

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the best evaluation's weights into ``model`` (no-op before any improvement)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return model

    def state_dict(self) -> dict:
        """What a resumed run needs (``EpochCheckpoint``): best value, epoch and weights."""
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.best_state, self.bad_evaluations = state["best_state"], state["bad_evaluations"]

    def summary(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_value": self.best_value, "mode": self.mode,
                "patience": self.patience, "min_epochs": self.min_epochs}
