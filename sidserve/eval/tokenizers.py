"""The tokenizers compared by the evaluation, built on the same inputs with the same
SID budget (paper's public setting: K = 100 codes per position, length 6).

- ``adc_sid``: ADC-SID, N_s = 1 shared, 1 expert per content modality (text, meta),
  N_b = 3 behavioral experts, in the configuration chosen on the validation split
  (``ADC_EVAL``): e_b is the tied CE SASRec table, richness is read from training popularity,
  and downstream models read its codes at weight 1. Its ablations and other variants inherit it.
- ``adc_sid_untied``: ADC-SID as the paper specifies it, which ``adc_sid`` was until
  2026-12-02: e_b is the run's ``behavior_embedding`` (the untied input table, whose norm grows
  with popularity), richness is its norm, and downstream models scale behavioral codes by R(e_b).
- ``adc_sid_no_controller`` / ``_no_align`` / ``_no_gate`` / ``_no_sparsity``: the
  paper's Table 3 ablations (one switch each).
- ``rqvae`` (TIGER) and ``opq``: content-only, on [text, meta].
- ``rqkmeans``: residual k-means on [text, meta, behavior] (behavior-aware baseline).
- ``rqkmeans_content`` (optional): the same on [text, meta] only: what the behavioral part of
  ``rqkmeans``'s input adds to its SIDs.
- ``adc_sid_adasid`` / ``_static`` / ``_no_relaxation`` / ``_no_pressure`` (optional,
  issue 8): ADC-SID with adaptive collision regulation, the static-repulsion baseline, and
  each of its two stages switched off.
- ``letter`` (optional): the 4 x 256 SIDs that LETTER published for Beauty, read from
  ``items.jsonl`` (an external reference with its own budget; no reconstruction).
- ``rqkmeans_tied`` (optional): ``rqkmeans`` fed the tied CE SASRec's item table as e_b
  instead of the run's ``behavior_embedding`` (``EMBEDDING_VARIANTS``): each tokenizer with
  the behavior table that validates best for it (on Beauty, SID-SASRec validation NDCG@10
  0.0512 against 0.0398 with the untied input table; ADC-SID was worse with it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

import numpy as np

from sidserve.metrics import quantization_report
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.tokenizer import SemanticIdTokenizer
from sidserve.tokenizers.baselines import (
    OPQConfig,
    OPQTokenizer,
    RQKmeansTokenizer,
    RQVAEConfig,
    RQVAETokenizer,
)
from sidserve.tokenizers.baselines.common import BaselineConfig
from sidserve.tokenizers.baselines.rqevidence import EvidenceRQConfig, EvidenceRQTokenizer
from sidserve.tokenizers.config import BEHAVIOR

ABLATIONS = {
    "adc_sid_no_controller": {"use_alignment_controller": False},
    "adc_sid_no_align": {"use_alignment_loss": False},
    "adc_sid_no_gate": {"use_behavior_gate": False},
    "adc_sid_no_sparsity": {"use_sparsity": False},
}
# issue 8: ADC-SID with collision regulation (overlaps within Hamming 1; identical SIDs
# are rare for ADC-SID on Beauty), the static baseline and each stage ablated
REGULATION = {"collision_regulation": "adaptive", "collision_hamming": 1}  # default weight 0.1
REGULATED = {
    "adc_sid_adasid": REGULATION,
    "adc_sid_adasid_static": {**REGULATION, "collision_regulation": "static"},
    "adc_sid_adasid_no_relaxation": {**REGULATION, "collision_relaxation": False},
    "adc_sid_adasid_no_pressure": {**REGULATION, "collision_adaptive_pressure": False},
}
# issue 20.6: each warm item's shared latent pulled toward its content-only one, scaled by
# 1 - w (thin behavior pulled, rich behavior free), so a new item keeps its shared code when
# its first interactions arrive. 0.3: the smallest of 0.1 / 0.3 / 1 whose agreement reaches
# 0.8 for the thinnest items under the refresh's sticky 0.3 (bench/cold_to_warm.py,
# docs/stability.md); this variant measures what it costs downstream
COLD_CONSISTENCY = {"adc_sid_cold_consistency": {"cold_consistency_weight": 0.3}}
# ADC-SID as the evaluation runs it, each setting chosen on the validation split (one fit,
# seed 0; docs/evaluation.md, "ADC-SID on the tied table"): against the paper's configuration
# (adc_sid_untied), SID-SASRec NDCG@10 0.0458 vs 0.0376, ranker GAUC 0.8190 vs 0.8106.
ADC_EVAL = {
    # the table SID-SASRec and the ranker score with: ADC-SID's codes then describe it
    # (held-out R^2 0.44 vs 0.11 for the untied input table's codes)
    "embedding": "tied",
    # the tied table's norm falls with popularity (Spearman -0.72): the controller and gate
    # read what the norm stands in for instead
    "overrides": {"richness_signal": "popularity"},
    # R(e_b) as a scale of the behavioral codes' embeddings cost SID-SASRec 0.0305 vs 0.0458
    # (weights raw; unit_mean as bad) and the ranker 0.8076 vs 0.8190 at weight 1
    "sid_weights": False,
}
# the paper's configuration, adc_sid before 2026-12-02 (its stages keep their cache)
ADC_UNTIED = {"adc_sid_untied": {}}
ADC_VARIANTS = {**ABLATIONS, **REGULATED, **COLD_CONSISTENCY, **ADC_UNTIED}
DEFAULT_TOKENIZERS = ["adc_sid", *ABLATIONS, "rqvae", "rqkmeans", "opq"]
# a tokenizer fitted on another SASRec table as e_b than the run's behavior_embedding:
# name -> (the tokenizer, the table; a key of sidserve.eval.config.EMBEDDING_SOURCE)
EMBEDDING_VARIANTS = {"rqkmeans_tied": ("rqkmeans", "tied"),
                      # issue 47: a content prefix, then [content; behavior weighted by evidence]
                      # (sidserve/tokenizers/baselines/rqevidence.py), on the table the judges use
                      "rqevidence_tied": ("rqevidence", "tied")}
ALL_TOKENIZERS = [*DEFAULT_TOKENIZERS, *REGULATED, *COLD_CONSISTENCY, "rqkmeans_content", "letter",
                  *EMBEDDING_VARIANTS, *ADC_UNTIED]
LABELS = {
    "adc_sid": "ADC-SID", "adc_sid_no_controller": "w/o alignment controller",
    "adc_sid_no_align": "w/o alignment loss", "adc_sid_no_gate": "w/o behavioral weighting gate",
    "adc_sid_no_sparsity": "w/o sparsity regularisation", "rqvae": "RQ-VAE", "rqkmeans": "RQ-Kmeans",
    "opq": "OPQ", "letter": "LETTER (published SIDs)", "rqkmeans_content": "RQ-Kmeans, content only",
    "adc_sid_adasid": "ADC-SID + collision regulation", "adc_sid_adasid_static": "+ static repulsion",
    "adc_sid_adasid_no_relaxation": "+ regulation w/o relaxation",
    "adc_sid_adasid_no_pressure": "+ regulation w/o load/progress",
    "adc_sid_cold_consistency": "ADC-SID + cold-path consistency 0.3",
    "rqkmeans_tied": "RQ-Kmeans, e_b = tied CE table",
    "rqevidence_tied": "Evidence-weighted RQ-Kmeans, content prefix, tied table",
    "adc_sid_untied": "ADC-SID, paper's configuration (untied e_b, norm, weights)",
}


def base_tokenizer(name: str) -> str:
    """The tokenizer an embedding variant fits (``rqkmeans_tied`` -> ``rqkmeans``)."""
    return EMBEDDING_VARIANTS[name][0] if name in EMBEDDING_VARIANTS else name


def in_adc_eval(name: str) -> bool:
    """Whether ``name`` is ADC-SID in the evaluation's configuration (``ADC_EVAL``) or a
    variant of it (every ADC-SID variant except ``adc_sid_untied``)."""
    return (name == "adc_sid" or name in ADC_VARIANTS) and name not in ADC_UNTIED


def embedding_of(name: str, default: str | None) -> str | None:
    """The SASRec table tokenizer ``name`` reads as e_b: an embedding variant's own
    (``rqkmeans_tied`` -> ``tied``), ADC-SID's (``ADC_EVAL``), else ``default`` (the run's
    ``behavior_embedding``)."""
    if name in EMBEDDING_VARIANTS:
        return EMBEDDING_VARIANTS[name][1]
    return ADC_EVAL["embedding"] if in_adc_eval(name) else default


def uses_sid_weights(name: str) -> bool:
    """Whether downstream models read ``name``'s behavioral weights (False: every code at 1)."""
    return ADC_EVAL["sid_weights"] if in_adc_eval(name) else True


def family_overrides(name: str) -> dict:
    """Config fields ``name`` is fitted with beyond the budget's: ADC_EVAL's for ADC-SID in the
    evaluation's configuration, then the variant's own switches (an ablation's, ...)."""
    return {**(ADC_EVAL["overrides"] if in_adc_eval(name) else {}), **ADC_VARIANTS.get(name, {})}


def spec(name: str, default_embedding: str) -> dict:
    """What ``name``'s SIDs and downstream stages depend on beyond the run's settings (which
    ``run_config.json`` pins, the budget among them), recorded in each of its stage files and
    compared when the cache is read (a changed variant is refused, not mixed in)."""
    return {"tokenizer": base_tokenizer(name), "embedding": embedding_of(name, default_embedding),
            "overrides": family_overrides(name), "sid_weights": uses_sid_weights(name)}


def legacy_spec(name: str, default_embedding: str) -> dict:
    """The spec of a fit cached before fits recorded one (before 2026-12-02): ADC-SID and its
    variants read the run's e_b with their own switches only, and every tokenizer's weights."""
    embedding = EMBEDDING_VARIANTS[name][1] if name in EMBEDDING_VARIANTS else default_embedding
    return {"tokenizer": base_tokenizer(name), "embedding": embedding,
            "overrides": dict(ADC_VARIANTS.get(name, {})), "sid_weights": True}


@dataclass
class TokenizerBudget:
    codebook_size: int = 100  # K (paper's public setting)
    sid_length: int = 6  # L = N_s + N_t + N_v + N_b = 1 + 1 + 1 + 3
    adc_epochs: int = 20  # ADC-SID passes over the catalog
    # RQ-VAE: 400 passes of 256-item batches (~19k steps on Beauty), chosen on validation
    # (ranker GAUC 0.784 at 20 x 1024, 0.796 at 20 x 256, 0.804 at 100, 0.806 at 400;
    # docs/evaluation/selection-rqvae.jsonl); TIGER trains its RQ-VAE far longer still
    rqvae_epochs: int = 400
    batch_size: int = 256  # items per step (RQ-VAE)
    # items per step of ADC-SID: 256 gives ~1,000 steps on Beauty, which its sparsity
    # controller needs to settle (at 1024, 240 steps: sparsity swung 0.1-0.9)
    adc_batch_size: int = 256
    seed: int = 0
    # extra fields of the fitted tokenizer's own config (``config_class(name)``: TokenizerConfig
    # for ADC-SID and its variants, RQVAEConfig for RQ-VAE, ...): selection trials, ablations
    overrides: dict = field(default_factory=dict)


def config_class(name: str) -> type:
    """The config dataclass whose fields ``TokenizerBudget.overrides`` may set for ``name``."""
    name = base_tokenizer(name)
    if name == "adc_sid" or name in ADC_VARIANTS:
        return TokenizerConfig
    classes = {"rqvae": RQVAEConfig, "opq": OPQConfig, "rqkmeans": BaselineConfig, "rqkmeans_content": BaselineConfig,
               "rqevidence": EvidenceRQConfig}
    if name not in classes:
        raise ValueError(f"tokenizer {name!r} has no config to override; choose from "
                         f"{sorted(['adc_sid', *ADC_VARIANTS, *classes])}")
    return classes[name]


@dataclass
class Tokenized:
    """What the downstream stages read: sid (N, L) int32, weights (N, L) float32 (R(e_b)
    at behavioral positions, 1 elsewhere), and the quantization metrics."""

    sid: np.ndarray
    weights: np.ndarray
    quantization: dict
    codebook_size: int
    tokenizer: object | None = None  # the fitted tokenizer (None for 'letter')


def _adc_config(dims: dict[str, int], behavior_dim: int, b: TokenizerBudget, family: dict | None = None,
                **switches) -> TokenizerConfig:
    content_positions = 1 + len(dims)  # 1 shared + 1 per content modality
    nb = b.sid_length - content_positions
    if nb <= 0:
        raise ValueError(f"sid_length={b.sid_length} leaves no behavioral position with {len(dims)} modalities")
    fields = dict(codebook_size=b.codebook_size, num_shared_experts=1, num_content_experts=1,
                  num_behavior_experts=nb, epochs=b.adc_epochs, batch_size=b.adc_batch_size, seed=b.seed,
                  # the evaluation's ADC-SID and its ablations are the paper's losses; the
                  # consistency term (the library's default since 2026-12-02) is measured as its
                  # own variant, adc_sid_cold_consistency, so each cached name keeps its meaning
                  cold_consistency_weight=0.0)
    fields.update(family or {})  # ADC_EVAL's settings (none for adc_sid_untied)
    fields.update(b.overrides)  # overrides win over the shared budget (e.g. batch_size)
    fields.update(switches)
    return replace(TokenizerConfig(modality_dims=dict(dims), behavior_dim=behavior_dim), **fields).validate()


POPULARITY_BUCKETS = (("1", 1, 1), ("2-10", 2, 10), ("11-100", 11, 100), ("100+", 101, np.inf))


def weight_by_popularity(values: np.ndarray, popularity: np.ndarray) -> dict[str, float | None]:
    """(N,) per-item values -> their mean per training-popularity bucket (1 / 2-10 / 11-100 /
    100+ interactions; None for an empty bucket): issue 47's check that behavioral weights rise
    with an item's evidence."""
    out = {}
    for label, lo, hi in POPULARITY_BUCKETS:
        sel = (popularity >= lo) & (popularity <= hi)
        out[label] = float(values[sel].mean()) if sel.any() else None
    return out


def fit_tokenizer(name: str, items: dict, dims: dict[str, int], behavior_dim: int, b: TokenizerBudget,
                  letter_sids: list | None = None) -> Tokenized:
    """items: the numpy item dict (``<modality>_emb`` (N, d), ``behavior_emb`` (N, d_b)): for an
    embedding variant, the caller passes its table as ``behavior_emb``."""
    name = base_tokenizer(name)
    if name == "letter":
        if letter_sids is None:
            raise ValueError("tokenizer 'letter' needs items.jsonl entries with 'letter_sid'")
        sid = parse_letter_sids(letter_sids)
        k = int(sid.max()) + 1
        return Tokenized(sid, np.ones(sid.shape, np.float32), quantization_report(sid, k), k)
    if name == "adc_sid" or name in ADC_VARIANTS:
        family = ADC_EVAL["overrides"] if in_adc_eval(name) else {}  # under the budget's overrides (trials)
        tok = SemanticIdTokenizer(_adc_config(dims, behavior_dim, b, family, **ADC_VARIANTS.get(name, {}))).fit(items)
        enc = tok.encode(items)
        weights = np.ones(enc.sid.shape, np.float32)
        beh = [p["position"] for p in tok.sid_layout if p["group"] == BEHAVIOR]
        weights[:, beh] = enc.behavior_weights
        q = dict(tok.stats_["fit_metrics"])
        q["behavior_weight_mean_per_position"] = enc.behavior_weights.mean(0).round(6).tolist()
        # issue 47, item 2: R(e_b) by popularity bucket, mean and share of zeros over the positions
        pop = np.asarray(items["popularity"], np.float64)
        q["behavior_weight_by_popularity"] = weight_by_popularity(enc.behavior_weights.mean(1), pop)
        q["behavior_weight_zero_share_by_popularity"] = weight_by_popularity(
            (enc.behavior_weights == 0).mean(1), pop)
        if tok.history_:  # the gates at the end of training (issue 17's per-epoch statistics)
            q["last_epoch"] = {k: v for k, v in tok.history_[-1].items()
                               if k.startswith(("gate_", "sparsity_", "align_w"))}
        return Tokenized(enc.sid, weights, q, b.codebook_size, tok)
    base = dict(modality_dims=dict(dims), behavior_dim=behavior_dim, codebook_size=b.codebook_size,
                num_levels=b.sid_length, seed=b.seed)
    if name == "rqevidence":
        cls = config_class(name)
        unknown = sorted(set(b.overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"overrides {unknown} are not {cls.__name__} fields (tokenizer {name!r})")
        tok = EvidenceRQTokenizer(cls(**{**base, **b.overrides})).fit(items)
        enc = tok.encode(items)
        q = dict(tok.stats_["fit_metrics"])
        # issue 47, item 2: the exported weights per popularity bucket (1 / 2-10 / 11-100 / 100+)
        pop = np.asarray(items["popularity"], np.float64)
        w = enc.behavior_weights[:, 0] if enc.behavior_weights.shape[1] else np.zeros(len(pop))
        q["behavior_weight_by_popularity"] = weight_by_popularity(w, pop)
        # downstream models read every code at weight 1, as for the other residual baselines
        return Tokenized(enc.sid, np.ones(enc.sid.shape, np.float32), q, b.codebook_size, tok)
    if name not in ("rqvae", "opq", "rqkmeans", "rqkmeans_content"):
        raise ValueError(f"unknown tokenizer {name!r}; choose from {ALL_TOKENIZERS}")
    if name == "rqvae":
        base.update(epochs=b.rqvae_epochs, batch_size=b.batch_size)
    elif name != "opq":
        base.update(use_behavior=name == "rqkmeans")
    cls = config_class(name)
    unknown = sorted(set(b.overrides) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"overrides {unknown} are not {cls.__name__} fields (tokenizer {name!r})")
    config = cls(**{**base, **b.overrides})
    tok = {"rqvae": RQVAETokenizer, "opq": OPQTokenizer}.get(name, RQKmeansTokenizer)(config)
    tok.fit(items)
    enc = tok.encode(items)
    return Tokenized(enc.sid, np.ones(enc.sid.shape, np.float32), dict(tok.stats_["fit_metrics"]),
                     b.codebook_size, tok)


_LETTER = re.compile(r"<[a-z]_(\d+)>")


def parse_letter_sids(values: list) -> np.ndarray:
    """['<a_183>', '<b_70>', ...] per item -> (N, L) int32."""
    rows = []
    for i, v in enumerate(values):
        if not v:
            raise ValueError(f"item {i + 1} has no letter_sid")
        codes = [_LETTER.fullmatch(x) for x in v]
        if not all(codes):
            raise ValueError(f"item {i + 1}: letter_sid {v!r} is not of the form '<a_N>'")
        rows.append([int(m.group(1)) for m in codes])
    if len({len(r) for r in rows}) != 1:
        raise ValueError("letter_sid lengths differ between items")
    return np.asarray(rows, dtype=np.int32)
