"""Batch-invariant inference: an item's codes and weights are a function of that item alone.

The same ``encode`` runs on 8,192-row calls in the assignment job and on whatever
``@serve.batch`` put together online. In plain float32 an item's result then depends on its
neighbours: a GEMM's reduction order changes with the batch shape (kernel choice, blocking,
threads), and an elementwise kernel computes the vector body and the scalar tail of a tensor
with different code (e.g. Sleef's exp against libm's), so which path an element takes depends
on where it sits. The last bits move, and an item near a tie between two codewords flips.

Inside ``batch_invariant()`` every operation the encoders use is made position-free:

* **GEMMs are exact.** ``exact_matmul`` rounds each row of both operands to fixed point with a
  power-of-two scale of its own (about 21 bits of the row's largest entry), so every product is
  an integer and every partial sum an integer below 2^53: float64 adds them exactly in *any*
  order, so no blocking, kernel or thread split can change the result. The scales are powers
  of two, so applying them is exact too. The error against the float32 GEMM is of the size of
  float32's own rounding (about 1e-6 of the row's scale).
* **Norms are exact** the same way (``row_norm``: an exact integer sum of squares, then a
  correctly rounded sqrt).
* **Elementwise kernels take one path for every element.** One intra-op thread, and rows
  padded to a multiple of ``ROW_MULTIPLE`` (``padded_rows``), so a contiguous tensor's element
  count is a multiple of every SIMD vector width torch uses and no element lands in a scalar
  tail. Correctly rounded operations (+, *, /, sqrt, round) are the same in either path anyway.
* **Ties go to the lowest index** (``torch.argmax``/``argmin`` return the first extremum).

ADC-SID's encode has a second, faster arithmetic, float32 with every GEMM in one of a few
checked shapes (sidserve/tokenizers/adc_sid/model/invariant_encode.py; ``float32_inside``), used where this
machine's kernels are shown to compute a row the same in each of them; fixed point is its
fallback, and the only arithmetic of the other encoders.

The outcome is bit-identical SIDs and weights for an item whatever batch it is encoded in, on
a given machine type and torch build (tests/test_batch_invariance.py, tests/test_invariance.py). Across CPU instruction sets,
or CPU against GPU, the transcendental functions (SiLU, sigmoid) may differ in their last bit,
so equality there is not guaranteed by construction. Fixed point costs a float64 GEMM instead of a
float32 one: measured in bench/encode_invariance.py, recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROW_MULTIPLE = 64  # rows padded to a multiple of this: element counts avoid every SIMD tail
MIN_ROWS = 4  # no GEMM of fewer rows: BLAS libraries compute 1-3 rows with other kernels (gemv)
CHUNK_ROWS = 1024  # rows per exact call: the float64 temporaries of 8,192 rows (tens of MB each)
                   # cost more in page faults than their arithmetic

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("sidserve_batch_invariant", default=False)
# inside batch_invariant(): which arithmetic an encoder that offers both may use (ADC-SID's,
# sidserve/tokenizers/adc_sid/model/encode.py): "auto" (float32 where this machine's kernels are checked to compute
# each row the same in every batch shape the encoder uses, fixed point otherwise), "float32"
# (checked the same way, an error if the check fails) or "fixed" (exact fixed point)
ARITHMETICS = ("auto", "float32", "fixed")
_ARITHMETIC: contextvars.ContextVar[str] = contextvars.ContextVar("sidserve_arithmetic", default="auto")


# torch's intra-op thread count is one setting for the whole process, so concurrent callers
# (a replica's request threads, an encode beside a fit) share it: the first to enter saves it and
# sets 1, the last to leave restores it. Toggling it per call raced: a caller leaving restored
# the saved count while another was still inside, whose elementwise kernels then split across
# threads (and so took other code paths), and the last to leave could restore a 1 it saved.
_THREADS_LOCK = threading.Lock()
_INSIDE = 0  # callers inside batch_invariant()
_SAVED_THREADS: int | None = None


@contextlib.contextmanager
def batch_invariant(enabled: bool = True, *, arithmetic: str | None = None):
    """Run the enclosed inference batch-invariantly (one intra-op thread while any caller is
    inside; exact GEMMs and norms in the modules and helpers of this package that consult
    ``exact()``). Safe to enter from several threads at once. ``arithmetic``: see ARITHMETICS
    (encoders without a float32 mode always compute in fixed point); None keeps the enclosing
    call's ("auto" outermost)."""
    global _INSIDE, _SAVED_THREADS
    if arithmetic is None:
        arithmetic = _ARITHMETIC.get()
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    if not enabled:
        yield
        return
    token = _ACTIVE.set(True)
    arithmetic_token = _ARITHMETIC.set(arithmetic)
    with _THREADS_LOCK:
        if _INSIDE == 0:
            _SAVED_THREADS = torch.get_num_threads()
            torch.set_num_threads(1)
        _INSIDE += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _INSIDE -= 1
            if _INSIDE == 0:
                torch.set_num_threads(_SAVED_THREADS)
        _ARITHMETIC.reset(arithmetic_token)
        _ACTIVE.reset(token)


def active() -> bool:
    return _ACTIVE.get()


def arithmetic() -> str:
    """Inside batch_invariant(): the arithmetic asked for (ARITHMETICS)."""
    return _ARITHMETIC.get()


_FLOAT32: contextvars.ContextVar[bool] = contextvars.ContextVar("sidserve_float32_inside", default=False)


def exact() -> bool:
    """Compute GEMMs and norms in exact fixed point: inside batch_invariant(), outside
    float32_inside()."""
    return _ACTIVE.get() and not _FLOAT32.get()


def float32_inside_active() -> bool:
    return _FLOAT32.get()


@contextlib.contextmanager
def float32_inside():
    """Plain float32 GEMMs and norms inside batch_invariant() (one thread, the caller's padding
    and ``pointwise`` still): an encoder's float32 mode, used once its rows are checked
    batch-independent (sidserve/tokenizers/adc_sid/model/encode.py)."""
    token = _FLOAT32.set(True)
    try:
        yield
    finally:
        _FLOAT32.reset(token)


def padded_rows(n: int, multiple: int = ROW_MULTIPLE) -> np.ndarray:
    """Row indices 0..n-1, then row 0 repeated up to a multiple of ``multiple``: take these,
    compute, keep the first n results (rows are independent, so the repeats change nothing)."""
    pad = (-n) % multiple if n else 0
    return np.concatenate([np.arange(n), np.zeros(pad, dtype=np.int64)])


def row_multiple(widths) -> int:
    """The fewest rows (a power of two, at least MIN_ROWS) whose (rows, w) tensors hold a
    multiple of 64 elements for every width w in ``widths``: an elementwise kernel then takes
    its vector body for every element (no scalar tail), whatever the row count's multiple."""
    m = MIN_ROWS
    for w in widths:
        m = max(m, 64 // math.gcd(64, int(w)))
    return m


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an elementwise fn (sigmoid, log1p) on a tensor whose element count is the
    batch's (B,): inside batch_invariant() computed on a copy padded to a multiple of 64
    elements, so no element lands in the kernel's scalar tail (whose libm result may differ in
    the last bit from the vector body's)."""
    if not active() or x.numel() % 64 == 0:
        return fn(x)
    flat = x.reshape(-1)
    pad = torch.cat([flat, flat.new_zeros((-flat.numel()) % 64)])
    return fn(pad)[:flat.numel()].reshape(x.shape)


def _fixed_point(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, K) -> (q (R, K) float64 integers with |q| <= 2^bits, scale (R, 1) float64 power of
    two) with x ~= q * scale; a function of each row alone. Scaling by a power of two is exact
    (in x's dtype: an integer below 2^24 is exact in float32) and so is round(), so q is the
    same whichever kernel path computes it."""
    x = x.detach()
    amax = torch.maximum(x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True))  # (R, 1) max |x|
    exponent = torch.frexp(amax).exponent.clamp_min(bits - 126)  # amax < 2^exponent; 2^(bits-e) finite
    q = (x * torch.ldexp(torch.ones_like(amax), bits - exponent)).round_()
    scale = torch.ldexp(torch.ones_like(amax, dtype=torch.float64), exponent - bits)
    return q.to(torch.float64), scale


def _bits(k: int, factors: int = 2) -> int:
    """Bits per operand so that k products of ``factors`` operands sum exactly below 2^53."""
    return (53 - max(1, math.ceil(math.log2(max(k, 2))))) // factors


class FixedPointWeight:
    """A weight (N, K) in fixed point, made once and reused while the tensor is unchanged
    (quantizing a weight on every call would cost more than a small batch's GEMM)."""

    def __init__(self):
        self._key = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w (N, K), a parameter (it has a version counter) -> ``fixed_point_weight(w)``."""
        key = (w.data_ptr(), w._version, w.device, tuple(w.shape))
        if key != self._key:
            self._value, self._key = fixed_point_weight(w), key
        return self._value


def fixed_point_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (q^T (K, N) float64 integers, scale^T (1, N) float64) for exact_matmul."""
    q, scale = _fixed_point(w, _bits(w.shape[1]))
    return q.t().contiguous(), scale.t().contiguous()


def exact_matmul(x: torch.Tensor, w: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, K), w (N, K) (or a ``FixedPointWeight`` result) -> x @ w.T (B, N) float64, each
    entry a function of its row of x and of w only (exact fixed-point products and sums: see
    the module docstring)."""
    if isinstance(w, torch.Tensor):
        if w.ndim != 2:
            raise ValueError(f"exact_matmul needs a (N, K) weight, got {tuple(w.shape)}")
        w = fixed_point_weight(w)
    wq_t, sw_t = w  # (K, N), (1, N)
    if x.ndim != 2 or x.shape[1] != wq_t.shape[0]:
        raise ValueError(f"exact_matmul needs (B, K) and (N, K), got {tuple(x.shape)} and {tuple(wq_t.t().shape)}")
    xq, sx = _fixed_point(x, _bits(x.shape[1]))  # (B, K), (B, 1)
    return (xq @ wq_t).mul_(sx).mul_(sw_t)  # integer sums below 2^53, times powers of two


@torch.no_grad()
def exact_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """nn.Linear's x (..., K) -> (..., N) in x's dtype, batch-invariant; weight (N, K) or a
    ``FixedPointWeight`` result. Inference only (no gradient through the rounding)."""
    lead = x.shape[:-1]
    y = exact_matmul(x.reshape(-1, x.shape[-1]), weight)  # (B, N) float64
    out = torch.empty(y.shape, dtype=x.dtype, device=y.device)
    if bias is None:
        out.copy_(y)
    else:
        torch.add(y, bias, out=out)  # added in float64, rounded once into x's dtype
    return out.reshape(*lead, y.shape[-1])


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """x (B, d) -> L2 norm of each row (B,) in x's dtype; exact-then-rounded when active()."""
    if not exact():
        return torch.linalg.vector_norm(x, dim=-1)
    q, scale = _fixed_point(x, _bits(x.shape[-1]))
    return (torch.sqrt((q * q).sum(-1)) * scale[:, 0]).to(x.dtype)


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize(x, dim=-1), with row_norm's exact norm when active()."""
    if not exact():
        return F.normalize(x, dim=-1, eps=eps)
    return x / row_norm(x).clamp_min(eps).unsqueeze(-1)


def similarity_l2(x: torch.Tensor, centroids: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, d), centroids (K, d) (or their ``fixed_point_weight``/``FixedPointWeight`` result)
    -> 2 x.c_k - ||c_k||^2 (B, K) float64 (= ||x||^2 - ||x - c_k||^2: the larger, the nearer),
    each row a function of its row of x alone."""
    if isinstance(centroids, torch.Tensor):
        centroids = fixed_point_weight(centroids)
    q_t, scale_t = centroids  # (d, K), (1, K)
    c_sq = (q_t * q_t).sum(0) * (scale_t[0] * scale_t[0])  # (K,) float64, exact then rounded
    xc = exact_matmul(x, centroids)  # (B, K): the fixed point of x.c needs the same bits
    return 2.0 * xc - c_sq.unsqueeze(0)


def nearest_l2(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x (B, d), centroids (K, d) -> index of the L2-nearest centroid (B,) int64, the lowest
    index on a tie; batch-invariant (``similarity_l2``)."""
    return similarity_l2(x, centroids).argmax(dim=-1)


class Linear(nn.Linear):
    """nn.Linear that computes exactly (``exact_linear``) inside ``batch_invariant()``; the
    same parameters and state-dict keys as nn.Linear, so artifacts do not change."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fixed_point = FixedPointWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exact():
            return exact_linear(x, self._fixed_point(self.weight), self.bias)
        return super().forward(x)
