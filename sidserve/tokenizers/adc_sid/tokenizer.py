"""``SemanticIdTokenizer``: the ADC-SID tokenizer with scikit-learn / Hugging Face
conventions.

    tok = SemanticIdTokenizer(TokenizerConfig(...)).fit(items)   # fit returns self
    enc = tok.encode(items)          # enc.sid (N, L) int32, enc.behavior_weights (N, N_b)
    tok.save_pretrained("model/")    # config.json, model.safetensors, stats.json, manifest.json
    tok = SemanticIdTokenizer.from_pretrained("model/")

``items``: a pyarrow Table (the columns of sidserve/items.py: ``text_emb``, ``image_emb``,
``behavior_emb`` nullable, ...), a pandas DataFrame, or a dict of numpy arrays.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from sidserve.items import ItemArrays, coerce_items
from sidserve.metrics import quantization_report
from sidserve.tokenizers import invariant
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.model.adc_sid import ADCSIDModel
from sidserve.tokenizers.adc_sid.regulation.pairs import refresh_pair_set
from sidserve.tokenizers.adc_sid.training import (
    CodeStats,
    Sync,
    TrainState,
    assign_codes,
    check_norm_range,
    compute_catalog_stats,
    freeze_codebooks,
    init_codebooks,
    set_weight_scale,
    to_model_input,
    train_step,
    warm_start_free,
)
from sidserve.tokenizers.base import BaseTokenizer, Encoding

log = logging.getLogger(__name__)

# buffers that artifacts written before sidserve 0.2 do not have (their defaults are right)
LEGACY_BUFFERS = ("richness_quantiles", "recon_scale")


class SemanticIdTokenizer(BaseTokenizer):
    tokenizer_type = "adc-sid"
    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig | None = None):
        self.config = config if config is not None else TokenizerConfig()

    @property
    def independent_positions(self) -> bool:
        """One codebook per expert, each on its own latent (so a position's code can be kept
        alone, as sticky assignment does), unless the behavioral codes are residual levels
        (``behavior_quantization`` residual / residual_input: level i codes what the levels
        before it left, and its scores are squared distances, not cosines)."""
        return self.config.behavior_quantization == "parallel"

    # ---- BaseTokenizer hooks -----------------------------------------------------
    def _fitted_attr(self) -> str:
        return "model_"

    def _config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _tensors(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.model_.state_dict().items()}

    @classmethod
    def _restore(cls, config, tensors, stats):
        config = dict(config)
        legacy = "richness_normalization" not in config  # written before sidserve 0.2
        if legacy:  # those models normalised with eq. 16 and had no fit-sample buffers
            config["richness_normalization"] = "minmax"
        tok = cls(TokenizerConfig.from_dict(config))
        model = ADCSIDModel(tok.config)
        state = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if legacy:
            missing = [k for k in missing if k not in LEGACY_BUFFERS]
        if missing or unexpected:
            raise ValueError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
        tok.model_ = model.eval()
        tok.stats_ = stats
        tok.catalog_stats_ = stats.get("catalog", {})
        return tok

    @property
    def sid_layout(self) -> list[dict[str, Any]]:
        return self.config.sid_layout

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @classmethod
    def from_model(cls, model: ADCSIDModel, catalog_stats: dict, history: list[dict] | None = None,
                   items=None) -> "SemanticIdTokenizer":
        """Wrap a network trained elsewhere (the Ray Train job) as a fitted tokenizer."""
        tok = cls(model.config)
        tok.model_ = model.cpu()
        tok.catalog_stats_ = dict(catalog_stats)
        tok.history_ = history or []
        tok.stats_ = {"catalog": tok.catalog_stats_, "history": tok.history_}
        if items is not None:
            tok.stats_["fit_metrics"] = tok.evaluate(items)
        return tok

    # ---- fit ---------------------------------------------------------------------
    def fit(self, items, *, catalog_stats: dict | None = None,
            init: "SemanticIdTokenizer | None" = None) -> "SemanticIdTokenizer":
        """Train in-process on ``items`` (small catalogs, tests, demos).

        catalog_stats: N_min / N_max of the whole catalog when ``items`` is a sample of
        it; computed from ``items`` otherwise.
        init: a fitted model of the same architecture to continue from (a warm re-fit, as
        ``sidserve refresh --refit`` does on Ray Train): its weights and input statistics
        (richness quantiles, reconstruction scales) instead of the k-means initialisation;
        N_min / N_max are this catalog's.
        """
        c = self.config.validate()
        arrays = coerce_items(items, c)
        stats = dict(catalog_stats) if catalog_stats is not None else compute_catalog_stats(arrays, c)
        torch.manual_seed(c.seed)
        rng = np.random.default_rng(c.seed)
        model = ADCSIDModel(c)
        n = len(arrays)
        sample = rng.choice(n, size=min(n, c.kmeans_init_samples), replace=False)
        if init is not None:
            if not isinstance(init, SemanticIdTokenizer) or init.config.replace(**warm_start_free(c)) != c:
                raise ValueError("init: not an ADC-SID model with this config; a warm start needs the same "
                                 f"architecture (only {', '.join(warm_start_free(c))} may differ)")
            init._check_fitted()
            model.load_state_dict(init.model_.state_dict())
        if c.has_behavior:
            check_norm_range(stats["n_min"], stats["n_max"])
            model.set_catalog_stats(stats["n_min"], stats["n_max"])
        if init is None:
            init_codebooks(model, to_model_input(arrays, np.sort(sample)))
        init_recon = float(SemanticIdTokenizer.from_model(model, stats).reconstruction_error(arrays).mean())
        freeze_codebooks(model)

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay)
        state = TrainState.create(c.seed)
        history = []
        pair_set, pair_step = None, 0
        for epoch in range(c.epochs):
            t0 = time.perf_counter()
            refresh: dict[str, Any] = {}
            if c.collision_regulation != "off" and epoch % c.collision_refresh_every == 0:
                # catalog-wide overlaps under the current weights (issue 8)
                pair_set, refresh = refresh_pair_set(assign_codes(model, arrays), arrays, c, epoch)
                pair_step = 0
            order = rng.permutation(n)
            sums: dict[str, float] = {}
            steps = 0
            codes = CodeStats(c)  # codes of the training batches: utilisation, entropy per position
            for start in range(0, n, c.batch_size):
                idx = order[start:start + c.batch_size]
                if idx.size < 2 and steps:  # a lone leftover item has no in-batch negatives
                    continue
                pairs = None
                if pair_set is not None and len(pair_set):
                    pairs = pair_set.batch(pair_step, c.collision_pairs_per_batch)
                    pair_step += 1
                m = train_step(model, optimizer, to_model_input(arrays, idx), state, pairs=pairs)
                codes.add(state.last_codes.numpy())
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
            record = {k: v / steps for k, v in sums.items()}
            record.update(codes.reduce(Sync()))
            record.update(refresh)
            record.update(epoch=epoch, steps=steps, items_per_s=n / (time.perf_counter() - t0))
            history.append(record)
            log.info("epoch %d %s", epoch, {k: (round(v, 5) if isinstance(v, float) else v)
                                            for k, v in record.items() if k != "num_items"})

        set_weight_scale(model, arrays)
        self.model_ = model.eval()
        self.catalog_stats_ = stats
        self.history_ = history
        self.stats_ = {"catalog": stats, "history": history, "init_metrics": {"recon": init_recon},
                       "fit_metrics": self.evaluate(arrays)}
        return self

    # ---- inference ---------------------------------------------------------------
    def to(self, device) -> "SemanticIdTokenizer":
        """Move the network to ``device`` ('cpu', 'cuda', 'cuda:1', ...) for encoding."""
        self._check_fitted()
        self.model_.to(device)
        return self

    def arithmetic(self) -> str:
        """What this process's encodes compute in: "float32" (batch-invariant, this machine's
        float32 kernels checked to compute a row the same in every batch shape), "fixed point"
        (batch-invariant by construction), or "float32, not batch-invariant" (config
        batch_invariant off). A snapshot and the replicas serving it must agree on it (their
        probe hashes do then: sidserve/tokenizers/probe.py)."""
        self._check_fitted()
        if not self.config.batch_invariant:
            return "float32, not batch-invariant"
        from sidserve.tokenizers.adc_sid.model import invariant_encode
        from sidserve.tokenizers.adc_sid.model.encode import _encode

        with invariant.batch_invariant():
            return invariant_encode.arithmetic(self.model_, _encode, self.device)

    @property
    def device(self) -> torch.device:
        return self.model_.n_min.device

    @torch.inference_mode()
    def _run(self, arrays: ItemArrays, batch_size: int, with_recon: bool = True, candidates: int = 0):
        self._check_fitted()
        was_training = self.model_.training
        if was_training:  # eval()/train() walk every module: skip when already in eval
            self.model_.eval()
        device = self.device
        c = self.config
        n = len(arrays)
        L = c.sid_length
        Nb = c.num_behavior_experts if c.has_behavior else 0
        sid = np.empty((n, L), dtype=np.int32)
        weights = np.zeros((n, Nb), dtype=np.float32)
        recon = np.full(n, np.nan)  # filled only with_recon
        cand = np.empty((n, L, candidates), dtype=np.int32) if candidates else None
        scores = np.empty((n, L, candidates), dtype=np.float64) if candidates else None
        # config.batch_invariant: each row's codes and weights from that row alone (invariant.py:
        # exact GEMMs, one thread, rows padded; any chunking then gives the same). The codes-only
        # encode pads and chunks inside (model/encode.py) and certifies a float32 forward where it
        # can (model/certified.py); the training forward (with_recon) gets padded chunks here.
        exact = c.batch_invariant
        pad = exact and with_recon
        step = min(batch_size, invariant.CHUNK_ROWS) if pad else batch_size
        with invariant.batch_invariant(exact):
            for start in range(0, n, step):
                sl = slice(start, min(n, start + step))
                k = sl.stop - sl.start
                rows = sl.start + (invariant.padded_rows(k) if pad else np.arange(k))
                out = self.model_(to_model_input(arrays, rows).to(device), codes_only=not with_recon,
                                  candidates=candidates)
                sid[sl] = out.codes[:k].cpu().numpy()
                if candidates:
                    cand[sl] = out.candidates[:k].cpu().numpy()
                    scores[sl] = out.candidate_scores[:k].cpu().numpy()
                weights[sl] = out.behavior_weights[:k].cpu().numpy()
                if with_recon:
                    recon[sl] = out.recon[:k].cpu().numpy()
        if was_training:
            self.model_.train()
        if candidates:
            return sid, weights, recon, cand, scores
        return sid, weights, recon

    def encode(self, items, *, batch_size: int = 8192, candidates: int = 0) -> Encoding:
        """items (N rows) -> Encoding: sid (N, L) int32 in ``sid_layout`` order,
        behavior_weights (N, N_b) float32, path (N,) 'full' | 'content_only'; with
        ``candidates=k`` also the k most similar codes per position and their cosines
        (``Encoding.candidates``, what sticky assignment compares against a margin)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not isinstance(candidates, int) or not 0 <= candidates <= self.config.codebook_size:
            raise ValueError(f"candidates must be an int in [0, {self.config.codebook_size}], got {candidates!r}")
        self._check_fitted()
        arrays = coerce_items(items, self.config)
        cand = scores = None
        if candidates:
            sid, weights, _, cand, scores = self._run(arrays, batch_size, with_recon=False, candidates=candidates)
        else:
            sid, weights, _ = self._run(arrays, batch_size, with_recon=False)
        if self.config.has_behavior:
            path = np.where(arrays.has_behavior, "full", "content_only").astype(object)
        else:
            path = np.full(len(arrays), "full", dtype=object)
        return Encoding(sid=sid, behavior_weights=weights, path=path, item_id=arrays.item_ids,
                        candidates=cand, candidate_scores=scores)

    def reconstruction_error(self, items, *, batch_size: int = 8192) -> np.ndarray:
        """(N,) mean squared error per embedding element of eq. 14's decoder output."""
        return self._run(coerce_items(items, self.config), batch_size)[2]

    def evaluate(self, items, *, batch_size: int = 8192) -> dict[str, Any]:
        """Quantization metrics on ``items`` plus the cold-path agreement: for items with
        behavior, the share whose shared and content SIDs are the same when their
        behavior is withheld (how well the content-only path stands in), per popularity
        bucket too when ``items`` carry a popularity."""
        arrays = coerce_items(items, self.config)
        sid, _, recon = self._run(arrays, batch_size)
        report = quantization_report(sid, self.config.codebook_size, recon)
        report["gate_mean_per_position"] = []
        if self.config.has_behavior and arrays.has_behavior.any():
            warm = arrays.take(np.flatnonzero(arrays.has_behavior))
            cold = ItemArrays(warm.content, warm.behavior, np.zeros(len(warm), bool))
            sid_warm, w_warm, _ = self._run(warm, batch_size)
            sid_cold, _, _ = self._run(cold, batch_size)
            k = self.config.sid_length - self.config.num_behavior_experts
            same = sid_warm[:, :k] == sid_cold[:, :k]
            report["cold_path_agreement"] = float(same.all(axis=1).mean())
            report["cold_path_agreement_per_position"] = same.mean(axis=0).round(6).tolist()
            if warm.popularity is not None:  # issue 20.6: thin-behavior items are the ones in transition
                from sidserve.jobs.assign.stats import share_per_bucket

                report["cold_path_agreement_by_popularity"] = {
                    name: {"items": n, "agreement": share}
                    for name, (n, share) in share_per_bucket(same.all(axis=1), warm.popularity).items()}
            report["gate_mean_per_position"] = w_warm.mean(axis=0).round(6).tolist()
            report["gate_zero_share"] = float((w_warm == 0).mean())
        return report
