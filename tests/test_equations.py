"""Each equation of paper §3 against values computed by hand."""

import math

import pytest
import torch

from sidserve import alignment_strength
from sidserve.tokenizers.adc_sid.model import (
    BehaviorWeightingGate,
    ContentGate,
    SparsityRegularizer,
    catalog_quantiles,
    info_nce,
    load_balance_factor,
    normalized_norm,
    quantile_normalized,
    target_sparsity,
)
from sidserve.tokenizers.adc_sid.model.alignment import alignment_loss


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# eq. 15-17 ------------------------------------------------------------------------

@pytest.mark.parametrize("n_norm", [0.0, 0.5, 1.0])
def test_controller_matches_eq17(n_norm):
    expected = sigmoid(10 * n_norm - 9) / sigmoid(10 - 9)
    assert alignment_strength(n_norm, 10, 9) == pytest.approx(expected, rel=1e-12)
    assert float(alignment_strength(torch.tensor([n_norm], dtype=torch.float64), 10, 9)[0]) == pytest.approx(expected)


def test_controller_values_by_hand():
    # sigmoid(1) = 0.7310586, sigmoid(-4) = 0.0179862, sigmoid(-9) = 1.2339458e-4
    assert alignment_strength(1.0) == pytest.approx(1.0)
    assert alignment_strength(0.5) == pytest.approx(0.0179862 / 0.7310586, rel=1e-5)
    assert alignment_strength(0.0) == pytest.approx(1.2339458e-4 / 0.7310586, rel=1e-5)


def test_controller_is_monotonic():
    w = alignment_strength(torch.linspace(0, 1, 101), 10, 9)
    assert torch.all(w[1:] > w[:-1])


def test_normalized_norm_uses_catalog_stats_and_clips():
    e_b = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 20.0], [0.0, 7.5]])  # norms 5, 1, 20, 7.5
    n = normalized_norm(e_b, n_min=2.5, n_max=12.5)
    assert n.tolist() == pytest.approx([0.25, 0.0, 1.0, 0.5])  # 1 and 20 are clipped


def test_quantile_normalisation_by_hand():
    q = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])  # quantiles at 0, .25, .5, .75, 1
    x = torch.tensor([0.5, 1.0, 3.0, 8.0, 12.0, 100.0])
    # below/above the range clip; 3 is half way from 2 to 4 -> 0.25 + 0.5 * 0.25
    assert quantile_normalized(x, q).tolist() == pytest.approx([0.0, 0.0, 0.375, 0.75, 0.875, 1.0], abs=1e-6)


def test_catalog_quantiles_make_the_catalog_uniform():
    norms = torch.distributions.LogNormal(0.0, 1.0).sample((20_000,))  # skewed, like SASRec norms
    u = quantile_normalized(norms, catalog_quantiles(norms, 1001))
    for level in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert float((u <= level).float().mean()) == pytest.approx(level, abs=0.01)
    # min-max of the same norms piles the catalog up near 0 (the defect quantiles fix)
    mm = (norms - norms.min()) / (norms.max() - norms.min())
    assert float((mm <= 0.1).float().mean()) > 0.5


def test_quantile_normalisation_does_not_depend_on_the_batch():
    norms = torch.rand(5_000) * 3
    q = catalog_quantiles(norms, 101)
    whole = quantile_normalized(norms, q)
    parts = torch.cat([quantile_normalized(norms[i:i + 7], q) for i in range(0, 5_000, 7)])
    assert torch.equal(whole, parts)


def test_normalized_norm_rejects_degenerate_stats():
    with pytest.raises(ValueError, match="n_max > n_min"):
        normalized_norm(torch.ones(2, 2), 1.0, 1.0)


# eq. 18-21 ------------------------------------------------------------------------

def test_info_nce_tiny_batch_by_hand():
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # row 0: sims (1, 1/sqrt2); row 1: sims (0, 1/sqrt2); positive is the diagonal
    s = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(s / tau)))
    l1 = -math.log(math.exp(s / tau) / (math.exp(0 / tau) + math.exp(s / tau)))
    assert info_nce(anchor, positive, tau).tolist() == pytest.approx([l0, l1], rel=1e-6)


def test_alignment_total_is_eq21():
    torch.manual_seed(0)
    h_t, h_v, h_b = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    w = torch.tensor([0.0, 0.5, 1.0, 0.2])
    tau = 0.07
    l_vt = (info_nce(h_t, h_v, tau) + info_nce(h_v, h_t, tau)).mean()  # symmetric, eq. 20
    l_bt = (w * info_nce(h_t, h_b, tau)).mean()
    l_bv = (w * info_nce(h_v, h_b, tau)).mean()
    total = alignment_loss({"text": h_t, "image": h_v}, h_b, w, tau)
    assert float(total) == pytest.approx(float(l_vt + l_bv + l_bt), rel=1e-6)
    # w = 0 removes the behavior terms entirely (long-tail items are not aligned)
    assert float(alignment_loss({"text": h_t, "image": h_v}, h_b, torch.zeros(4), tau)) == pytest.approx(float(l_vt))


# eq. 12-13, 22 ---------------------------------------------------------------------

def test_content_gate_is_softmax_of_mlp_plus_bias():
    gate = ContentGate(dim=3, num_experts=3, hidden_dim=4)
    torch.nn.init.zeros_(gate.mlp[2].weight)
    torch.nn.init.zeros_(gate.mlp[2].bias)
    gate.bias.data = torch.tensor([0.0, math.log(2), math.log(5)])
    g = gate(torch.randn(2, 3))
    assert g[0].tolist() == pytest.approx([1 / 8, 2 / 8, 5 / 8], rel=1e-6)


def test_behavior_gate_eq22_and_sparsity():
    gate = BehaviorWeightingGate(dim=2, num_experts=3, hidden_dim=4, bias_init=0.0)
    torch.nn.init.zeros_(gate.mlp[2].weight)
    torch.nn.init.zeros_(gate.mlp[2].bias)
    gate.bias.data = torch.tensor([1.0, -1.0, 0.5])
    n_norm = torch.tensor([0.0, 1.0])
    r, r_fuse = gate(torch.randn(2, 2), n_norm)
    assert torch.equal(r, r_fuse)  # the same weights; only their gradients differ
    assert r[0].tolist() == pytest.approx([sigmoid(0) * 1.0, 0.0, sigmoid(0) * 0.5])
    assert r[1].tolist() == pytest.approx([sigmoid(1) * 1.0, 0.0, sigmoid(1) * 0.5])
    assert r[:, 1].eq(0).all()  # relu switches an expert off exactly


# eq. 23 -------------------------------------------------------------------------

def test_target_sparsity_falls_with_richness():
    assert target_sparsity(torch.tensor([0.0, 0.5, 1.0]), 0.6).tolist() == pytest.approx([0.6, 0.3, 0.0])


def test_load_balance_factor_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    # active shares: 1, 0.5, 0.25; mean 7/12
    assert load_balance_factor(r).tolist() == pytest.approx([12 / 7, 6 / 7, 3 / 7])


def test_sparsity_loss_by_hand():
    reg = SparsityRegularizer(theta=0.5, lambda_init=0.1, rate=1.2)
    r = torch.tensor([[1.0, 0.0], [2.0, 4.0]])
    n_norm = torch.tensor([0.0, 1.0])  # s_target 0.5, 0 -> c = (2, 0)
    # f = (1, 0.5) / 0.75 = (4/3, 2/3); sum_j f_j r_tj: row0 4/3, row1 8/3 + 8/3
    expected = 0.1 * (2 * 4 / 3 + 0 * 16 / 3) / 2
    assert float(reg(r, n_norm)) == pytest.approx(expected, rel=1e-6)


def test_straight_through_gate_passes_the_fusion_gradient_of_a_closed_gate():
    for straight_through in (False, True):
        gate = BehaviorWeightingGate(dim=2, num_experts=2, hidden_dim=4, bias_init=0.0,
                                     straight_through=straight_through)
        torch.nn.init.zeros_(gate.mlp[2].weight)
        torch.nn.init.zeros_(gate.mlp[2].bias)
        gate.bias.data = torch.tensor([1.0, -1.0])  # expert 1 closed for every item
        r, r_fuse = gate(torch.randn(3, 2), torch.zeros(3))
        r_fuse.sum().backward(retain_graph=True)
        # d r_fuse / d b = sigmoid(0) per item where open; through the closed side only if ST
        assert gate.bias.grad.tolist() == pytest.approx([1.5, 1.5 if straight_through else 0.0])
        gate.zero_grad()
        r.sum().backward()  # what the sparsity loss reads: a closed gate gets no push
        assert gate.bias.grad.tolist() == pytest.approx([1.5, 0.0])


def test_proportional_lambda_update_by_hand():
    reg = SparsityRegularizer(theta=0.5, lambda_init=1.0, rate=2.0, update="proportional")
    reg.update_lambda(target=0.4, actual=0.3)  # gap 0.1 / 0.4 = 0.25 -> x 2^0.25
    assert float(reg.lam) == pytest.approx(2 ** 0.25)
    reg.update_lambda(target=0.4, actual=1.0)  # gap -1.5 clipped to -1 -> / 2
    assert float(reg.lam) == pytest.approx(2 ** 0.25 / 2)
    reg.update_lambda(target=0.4, actual=0.4)  # on target: unchanged
    assert float(reg.lam) == pytest.approx(2 ** 0.25 / 2)


def test_lambda_moves_toward_target():
    reg = SparsityRegularizer(theta=0.5, lambda_init=1.0, rate=2.0)
    reg.update_lambda(target=0.5, actual=0.1)  # not sparse enough -> stronger
    assert float(reg.lam) == pytest.approx(2.0)
    reg.update_lambda(target=0.5, actual=0.9)  # too sparse -> weaker
    reg.update_lambda(target=0.5, actual=0.9)
    assert float(reg.lam) == pytest.approx(0.5)
