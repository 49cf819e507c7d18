"""Batch invariance of the encoders themselves, no Ray (the snapshot against POST /tokenize,
on the session's Ray cluster, is tests/test_invariance.py): exact GEMMs and norms, the shared
thread setting, ADC-SID's encode in both arithmetics against random batchings."""

import numpy as np
import pytest
import torch

from sidserve.tokenizers import invariant

SIZES = (1, 7, 64, 333)


def random_pieces(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A permutation of 0..n-1 cut into pieces whose sizes cycle through SIZES, then random."""
    perm, pieces, i = rng.permutation(n), [], 0
    while i < n:
        size = SIZES[len(pieces)] if len(pieces) < len(SIZES) else int(rng.integers(1, 200))
        pieces.append(perm[i:i + size])
        i += size
    return pieces


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def operands(rng):
    # rows over 12 orders of magnitude, a zero row, exact zeros inside rows
    x = rng.standard_normal((400, 97)) * 10.0 ** rng.integers(-6, 6, size=(400, 1))
    x[5] = 0.0
    x[rng.random(x.shape) < 0.05] = 0.0
    w = rng.standard_normal((33, 97))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32)


def test_exact_matmul_is_accurate_and_each_row_ignores_the_others():
    rng = np.random.default_rng(0)
    x, w = operands(rng)
    ref = x.double() @ w.double().t()
    out = invariant.exact_matmul(x, w)
    assert out.dtype == torch.float64 and out.shape == (400, 33)
    # fixed point with ~21 bits per row of each operand: error within 2^-19 of the row scales
    bound = 2.0 ** -19 * x.abs().amax(1, keepdim=True).double() * w.abs().amax(1).double().unsqueeze(0) * 97
    assert bool(((out - ref).abs() <= bound).all())
    assert bool((out[5] == 0).all())
    for idx in random_pieces(400, rng):
        got = invariant.exact_matmul(x[idx], w)
        assert torch.equal(got, out[idx]), f"rows {idx[:5]}... changed with their batch"


def test_exact_linear_and_norm_are_batch_invariant():
    rng = np.random.default_rng(1)
    x, w = operands(rng)
    bias = torch.randn(33)
    lin = invariant.Linear(97, 33)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    plain = lin(x)  # outside the context: nn.Linear's float32 GEMM
    with invariant.batch_invariant():
        assert invariant.active() and torch.get_num_threads() == 1
        whole, norms = lin(x), invariant.row_norm(x)
        assert whole.dtype == torch.float32
        for idx in random_pieces(400, rng):
            assert torch.equal(lin(x[idx]), whole[idx])
            assert torch.equal(invariant.row_norm(x[idx]), norms[idx])
    assert not invariant.active()
    torch.testing.assert_close(whole, plain, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    torch.testing.assert_close(norms.double(), torch.linalg.vector_norm(x.double(), dim=-1), rtol=1e-6, atol=0)


def test_concurrent_callers_share_one_thread_setting():
    """Two threads inside batch_invariant() at once, leaving in the order they entered: the
    first to leave must not restore the thread count under the second (issue 49.3: toggled per
    call, it did), and the last to leave restores what was set before either entered."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def a():
            with invariant.batch_invariant():
                a_in.set()
                b_in.wait(10)
            a_out.set()

        def b():
            a_in.wait(10)
            with invariant.batch_invariant():
                b_in.set()
                a_out.wait(10)
                seen["b_after_a_left"] = torch.get_num_threads()
            seen["after_both"] = torch.get_num_threads()

        ta, tb = threading.Thread(target=a), threading.Thread(target=b)
        ta.start(), tb.start()
        ta.join(20), tb.join(20)
        assert seen == {"b_after_a_left": 1, "after_both": 2}
    finally:
        torch.set_num_threads(before)


def test_nearest_l2_is_exact_and_breaks_ties_by_lowest_index():
    rng = np.random.default_rng(2)
    c = torch.tensor(rng.standard_normal((16, 8)), dtype=torch.float32)
    x = torch.tensor(rng.standard_normal((500, 8)), dtype=torch.float32)
    d = ((x.double()[:, None, :] - c.double()[None]) ** 2).sum(-1)  # (500, 16)
    top2 = d.sort(dim=1).values[:, :2]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-6
    got = invariant.nearest_l2(x, c)
    assert torch.equal(got[clear], d.argmin(1)[clear])
    # a duplicated centroid: the lower index wins, for every row
    dup = torch.cat([c[:3], c[2:3], c[3:]])  # rows 2 and 3 equal
    picks = invariant.nearest_l2(x, dup)
    assert not bool((picks == 3).any()) and bool((picks == 2).any())


# ADC-SID variants whose encode has its own arithmetic (residual levels, the shrunk e_b)
VARIANTS = {"residual": dict(behavior_quantization="residual"),
            "residual_input": dict(behavior_quantization="residual_input"),
            "shrunk": dict(richness_signal="popularity", behavior_shrinkage=3.0)}


@pytest.mark.parametrize("variant", [None, *VARIANTS])
def test_adc_sid_encode_is_batch_invariant(variant, fitted, small_config, small_catalog):
    """The whole catalog in one call vs random pieces (sizes 1, 7, 64, 333, ...) in a random
    order, and vs a tiny batch_size: the same SIDs and the same weight bits (residual
    behavioral levels too: each level's residual comes from the exact codes before it)."""
    if variant is not None:
        from sidserve import SemanticIdTokenizer

        fitted = SemanticIdTokenizer(small_config.replace(**VARIANTS[variant])).fit(small_catalog)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the context must force its own thread count
    try:
        whole = fitted.encode(small_catalog)
    finally:
        torch.set_num_threads(threads)  # the worker's other tests keep theirs
    assert (whole.behavior_weights > 0).any()  # the weights compared are not all zeros
    rng = np.random.default_rng(3)
    for idx in random_pieces(len(small_catalog), rng):
        part = fitted.encode(small_catalog.take(idx))
        np.testing.assert_array_equal(part.sid, whole.sid[idx])
        np.testing.assert_array_equal(bits(part.behavior_weights), bits(whole.behavior_weights[idx]))
    small = fitted.encode(small_catalog, batch_size=5)
    np.testing.assert_array_equal(small.sid, whole.sid)
    np.testing.assert_array_equal(bits(small.behavior_weights), bits(whole.behavior_weights))


def test_the_float32_path_is_the_same_model(fitted, small_catalog, tmp_path):
    """batch_invariant=False (plain float32, faster) computes the same function up to rounding:
    the SIDs agree except near ties, and the flag travels with the artifact."""
    from sidserve import SemanticIdTokenizer

    exact = fitted.encode(small_catalog)
    fitted.config.batch_invariant = False
    try:
        fitted.save_pretrained(str(tmp_path / "plain"))
        plain = fitted.encode(small_catalog)
    finally:
        fitted.config.batch_invariant = True
    assert SemanticIdTokenizer.from_pretrained(str(tmp_path / "plain")).config.batch_invariant is False
    assert (plain.sid == exact.sid).all(axis=1).mean() >= 0.99
    np.testing.assert_allclose(plain.behavior_weights, exact.behavior_weights, rtol=1e-4, atol=1e-5)


def test_fixed_point_encode_is_batch_invariant_and_float32_mode_computes_the_same_model(fitted, small_catalog):
    """Both arithmetics of the batch-invariant encode (adc_sid/model/invariant_encode.py): fixed
    point is batch-invariant by construction, pieces against the whole; and "auto" (float32
    where this machine's rows are checked batch-independent) computes the same model: the same
    SIDs but for the odd near-tie, weights within float32 rounding."""
    with invariant.batch_invariant(arithmetic="fixed"):
        whole = fitted.encode(small_catalog)
        rng = np.random.default_rng(5)
        for idx in random_pieces(len(small_catalog), rng):
            part = fitted.encode(small_catalog.take(idx))
            np.testing.assert_array_equal(part.sid, whole.sid[idx])
            np.testing.assert_array_equal(bits(part.behavior_weights), bits(whole.behavior_weights[idx]))
    auto = fitted.encode(small_catalog)
    assert (auto.sid != whole.sid).any(axis=1).mean() <= 0.01
    np.testing.assert_allclose(auto.behavior_weights, whole.behavior_weights, rtol=1e-4, atol=1e-6)
    if fitted.arithmetic() == "float32":  # it did compute in another arithmetic (on this machine: yes)
        assert not np.array_equal(bits(auto.behavior_weights), bits(whole.behavior_weights))


def test_float32_mode_is_refused_where_rows_depend_on_the_batch_shape(fitted, small_catalog, monkeypatch):
    """A BLAS whose row results change with the GEMM's row count (here: a float32 linear that
    rounds differently for row counts not a multiple of 8, as gemv-style small-M kernels do)
    fails the check: "auto" computes in fixed point (and stays batch-invariant), "float32" is
    refused with a message."""
    import torch.nn.functional as F

    from sidserve.tokenizers.adc_sid.model import invariant_encode

    with invariant.batch_invariant(arithmetic="fixed"):
        fixed = fitted.encode(small_catalog)
    own = fitted.encode(small_catalog)  # this machine's own arithmetic, before the patch
    real = F.linear

    def shape_dependent(x, w, b=None):
        y = real(x, w, b)
        return y * (1 + 2.0 ** -20) if x.ndim == 2 and x.shape[0] % 8 else y

    monkeypatch.setattr(torch.nn.modules.linear.F, "linear", shape_dependent)
    monkeypatch.setattr(invariant_encode, "_CHECKS", {})
    assert not invariant_encode.float32_rows_agree(fitted.model_, __import__(
        "sidserve.tokenizers.adc_sid.model.encode", fromlist=["_encode"])._encode)
    auto = fitted.encode(small_catalog)
    np.testing.assert_array_equal(auto.sid, fixed.sid)  # fixed point: the same bits
    np.testing.assert_array_equal(bits(auto.behavior_weights), bits(fixed.behavior_weights))
    with pytest.raises(RuntimeError, match="float32.*batch shapes"):
        with invariant.batch_invariant(arithmetic="float32"):
            fitted.encode(small_catalog.slice(0, 5))
    assert fitted.arithmetic() == "fixed point"
    monkeypatch.undo()
    monkeypatch.setattr(invariant_encode, "_CHECKS", {})
    # the fallback was not remembered past the patch: a fresh check gives this machine's own bits
    again = fitted.encode(small_catalog)
    np.testing.assert_array_equal(again.sid, own.sid)
    np.testing.assert_array_equal(bits(again.behavior_weights), bits(own.behavior_weights))
