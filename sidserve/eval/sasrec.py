"""SASRec (Kang & McAuley, 2018): the behavioral embeddings of the evaluation, and
SID-SASRec, the same model judging Semantic IDs as item representations.

Self-attentive next-item model over the training part of each sequence. Two losses:

- ``ce`` (default): softmax cross-entropy over the whole catalog at every position,
  the loss under which SASRec reaches its published strength on Beauty (Recall@10
  ~0.07 in full-catalog ranking; the ~0.06 figures of the TIGER/P5 tables are BCE);
- ``bce``: the SASRec paper's binary cross-entropy with one uniformly sampled negative
  per position (kept for comparison).

Item tables (``ItemTable``): the classic one free vector per item id (``IDItems``,
tied: the same table embeds the history and scores the catalog; untied: a second table
scores), or ``SIDItems``: an item's vector is the sum of its SID codes' embeddings,
behavioral codes scaled by R(e_b) (VQ-Rec, RecJPQ, "Better Generalization with Semantic
IDs"). SID-SASRec is scored against the whole catalog with the same loss, so its gap to
the ID-based SASRec is the price of describing items by their SIDs.

The ID model's input table, *not* L2-normalised, is the behavioral embedding ``e_b``
handed to the tokenizers; whether its norm grows with popularity (the premise of
ADC-SID's controller) is measured by the pipeline, per variant.

Shapes: B sequences, T positions, N items (ids 1..N, 0 = padding), d width.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidserve.eval.checkpoint import EpochCheckpoint
from sidserve.eval.chunked_ce import chunked_cross_entropy
from sidserve.eval.early_stopping import EarlyStopping
from sidserve.eval.metrics import recall_ndcg
from sidserve.eval.sid_table import SIDTable

log = logging.getLogger(__name__)

LOSSES = ("ce", "bce")


@dataclass
class SASRecConfig:
    hidden_dim: int = 64  # item embedding size = behavior_dim of the tokenizers
    max_len: int = 50  # most recent items read (SASRec paper's setting for Amazon data)
    num_blocks: int = 2  # self-attention blocks (SASRec paper)
    num_heads: int = 1  # SASRec paper
    ff_dim: int = 256  # feed-forward width (4 d; the paper's d-wide FFN underfits with CE)
    dropout: float = 0.2  # chosen on validation (docs/evaluation.md, "Selection")
    loss: str = "ce"  # 'ce' full-catalog softmax | 'bce' one sampled negative (paper)
    tied: bool = True  # False: a separate output table scores the catalog (ID items only)
    max_epochs: int = 60  # upper bound; early stopping ends runs well before on Beauty
    patience: int = 3  # evaluations without a better validation NDCG@10 before stopping
    batch_size: int = 128  # sequences per step
    lr: float = 1e-3  # Adam, SASRec paper
    seed: int = 0

    def validate(self) -> "SASRecConfig":
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("hidden_dim", "max_len", "num_blocks", "num_heads", "ff_dim", "max_epochs", "patience",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


def pad_left(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """Most recent ``max_len`` items of each sequence, right-aligned, 0-padded: (U, max_len)."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-max_len:]
        if s.size:
            out[i, max_len - s.size:] = s
    return out


# ---- item tables ---------------------------------------------------------------------------
class IDItems(nn.Module):
    """One free vector per item id. tied: ``input_table`` also scores the catalog."""

    def __init__(self, num_items: int, d: int, tied: bool = True):
        super().__init__()
        self.inp = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.out = None if tied else nn.Embedding(num_items + 1, d, padding_idx=0)
        for e in (self.inp, self.out):
            if e is not None:
                nn.init.xavier_normal_(e.weight)
                with torch.no_grad():
                    e.weight[0].zero_()

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input (N+1, d), output (N+1, d)); row 0 is padding."""
        return self.inp.weight, (self.inp if self.out is None else self.out).weight


class SIDItems(nn.Module):
    """v(i) = sum_t w_t(i) E[offset_t + code_t(i)]: an item is the weighted sum of its SID
    codes' embeddings (w = R(e_b) at ADC-SID's behavioral positions, 1 elsewhere). The
    dedup suffix (TIGER's tie-breaker) is a feature only when ``use_dedup``; without it
    items sharing a SID share a vector. Tied by construction."""

    def __init__(self, table: SIDTable, d: int, use_dedup: bool = False, use_weights: bool = True):
        super().__init__()
        T = table.length if use_dedup else table.length - 1
        self.register_buffer("codes", torch.from_numpy(table.codes[:, :T].copy()), persistent=False)  # (N+1, T)
        self.register_buffer("offsets", torch.from_numpy(table.offsets[:T].copy()), persistent=False)  # (T,)
        w = table.weights[:, :T].copy() if use_weights else np.ones((table.codes.shape[0], T), np.float32)
        w[0] = 0.0  # the padding row is the zero vector
        self.register_buffer("weights", torch.from_numpy(w), persistent=False)  # (N+1, T)
        self.emb = nn.Embedding(int(table.vocab[:T].sum()), d)
        # a sum of T codes with the scale of an ID table's row at initialisation
        std = math.sqrt(2.0 / (table.codes.shape[0] + d)) / math.sqrt(T)
        nn.init.normal_(self.emb.weight, std=std)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """items (...,) ids (None: every row) -> (..., d)."""
        codes, w = (self.codes, self.weights) if items is None else (self.codes[items], self.weights[items])
        return (self.emb(codes + self.offsets) * w[..., None]).sum(-2)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.item_vectors()
        return t, t


# ---- the model -----------------------------------------------------------------------------
class SASRec(nn.Module):
    def __init__(self, items: nn.Module, c: SASRecConfig):
        super().__init__()
        self.c = c.validate()
        d = c.hidden_dim
        self.items = items
        self.pos_emb = nn.Embedding(c.max_len, d)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, c.num_heads, dim_feedforward=c.ff_dim, dropout=c.dropout,
                                       activation="relu", batch_first=True, norm_first=True)
            for _ in range(c.num_blocks))
        self.final_norm = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("items."):
                nn.init.xavier_normal_(p)

    def forward(self, seq: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """seq: (B, T) item ids right-aligned, 0 = padding, T <= max_len -> (B, T, d)
        states (state t predicts item t+1). Positions count from the right and padding is
        masked as a key, so a state does not depend on how much padding precedes the
        sequence: a batch trimmed of its common padding (training) and a full-width one
        (scoring) give the same states. table: the input table if already computed this step."""
        T = seq.shape[1]
        table = self.items.tables()[0] if table is None else table
        x = table[seq] * math.sqrt(self.c.hidden_dim) + self.pos_emb.weight[self.c.max_len - T:]
        pad = seq == 0  # (B, T)
        x = self.drop(x) * (~pad).unsqueeze(-1)
        mask = self.attention_mask(pad)  # (B * heads, T, T), True = may not attend
        for blk in self.blocks:
            x = blk(x, src_mask=mask) * (~pad).unsqueeze(-1)
        return self.final_norm(x)

    def attention_mask(self, pad: torch.Tensor) -> torch.Tensor:
        """pad (B, T) -> (B * heads, T, T) bool, True where query t may not read key s:
        the future (s > t) and padding keys. A padding query reads itself only (its row
        would otherwise be all masked, a NaN softmax; its state is zeroed anyway). Without
        the key mask, a pre-norm block turns padding into LayerNorm's bias, which real
        items then attend to: on Beauty, scoring at full width instead of trimmed moved
        validation NDCG@10 by 3% (docs/evaluation.md)."""
        T = pad.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=pad.device), 1)
        eye = torch.eye(T, dtype=torch.bool, device=pad.device)
        mask = (causal[None] | pad[:, None, :]) & ~eye[None]  # (B, T, T)
        return mask.repeat_interleave(self.c.num_heads, 0)

    def item_vectors(self, which: str = "input") -> np.ndarray:
        """(N, d) float32 raw item vectors, row i = item id i + 1; which: 'input' (the
        table that embeds histories) or 'output' (the one that scores; same when tied)."""
        if which not in ("input", "output"):
            raise ValueError(f"which must be 'input' or 'output', got {which!r}")
        with torch.no_grad():
            t = self.items.tables()[0 if which == "input" else 1]
            return t[1:].detach().cpu().numpy().astype(np.float32)


def ce_loss(h: torch.Tensor, out_table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of states h (P, d) against the whole catalog
    out_table (N+1, d) (row 0, padding, excluded), targets (P,) in 1..N. Computed in
    cache-sized tiles (``chunked_ce``): equal to ``F.cross_entropy(h @ out_table[1:].T,
    target - 1)`` without materialising the (P, N) logits."""
    return chunked_cross_entropy(h, out_table[1:], target - 1)


def _negatives(rng: np.random.Generator, pos: np.ndarray, num_items: int, seen_keys: np.ndarray,
               rows: np.ndarray) -> np.ndarray:
    """Uniform negatives for every non-padding position, redrawn (up to 5 times) where they
    hit an item of that user's sequence. seen_keys: sorted user * (N+1) + item keys."""
    neg = rng.integers(1, num_items + 1, size=pos.shape)
    for _ in range(5):
        keys = rows[:, None] * (num_items + 1) + neg
        i = np.searchsorted(seen_keys, keys).clip(max=seen_keys.size - 1)
        bad = seen_keys[i] == keys
        if not bad.any():
            break
        neg[bad] = rng.integers(1, num_items + 1, size=int(bad.sum()))
    return neg * (pos > 0)


def _batches(rng: np.random.Generator, lengths: np.ndarray, batch_size: int):
    """Shuffled batches of sequences of similar length (padding is trimmed per batch)."""
    from sidserve.eval.retrieval import length_buckets
    return length_buckets(rng, lengths, batch_size, chunk=16)


def train_sasrec(train_seqs: list[np.ndarray], num_items: int, c: SASRecConfig,
                 valid: tuple[list[np.ndarray], np.ndarray] | None = None,
                 items: nn.Module | None = None, init: "SASRec | None" = None,
                 checkpoint: str | None = None) -> tuple[SASRec, list[dict]]:
    """Fit on ``train_seqs`` (each (n_u,) item ids); returns (model, per-epoch history).

    init: a model of the same shape whose weights training continues from (a warm start:
    yesterday's model on today's interactions).

    items: the item table (default: ``IDItems``, tied per the config). With ``valid``
    (histories, targets), every epoch is scored on it (full-catalog NDCG@10) and training
    stops after ``patience`` epochs without improvement, restoring the best epoch;
    without it, ``max_epochs`` are run. ``model.early_stopping`` says what was kept.

    checkpoint: a file where the state after each epoch is saved, and from which an
    interrupted run with the same configuration resumes (``EpochCheckpoint``).
    """
    c.validate()
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    usable = [s for s in train_seqs if s.size >= 2]
    if not usable:
        raise ValueError("SASRec needs sequences with at least 2 training items")
    inp = pad_left([s[:-1] for s in usable], c.max_len)
    pos = pad_left([s[1:] for s in usable], c.max_len)
    lengths = (pos > 0).sum(1)
    seen_keys = np.sort(np.concatenate([u * (num_items + 1) + s for u, s in enumerate(usable)]))
    model = SASRec(items if items is not None else IDItems(num_items, c.hidden_dim, c.tied), c)
    if init is not None:
        model.load_state_dict(init.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, betas=(0.9, 0.98))
    stopper = EarlyStopping(c.patience, mode="max")
    ckpt = EpochCheckpoint(checkpoint, {"model": "sasrec", "config": dataclasses.asdict(c), "num_items": num_items,
                                        "items": type(model.items).__name__, "sequences": len(usable)})
    start, history, stopped = ckpt.resume(model, opt, rng, stopper)
    for epoch in range(start, 0 if stopped else c.max_epochs):
        t0 = time.perf_counter()
        model.train()
        total, steps = 0.0, 0
        for idx in _batches(rng, lengths, c.batch_size):
            w = int(lengths[idx].max())
            p = pos[idx][:, -w:]
            mask = torch.from_numpy(p > 0)
            in_table, out_table = model.items.tables()
            h = model(torch.from_numpy(inp[idx][:, -w:]), in_table)  # (B, w, d)
            if c.loss == "ce":
                loss = ce_loss(h[mask], out_table, torch.from_numpy(p)[mask])
            else:
                n = _negatives(rng, p, num_items, seen_keys, idx)
                pe, ne = out_table[torch.from_numpy(p)], out_table[torch.from_numpy(n)]
                pl, nl = (h * pe).sum(-1)[mask], (h * ne).sum(-1)[mask]
                loss = (F.binary_cross_entropy_with_logits(pl, torch.ones_like(pl))
                        + F.binary_cross_entropy_with_logits(nl, torch.zeros_like(nl)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        rec = {"epoch": epoch, "loss": total / steps, "seconds": time.perf_counter() - t0}
        stop = False
        if valid is not None:
            rec.update({f"valid_{k}": v for k, v in evaluate_sasrec(model, *valid).items()})
            stop = stopper.update(epoch, rec["valid_ndcg@10"], model)
        history.append(rec)
        log.info("sasrec epoch %d %s", epoch, {k: round(v, 4) for k, v in rec.items()})
        ckpt.save(epoch, model, opt, rng, stopper, history, stop)
        if stop:
            break
    stopper.restore(model)
    model.early_stopping = {**stopper.summary(), "epochs_run": len(history), "max_epochs": c.max_epochs,
                            **ckpt.summary()}
    return model.eval(), history


@torch.inference_mode()
def rank_sasrec(model: SASRec, histories: list[np.ndarray], k: int, batch_size: int = 1024) -> np.ndarray:
    """(U, k) item ids ranked over the whole catalog, history items excluded."""
    was = model.training
    model.eval()
    in_table, out_table = model.items.tables()
    ranked = []
    seqs = pad_left(histories, model.c.max_len)
    for start in range(0, len(histories), batch_size):
        h = model(torch.from_numpy(seqs[start:start + batch_size]), in_table)[:, -1]  # (B, d)
        scores = h @ out_table.T
        scores[:, 0] = -torch.inf
        for i, s in enumerate(histories[start:start + batch_size]):
            scores[i, torch.from_numpy(s)] = -torch.inf
        ranked.append(torch.topk(scores, k, dim=1).indices.numpy())
    if was:
        model.train()
    return np.concatenate(ranked)


def evaluate_sasrec(model: SASRec, histories: list[np.ndarray], targets: np.ndarray,
                    ks=(10,), per_user: bool = False) -> dict:
    """Full-catalog ranking (history items excluded) -> mean Recall@k / NDCG@k, or the
    per-user arrays (U,) when ``per_user``."""
    m = recall_ndcg(rank_sasrec(model, histories, max(ks)), targets, ks)
    return m if per_user else {k: float(v.mean()) for k, v in m.items()}
