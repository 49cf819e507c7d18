"""Discriminative ranking: a small pointwise model whose only item features are SID
embeddings, trained on next-item positives vs. sampled negatives; AUC and GAUC.

Item representation: r(i) = sum_t w_t(i) * E_t[code_t(i)] over the SID positions
(behavioral positions of ADC-SID scaled by their weights R(e_b), paper §4.1.3; w = 1
elsewhere). User representation: the history representations pooled with scaled
dot-product attention to the candidate (DIN-style target attention without DIN's MLP,
which would cost 300+ GMAC to score Beauty's test candidates on 2 CPUs). Score:
MLP([u, r, u * r]).

Training runs until validation GAUC (the validation item against ``valid_negatives``
sampled items per user, one fixed draw) has not improved for ``patience`` epochs, then
the best epoch is restored.

Evaluation: per test user, the held-out item against ``num_negatives`` items sampled
from those the user never interacted with (one fixed draw shared by all tokenizers).
AUC pools every (user, item) pair; GAUC averages per-user AUC weighted by pairs.

Shapes: B examples, H history items, L SID positions, d width.
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
from sidserve.eval.metrics import auc, gauc, per_user_auc
from sidserve.eval.sasrec import pad_left
from sidserve.eval.sid_table import SIDTable

log = logging.getLogger(__name__)


@dataclass
class RankingConfig:
    d_model: int = 64  # SID code embedding size
    mlp_dim: int = 128  # hidden width of the scoring MLP
    max_history: int = 20  # most recent items pooled into the user representation
    negatives_per_positive: int = 4  # sampled negatives per training positive
    max_epochs: int = 20  # upper bound; early stopping on validation GAUC ends runs before it
    patience: int = 2  # epochs without a better validation GAUC before stopping
    valid_negatives: int = 99  # sampled items per validation user (as at test time)
    batch_size: int = 1024
    lr: float = 2e-3  # AdamW
    weight_decay: float = 1e-5
    use_sid_weights: bool = True  # scale behavioral code embeddings by R(e_b)
    seed: int = 0


class SIDRanker(nn.Module):
    def __init__(self, table: SIDTable, c: RankingConfig):
        super().__init__()
        self.max_history = c.max_history
        L = table.length - 1  # the dedup suffix carries no meaning: not a feature
        self.register_buffer("codes", torch.from_numpy(table.codes[:, :L]), persistent=False)
        w = table.weights[:, :L].copy() if c.use_sid_weights else np.ones((table.codes.shape[0], L), np.float32)
        w[0] = 0.0  # padding item contributes nothing
        self.register_buffer("weights", torch.from_numpy(w), persistent=False)
        self.register_buffer("offsets", torch.from_numpy(table.offsets[:L]), persistent=False)
        self.emb = nn.Embedding(int(table.vocab[:L].sum()), c.d_model)
        nn.init.normal_(self.emb.weight, std=0.05)
        d = c.d_model
        self.scale = d ** -0.5
        self.mlp = nn.Sequential(nn.Linear(3 * d, c.mlp_dim), nn.ReLU(), nn.Linear(c.mlp_dim, 1))

    def item_repr(self, items: torch.Tensor) -> torch.Tensor:
        """items (...,) ids -> (..., d)."""
        e = self.emb(self.codes[items] + self.offsets)  # (..., L, d)
        return (e * self.weights[items][..., None]).sum(-2)

    def forward(self, hist: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """hist (B, H), items (B, C) candidates -> (B, C) logits."""
        h = self.item_repr(hist)  # (B, H, d)
        r = self.item_repr(items)  # (B, C, d)
        a = (r @ h.transpose(1, 2)) * self.scale  # (B, C, H)
        a = a.masked_fill((hist == 0)[:, None], -torch.inf).softmax(-1)
        u = a @ h  # (B, C, d)
        return self.mlp(torch.cat([u, r, u * r], -1)).squeeze(-1)


def sample_negatives(rng: np.random.Generator, users_items: list[np.ndarray], num_items: int,
                     count: int) -> np.ndarray:
    """(U, count) item ids in 1..num_items outside each user's own sequence."""
    out = rng.integers(1, num_items + 1, size=(len(users_items), count))
    for u, seen in enumerate(users_items):
        bad = np.isin(out[u], seen)
        while bad.any():
            out[u, bad] = rng.integers(1, num_items + 1, size=int(bad.sum()))
            bad = np.isin(out[u], seen)
    return out


def train_ranker(table: SIDTable, train_seqs: list[np.ndarray], c: RankingConfig,
                 valid: tuple[list[np.ndarray], np.ndarray, np.ndarray] | None = None,
                 checkpoint: str | None = None) -> tuple[SIDRanker, list[dict]]:
    """Every training prefix's next item is a positive, with sampled negatives.

    valid: (histories, targets, negatives (U, n)) -> early stopping on validation GAUC;
    without it ``max_epochs`` are run. ``model.early_stopping`` says what was kept.
    checkpoint: a file to save each epoch's state to and resume an interrupted run from
    (``EpochCheckpoint``)."""
    from sidserve.eval.retrieval import length_buckets, training_examples

    if c.max_epochs < 1 or c.patience < 1:
        raise ValueError(f"max_epochs and patience must be >= 1, got {c.max_epochs}, {c.patience}")
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    hist, target = training_examples(train_seqs, c.max_history)
    lengths = (hist > 0).sum(1)
    model = SIDRanker(table, c)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    n = table.num_items
    stopper = EarlyStopping(c.patience, mode="max")
    ckpt = EpochCheckpoint(checkpoint, {"model": "ranking", "config": dataclasses.asdict(c), "num_items": n,
                                        "examples": int(target.size)})
    start, history, stopped = ckpt.resume(model, opt, rng, stopper)
    for epoch in range(start, 0 if stopped else c.max_epochs):
        t0 = time.perf_counter()
        model.train()
        neg = rng.integers(1, n + 1, size=(target.size, c.negatives_per_positive))
        total, steps = 0.0, 0
        for idx in length_buckets(rng, lengths, c.batch_size):
            cand = np.concatenate([target[idx, None], neg[idx]], axis=1)
            labels = torch.zeros(cand.shape)
            labels[:, 0] = 1.0
            h = torch.from_numpy(hist[idx][:, -int(lengths[idx].max()):])
            logits = model(h, torch.from_numpy(cand))
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        rec = {"epoch": epoch, "loss": total / steps, "seconds": time.perf_counter() - t0}
        stop = False
        if valid is not None:
            v_hist, v_target, v_neg = valid
            rec["valid_gauc"] = float(per_user_auc(score(model, v_hist, np.concatenate([v_target[:, None], v_neg], 1)))
                                      .mean())
            stop = stopper.update(epoch, rec["valid_gauc"], model)
        history.append(rec)
        log.info("ranking epoch %d %s", epoch, history[-1])
        ckpt.save(epoch, model, opt, rng, stopper, history, stop)
        if stop:
            break
    stopper.restore(model)
    model.early_stopping = {**stopper.summary(), "epochs_run": len(history), "max_epochs": c.max_epochs,
                            **ckpt.summary()}
    return model.eval(), history


@torch.inference_mode()
def score(model: SIDRanker, histories: list[np.ndarray], candidates: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(U, C) candidate ids -> (U, C) scores."""
    was = model.training
    model.eval()
    hist = pad_left(histories, model.max_history)
    out = [model(torch.from_numpy(hist[s:s + batch_size]), torch.from_numpy(candidates[s:s + batch_size])).numpy()
           for s in range(0, hist.shape[0], batch_size)]
    model.train(was)
    return np.concatenate(out)


def evaluate_ranking(scores: np.ndarray, targets: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, dict]:
    """scores (U, 1 + n_neg), column 0 the held-out positive -> AUC / GAUC overall and
    for users whose positive is in each popularity group."""
    U, C = scores.shape
    labels = np.zeros((U, C), bool)
    labels[:, 0] = True
    users = np.repeat(np.arange(U), C)

    def metrics(sel):
        s, y, g = scores[sel].ravel(), labels[sel].ravel(), users.reshape(U, C)[sel].ravel()
        return {"auc": auc(y, s), "gauc": gauc(g, y, s), "users": int(sel.sum())}

    out = {"all": metrics(np.ones(U, bool))}
    for name, items in groups.items():
        out[name] = metrics(np.isin(targets, items))
    return out
