"""The network: straight-through path, codebooks, fusion, content-only path."""

import pytest
import torch
import torch.nn.functional as F

from sidserve.tokenizers import invariant
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.model import ADCSIDModel, CosineCodebook, ModelInput
from sidserve.tokenizers.adc_sid.model.euclidean_codebook import EuclideanCodebook
from sidserve.tokenizers.adc_sid.training import init_codebooks

QUANTIZATIONS = ["parallel", "residual", "residual_input"]


def make_input(B=8, behavior=True, has=None):
    torch.manual_seed(0)
    has_b = torch.ones(B, dtype=torch.bool) if has is None else has
    return ModelInput(
        {"text": torch.randn(B, 6), "image": torch.randn(B, 5)},
        torch.randn(B, 4) * 3 if behavior else None,
        has_b if behavior else torch.zeros(B, dtype=torch.bool),
    )


def tiny_config(**kw):
    base = dict(modality_dims={"text": 6, "image": 5}, behavior_dim=4, codebook_size=4,
                hidden_dim=8, latent_dim=4, expert_hidden_dim=8, num_content_experts=2)
    return TokenizerConfig(**{**base, **kw})


def test_codebook_assigns_highest_cosine():
    book = CosineCodebook(dim=2, codebook_size=3)
    book.embed.data = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, -1.0]])
    z = torch.tensor([[2.0, 0.1], [0.1, 0.2], [-3.0, -2.0]])
    assert book.assign(z).tolist() == [0, 1, 2]


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_straight_through_gradient_path(quantization):
    model = ADCSIDModel(tiny_config(behavior_quantization=quantization)).train()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    out = model(make_input())
    out.losses["recon"].backward()
    # recon reaches the encoders and gates through the straight-through estimator ...
    assert model.content_experts["text"][0][0].weight.grad.abs().sum() > 0
    assert model.shared_experts[0][0].weight.grad.abs().sum() > 0
    assert model.behavior_gate.mlp[0].weight.grad.abs().sum() > 0
    # ... but not the codewords: those are trained by the codebook loss only
    for book in model.codebooks:
        assert book.embed.grad is None or book.embed.grad.abs().sum() == 0
    model.zero_grad()
    out = model(make_input())
    out.losses["vq"].backward()
    assert all(book.embed.grad.abs().sum() > 0 for book in model.codebooks)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_decoder_sees_quantized_value(quantization):
    """Eq. 14: the decoder's input equals z_q in value (z + sg(z_q - z)); residual levels add
    their codewords, each weighted by its R(e_b)_i, as parallel experts do."""
    model = ADCSIDModel(tiny_config(behavior_quantization=quantization)).eval()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    seen = {}

    def hook(module, inputs, output):
        seen["x"] = inputs[0]

    model.decoder.register_forward_hook(hook)
    x = make_input()
    out = model(x)
    c = model.config
    # rebuild z_q from codes, gates and codewords (eq. 11)
    books = model.codebooks
    z_q = sum(books[i].codewords()[out.codes[:, i]] for i in range(c.num_shared_experts))
    pos = c.num_shared_experts
    for m in c.content_modalities:
        g = model.content_gates[m](x.content[m])
        for i in range(c.num_content_experts):
            z_q = z_q + g[:, i:i + 1] * books[pos].codewords()[out.codes[:, pos]]
            pos += 1
    for i in range(c.num_behavior_experts):
        word = books[pos].codewords()[out.codes[:, pos]]
        if quantization == "residual_input":  # a level of e_b reaches the fusion through W
            word = model.behavior_out(word)
        z_q = z_q + out.behavior_weights[:, i:i + 1] * word
        pos += 1
    assert torch.allclose(seen["x"], z_q, atol=1e-5)


def test_content_gates_sum_to_one():
    model = ADCSIDModel(tiny_config(num_content_experts=3))
    g = model.content_gates["text"](torch.randn(5, 6))
    assert torch.allclose(g.sum(-1), torch.ones(5))


def test_cold_items_get_missing_code_and_zero_weight():
    model = ADCSIDModel(tiny_config()).eval()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    has = torch.tensor([True, False, True, False])
    out = model(make_input(B=4, has=has))
    c = model.config
    nb = c.num_behavior_experts
    assert out.codes[~has][:, -nb:].eq(c.missing_code).all()
    assert out.codes[has][:, -nb:].lt(c.codebook_size).all()
    assert out.behavior_weights[~has].eq(0).all()
    assert out.codes.shape == (4, c.sid_length)


def test_cold_path_uses_learned_missing_vector():
    model = ADCSIDModel(tiny_config()).eval()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    x = make_input(B=3, has=torch.zeros(3, dtype=torch.bool))
    before = model(x).latents[0].clone()
    model.missing_h_b.data += 1.0
    after = model(x).latents[0]
    assert not torch.allclose(before, after)  # shared experts read missing_h_b for cold items


def test_behavior_dropout_zeroes_weights_of_dropped_items():
    model = ADCSIDModel(tiny_config()).train()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    out = model(make_input(B=64), behavior_dropout=0.5, generator=torch.Generator().manual_seed(0))
    dropped = out.behavior_weights.eq(0).all(-1)
    assert 10 < int(dropped.sum()) < 54


def test_ablated_gate_gives_equal_weights():
    model = ADCSIDModel(tiny_config(use_behavior_gate=False)).eval()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    out = model(make_input())
    assert out.behavior_weights.eq(1).all()


def test_codebook_restart_replaces_only_dead_codes():
    torch.manual_seed(0)
    book = CosineCodebook(dim=3, codebook_size=4)
    book.train()
    before = book.codewords().clone()
    book.usage.copy_(torch.tensor([50.0, 50.0, 0.0, 1.0]))  # fair share 25.25 -> codes 2, 3 dead
    z = torch.randn(10, 3)
    n = book.restart_dead_codes(z, threshold=0.1, generator=torch.Generator().manual_seed(0))
    after = book.codewords()
    assert n == 2
    assert torch.allclose(before[:2], after[:2])
    zn = F.normalize(z, dim=-1)
    for j in (2, 3):  # each restarted code sits next to one of the given latents
        assert (zn @ after[j]).max() > 0.99
    assert book.usage.sum() == 0


def test_kmeans_init_uses_every_code():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(8, 5), dim=-1)
    z = centers.repeat(50, 1) + 0.01 * torch.randn(400, 5)
    book = CosineCodebook(dim=5, codebook_size=8)
    book.init_from_kmeans(z, niter=20, seed=0)
    assert book.assign(z).unique().numel() == 8


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_codes_only_inference_matches_the_full_forward(quantization):
    model = ADCSIDModel(tiny_config(codebook_size=16, behavior_quantization=quantization)).eval()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    has = torch.tensor([True, False, True, True, False, True, True, False])
    x = make_input(B=8, has=has)
    full = model(x)
    fast = model(x, codes_only=True)
    assert torch.equal(full.codes, fast.codes)
    # the full forward runs the gate on the rows with behavior only, codes_only on every row
    # (so a row's result does not depend on its batch): equal up to float32 rounding
    torch.testing.assert_close(full.behavior_weights, fast.behavior_weights, rtol=1e-6, atol=1e-7)
    assert fast.recon is None and fast.losses == {}
    model.train()
    try:
        model(x, codes_only=True)
    except ValueError as err:
        assert "inference" in str(err)
    else:
        raise AssertionError("codes_only in train mode must be refused")


def test_host_copies_of_the_richness_statistics_follow_every_change():
    """richness() reads N_min/N_max and the quantile check from host copies (no device sync per
    forward); each way the buffers change must refresh them."""
    cfg = TokenizerConfig(modality_dims={"text": 8, "image": 4}, behavior_dim=4, richness_normalization="minmax",
                          codebook_size=8, hidden_dim=16, latent_dim=8, expert_hidden_dim=16)
    model = ADCSIDModel(cfg)
    e_b = torch.tensor([[3.0, 0.0, 0.0, 0.0]])  # ||e_b|| = 3
    model.set_catalog_stats(1.0, 5.0)
    assert model.richness(e_b).item() == pytest.approx(0.5)
    model.set_catalog_stats(2.0, 4.0)
    assert model.richness(e_b).item() == pytest.approx(0.5)
    model.set_catalog_stats(3.0, 7.0)
    assert model.richness(e_b).item() == pytest.approx(0.0)
    other = ADCSIDModel(cfg)
    other.set_catalog_stats(0.0, 6.0)
    model.load_state_dict(other.state_dict())
    assert model.richness(e_b).item() == pytest.approx(0.5)


def test_cold_consistency_term_by_hand():
    """Issue 20.6: sum over fed items of (1 - w_i) * (1 - cos(z_s(i), z_s(i | behavior
    withheld))) / items with behavior; dropped-out and cold items add nothing."""
    from sidserve import alignment_strength

    c = tiny_config(cold_consistency_weight=2.0, num_shared_experts=2)
    model = ADCSIDModel(c).train()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    torch.nn.init.normal_(model.missing_h_b)
    x = make_input(6, has=torch.tensor([True, True, False, True, True, True]))
    h = {m: model.proj[m](x.content[m]) for m in c.content_modalities}
    h_b = model.proj_b(x.behavior)
    rows = torch.tensor([0, 1, 3, 4, 5])
    warm = torch.tensor([True, False, False, True, True, True])  # item 1 dropped out, item 2 cold
    n_norm = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7])
    shared_in = torch.cat([h["text"], h["image"], h_b], -1)
    shared_z = [e(shared_in) for e in model.shared_experts]
    got = model.cold_consistency(h, warm, rows, n_norm, shared_z)
    want = 0.0
    for j, i in enumerate(rows.tolist()):
        if not warm[i]:
            continue
        cold_in = torch.cat([h["text"][i], h["image"][i], model.missing_h_b])
        w = alignment_strength(n_norm[j:j + 1], c.alpha, c.beta)[0]
        for z, e in zip(shared_z, model.shared_experts):
            a, b = z[i], e(cold_in[None])[0]
            want += (1 - w) * (1 - (a @ b) / (a.norm() * b.norm()))
    assert got.item() == pytest.approx(want.item() / 5, rel=1e-5)
    # cold_consistency_below: only items whose N_norm is below it are pulled (items 0 and 4 here)
    model.config = c.replace(cold_consistency_below=0.5)
    part = model.cold_consistency(h, warm, rows, n_norm, shared_z)
    want_part = 0.0
    for j, i in ((0, 0), (3, 4)):
        cold_in = torch.cat([h["text"][i], h["image"][i], model.missing_h_b])
        w = alignment_strength(n_norm[j:j + 1], c.alpha, c.beta)[0]
        for z, e in zip(shared_z, model.shared_experts):
            a, b = z[i], e(cold_in[None])[0]
            want_part += (1 - w) * (1 - (a @ b) / (a.norm() * b.norm()))
    assert 0 < part.item() < got.item() and part.item() == pytest.approx(want_part.item() / 5, rel=1e-5)
    # in the total with its weight; 0 (the paper's model) leaves the paper's loss untouched
    model.zero_grad()
    out = model(x)
    assert out.losses["consistency"] > 0
    parts = out.losses["recon"] + out.losses["vq"] + c.align_weight * out.losses["align"] + out.losses["reg"]
    assert out.losses["total"].item() == pytest.approx((parts + 2.0 * out.losses["consistency"]).item(), rel=1e-6)
    out.losses["consistency"].backward()
    assert model.missing_h_b.grad.abs().sum() > 0  # the cold path learns from it too
    plain = ADCSIDModel(tiny_config(cold_consistency_weight=0.0)).train()
    plain.set_catalog_stats(0.5, 10.0)
    plain.fit_input_stats(make_input(64))
    assert plain(x).losses["consistency"] == 0


def test_euclidean_codebook_picks_the_nearest_codeword_not_the_most_similar_direction():
    book = EuclideanCodebook(dim=2, codebook_size=3)
    book.embed.data = torch.tensor([[1.0, 0.0], [0.0, 0.2], [-2.0, -2.0]])
    z = torch.tensor([[0.1, 0.05], [0.9, 0.1], [-1.5, -1.0]])
    # row 0: cosine would pick code 0 (0.89 vs 0.45); code 1 is nearer (0.0325 vs 0.8125)
    d2 = ((z[:, None, :] - book.embed.data[None]) ** 2).sum(-1)  # (3, 3) by hand
    assert book.assign(z).tolist() == [1, 0, 2] == d2.argmin(1).tolist()
    codes, scores = book.top(z, 2)
    assert codes[:, 0].tolist() == [1, 0, 2]
    torch.testing.assert_close(scores, -d2.double().gather(1, codes), rtol=0, atol=1e-6)
    assert bool((scores[:, 0] >= scores[:, 1]).all())
    with invariant.batch_invariant():  # the exact path agrees
        exact_codes, exact_scores = book.top(z, 2)
    assert torch.equal(exact_codes, codes)
    torch.testing.assert_close(exact_scores, scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantization", ["residual", "residual_input"])
def test_residual_levels_code_what_the_levels_before_left(quantization):
    """r_0 is the expert's unit latent ("residual") or e_b itself ("residual_input"), each
    level's code is the codeword nearest its residual, and r_i+1 = r_i - c_i[code_i]."""
    model = ADCSIDModel(tiny_config(behavior_quantization=quantization, codebook_size=8)).eval()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    x = make_input(B=16)
    out = model(x)
    c = model.config
    k = c.sid_length - c.num_behavior_experts
    r = out.latents[k:]  # (16, D or d_b) per level: what that level quantized
    if quantization == "residual":
        assert len(model.behavior_experts) == 1  # one expert feeds every level
        torch.testing.assert_close(r[0].norm(dim=-1), torch.ones(16))
    else:
        assert len(model.behavior_experts) == 0 and torch.equal(r[0], x.behavior)
    for i in range(c.num_behavior_experts):
        words = model.codebooks[k + i].codewords()
        d2 = ((r[i][:, None, :] - words[None]) ** 2).sum(-1)
        assert torch.equal(out.codes[:, k + i], d2.argmin(1))
        if i + 1 < c.num_behavior_experts:
            torch.testing.assert_close(r[i + 1], r[i] - words[out.codes[:, k + i]])


@pytest.mark.parametrize("quantization", ["residual", "residual_input"])
def test_residual_init_shrinks_what_is_left_level_by_level(quantization):
    """k-means at each level on what the levels before left (init_codebooks runs them in
    order): the residual's mean length falls at every level."""
    torch.manual_seed(0)
    model = ADCSIDModel(tiny_config(behavior_quantization=quantization, codebook_size=8, latent_dim=6))
    model.set_catalog_stats(0.5, 10.0)
    sample = make_input(B=600)
    init_codebooks(model, sample)
    model.eval()
    out = model(sample)
    c = model.config
    k = c.sid_length - c.num_behavior_experts
    lengths = [float(z.norm(dim=-1).mean()) for z in out.latents[k:]]
    last = out.latents[-1] - model.codebooks[-1].codewords()[out.codes[:, -1]]
    lengths.append(float(last.norm(dim=-1).mean()))
    assert all(a > b for a, b in zip(lengths, lengths[1:])), lengths


def test_residual_candidates_follow_the_chosen_path():
    model = ADCSIDModel(tiny_config(behavior_quantization="residual", codebook_size=8)).eval()
    model.set_catalog_stats(0.5, 10.0)
    model.fit_input_stats(make_input(64))
    x = make_input(B=8, has=torch.tensor([True, False] * 4))
    out = model(x, codes_only=True, candidates=3)
    assert torch.equal(out.candidates[:, :, 0], out.codes)
    k = model.config.sid_length - model.config.num_behavior_experts
    assert bool(out.candidates[1::2, k:].eq(model.config.missing_code).all())
    s = out.candidate_scores[::2, k:]  # (4, N_b, 3): -||r - c||^2, best first
    assert bool((s <= 0).all()) and bool((s[..., :-1] >= s[..., 1:]).all())


def test_euclidean_restart_puts_dead_codes_on_residuals():
    torch.manual_seed(0)
    book = EuclideanCodebook(dim=3, codebook_size=4)
    before = book.codewords().clone()
    book.usage.copy_(torch.tensor([50.0, 50.0, 0.0, 1.0]))
    z = 0.2 * torch.randn(10, 3)  # residuals are short: a restart keeps their scale
    assert book.restart_dead_codes(z, threshold=0.1, generator=torch.Generator().manual_seed(0)) == 2
    after = book.codewords()
    assert torch.equal(before[:2], after[:2])
    for j in (2, 3):
        assert float(((z - after[j]) ** 2).sum(-1).min().sqrt()) < 0.01


@pytest.mark.parametrize("cls", [CosineCodebook, EuclideanCodebook])
def test_exact_assignment_sees_restarted_codewords(cls):
    """The exact path caches the codewords in fixed point; a dead-code restart changes them
    without an optimizer step, and the next exact assignment must use the new ones."""
    torch.manual_seed(0)
    book = cls(dim=3, codebook_size=4)
    z = torch.randn(10, 3)
    with invariant.batch_invariant():
        book.assign(z)  # fills the fixed-point cache
    book.usage.copy_(torch.tensor([50.0, 50.0, 0.0, 0.0]))  # codes 2, 3 dead
    # restarted onto two of the rows themselves: those rows must now pick a restarted code
    assert book.restart_dead_codes(z[:2], threshold=0.1, generator=torch.Generator().manual_seed(0)) == 2
    with invariant.batch_invariant():
        exact = book.assign(z)
    assert torch.equal(exact, book.assign(z))  # the float path reads the codewords directly
    assert bool((exact >= 2).any())  # a restarted codeword is chosen: the new ones were read


def test_behavior_shrinkage_by_hand():
    """e_b' = a e_b + (1 - a) W [e_m], a = pop / (pop + k); W a ridge fit of e_b on the
    content, so on a catalog where e_b is exactly linear in the content W recovers it."""
    torch.manual_seed(0)
    k = 4.0
    model = ADCSIDModel(tiny_config(richness_signal="popularity", behavior_shrinkage=k, behavior_prior_ridge=1e-6))
    B = 200
    content = {"text": torch.randn(B, 6), "image": torch.randn(B, 5)}
    W, b = torch.randn(11, 4), torch.randn(4)
    e_b = torch.cat([content["text"], content["image"]], -1) @ W + b  # (B, 4)
    pop = torch.randint(0, 50, (B,)).double()
    has = torch.ones(B, dtype=torch.bool)
    has[:5] = False
    e_b[:5] = 0.0
    x = ModelInput(content, e_b, has, pop)
    model.fit_input_stats(x)
    prior = model.behavior_prior(torch.cat([content["text"], content["image"]], -1))
    torch.testing.assert_close(prior[has], e_b[has], atol=1e-3, rtol=1e-3)  # W recovered
    # a noisy e_b: shrunk toward the prior by a = pop / (pop + k), rows without behavior kept
    noisy = ModelInput(content, e_b + torch.randn(B, 4), has, pop)
    got = model.shrink_behavior(noisy).behavior
    a = (pop / (pop + k)).float().unsqueeze(-1)
    want = a * noisy.behavior + (1 - a) * prior
    torch.testing.assert_close(got[has], want[has])
    assert torch.equal(got[~has], noisy.behavior[~has])
    # the more popular, the less an item's e_b moves
    moved = (got - noisy.behavior).norm(dim=-1) / (noisy.behavior - prior).norm(dim=-1)
    order = torch.argsort(pop[has])
    assert bool((moved[has][order].diff() <= 1e-5).all())
    # off: e_b as given
    off = ADCSIDModel(tiny_config())
    assert off.shrink_behavior(noisy) is noisy
