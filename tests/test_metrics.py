import math

import numpy as np
import pytest

from sidserve.metrics import (
    CodeCounter,
    churn,
    collision_rate,
    entropy_per_position,
    quantization_report,
    utilisation_per_position,
)


def test_entropy_uniform_is_ln_k_and_constant_is_zero():
    codes = np.stack([np.arange(100) % 4, np.zeros(100, int)], axis=1)
    ent = entropy_per_position(codes, 4)
    assert ent[0] == pytest.approx(math.log(4))
    assert ent[1] == 0.0


def test_entropy_by_hand():
    codes = np.array([[0], [0], [1], [2]])  # p = 1/2, 1/4, 1/4
    assert entropy_per_position(codes, 3)[0] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def test_utilisation_ignores_missing_code():
    codes = np.array([[0, 4], [1, 4], [1, 2]])  # K = 4; 4 is the missing-behavior code
    assert utilisation_per_position(codes, 4).tolist() == [0.5, 0.25]


def test_collision_rate_by_hand():
    codes = np.array([[1, 2], [1, 2], [1, 3], [0, 0], [1, 2]])
    assert collision_rate(codes) == pytest.approx(3 / 5)
    assert collision_rate(np.eye(3, dtype=int)) == 0.0


def test_churn_by_hand():
    a = np.array([[1, 1], [2, 2], [3, 3]])
    b = np.array([[2, 2], [9, 9], [4, 4]])
    out = churn(["x", "y", "z"], a, ["y", "z", "new"], b)
    assert out == {"common": 2, "changed": 1, "churn": 0.5, "new": 1, "removed": 1}


def test_churn_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="unique"):
        churn(["a", "a"], np.zeros((2, 1), int), ["a"], np.zeros((1, 1), int))


def test_report_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        quantization_report(np.zeros(3, int), 4)


def test_code_counter_streams_merges_and_skips_the_missing_code():
    rng = np.random.default_rng(0)
    K, L = 5, 3
    codes = rng.integers(0, K + 1, size=(400, L))  # K = missing_code at some rows
    whole = CodeCounter(L, K).add(codes)
    parts = CodeCounter(L, K).add(codes[:123]).merge(CodeCounter(L, K).add(codes[123:]))
    assert (whole.counts == parts.counts).all()
    for j in range(L):  # by hand: counts of 0..K-1, the missing code left out
        assert whole.counts[j].tolist() == [int((codes[:, j] == k).sum()) for k in range(K)]
    p = whole.counts[0] / whole.counts[0].sum()
    assert whole.entropy_per_position()[0] == pytest.approx(float(-(p * np.log(p)).sum()))
    one = CodeCounter(2, 4).add(np.array([[0, 1], [0, 1], [0, 3]]))
    assert one.utilisation_per_position().tolist() == [0.25, 0.5]
    assert one.report()["utilisation_mean"] == pytest.approx(0.375)
    with pytest.raises(ValueError, match="codes have 3 positions, the counter 2"):
        one.add(np.zeros((1, 3), int))


def test_id_buckets_are_stable_in_range_and_even():
    import pyarrow as pa

    from sidserve.ids import buckets, hash_codes

    ids = pa.array([f"item-{i:08d}" for i in range(20000)])
    b = buckets(ids, 7)
    assert b.min() >= 0 and b.max() < 7 and (buckets(ids, 7) == b).all()
    assert (buckets(ids.slice(100, 50), 7) == b[100:150]).all()  # a value's bucket, not its row's
    share = np.bincount(b, minlength=7) / len(b)
    assert np.abs(share - 1 / 7).max() < 0.01  # sequential ids spread evenly
    with pytest.raises(ValueError, match="n_buckets must be >= 1"):
        buckets(ids, 0)
    codes = np.array([[1, 2, 3], [1, 2, 3], [3, 2, 1]])
    h = hash_codes(codes)
    assert h[0] == h[1] and h[0] != h[2]
