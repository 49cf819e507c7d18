"""Worker callbacks the Train tests inject (``TrainJobConfig.callbacks``): production code
has no test hooks, only the generic callback interface."""

import json
import os
import time

import numpy as np

from sidserve.jobs.train.worker import TrainCallback


class FaultInjection(TrainCallback):
    """Worker ``rank`` dies hard once at the start of ``epoch`` (``marker`` records that it did)."""

    def __init__(self, epoch: int, rank: int, marker: str, delay_s: float = 2.0):
        self.epoch, self.rank, self.marker, self.delay_s = epoch, rank, marker, delay_s

    def on_epoch_start(self, epoch, rank):
        if (epoch, rank) == (self.epoch, self.rank) and not os.path.exists(self.marker):
            # wait first: the controller collects the previous report (and its checkpoint) on
            # its next poll (every 2 s by default; tests/conftest.py sets 0.2 s, so 2 s is ten polls)
            time.sleep(self.delay_s)
            open(self.marker, "w").close()
            print(f"[test] fault injection: worker {rank} dies in epoch {epoch}", flush=True)
            os._exit(1)


class FaultAtStep(TrainCallback):
    """Worker ``rank`` dies hard once right after step ``step`` of ``epoch`` (counted from the
    epoch's first batch; ``marker`` records that it did)."""

    def __init__(self, epoch: int, step: int, rank: int, marker: str, delay_s: float = 2.0):
        self.epoch, self.step, self.rank, self.marker, self.delay_s = epoch, step, rank, marker, delay_s
        self.seen = 0

    def on_epoch_start(self, epoch, rank):
        self.seen = 0

    def on_batch(self, epoch, rank, batch):
        self.seen += 1
        if (epoch, rank, self.seen) == (self.epoch, self.rank, self.step) and not os.path.exists(self.marker):
            time.sleep(self.delay_s)  # let the controller collect the last report (see FaultInjection)
            open(self.marker, "w").close()
            print(f"[test] fault injection: worker {rank} dies after step {self.seen} of epoch {epoch}", flush=True)
            os._exit(1)


class RecordShards(TrainCallback):
    """Each worker writes the item ids of its first epoch's shard and the pairs it plans."""

    def __init__(self, directory: str):
        self.directory = directory
        self.first_epoch = None
        self.seen = []

    def on_pairs(self, epoch, rank, pair_set):
        if len(pair_set):
            ids = pair_set.items.item_ids
            with open(os.path.join(self.directory, f"rank-{rank}-pairs-epoch-{epoch}.json"), "w") as f:
                json.dump({"pairs": [[ids[a], ids[b]] for a, b in zip(pair_set.a, pair_set.b)],
                           "weight": pair_set.weight.tolist()}, f)

    def on_batch(self, epoch, rank, batch):
        self.first_epoch = epoch if self.first_epoch is None else self.first_epoch
        if epoch == self.first_epoch and "item_id" in batch:
            self.seen.append(np.asarray(batch["item_id"]).astype(str))

    def on_epoch_end(self, epoch, rank, record):
        if epoch == self.first_epoch and self.seen:
            with open(os.path.join(self.directory, f"rank-{rank}-epoch-{epoch}.txt"), "w") as f:
                f.write("\n".join(np.concatenate(self.seen)))
            self.seen = []
