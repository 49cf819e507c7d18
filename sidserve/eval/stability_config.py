"""What the two-night stability simulation (sidserve/eval/stability.py) measures: the ADC-SID
configurations, night 2's embedding modes and tokenizers, and ``StabilityConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sidserve.eval.sasrec import SASRecConfig
from sidserve.eval.tokenizers import TokenizerBudget, embedding_of

MODES = ("scratch", "warm", "procrustes")
# bumped when a change moves the figures of a cached stability run (run_config.json): 2 = every
# seed fits its own tokenizers (before: one fit, only the downstream models seeded)
STABILITY_VERSION = 2
# ADC-SID configurations the simulation fits (sidserve.eval.tokenizers): the evaluation's
# (ADC_EVAL), the library's default (the same plus cold-path consistency 0.3) and the paper's
TOKENIZERS = ("adc_sid", "adc_sid_cold_consistency", "adc_sid_untied", "rqkmeans_tied", "rqevidence_tied")
# residual k-means (issue 47, item 3): no warm re-fit exists, so night 2 is either a cold re-fit or
# night 1's model as it is (a refresh without --refit), the latter also with sticky assignment of
# whole SIDs (sidserve.jobs.assign.sticky.sticky_from_paths; the margin is in relative distortion)
RESIDUAL = ("rqkmeans_tied", "rqevidence_tied")
TOKENIZER_TEXT = {
    "adc_sid": "the evaluation's configuration (e_b the tied CE SASRec's table, richness from popularity, "
               "codes at weight 1 downstream)",
    "adc_sid_cold_consistency": "the library's default (the evaluation's configuration plus cold-path consistency "
                                "0.3: `cold_consistency_weight`)",
    "adc_sid_untied": "the paper's configuration (e_b the untied CE SASRec's input table, richness from its norm, "
                      "behavioral codes scaled by R(e_b) downstream)",
    "rqkmeans_tied": "RQ-Kmeans over [text, meta, the tied CE SASRec's table] (the evaluation's `rqkmeans_tied`)",
    "rqevidence_tied": "evidence-weighted RQ-Kmeans (`rq-evidence`: content prefix, then residual levels over "
                       "[content; r b + (1 - r) W c], r = n / (n + kappa)) over the tied CE SASRec's table",
}
# night 2's tokenizers that sticky assignment is applied to: night 1's model as it is (a refresh
# without --refit), the warm re-fit, and the warm re-fit with frozen codebooks (anchored)
STICKY_KINDS = ("none", "warm", "anchored")


@dataclass
class StabilityConfig:
    data: str  # dataset directory (sequences.txt + items.jsonl)
    output: str  # cache + report directory
    holdout: int = 1  # interactions per user night 1 does not see (the newest of its training part)
    modes: list[str] = field(default_factory=lambda: list(MODES))  # night 2's behavioral embeddings
    # sticky margins; 0.3 is refresh's default for adc-sid (this page's result), 0 the plain assignment
    deltas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    # which embedding modes get the downstream SID-SASRec per setting (each ~1 SASRec training)
    downstream_modes: list[str] = field(default_factory=lambda: ["warm"])
    # codes per position the encoder scores for the sticky comparison (the assignment job's
    # --sticky-candidates, default 32); a previous code outside them cannot be kept
    candidates: int = 32
    # sticky margins that get the downstream model too (each costs one SID-SASRec per kind)
    downstream_deltas: list[float] = field(default_factory=lambda: [0.3])
    # an explicit list of setting names ("warm/none+sticky 0.3", ...) to give the downstream
    # model instead of the two rules above (each costs one SID-SASRec)
    downstream_settings: list[str] | None = None
    # seeds: each one fits every tokenizer (night 1's and night 2's re-fits) and trains night
    # 2's downstream models (SID-SASRec and ranker) with that seed, as the evaluation's seeds do;
    # None = [seed]. One fit cannot separate settings a few percent apart. The SASRecs that
    # give e_b are trained once (``seed``), as in the evaluation
    downstream_seeds: list[int] | None = None
    quick: bool = False  # subsample users and shrink every model (tests, smoke runs)
    quick_users: int = 1000
    # an evaluation output dir (sidserve evaluate) of the same dataset whose text embeddings
    # (embeddings/text.npy, meta.npy) to reuse instead of embedding the item text again
    content_from: str | None = None
    # another stability run of the same data and SASRec settings whose night tables (behavior/)
    # to reuse instead of training the nights' SASRecs again (a second tokenizer on the same nights)
    behavior_from: str | None = None
    seed: int = 0
    # the ADC-SID configuration measured (TOKENIZERS): "adc_sid", the one the evaluation chose on
    # validation (tied table, richness from popularity, codes at weight 1), so the churn and
    # quality figures describe what docs/evaluation.md recommends; "adc_sid_untied", the paper's
    # (this page's figures before 2026-12-02)
    tokenizer: str = "adc_sid"
    # the SASRec that gives e_b: its ``tied`` is set from ``tokenizer`` (the table it reads)
    sasrec: SASRecConfig = field(default_factory=lambda: SASRecConfig(loss="ce", tied=False))
    budget: TokenizerBudget = field(default_factory=TokenizerBudget)

    def validate(self) -> "StabilityConfig":
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {list(TOKENIZERS)}, got {self.tokenizer!r}")
        if not isinstance(self.holdout, int) or self.holdout < 1:
            raise ValueError(f"holdout must be an int >= 1, got {self.holdout!r}")
        bad = [m for m in [*self.modes, *self.downstream_modes] if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must name some of {list(MODES)}, got {self.modes} / {self.downstream_modes}")
        if [m for m in self.downstream_modes if m not in self.modes]:
            raise ValueError(f"downstream_modes {self.downstream_modes} must be among modes {self.modes}")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"candidates must be an int >= 1, got {self.candidates!r}")
        if any(d < 0 for d in self.deltas):
            raise ValueError(f"deltas must be >= 0, got {self.deltas}")
        seeds = self.seeds()
        if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) and x >= 0 for x in seeds):
            raise ValueError(f"downstream_seeds must be distinct ints >= 0, got {self.downstream_seeds!r}")
        if self.downstream_settings is None:
            if self.downstream_modes and [d for d in self.downstream_deltas if d not in self.deltas]:
                raise ValueError(f"downstream_deltas {self.downstream_deltas} must be among deltas {self.deltas}")
        else:  # named now, not after an hour of fits
            unknown = sorted(set(self.downstream_settings) - set(self.setting_names()))
            if unknown:
                raise ValueError(f"downstream_settings {unknown} are not settings of this run; "
                                 f"settings: {self.setting_names()}")
        self.sasrec.validate()
        return self

    def setting_names(self) -> list[str]:
        """Every night-2 setting the run measures, in its report's order."""
        names = []
        for mode in self.modes:
            names.append(f"{mode}/cold")
            for kind in self.sticky_kinds():
                names += [f"{mode}/{kind}"] + [f"{mode}/{kind}+sticky {d:g}" for d in self.deltas]
            if self.tokenizer in RESIDUAL:  # the previous SID scored itself, not looked up in the beam
                names += [f"{mode}/none+direct {d:g}" for d in self.deltas]
        return names

    def sticky_kinds(self) -> tuple[str, ...]:
        """Night 2's models that sticky assignment is applied to: every STICKY_KIND for ADC-SID,
        night 1's model as it is ("none") for residual k-means, which has no warm re-fit."""
        return ("none",) if self.tokenizer in RESIDUAL else STICKY_KINDS

    def seeds(self) -> list[int]:
        return [self.seed] if self.downstream_seeds is None else list(self.downstream_seeds)

    def tied(self) -> bool:
        """Whether e_b is a tied SASRec's item table (else an untied one's input table)."""
        return embedding_of(self.tokenizer, "untied-input") == "tied"

    @classmethod
    def quick_profile(cls, data: str, output: str, **kw) -> "StabilityConfig":
        c = cls(data=data, output=output, quick=True, **kw)
        c.sasrec = dataclasses.replace(c.sasrec, max_epochs=4, patience=2, batch_size=64, max_len=20)
        c.budget = dataclasses.replace(c.budget, adc_epochs=3, batch_size=256)
        return c


# what a committed cache leaves out: rebuilt from --content-from or the text model, or temporary
GITIGNORE = """# written by sidserve stability: everything else here is kept (commit it to resume elsewhere)
embeddings.npz
*.tmp.npz
*.tmp-*
*.ckpt.pt
"""
