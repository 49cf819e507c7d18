"""SASRec (Kang & McAuley, 2018): the behavioral embeddings of the evaluation.

Self-attentive next-item model over the training part of each sequence; binary
cross-entropy with one sampled negative per position, as in the paper. Its item
embedding table, *not* L2-normalised, is the behavioral embedding ``e_b``: items
trained on many interactions grow larger norms, which is the premise of ADC-SID's
alignment-strength controller (reported as the norm/popularity rank correlation).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidserve.eval.metrics import recall_ndcg

log = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    hidden_dim: int = 64  # item embedding size = behavior_dim of the tokenizers
    max_len: int = 20  # most recent items seen (the ADC-SID paper caps sequences at 20)
    num_blocks: int = 2  # self-attention blocks (SASRec paper)
    num_heads: int = 1  # SASRec paper
    dropout: float = 0.5  # SASRec paper's value for the sparse Amazon datasets
    epochs: int = 30  # passes over the users' training sequences (~10 s each on 2 CPUs for Beauty)
    batch_size: int = 128  # sequences per step
    lr: float = 1e-3  # Adam, SASRec paper
    seed: int = 0


def pad_left(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """Most recent ``max_len`` items of each sequence, right-aligned, 0-padded: (U, max_len)."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-max_len:]
        if s.size:
            out[i, max_len - s.size:] = s
    return out


class SASRec(nn.Module):
    def __init__(self, num_items: int, c: SASRecConfig):
        super().__init__()
        self.c = c
        d = c.hidden_dim
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(c.max_len, d)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, c.num_heads, dim_feedforward=d, dropout=c.dropout,
                                       activation="relu", batch_first=True, norm_first=True)
            for _ in range(c.num_blocks))
        self.final_norm = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: (B, T) item ids, 0 = padding -> (B, T, d) states (state t predicts item t+1)."""
        T = seq.shape[1]
        x = self.item_emb(seq) * math.sqrt(self.c.hidden_dim) + self.pos_emb.weight[:T]
        pad = seq == 0
        x = self.drop(x) * (~pad).unsqueeze(-1)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=seq.device), 1)
        for blk in self.blocks:
            x = blk(x, src_mask=causal) * (~pad).unsqueeze(-1)
        return self.final_norm(x)

    def item_vectors(self) -> np.ndarray:
        """(num_items, d) float32 raw item embeddings (row i = item id i + 1)."""
        return self.item_emb.weight[1:].detach().cpu().numpy().astype(np.float32)


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


def train_sasrec(train_seqs: list[np.ndarray], num_items: int, c: SASRecConfig,
                 valid: tuple[list[np.ndarray], np.ndarray] | None = None) -> tuple[SASRec, list[dict]]:
    """Fit on ``train_seqs`` (each (n_u,) item ids); returns (model, per-epoch history)."""
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    usable = [s for s in train_seqs if s.size >= 2]
    if not usable:
        raise ValueError("SASRec needs sequences with at least 2 training items")
    inp = pad_left([s[:-1] for s in usable], c.max_len)
    pos = pad_left([s[1:] for s in usable], c.max_len)
    seen_keys = np.sort(np.concatenate([u * (num_items + 1) + s for u, s in enumerate(usable)]))
    model = SASRec(num_items, c)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, betas=(0.9, 0.98))
    history = []
    for epoch in range(c.epochs):
        t0 = time.perf_counter()
        model.train()
        order = rng.permutation(len(usable))
        total, steps = 0.0, 0
        for start in range(0, len(order), c.batch_size):
            idx = order[start:start + c.batch_size]
            p = pos[idx]
            n = _negatives(rng, p, num_items, seen_keys, idx)
            h = model(torch.from_numpy(inp[idx]))
            pe, ne = model.item_emb(torch.from_numpy(p)), model.item_emb(torch.from_numpy(n))
            pl, nl = (h * pe).sum(-1), (h * ne).sum(-1)
            mask = torch.from_numpy(p > 0)
            loss = (F.binary_cross_entropy_with_logits(pl[mask], torch.ones_like(pl[mask]))
                    + F.binary_cross_entropy_with_logits(nl[mask], torch.zeros_like(nl[mask])))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        rec = {"epoch": epoch, "loss": total / steps, "seconds": time.perf_counter() - t0}
        if valid is not None and (epoch + 1) % 10 == 0 or valid is not None and epoch == c.epochs - 1:
            rec.update({f"valid_{k}": v for k, v in evaluate_sasrec(model, *valid).items()})
        history.append(rec)
        log.info("sasrec epoch %d %s", epoch, {k: round(v, 4) for k, v in rec.items()})
    return model.eval(), history


@torch.inference_mode()
def evaluate_sasrec(model: SASRec, histories: list[np.ndarray], targets: np.ndarray,
                    ks=(10,), batch_size: int = 1024) -> dict[str, float]:
    """Full-catalog ranking (history items excluded) -> mean Recall@k / NDCG@k."""
    was = model.training
    model.eval()
    table = model.item_emb.weight  # (N+1, d)
    ranked = []
    seqs = pad_left(histories, model.c.max_len)
    for start in range(0, len(histories), batch_size):
        h = model(torch.from_numpy(seqs[start:start + batch_size]))[:, -1]  # (B, d)
        scores = h @ table.T
        scores[:, 0] = -torch.inf
        for i, s in enumerate(histories[start:start + batch_size]):
            scores[i, torch.from_numpy(s)] = -torch.inf
        ranked.append(torch.topk(scores, max(ks), dim=1).indices.numpy())
    if was:
        model.train()
    per_user = recall_ndcg(np.concatenate(ranked), targets, ks)
    return {k: float(v.mean()) for k, v in per_user.items()}
