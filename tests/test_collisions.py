"""Collision detection against a brute-force all-pairs reference."""

import math

import numpy as np
import pytest

from sidserve.metrics import collision_rate
from sidserve.tokenizers.adc_sid.regulation.overlaps import find_overlaps


def brute_force(codes, h):
    n = codes.shape[0]
    return {(i, j) for i in range(n) for j in range(i + 1, n) if (codes[i] != codes[j]).sum() <= h}


@pytest.mark.parametrize("h", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_overlaps_match_brute_force(h, seed):
    codes = np.random.default_rng(seed).integers(0, 3, size=(120, 4))  # small K: many overlaps
    o = find_overlaps(codes, hamming=h)
    assert {tuple(p) for p in o.pairs.tolist()} == brute_force(codes, h)
    assert (o.pairs[:, 0] < o.pairs[:, 1]).all()
    assert (o.distance <= h).all()
    np.testing.assert_array_equal(o.distance, (codes[o.pairs[:, 0]] != codes[o.pairs[:, 1]]).sum(1))


def test_exact_collisions_by_hand():
    codes = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 4], [9, 9, 9], [1, 2, 3]])
    o = find_overlaps(codes, hamming=0)
    assert o.pairs.tolist() == [[0, 1], [0, 4], [1, 4]]
    assert o.group_sizes.tolist() == [3]
    assert o.exact_collision_rate == pytest.approx(3 / 5) == pytest.approx(collision_rate(codes))
    o1 = find_overlaps(codes, hamming=1)
    assert o1.pairs.tolist() == [[0, 1], [0, 2], [0, 4], [1, 2], [1, 4], [2, 4]]
    assert o1.overlap_rate == pytest.approx(4 / 5)  # item 3 is alone


def test_bad_arguments():
    with pytest.raises(ValueError, match="hamming must be an int in \\[0, 2\\]"):
        find_overlaps(np.zeros((3, 3), int), hamming=3)
    with pytest.raises(ValueError, match="codes must be"):
        find_overlaps(np.zeros(3, int))
    assert find_overlaps(np.zeros((0, 3), int)).pairs.shape == (0, 2)


# ---- the regulation's pieces on hand-made cases ---------------------------------------------

def test_compatibility_relaxes_near_duplicates_only():
    import torch

    from sidserve.tokenizers.adc_sid.regulation.repulsion import compatibility

    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, math.sqrt(1 - 0.81)]])  # cos 1, 0, 0.9
    c = compatibility(a, b, threshold=0.9, temperature=0.02)
    assert c[0] > 0.99 and c[1] < 1e-6 and c[2] == pytest.approx(0.5, abs=1e-4)


def test_load_factor_and_schedule_by_hand():
    import torch

    from sidserve.tokenizers.adc_sid.regulation.repulsion import load_factor, progress_schedule

    assert load_factor(torch.tensor([1, 2, 6, 100]), expected=2.0, cap=4.0).tolist() == [1.0, 1.0, 3.0, 4.0]
    assert progress_schedule(0.0) == pytest.approx(1.0)
    assert progress_schedule(1.0) == pytest.approx(0.1)
    assert progress_schedule(0.5) == pytest.approx(0.55)
    values = [progress_schedule(p / 10) for p in range(11)]
    assert all(x >= y for x, y in zip(values, values[1:]))  # never strengthens later
    with pytest.raises(ValueError, match="progress"):
        progress_schedule(1.5)


def test_repulsion_pushes_close_latents_apart_and_ignores_distant_ones():
    import torch

    from sidserve.tokenizers.adc_sid.regulation.repulsion import repulsion

    za = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    zb = torch.tensor([[1.0, 0.1], [-1.0, 0.0]])
    per_pair = repulsion(za, zb, margin=0.5)
    cos0 = 1.0 / math.sqrt(1.01)
    assert per_pair.tolist() == pytest.approx([cos0 - 0.5, 0.0], rel=1e-5)  # the far pair adds 0
    per_pair.sum().backward()
    assert za.grad[1].abs().sum() == 0 and za.grad[0].abs().sum() > 0
    # a gradient step lowers the similarity of the close pair
    with torch.no_grad():
        moved = za - 0.5 * za.grad
    assert torch.nn.functional.cosine_similarity(moved[:1], zb[:1]) < cos0
    # a narrower margin than their distance (1 - cos0 = 0.005): already far enough apart
    assert float(repulsion(za, zb, margin=1 - cos0 - 1e-3).max()) == 0.0
