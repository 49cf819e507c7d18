"""Generative retrieval (TIGER-style): an encoder-decoder that reads a user's history
and generates the next item's SID code by code; beam search constrained to SIDs that
exist; Recall@K / NDCG@K of the generated ranking.

One deviation from TIGER, for a 2-CPU budget: each history item enters the encoder as
one token (the sum of its SID codes' embeddings plus a recency embedding) instead of
T tokens, so the encoder input is T = 7 times shorter. The decoder generates the T
codes (SID + dedup suffix) autoregressively, as in TIGER. Behavioral-SID weights
R(e_b) are the per-position loss weights (ADC-SID paper §4.1.3).

Shapes: U users, H history items, G beams per user, T code positions, d model width.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidserve.eval.metrics import recall_ndcg
from sidserve.eval.sasrec import pad_left
from sidserve.eval.sid_table import PrefixTrie, SIDTable

log = logging.getLogger(__name__)


@dataclass
class RetrievalConfig:
    d_model: int = 64  # width of every token / state
    num_heads: int = 4  # attention heads (encoder and decoder)
    num_encoder_layers: int = 2  # over the history items
    # over the generated codes; 1 layer halves beam-search time (2-CPU budget, see docs/evaluation.md)
    num_decoder_layers: int = 1
    ff_dim: int = 128  # feed-forward width
    dropout: float = 0.0  # few epochs + best epoch by validation loss; CPU dropout costs ~15%
    max_history: int = 20  # most recent items read (ADC-SID paper: sequences capped at 20)
    epochs: int = 3  # passes over the ~131k Beauty training prefixes (~25 s each); best by validation loss
    batch_size: int = 1024  # examples per step
    lr: float = 3e-3  # AdamW, one-cycle schedule
    weight_decay: float = 1e-4
    beam_size: int = 50  # >= the largest K reported
    use_sid_weights: bool = True  # R(e_b) as loss weights (False: every position weight 1)
    seed: int = 0


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the user's memory, feed-forward.
    The memory's keys/values are computed once per user and shared by all its beams."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out1 = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.q2, self.kv2, self.out2 = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.drop = nn.Dropout(dropout)

    def _heads(self, x):  # (..., n, d) -> (..., h, n, dh)
        return x.unflatten(-1, (self.h, self.dh)).transpose(-3, -2)

    def memory_kv(self, memory):  # (U, S, d) -> 2 x (U, h, S, dh)
        k, v = self.kv2(memory).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x, mem_kv, mem_mask, cache=None):
        """x: (U, G, t, d) new positions; mem_mask: (U, 1, 1, S) True = attend;
        cache: (k, v) each (U, G, h, t_prev, dh) of earlier positions or None (then x
        holds the whole prefix and attention is causal). Returns (x, new cache)."""
        U, G, t, d = x.shape
        q, k, v = (self._heads(z) for z in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=-2), torch.cat([cache[1], v], dim=-2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and t > 1)
        x = x + self.drop(self.out1(a.transpose(-3, -2).flatten(-2)))
        # cross-attention: every beam's positions of user u attend to u's memory
        q2 = self._heads(self.q2(self.ln2(x)).reshape(U, G * t, d))  # (U, h, G*t, dh)
        a2 = F.scaled_dot_product_attention(q2, *mem_kv, attn_mask=mem_mask)
        x = x + self.drop(self.out2(a2.transpose(-3, -2).flatten(-2).reshape(U, G, t, d)))
        x = x + self.drop(self.ff(self.ln3(x)))
        return x, (k, v)


class SIDSeq2Seq(nn.Module):
    def __init__(self, table: SIDTable, c: RetrievalConfig):
        super().__init__()
        self.c = c
        T, d = table.length, c.d_model
        self.register_buffer("codes", torch.from_numpy(table.codes), persistent=False)  # (N+1, T)
        self.register_buffer("offsets", torch.from_numpy(table.offsets), persistent=False)  # (T,)
        self.vocab = [int(v) for v in table.vocab]
        total = int(table.vocab.sum())
        self.enc_tok = nn.Embedding(total, d)
        self.enc_pos = nn.Embedding(c.max_history, d)
        layer = nn.TransformerEncoderLayer(d, c.num_heads, c.ff_dim, c.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_encoder_layers, enable_nested_tensor=False)
        self.enc_norm = nn.LayerNorm(d)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.dec_tok = nn.Embedding(total, d)
        self.dec_pos = nn.Embedding(T, d)
        self.decoder = nn.ModuleList(DecoderLayer(d, c.num_heads, c.ff_dim, c.dropout)
                                     for _ in range(c.num_decoder_layers))
        self.dec_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, total)

    # ---- encoder -------------------------------------------------------------------
    def encode(self, hist: torch.Tensor):
        """hist: (U, H) item ids right-aligned, 0 = padding -> memory (U, H, d), mask (U, 1, 1, H)."""
        pad = hist == 0
        tok = self.enc_tok(self.codes[hist] + self.offsets).sum(-2)  # (U, H, d)
        H = hist.shape[1]
        x = tok + self.enc_pos.weight[:H].flip(0)  # position 0 = most recent
        x = self.enc_norm(self.encoder(x, src_key_padding_mask=pad))
        return x, (~pad)[:, None, None, :]

    # ---- decoder -------------------------------------------------------------------
    def _embed_prev(self, prev_codes: torch.Tensor, start: int):
        """prev_codes: (U, G, t) codes at positions start-1 .. start+t-2 (position -1 = BOS)."""
        U, G, t = prev_codes.shape
        pos = torch.arange(start, start + t, device=prev_codes.device)
        e = torch.empty(U, G, t, self.c.d_model, device=prev_codes.device)
        tok_pos = pos - 1
        for j in range(t):
            e[:, :, j] = self.bos if tok_pos[j] < 0 else self.dec_tok(prev_codes[:, :, j] + self.offsets[tok_pos[j]])
        return e + self.dec_pos(pos)

    def _logits(self, h: torch.Tensor, position: int):
        """Logits over the codes of ``position`` only: (..., vocab[position])."""
        lo = int(self.offsets[position])
        w = self.head.weight[lo:lo + self.vocab[position]]
        b = self.head.bias[lo:lo + self.vocab[position]]
        return F.linear(h, w, b)

    def forward(self, hist: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """Teacher forcing: hist (U, H), target (U,) item ids -> per position t, logits
        (U, vocab[t])."""
        memory, mask = self.encode(hist)
        mem_kv = [layer.memory_kv(memory) for layer in self.decoder]
        tgt = self.codes[target]  # (U, T)
        T = tgt.shape[1]
        prev = torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], dim=1)[:, None]  # (U, 1, T)
        x = self._embed_prev(prev, 0)
        for layer, kv in zip(self.decoder, mem_kv):
            x, _ = layer(x, kv, mask)
        x = self.dec_norm(x)[:, 0]  # (U, T, d)
        return [self._logits(x[:, t], t) for t in range(T)]

    def loss(self, hist, target, weights: torch.Tensor | None):
        """Mean over examples of sum_t w_t * CE_t / T; weights (U, T) or None."""
        logits = self.forward(hist, target)
        tgt = self.codes[target]
        ce = torch.stack([F.cross_entropy(lg, tgt[:, t], reduction="none")
                          for t, lg in enumerate(logits)], dim=1)  # (U, T)
        if weights is not None:
            ce = ce * weights
        return ce.mean()

    # ---- constrained beam search -----------------------------------------------------
    @torch.inference_mode()
    def generate(self, hist: torch.Tensor, trie: PrefixTrie, beam_size: int,
                 children_t: list[torch.Tensor] | None = None) -> torch.Tensor:
        """hist (U, H) -> (U, beam_size) item ids ranked by sequence log-probability,
        -1 where fewer valid SIDs exist. Only prefixes in ``trie`` are ever expanded."""
        children = children_t or [torch.from_numpy(c) for c in trie.children]
        U = hist.shape[0]
        memory, mask = self.encode(hist)
        mem_kv = [layer.memory_kv(memory) for layer in self.decoder]
        T = len(self.vocab)
        node = torch.zeros(U, 1, dtype=torch.long)  # (U, G) trie node per beam
        score = torch.zeros(U, 1)
        prev = torch.zeros(U, 1, 1, dtype=torch.long)  # last chosen code per beam
        caches = [None] * len(self.decoder)
        for t in range(T):
            x = self._embed_prev(prev, t)  # (U, G, 1, d)
            new_caches = []
            for i, (layer, kv) in enumerate(zip(self.decoder, mem_kv)):
                x, cache = layer(x, kv, mask, caches[i])
                new_caches.append(cache)
            logp = F.log_softmax(self._logits(self.dec_norm(x[:, :, 0]), t), dim=-1)  # (U, G, V)
            child = children[t][node.clamp(min=0)]  # (U, G, V)
            valid = (child >= 0) & (node >= 0)[..., None]
            cand = torch.where(valid, score[..., None] + logp, -torch.inf)
            G, V = cand.shape[1], cand.shape[2]
            k = min(beam_size, G * V)
            score, flat = torch.topk(cand.reshape(U, G * V), k, dim=1)  # (U, k)
            parent, code = flat // V, flat % V
            node = torch.gather(child.reshape(U, G * V), 1, flat)
            node = torch.where(torch.isfinite(score), node, torch.full_like(node, -1))
            rows = (parent + torch.arange(U)[:, None] * G).reshape(-1)  # beams' parents, flat
            caches = [tuple(z.flatten(0, 1).index_select(0, rows).unflatten(0, (U, k)) for z in c)
                      for c in new_caches]
            prev = code[:, :, None]
        items = torch.from_numpy(trie.leaf_item)[node.clamp(min=0)]
        items = torch.where(node >= 0, items, torch.full_like(items, -1))
        if items.shape[1] < beam_size:
            items = F.pad(items, (0, beam_size - items.shape[1]), value=-1)
        return items


def training_examples(train_seqs: list[np.ndarray], max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Every prefix of every training sequence predicts its next item:
    -> hist (E, max_history) right-aligned, target (E,)."""
    hists, targets = [], []
    for s in train_seqs:
        for t in range(1, s.size):
            hists.append(s[max(0, t - max_history):t])
            targets.append(s[t])
    return pad_left(hists, max_history), np.asarray(targets, dtype=np.int64)


def length_buckets(rng: np.random.Generator, lengths: np.ndarray, batch_size: int, chunk: int = 64):
    """Shuffled batches of examples with similar history lengths (so padding can be
    trimmed): shuffle, sort chunks of ``chunk`` batches by length, shuffle the batches."""
    order = rng.permutation(lengths.size)
    span = batch_size * chunk
    batches = []
    for s in range(0, order.size, span):
        part = order[s:s + span]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, part.size, batch_size)]
    for i in rng.permutation(len(batches)):
        yield batches[i]


def train_retrieval(table: SIDTable, train_seqs: list[np.ndarray], valid: tuple[list[np.ndarray], np.ndarray],
                    c: RetrievalConfig) -> tuple[SIDSeq2Seq, list[dict]]:
    """Fit on all training prefixes; keep the epoch with the lowest validation loss."""
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    hist, target = training_examples(train_seqs, c.max_history)
    if target.size == 0:
        raise ValueError("no training examples: every user needs >= 2 training items")
    lengths = (hist > 0).sum(1)
    v_hist, v_target = pad_left(valid[0], c.max_history), np.asarray(valid[1])
    weights = torch.from_numpy(table.weights) if c.use_sid_weights else None
    model = SIDSeq2Seq(table, c)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    steps_total = c.epochs * math.ceil(target.size / c.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=steps_total, pct_start=0.1)
    best, best_state, history = math.inf, None, []
    for epoch in range(c.epochs):
        t0 = time.perf_counter()
        model.train()
        total, steps = 0.0, 0
        for idx in length_buckets(rng, lengths, c.batch_size):
            tg = torch.from_numpy(target[idx])
            h = torch.from_numpy(hist[idx][:, -int(lengths[idx].max()):])  # trim common padding
            loss = model.loss(h, tg, None if weights is None else weights[tg])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            steps += 1
        vloss = validation_loss(model, v_hist, v_target, weights)
        history.append({"epoch": epoch, "loss": total / steps, "valid_loss": vloss,
                        "seconds": time.perf_counter() - t0})
        log.info("retrieval epoch %d %s", epoch, history[-1])
        if vloss < best:
            best, best_state = vloss, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), history


@torch.inference_mode()
def validation_loss(model: SIDSeq2Seq, hist: np.ndarray, target: np.ndarray, weights, batch_size: int = 2048) -> float:
    model.eval()
    total = 0.0
    for start in range(0, target.size, batch_size):
        tg = torch.from_numpy(target[start:start + batch_size])
        w = None if weights is None else weights[tg]
        total += float(model.loss(torch.from_numpy(hist[start:start + batch_size]), tg, w)) * tg.numel()
    return total / target.size


def rank_items(model: SIDSeq2Seq, trie: PrefixTrie, histories: list[np.ndarray], beam_size: int,
               batch_size: int = 128) -> np.ndarray:
    """(U, beam_size) generated item ids per user, best first."""
    model.eval()
    hist = pad_left(histories, model.c.max_history)
    children = [torch.from_numpy(c) for c in trie.children]
    out = [model.generate(torch.from_numpy(hist[s:s + batch_size]), trie, beam_size, children).numpy()
           for s in range(0, hist.shape[0], batch_size)]
    return np.concatenate(out)


def evaluate_retrieval(ranked: np.ndarray, targets: np.ndarray, groups: dict[str, np.ndarray],
                       ks=(5, 10, 50)) -> dict[str, dict[str, float]]:
    """Metrics overall and for users whose target is in each popularity group."""
    per_user = recall_ndcg(ranked, targets, ks)
    out = {"all": {k: float(v.mean()) for k, v in per_user.items()}}
    out["all"]["users"] = int(targets.size)
    for name, items in groups.items():
        sel = np.isin(targets, items)
        out[name] = {k: float(v[sel].mean()) for k, v in per_user.items()}
        out[name]["users"] = int(sel.sum())
    return out
