"""The collectives the Ray Train workers use, on two real gloo processes (no Ray): the
hash-partitioned exchange behind the per-epoch collision rate, against one process."""

import os

import numpy as np
import pytest
import torch

from sidserve.ids import hash_codes
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.training import CodeStats, Sync

CONFIG = TokenizerConfig(modality_dims={"text": 8}, behavior_dim=None, codebook_size=16)  # 2 positions


def codes_of(rank: int) -> np.ndarray:
    """Each rank's codes, SID i = (i // 16, i % 16): rank 0 has SIDs 0-59, rank 1 SIDs 40-99
    (20 shared across ranks) and SID 99 twice (a collision inside one rank)."""
    ids = np.arange(60) if rank == 0 else np.concatenate([np.arange(40, 100), [99]])
    return np.stack([ids // 16, ids % 16], axis=1)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from sidserve.jobs.train.worker import DistSync

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    sync = DistSync(torch.device("cpu"))
    stats = CodeStats(CONFIG)
    stats.add(codes_of(rank))
    mine = sync.exchange_by_hash(hash_codes(codes_of(rank)))
    np.save(os.path.join(out, f"mine{rank}.npy"), mine)
    np.save(os.path.join(out, f"report{rank}.npy"), np.array([stats.reduce(sync)], dtype=object))
    # the mid-epoch checkpoint's parts: every rank's to rank 0, nothing to the others
    np.save(os.path.join(out, f"root{rank}.npy"),
            np.array([sync.gather_object_to_root({"rank": rank, "codes": codes_of(rank)})], dtype=object))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_the_collision_rate_over_two_workers_equals_one_process_over_their_union(tmp_path):
    world = 2
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_worker, args=(world, init, str(tmp_path)), nprocs=world)
    union = np.concatenate([codes_of(r) for r in range(world)])
    one = CodeStats(CONFIG)
    one.add(union)
    expected = one.reduce(Sync())
    _, inv, cnt = np.unique(hash_codes(union), return_inverse=True, return_counts=True)
    assert expected["collision_rate"] == pytest.approx((cnt[inv] > 1).mean())  # the definition
    assert expected["collision_rate"] == pytest.approx((2 * 20 + 2) / 121)  # by hand: 42 of 121 items
    for r in range(world):
        got = np.load(tmp_path / f"report{r}.npy", allow_pickle=True)[0]
        assert got == expected  # every worker reports the same, equal to one process over the union
    mine = [np.load(tmp_path / f"mine{r}.npy") for r in range(world)]
    for r, part in enumerate(mine):  # each worker holds one hash range ...
        assert (part % world == r).all()
    assert sorted(np.concatenate(mine)) == sorted(hash_codes(union))  # ... and together every hash once
    root = [np.load(tmp_path / f"root{r}.npy", allow_pickle=True)[0] for r in range(world)]
    assert [p["rank"] for p in root[0]] == list(range(world)) and root[1] is None
    assert all(np.array_equal(p["codes"], codes_of(r)) for r, p in enumerate(root[0]))
    assert Sync().gather_object_to_root(7) == [7]  # one process: it is rank 0
