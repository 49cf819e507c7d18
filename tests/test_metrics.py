import math

import numpy as np
import pytest

from sidserve.metrics import (
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
