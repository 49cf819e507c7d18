"""Configuration of the ADC-SID tokenizer: one dataclass, a reason per field.

Unknown keys are an error naming the key (``TokenizerConfig.from_dict``), so a typo in
a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sidserve.tokenizers.config import BEHAVIOR, ModalityInputs, config_from_dict


@dataclass
class TokenizerConfig(ModalityInputs):
    # ---- inputs --------------------------------------------------------------------
    # content modality -> embedding dim; any non-empty set, order fixes the SID layout
    modality_dims: dict[str, int] = field(default_factory=lambda: {"text": 64, "image": 32})
    # dim of the behavioral (collaborative) embedding; None = model without behavior
    behavior_dim: int | None = 32

    # ---- SID structure (paper §4.1.3 public setting: K=100, N_s=N_t=N_v=1, N_b=3) -----
    codebook_size: int = 100  # K codewords per expert codebook
    num_shared_experts: int = 1  # N_s: experts on [h_t, h_v, h_b]
    num_content_experts: int = 1  # N_t = N_v: experts per content modality
    num_behavior_experts: int = 3  # N_b: behavioral experts, one weight R(e_b)_i each
    # how the N_b behavioral codes are made: "parallel" (the paper: N_b experts on e_b, each
    # with its own cosine codebook) or "residual" (one behavioral expert, its unit latent
    # quantized coarse-to-fine by N_b Euclidean codebooks, level i coding what levels < i
    # left; R(e_b)_i weighs level i) or "residual_input" (the same levels on e_b itself, no
    # behavioral expert: online residual k-means of the table, read by the fusion through a
    # linear map). On Beauty's validation split ADC-SID's three parallel behavioral codes gave
    # a ranker GAUC 0.7711 alone where three residual k-means levels of the same table gave
    # 0.8211, mostly on long-tail items (docs/evaluation.md, "Parallel or residual behavioral codes")
    behavior_quantization: str = "parallel"
    # trust in e_b by behavioral richness, on the input: a thin item's e_b is mostly noise,
    # so every part of the model reads e_b' = a e_b + (1 - a) W [e_m], a = pop / (pop + k),
    # where W (a ridge map from the content embeddings to e_b, fitted on the fit sample with
    # each item weighted by its a, stored in the artifact) predicts behavior from content.
    # k > 0 turns it on (needs richness_signal="popularity": the same per-item popularity);
    # 0 reads e_b as given (the paper). On Beauty's validation split (k = 3) it lifted a
    # ranker's long tail and cost SID-SASRec's, so it is off (docs/evaluation.md, "Thin
    # items' e_b shrunk toward their content"): validate it against your downstream model
    behavior_shrinkage: float = 0.0
    behavior_prior_ridge: float = 1.0  # ridge penalty of W (content embeddings of unit norm)

    # ---- network sizes -------------------------------------------------------------
    hidden_dim: int = 128  # width of h_m = D_m(e_m), the space where alignment happens
    latent_dim: int = 32  # expert output / codeword dim (cosine codebooks)
    expert_hidden_dim: int = 128  # hidden width of every expert / gate / decoder MLP

    # ---- alignment (eq. 15-21) -------------------------------------------------------
    # how N_norm (eq. 16) is computed from ||e_b||: "minmax" (eq. 16) or "quantile" (the
    # norm's rank in the catalog, from stored quantiles; sidserve/tokenizers/adc_sid/model/controller.py)
    richness_normalization: str = "quantile"
    # what measures an item's behavioral richness: "norm" (||e_b||, the paper's proxy) or
    # "popularity" (log(1 + the catalog's `popularity` column), what the norm stands in for;
    # then every item with behavior needs a popularity, online too)
    richness_signal: str = "norm"
    richness_quantile_points: int = 1001  # quantiles stored in the artifact for "quantile"
    alpha: float = 10.0  # controller steepness (paper's best: alpha=10, beta=9)
    beta: float = 9.0  # controller threshold
    tau: float = 0.07  # InfoNCE temperature
    align_weight: float = 1.0  # weight of L_align_total in the total loss (paper: 1)
    # L_recon of eq. 14 is a squared L2 norm: "sum" over the embedding's elements, as the
    # paper writes it. "mean" (per element, sidserve < 0.3) divides it by sum(d) ~ 800 on
    # Beauty, so InfoNCE outweighed reconstruction 2000:1 and the gates and codebooks were
    # trained by alignment alone
    recon_reduction: str = "sum"
    # divide each modality's squared error by its mean squared norm over the fit sample, so
    # every modality counts the same in L_recon. Without it the 64-d behavior embedding
    # (norm ~0.35) was ~6% of the target's energy beside two unit 384-d text embeddings:
    # the decoder did better ignoring the behavioral latents and closed every gate
    recon_balance: bool = True

    # ---- quantization ------------------------------------------------------------
    commitment_weight: float = 0.25  # beta_c of ||z - sg(c)||^2, VQ-VAE's usual value
    kmeans_init_samples: int = 20000  # items sampled to k-means-initialise codebooks
    kmeans_iters: int = 25  # faiss k-means iterations for the init
    restart_every: int = 50  # steps between dead-code checks
    dead_code_threshold: float = 0.1  # a code is dead below this share of its fair usage (balances usage)
    # False: codewords stay where the fit starts them, only encoders, gates and fusion
    # learn (no dead-code restarts either). On a warm re-fit (refresh --refit) the codewords
    # are the previous model's, so an item's code moves only where its latent moves: the
    # codebook anchoring of issue 20. On a cold fit they stay at their k-means initialisation
    train_codebooks: bool = True

    # ---- dynamic behavioral weighting + sparsity (eq. 22-23) -----------------------
    gate_bias_init: float = 0.5  # initial b of relu(MLP(e_b)+b): gates start open
    # the fusion's gradient passes relu's zero side too (the sparsity loss does not): a gate
    # the L1 pressure closed still sees the reconstruction gradient and can reopen when
    # lambda falls. Off, ReMoE's schedule closed every gate of Beauty for good by epoch 10
    gate_straight_through: bool = True
    sparsity_theta: float = 0.5  # s_target = theta * (1 - N_norm) (MMQ-v2)
    # what holds the share of closed gates at the target: "threshold" (a per-expert gate
    # offset under integral control, scaled by the logits' spread; immediate, scale-free) or
    # "lambda" (ReMoE: only the L1 coefficient adapts; on Beauty and the synthetic catalog
    # it overshot, closed every gate and recovered only slowly). Both keep eq. 23's L1
    sparsity_control: str = "threshold"
    # integral gain of the "threshold" control: offset step = gain * (target - closed) * std
    # of the logits (0.5 lagged the target by 0.05-0.1 on the synthetic catalog; 2 holds it)
    sparsity_threshold_gain: float = 2.0
    # lambda starts small (a dense stage first, as in ReMoE) and is multiplied every step
    # by rate^(gap) (below). ReMoE's own 1e-8 and 1.2 assume ~1e5 steps: on Beauty (~1,000
    # steps) lambda reached 2 before the gates reacted and closed them all (sparsity 0.99
    # against 0.25); 1e-4 and 1.05 reach the target by epoch 5 and hold it
    sparsity_lambda_init: float = 1e-4
    sparsity_lambda_rate: float = 1.05
    # "sign": lambda *= rate^sign(gap) (ReMoE); "proportional": rate^clip(gap / target, -1, 1),
    # full steps far from the target and small ones near it (less overshoot)
    sparsity_lambda_update: str = "proportional"
    # the behavioral weights encode() reports (and downstream models read as importance):
    # "raw" R(e_b) of eq. 22, or "unit_mean": R divided by its mean over the fit catalog's
    # items with behavior, per expert, so an average behavioral SID weighs as much as a
    # content SID (weight 1) while the ratios between items and zeros stay. R's scale is
    # arbitrary (the decoder absorbs it): on Beauty raw R averaged ~0.1, which made the
    # behavioral positions near-silent loss weights in generative retrieval
    behavior_weight_scale: str = "raw"
    behavior_dropout: float = 0.15  # share of warm items trained as cold (content-only path)
    # issue 20.6, cold -> warm without a new SID: weight of a term pulling each warm item's
    # shared latent and its content-only (cold path) latent together, per item scaled by
    # 1 - w (eq. 17's alignment strength; 1 without the controller), so items whose behavior
    # is thin keep the shared code they had on the cold path while rich items stay free.
    # 0 = the paper's model (on Beauty the shared code then agrees for 31-38% of items with the
    # tied table, ~2.5% with the untied one). 0.3, chosen on Beauty's validation split at 3
    # seeds: agreement 0.86-0.96 (0.91-0.97 for items with 1-9 interactions) and no downstream
    # cost (SID-SASRec level, retrieval ahead, ranker GAUC +4.5 seed spreads; docs/evaluation.md)
    cold_consistency_weight: float = 0.3
    # ... applied only to items whose normalised richness N_norm is below this (the richness
    # quantile under the default quantile normalisation; 1 = every item, as 1 - w alone
    # gives). On Beauty 85% of items have w < 0.5, so 1 - w pulls head items too: weight 0.3
    # raised validation tail GAUC by 0.018 and lowered head GAUC by 0.015; below 0.25 kept the
    # head and lost the tail gain (one fit each, docs/evaluation.md "Where ADC-SID loses")
    cold_consistency_below: float = 1.0

    # ---- ablations (paper Table 3) -------------------------------------------------
    use_alignment_controller: bool = True  # False: w = 1 for every item
    use_alignment_loss: bool = True  # False: no L_align_total
    use_behavior_gate: bool = True  # False: R(e_b) = 1 (equal-weight behavioral SIDs)
    use_sparsity: bool = True  # False: no L_reg

    # ---- collision regulation (AdaSID-style, issue 8; sidserve/tokenizers/adc_sid/regulation/pairs.py) ----------
    # off: no regulation; adaptive: w = (1 - compat) * load * schedule per overlap;
    # static: the same repulsion with w = 1 for every overlap (the baseline)
    collision_regulation: str = "off"
    collision_hamming: int = 0  # h: overlaps are SIDs within this Hamming distance (0 = identical)
    collision_weight: float = 0.1  # weight of the repulsion term in the total loss
    collision_margin: float = 0.5  # latents repel until their cosine is below 1 - margin
    collision_relaxation: bool = True  # stage 1: content-compatible pairs keep their code
    collision_adaptive_pressure: bool = True  # stage 2: scale by collision load and progress
    collision_compat_threshold: float = 0.9  # content cosine of a 50% compatible pair
    collision_compat_temperature: float = 0.02  # sharpness of the compatibility sigmoid
    collision_load_cap: float = 4.0  # the most a crowded region multiplies the pressure by
    collision_schedule_floor: float = 0.1  # pressure left at the end of training (starts at 1)
    collision_pairs_per_batch: int = 64  # overlapping pairs appended to every batch (2 rows each)
    collision_max_pairs: int = 100_000  # pairs kept per refresh (a random sample beyond), bounds memory
    collision_refresh_every: int = 1  # epochs between catalog-wide collision detections

    # ---- optimisation ------------------------------------------------------------
    epochs: int = 20  # passes over the catalog
    batch_size: int = 1024  # items per step (also the InfoNCE negatives pool)
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    seed: int = 0  # seeds init, shuffling, dropout and restarts

    # ---- inference -----------------------------------------------------------------
    # encode() computes each item's SID and weights from that item alone, bit for bit,
    # whatever other items share its call (exact fixed-point float64 GEMMs on one thread:
    # sidserve/tokenizers/invariant.py), so the batch job and POST /tokenize agree exactly.
    # False: plain float32, about 2.7x the offline encode rate (docs/benchmarks.md), but
    # about 4% of items' weights then differ in their last bits between batchings, and an
    # item near a tie between two codewords can change SID
    batch_invariant: bool = True

    # ----------------------------------------------------------------------------
    @property
    def sid_layout(self) -> list[dict[str, Any]]:
        """One entry per SID position: which expert (group, index) produced it."""
        layout = [{"group": "shared", "index": i} for i in range(self.num_shared_experts)]
        for m in self.content_modalities:
            layout += [{"group": m, "index": i} for i in range(self.num_content_experts)]
        if self.has_behavior:
            layout += [{"group": BEHAVIOR, "index": i} for i in range(self.num_behavior_experts)]
        for pos, entry in enumerate(layout):
            entry["position"] = pos
        return layout

    @property
    def sid_length(self) -> int:
        return len(self.sid_layout)

    @property
    def missing_code(self) -> int:
        """Code written at behavioral positions of content-only items (weight 0)."""
        return self.codebook_size

    def validate(self) -> "TokenizerConfig":
        if not self.modality_dims:
            raise ValueError("modality_dims must name at least one content modality")
        for name, dim in self.modality_dims.items():
            if name == BEHAVIOR:
                raise ValueError("'behavior' is reserved: set behavior_dim instead of modality_dims")
            if not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"modality_dims[{name!r}] must be a positive int, got {dim!r}")
        if self.behavior_dim is not None and (
            not isinstance(self.behavior_dim, int) or self.behavior_dim <= 0
        ):
            raise ValueError(f"behavior_dim must be a positive int or None, got {self.behavior_dim!r}")
        positive_ints = [
            "codebook_size", "num_shared_experts", "num_content_experts", "hidden_dim",
            "latent_dim", "expert_hidden_dim", "epochs", "batch_size", "kmeans_init_samples",
            "kmeans_iters", "restart_every",
        ]
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.has_behavior and self.num_behavior_experts <= 0:
            raise ValueError(
                f"num_behavior_experts must be positive with a behavior modality, "
                f"got {self.num_behavior_experts!r}"
            )
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if not self.cold_consistency_weight >= 0:
            raise ValueError(f"cold_consistency_weight must be >= 0, got {self.cold_consistency_weight!r}")
        if not 0 < self.cold_consistency_below <= 1:
            raise ValueError(f"cold_consistency_below must be in (0, 1], got {self.cold_consistency_below!r}")
        for name in ["tau", "lr", "sparsity_lambda_init"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.sparsity_lambda_rate > 1:
            raise ValueError(f"sparsity_lambda_rate must be > 1, got {self.sparsity_lambda_rate}")
        for name in ["behavior_dropout", "sparsity_theta", "dead_code_threshold"]:
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.behavior_quantization not in ("parallel", "residual", "residual_input"):
            raise ValueError("behavior_quantization must be 'parallel', 'residual' or 'residual_input', "
                             f"got {self.behavior_quantization!r}")
        if not self.behavior_shrinkage >= 0:
            raise ValueError(f"behavior_shrinkage must be >= 0, got {self.behavior_shrinkage!r}")
        if self.behavior_shrinkage > 0 and self.richness_signal != "popularity":
            raise ValueError(f"behavior_shrinkage={self.behavior_shrinkage!r} reads each item's popularity: "
                             f"it needs richness_signal='popularity', got {self.richness_signal!r}")
        if not self.behavior_prior_ridge > 0:
            raise ValueError(f"behavior_prior_ridge must be > 0, got {self.behavior_prior_ridge!r}")
        if self.richness_signal not in ("norm", "popularity"):
            raise ValueError(f"richness_signal must be 'norm' or 'popularity', got {self.richness_signal!r}")
        if self.richness_normalization not in ("minmax", "quantile"):
            raise ValueError(f"richness_normalization must be 'minmax' or 'quantile', got {self.richness_normalization!r}")
        if not isinstance(self.richness_quantile_points, int) or self.richness_quantile_points < 2:
            raise ValueError(f"richness_quantile_points must be an int >= 2, got {self.richness_quantile_points!r}")
        if self.behavior_weight_scale not in ("raw", "unit_mean"):
            raise ValueError(f"behavior_weight_scale must be 'raw' or 'unit_mean', got {self.behavior_weight_scale!r}")
        if self.sparsity_control not in ("threshold", "lambda"):
            raise ValueError(f"sparsity_control must be 'threshold' or 'lambda', got {self.sparsity_control!r}")
        if not 0 < self.sparsity_threshold_gain <= 5:
            raise ValueError(f"sparsity_threshold_gain must be in (0, 5], got {self.sparsity_threshold_gain!r}")
        if self.sparsity_lambda_update not in ("sign", "proportional"):
            raise ValueError(f"sparsity_lambda_update must be 'sign' or 'proportional', got {self.sparsity_lambda_update!r}")
        if self.recon_reduction not in ("sum", "mean"):
            raise ValueError(f"recon_reduction must be 'sum' or 'mean', got {self.recon_reduction!r}")
        if self.collision_regulation not in ("off", "adaptive", "static"):
            raise ValueError(
                f"collision_regulation must be 'off', 'adaptive' or 'static', got {self.collision_regulation!r}"
            )
        if not isinstance(self.collision_hamming, int) or not 0 <= self.collision_hamming < self.sid_length:
            raise ValueError(
                f"collision_hamming must be an int in [0, {self.sid_length - 1}] for SIDs of length "
                f"{self.sid_length}, got {self.collision_hamming!r}"
            )
        for name in ["collision_pairs_per_batch", "collision_max_pairs", "collision_refresh_every"]:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ["collision_weight", "collision_compat_temperature"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.collision_margin <= 2:
            raise ValueError(f"collision_margin must be in (0, 2], got {self.collision_margin!r}")
        if not -1 <= self.collision_compat_threshold <= 1:
            raise ValueError(f"collision_compat_threshold must be in [-1, 1], got {self.collision_compat_threshold!r}")
        if not self.collision_load_cap >= 1:
            raise ValueError(f"collision_load_cap must be >= 1, got {self.collision_load_cap!r}")
        if not 0 <= self.collision_schedule_floor <= 1:
            raise ValueError(f"collision_schedule_floor must be in [0, 1], got {self.collision_schedule_floor!r}")
        if not math.isfinite(self.alpha) or not math.isfinite(self.beta):
            raise ValueError(f"alpha and beta must be finite, got {self.alpha}, {self.beta}")
        return self

    # ---- (de)serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        return config_from_dict(cls, data)

    def replace(self, **changes: Any) -> "TokenizerConfig":
        return self.from_dict({**self.to_dict(), **changes})
