"""ADC-SID's batch-invariant encode (inside ``invariant.batch_invariant()``): chunks, padding,
and which arithmetic computes them.

An item's codes and weights must not depend on the batch it is encoded in. Two ways to get that:

* **Fixed point** (invariant.py): every GEMM and norm exact, so no kernel, blocking or thread
  split can change a result. Batch-invariant by construction, on any machine; a float64 GEMM
  costs about twice a float32 one.
* **float32, checked**: the plain float32 forward, one intra-op thread, rows padded so that
  every GEMM has one of 31 shapes (``buckets``: 4, 8, ..., 64, then 128, 192, ..., 1,024 rows)
  and no elementwise kernel has a scalar tail. A BLAS computes a row of a GEMM from that row and the weight alone,
  but which kernel (and so which order of additions) it uses may depend on the shape: on an
  AMD EPYC with torch 2.13's CPU build, rows of 1, of 2-3 and of 4+ row GEMMs round differently,
  and every shape from 4 rows up agrees. Whether that holds is checked, not assumed
  (``float32_rows_agree``): once per process and model shape, probe rows are encoded in every
  bucket shape at several positions among random rows, and their codes, weights and top-2
  scores compared bit for bit. Only if all agree is float32 used ("auto"); otherwise fixed point.

Both modes are batch-invariant; they are not the same arithmetic, so a snapshot and a replica
must use the same one: ``arithmetic(model)`` names it and the probe hash (probe.py) covers it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from sidserve.tokenizers import invariant
from sidserve.tokenizers.adc_sid.model.io import ModelInput, ModelOutput

if TYPE_CHECKING:
    from sidserve.tokenizers.adc_sid.model.adc_sid import ADCSIDModel

CHECK_SEED = 20261207  # the check's random rows: fixed, so every process checks the same thing
_CHECKS: dict[tuple, bool] = {}  # (model shape, torch, CPU capability) -> do float32 rows agree
_CHECKS_LOCK = threading.Lock()
_PAD_INDEX: dict[tuple[int, int], torch.Tensor] = {}  # (rows, padded rows <= 64) -> row indices


def row_multiple(model: ADCSIDModel) -> int:
    """Rows are padded to a multiple of this: the SiLU widths (H, X) times it hold a multiple of
    64 elements (the (B,)-shaped kernels pad themselves: ``invariant.pointwise``)."""
    c = model.config
    return invariant.row_multiple([c.hidden_dim, c.expert_hidden_dim])


def bucket(n: int, multiple: int) -> int:
    """float32 mode's padded row count for 0 < n <= CHUNK_ROWS rows: up to 64 rows the next
    multiple of ``multiple`` (a power of two <= 64), above it the next multiple of 64."""
    step = multiple if n <= 64 else 64
    return max(multiple, -(-n // step) * step)


def buckets(multiple: int) -> list[int]:
    """Every row count ``bucket`` returns: the GEMM shapes float32 mode uses (and checks)."""
    return sorted({bucket(n, multiple) for n in range(1, invariant.CHUNK_ROWS + 1)})


def take_rows(x: ModelInput, rows: torch.Tensor) -> ModelInput:
    """The rows ``rows`` (n,) int64 of a batch, as a new batch."""
    return ModelInput({m: v[rows] for m, v in x.content.items()},
                      None if x.behavior is None else x.behavior[rows], x.has_behavior[rows],
                      None if x.popularity is None else x.popularity[rows])


def _padded(x: ModelInput, rows: int) -> ModelInput:
    """x with row 0 repeated up to ``rows`` rows."""
    n = x.batch_size
    if n == rows:
        return x

    idx = _PAD_INDEX.get((n, rows))
    if idx is None:
        idx = torch.from_numpy(invariant.padded_rows(n, rows))
        if rows <= 64:
            _PAD_INDEX[(n, rows)] = idx

    def pad(v):
        return None if v is None else v.index_select(0, idx)

    return ModelInput({m: pad(v) for m, v in x.content.items()}, pad(x.behavior), pad(x.has_behavior),
                      pad(x.popularity))


def _slice(out: ModelOutput, n: int) -> ModelOutput:
    def cut(t):
        return None if t is None else t[:n]

    return ModelOutput(codes=out.codes[:n], behavior_weights=out.behavior_weights[:n],
                       candidates=cut(out.candidates), candidate_scores=cut(out.candidate_scores))


def _cat(outs: list[ModelOutput]) -> ModelOutput:
    if len(outs) == 1:
        return outs[0]

    def cat(name):
        parts = [getattr(o, name) for o in outs]
        return None if parts[0] is None else torch.cat(parts)

    return ModelOutput(codes=cat("codes"), behavior_weights=cat("behavior_weights"),
                       candidates=cat("candidates"), candidate_scores=cat("candidate_scores"))


def random_input(model: ADCSIDModel, n: int, generator: torch.Generator) -> ModelInput:
    """n random rows of the model's inputs: standard normal content, behavior on 3 rows of 4,
    popularity 1-200 there."""
    c = model.config
    content = {m: torch.randn(n, d, generator=generator) for m, d in c.modality_dims.items()}
    has_b = torch.arange(n) % 4 != 3
    behavior = None
    if c.has_behavior:
        behavior = torch.randn(n, c.behavior_dim, generator=generator) * has_b.unsqueeze(-1)
    popularity = torch.where(has_b, torch.randint(1, 200, (n,), generator=generator), 0).double()
    return ModelInput(content, behavior, has_b, popularity)


def _bits(out: ModelOutput) -> list[np.ndarray]:
    return [out.codes.numpy(), out.behavior_weights.numpy().view(np.uint32),
            out.candidate_scores.numpy().view(np.uint64 if out.candidate_scores.dtype == torch.float64 else np.uint32)]


def float32_rows_agree(model: ADCSIDModel, encode_rows) -> bool:
    """Does this machine's float32 forward compute a row the same in every bucket shape and at
    every position? ``encode_rows(model, x, candidates)``: the plain forward. Probe rows (one
    bucket's worth) are encoded alone, then inside every bucket shape among random rows at
    spread positions (in the smallest, rotated by one), comparing codes, weights and the top-2
    scores bit for bit. Cached per model shape, torch build and CPU capability."""
    shape = model.__dict__.get("_invariant_shape")
    if shape is None:  # the parameters' shapes (fixed at construction; ~0.3 ms to list)
        shape = model.__dict__["_invariant_shape"] = (
            tuple((name, tuple(p.shape)) for name, p in model.named_parameters()), repr(model.config))
    key = (shape, torch.__version__, torch.backends.cpu.get_cpu_capability())
    with _CHECKS_LOCK:
        if key in _CHECKS:
            return _CHECKS[key]
    r = row_multiple(model)
    gen = torch.Generator().manual_seed(CHECK_SEED)
    probes = random_input(model, r, gen)
    fillers = random_input(model, invariant.CHUNK_ROWS, gen)
    agree = True
    with torch.inference_mode(), invariant.batch_invariant(), invariant.float32_inside():  # one thread, pointwise padding
        ref = _bits(encode_rows(model, probes, 2))
        for m in buckets(r):
            if m == r:
                pos = torch.roll(torch.arange(r), 1)
            else:
                pos = torch.from_numpy(np.unique(np.linspace(0, m - 1, r).round().astype(np.int64)))
            batch = take_rows(fillers, torch.arange(m))  # a copy: probe i goes to pos[i]
            for name, v in probes.content.items():
                batch.content[name][pos] = v[:len(pos)]
            if batch.behavior is not None:
                batch.behavior[pos] = probes.behavior[:len(pos)]
            batch.has_behavior[pos] = probes.has_behavior[:len(pos)]
            batch.popularity[pos] = probes.popularity[:len(pos)]
            got = _bits(encode_rows(model, batch, 2))
            agree = all(np.array_equal(g[pos.numpy()], e[:len(pos)]) for g, e in zip(got, ref))
            if not agree:
                break
    with _CHECKS_LOCK:
        _CHECKS[key] = agree
    return agree


def _agree(model: ADCSIDModel, encode_rows) -> bool:
    """float32_rows_agree, remembered on the model for this CPU capability (a one-item call
    should not hash the model's shape each time)."""
    cap = torch.backends.cpu.get_cpu_capability()
    hit = model.__dict__.get("_float32_rows_agree")
    if hit is None or hit[0] != cap or hit[1] is not _CHECKS:
        agree = float32_rows_agree(model, encode_rows)
        hit = model.__dict__["_float32_rows_agree"] = (cap, _CHECKS, agree)
    return hit[2]


def arithmetic(model: ADCSIDModel, encode_rows, device: torch.device) -> str:
    """"float32" or "fixed point": what an encode inside batch_invariant() computes in."""
    asked = invariant.arithmetic()
    if asked == "fixed" or device.type != "cpu":  # (GPU kernels: fixed point, as before)
        return "fixed point"
    if _agree(model, encode_rows):
        return "float32"
    if asked == "float32":
        raise RuntimeError("arithmetic='float32' asked for, but this machine's float32 kernels compute a row "
                           "differently in different batch shapes (invariant_encode.float32_rows_agree): "
                           "use 'auto' (fixed point here) or 'fixed'")
    return "fixed point"


def encode_invariant(model: ADCSIDModel, x: ModelInput, candidates: int, encode_rows) -> ModelOutput:
    """``encode_rows(model, x, candidates)`` made batch-invariant: CHUNK_ROWS rows at a time,
    each chunk padded (float32: to its bucket; fixed point: to a multiple of ``row_multiple``),
    in the arithmetic ``arithmetic`` picks."""
    if x.batch_size == 0:
        return encode_rows(model, x, candidates)
    float32 = arithmetic(model, encode_rows, x.has_behavior.device) == "float32"
    r = row_multiple(model)
    outs = []
    for start in range(0, x.batch_size, invariant.CHUNK_ROWS):
        n = min(x.batch_size, start + invariant.CHUNK_ROWS) - start
        chunk = x if n == x.batch_size else take_rows(x, torch.arange(start, start + n))
        rows = bucket(n, r) if float32 else max(r, -(-n // r) * r)
        if float32:
            with invariant.float32_inside():
                out = encode_rows(model, _padded(chunk, rows), candidates)
        else:
            out = encode_rows(model, _padded(chunk, rows), candidates)
        outs.append(_slice(out, n))
    return _cat(outs)
