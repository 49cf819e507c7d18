"""Generative retrieval (TIGER-style): an encoder-decoder that reads a user's history
and generates the next item's SID code by code; beam search constrained to SIDs that
exist; Recall@K / NDCG@K of the generated ranking.

History encoding (``history_tokens``): ``item`` (default, for a 2-CPU budget) gives each
history item one encoder token, the sum of its SID codes' embeddings plus a recency
embedding; ``codes`` gives it T tokens, one per code, as TIGER does (T times longer
encoder input; its cost is measured in docs/evaluation.md). The decoder generates the T
codes (SID + dedup suffix) autoregressively, as in TIGER. Behavioral-SID weights R(e_b)
are the per-position loss weights (ADC-SID paper §4.1.3).

Training runs until the validation metric (NDCG@10 of constrained beam search on a fixed
sample of validation users, or the validation loss) has not improved for ``patience``
epochs, and the best epoch's weights are restored (``sidserve.eval.early_stopping``).

Shapes: U users, H history items, G beams per user, T code positions, d model width.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidserve.eval.checkpoint import EpochCheckpoint
from sidserve.eval.early_stopping import EarlyStopping
from sidserve.eval.metrics import grouped_means, recall_ndcg
from sidserve.eval.sasrec import pad_left
from sidserve.eval.sid_table import PrefixTrie, SIDTable

log = logging.getLogger(__name__)


VALID_METRICS = ("ndcg@10", "recall@10", "loss")
HISTORY_TOKENS = ("item", "codes")


@dataclass
class RetrievalConfig:
    d_model: int = 64  # width of every token / state
    num_heads: int = 4  # attention heads (encoder and decoder)
    num_encoder_layers: int = 2  # over the history items
    # over the generated codes; 1 layer halves beam-search time (2-CPU budget, see docs/evaluation.md)
    num_decoder_layers: int = 1
    ff_dim: int = 128  # feed-forward width
    dropout: float = 0.1  # TIGER's value; training now runs to convergence, so it regularises
    max_history: int = 20  # most recent items read (ADC-SID paper: sequences capped at 20)
    history_tokens: str = "item"  # 'item': one token per history item | 'codes': T per item (TIGER)
    max_epochs: int = 40  # upper bound; early stopping ends runs before it
    # epochs without a better validation metric before stopping: 4, since NDCG@10 of 5,000
    # users moves by about its own noise (~0.002) from one epoch to the next near the top
    patience: int = 4
    # ... but not before 15 epochs: RQ-VAE's Beauty run once stopped after 9 (best epoch 4, a
    # plateau of its validation NDCG@10) where another draw of it rose to epoch 27; the other
    # tokenizers' best epochs were 13-28, so the floor costs them nothing
    min_epochs: int = 15
    valid_metric: str = "ndcg@10"  # beam-search NDCG@10 on valid_users validation users, or 'loss'
    valid_users: int = 5000  # fixed random sample of validation users scored every epoch (0 = all)
    batch_size: int = 1024  # examples per step
    lr: float = 2e-3  # AdamW, linear warm-up then constant (early stopping decides the length)
    warmup_steps: int = 300
    weight_decay: float = 1e-4
    beam_size: int = 50  # >= the largest K reported
    use_sid_weights: bool = True  # R(e_b) as loss weights (False: every position weight 1)
    seed: int = 0

    def validate(self) -> "RetrievalConfig":
        if self.valid_metric not in VALID_METRICS:
            raise ValueError(f"valid_metric must be one of {VALID_METRICS}, got {self.valid_metric!r}")
        if self.history_tokens not in HISTORY_TOKENS:
            raise ValueError(f"history_tokens must be one of {HISTORY_TOKENS}, got {self.history_tokens!r}")
        for name in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "ff_dim", "max_history",
                     "max_epochs", "patience", "batch_size", "beam_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.min_epochs < 0:
            raise ValueError(f"min_epochs must be >= 0, got {self.min_epochs}")
        if self.valid_users < 0 or self.warmup_steps < 0:
            raise ValueError(f"valid_users and warmup_steps must be >= 0, got {self.valid_users}, {self.warmup_steps}")
        return self


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
        self.c = c.validate()
        T, d = table.length, c.d_model
        self.register_buffer("codes", torch.from_numpy(table.codes), persistent=False)  # (N+1, T)
        self.register_buffer("offsets", torch.from_numpy(table.offsets), persistent=False)  # (T,)
        self.vocab = [int(v) for v in table.vocab]
        total = int(table.vocab.sum())
        self.enc_tok = nn.Embedding(total, d)
        self.enc_pos = nn.Embedding(c.max_history, d)  # recency of the history item
        # 'codes' history: which code of its item a token is
        self.enc_code_pos = nn.Embedding(T, d) if c.history_tokens == "codes" else None
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
        """hist: (U, H) item ids right-aligned, 0 = padding -> memory (U, S, d), mask
        (U, 1, 1, S); S = H ('item' tokens) or H * T ('codes' tokens)."""
        pad = hist == 0
        H = hist.shape[1]
        tok = self.enc_tok(self.codes[hist] + self.offsets)  # (U, H, T, d)
        recency = self.enc_pos.weight[:H].flip(0)  # (H, d), position 0 = most recent
        if self.enc_code_pos is None:
            x = tok.sum(-2) + recency
        else:
            T = tok.shape[2]
            x = (tok + recency[:, None] + self.enc_code_pos.weight).flatten(1, 2)  # (U, H*T, d)
            pad = pad.repeat_interleave(T, dim=1)
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
                    c: RetrievalConfig, trie: PrefixTrie | None = None,
                    checkpoint: str | None = None) -> tuple[SIDSeq2Seq, list[dict]]:
    """Fit on all training prefixes until the validation metric stops improving
    (``patience`` epochs), then restore the best epoch. ``model.early_stopping`` says
    which epoch was kept. checkpoint: a file to save each epoch's state to and resume an
    interrupted run from (``EpochCheckpoint``)."""
    c.validate()
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    hist, target = training_examples(train_seqs, c.max_history)
    if target.size == 0:
        raise ValueError("no training examples: every user needs >= 2 training items")
    lengths = (hist > 0).sum(1)
    v_hist, v_target = pad_left(valid[0], c.max_history), np.asarray(valid[1])
    if c.valid_metric != "loss" and 0 < c.valid_users < v_target.size:
        pick = np.sort(np.random.default_rng(c.seed + 7919).choice(v_target.size, c.valid_users, replace=False))
        v_hist_gen, v_target_gen = v_hist[pick], v_target[pick]
    else:
        v_hist_gen, v_target_gen = v_hist, v_target
    trie = trie if trie is not None else PrefixTrie.build(table)
    weights = torch.from_numpy(table.weights) if c.use_sid_weights else None
    model = SIDSeq2Seq(table, c)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, c.warmup_steps)))
    stopper = EarlyStopping(c.patience, mode="min" if c.valid_metric == "loss" else "max", min_epochs=c.min_epochs)
    ckpt = EpochCheckpoint(checkpoint, {"model": "retrieval", "config": dataclasses.asdict(c),
                                        "num_items": table.num_items, "examples": int(target.size)})
    start, history, stopped = ckpt.resume(model, opt, rng, stopper, sched)
    for epoch in range(start, 0 if stopped else c.max_epochs):
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
        rec = {"epoch": epoch, "loss": total / steps, "seconds": time.perf_counter() - t0}
        t1 = time.perf_counter()
        rec["valid_loss"] = validation_loss(model, v_hist, v_target, weights)
        if c.valid_metric != "loss":
            ranked = rank_items(model, trie, v_hist_gen, c.beam_size, padded=True)
            m = recall_ndcg(ranked, v_target_gen, (10,))
            rec.update({f"valid_{k}": float(v.mean()) for k, v in m.items()})
        rec["valid_seconds"] = time.perf_counter() - t1
        history.append(rec)
        log.info("retrieval epoch %d %s", epoch, {k: round(v, 4) for k, v in rec.items()})
        stop = stopper.update(epoch, rec[f"valid_{c.valid_metric}"], model)
        ckpt.save(epoch, model, opt, rng, stopper, history, stop, sched)
        if stop:
            break
    stopper.restore(model)
    model.early_stopping = {**stopper.summary(), "metric": c.valid_metric, "epochs_run": len(history),
                            "max_epochs": c.max_epochs, "valid_users_scored": int(v_target_gen.size),
                            **ckpt.summary()}
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


def rank_items(model: SIDSeq2Seq, trie: PrefixTrie, histories, beam_size: int,
               batch_size: int = 128, padded: bool = False) -> np.ndarray:
    """(U, beam_size) generated item ids per user, best first. histories: list of (n_u,)
    arrays, or already a (U, max_history) right-aligned array when ``padded``."""
    model.eval()
    hist = np.asarray(histories) if padded else pad_left(histories, model.c.max_history)
    children = [torch.from_numpy(c) for c in trie.children]
    out = []
    for s in range(0, hist.shape[0], batch_size):
        h = hist[s:s + batch_size]
        width = max(1, int((h > 0).sum(1).max()))
        out.append(model.generate(torch.from_numpy(h[:, -width:]), trie, beam_size, children).numpy())
    return np.concatenate(out)


def evaluate_retrieval(ranked: np.ndarray, targets: np.ndarray, groups: dict[str, np.ndarray],
                       ks=(5, 10, 50)) -> dict[str, dict[str, float]]:
    """Metrics overall and for users whose target is in each popularity group."""
    return grouped_means(recall_ndcg(ranked, targets, ks), targets, groups)
