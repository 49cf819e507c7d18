"""ADC-SID behavior-content mixture-of-quantization network (paper §3.2-3.4).

One forward pass, for a batch of B items:

    h_m = D_m(e_m)                    content projections            (eq. 2)
    h_b = D_b(e_b), or a learned "missing behavior" vector for cold items
    z_s,i = E_s,i([h_t, h_v, h_b])    shared experts                 (eq. 3-4)
    z_m,i = E_m,i(e_m), z_b,i = E_b,i(e_b)   specific experts        (eq. 6, typo fixed)
    codes = argmax cosine per expert codebook                        (eq. 5, 7-9)
      or, behavior_quantization="residual": r_0 = unit E_b(e_b), level i picks the nearest
      codeword q_i of r_i (Euclidean), r_i+1 = r_i - q_i; z_b,i := q_i
      or "residual_input": the same levels on r_0 = e_b itself; z_b,i := W q_i
    z  = sum z_s + sum g_m z_m + sum R(e_b) z_b,  z_q likewise       (eq. 10-13, 22)
    L_recon = ||e - decoder(z + sg(z_q - z))||^2                     (eq. 14, summed over
                                                                      elements; config.recon_reduction)
    L_align = content pairs + w * behavior pairs                     (eq. 15-21)
    L_reg   = lambda * load-balanced L1 of R(e_b)                    (eq. 23)

Latents are unit-normalised before fusion, so z and z_q live on the same scale and the
straight-through residual z_q - z is small.
"""

from __future__ import annotations

import torch
from torch import nn

from sidserve.tokenizers import invariant
from sidserve.tokenizers.adc_sid.config import TokenizerConfig
from sidserve.tokenizers.adc_sid.model.alignment import (
    behavior_alignment_loss,
    content_alignment_loss,
)
from sidserve.tokenizers.adc_sid.model.codebook import CosineCodebook
from sidserve.tokenizers.adc_sid.model.controller import (
    alignment_strength,
    catalog_quantiles,
    normalized_norm,
    quantile_normalized,
)
from sidserve.tokenizers.adc_sid.model.encode import encode
from sidserve.tokenizers.adc_sid.model.euclidean_codebook import EuclideanCodebook
from sidserve.tokenizers.adc_sid.model.experts import MLP
from sidserve.tokenizers.adc_sid.model.gates import BehaviorWeightingGate, ContentGate
from sidserve.tokenizers.adc_sid.model.io import ModelInput, ModelOutput, fill_missing
from sidserve.tokenizers.adc_sid.model.sparsity import SparsityRegularizer


class ADCSIDModel(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        c = config.validate()
        self.config = c
        H, D, X, K = c.hidden_dim, c.latent_dim, c.expert_hidden_dim, c.codebook_size
        mods = c.content_modalities

        def codebook():
            return CosineCodebook(dim=D, codebook_size=K, commitment_weight=c.commitment_weight)

        # projections D_m (eq. 2)
        self.proj = nn.ModuleDict({m: MLP(c.modality_dims[m], H, H) for m in mods})
        shared_in = H * len(mods)
        if c.has_behavior:
            self.proj_b = MLP(c.behavior_dim, H, H)
            self.missing_h_b = nn.Parameter(torch.zeros(H))  # stands in for h_b of cold items
            shared_in += H
        # experts and their codebooks (eq. 4-9)
        self.shared_experts = nn.ModuleList([MLP(shared_in, X, D) for _ in range(c.num_shared_experts)])
        self.shared_codebooks = nn.ModuleList([codebook() for _ in range(c.num_shared_experts)])
        self.content_experts = nn.ModuleDict(
            {m: nn.ModuleList([MLP(c.modality_dims[m], X, D) for _ in range(c.num_content_experts)]) for m in mods}
        )
        self.content_codebooks = nn.ModuleDict(
            {m: nn.ModuleList([codebook() for _ in range(c.num_content_experts)]) for m in mods}
        )
        self.content_gates = nn.ModuleDict(
            {m: ContentGate(dim=c.modality_dims[m], num_experts=c.num_content_experts, hidden_dim=X) for m in mods}
        )
        if c.has_behavior:
            Nb = c.num_behavior_experts
            if c.behavior_quantization == "residual":  # one expert, N_b residual levels
                self.behavior_experts = nn.ModuleList([MLP(c.behavior_dim, X, D)])
                self.behavior_codebooks = nn.ModuleList([
                    EuclideanCodebook(dim=D, codebook_size=K, commitment_weight=c.commitment_weight)
                    for _ in range(Nb)])
            elif c.behavior_quantization == "residual_input":  # N_b residual levels of e_b itself
                self.behavior_experts = nn.ModuleList()
                self.behavior_codebooks = nn.ModuleList([
                    EuclideanCodebook(dim=c.behavior_dim, codebook_size=K, commitment_weight=c.commitment_weight)
                    for _ in range(Nb)])
                self.behavior_out = nn.Linear(c.behavior_dim, D, bias=False)  # a level's codeword -> fusion
            else:
                self.behavior_experts = nn.ModuleList([MLP(c.behavior_dim, X, D) for _ in range(Nb)])
                self.behavior_codebooks = nn.ModuleList([codebook() for _ in range(Nb)])
            self.behavior_gate = BehaviorWeightingGate(
                dim=c.behavior_dim, num_experts=Nb, hidden_dim=X, bias_init=c.gate_bias_init,
                straight_through=c.gate_straight_through,
            )
            self.sparsity = SparsityRegularizer(
                theta=c.sparsity_theta, lambda_init=c.sparsity_lambda_init, rate=c.sparsity_lambda_rate,
                update=c.sparsity_lambda_update,
            )
        if c.has_behavior and c.behavior_shrinkage > 0:
            # W of behavior_shrinkage: content -> e_b, a ridge fit (fit_input_stats), not trained
            self.behavior_prior = invariant.Linear(sum(c.modality_dims[m] for m in mods), c.behavior_dim)
            self.behavior_prior.requires_grad_(False)
        out_dim = sum(c.modality_dims.values()) + (c.behavior_dim or 0)
        self.decoder = MLP(D, X, out_dim)
        # catalog statistics (eq. 15), set before training from the whole catalog
        self.register_buffer("n_min", torch.tensor(0.0))
        self.register_buffer("n_max", torch.tensor(1.0))
        # ||e_b|| quantiles over the fit sample (richness_normalization="quantile")
        self.register_buffer("richness_quantiles", torch.zeros(c.richness_quantile_points))
        # per reconstructed part (content modalities, then behavior): 1 / mean ||e_m||^2
        # over the fit sample (recon_balance); ones otherwise
        n_parts = len(mods) + (1 if c.has_behavior else 0)
        self.register_buffer("recon_scale", torch.ones(n_parts))
        # divisor of the reported behavioral weights (behavior_weight_scale="unit_mean"),
        # set after training from the catalog; the fusion always uses R itself
        self.register_buffer("weight_scale", torch.ones(c.num_behavior_experts if c.has_behavior else 0))

    # ------------------------------------------------------------------------------
    def behavior_residual(self, e_b: torch.Tensor) -> torch.Tensor | None:
        """e_b (B, d_b) -> what the first behavioral level quantizes: the expert's unit latent
        (B, D) for "residual", e_b itself for "residual_input", None for parallel experts."""
        mode = self.config.behavior_quantization
        if mode == "residual":
            return invariant.normalize(self.behavior_experts[0](e_b))
        return e_b if mode == "residual_input" else None

    @property
    def codebooks(self) -> list[CosineCodebook]:
        """All codebooks in SID layout order."""
        books = list(self.shared_codebooks)
        for m in self.config.content_modalities:
            books += list(self.content_codebooks[m])
        if self.config.has_behavior:
            books += list(self.behavior_codebooks)
        return books

    def set_catalog_stats(self, n_min: float, n_max: float) -> None:
        if not n_max > n_min:
            raise ValueError(f"catalog stats need n_max > n_min, got n_min={n_min}, n_max={n_max}")
        self.n_min.fill_(float(n_min))
        self.n_max.fill_(float(n_max))
        self._host_stats = None

    @torch.no_grad()
    def fit_input_stats(self, sample: ModelInput) -> None:
        """Statistics read from a uniform sample of the catalog before training: the
        richness quantiles and the per-modality reconstruction scales."""
        c = self.config
        if c.has_behavior and c.behavior_shrinkage > 0:
            self.fit_behavior_prior(sample)
            sample = self.shrink_behavior(sample)
        parts = [sample.content[m] for m in c.content_modalities]
        if c.has_behavior:
            e_b = sample.behavior[sample.has_behavior]
            if e_b.shape[0] == 0:
                raise ValueError("the fit sample has no item with a behavior embedding")
            parts.append(e_b)
            signal = self.richness_signal(e_b, _rows(sample.popularity, sample.has_behavior))
            self.richness_quantiles.copy_(catalog_quantiles(signal.double(), c.richness_quantile_points))
            self._host_stats = None
        if c.recon_balance:
            energy = torch.stack([(p.double() ** 2).sum(-1).mean() for p in parts])
            if not bool((energy > 0).all()):
                raise ValueError("an input modality is all zeros in the fit sample: cannot balance L_recon")
            self.recon_scale.copy_((1.0 / energy).to(self.recon_scale))

    def _trust(self, x: ModelInput) -> torch.Tensor:
        """(B, 1) a = pop / (pop + k) of behavior_shrinkage (0 for rows without behavior)."""
        if x.popularity is None:
            raise ValueError("behavior_shrinkage needs each item's 'popularity' (column or field)")
        pop = fill_missing(x.popularity, x.has_behavior).to(torch.float64).clamp_min(0.0)
        return (pop / (pop + self.config.behavior_shrinkage)).unsqueeze(-1)

    @torch.no_grad()
    def fit_behavior_prior(self, sample: ModelInput) -> None:
        """W of behavior_shrinkage: ridge regression of e_b on the concatenated content
        embeddings over the sample's items with behavior, each weighted by its trust a (so
        the map is learned from the items whose e_b means something); bias unpenalised."""
        c = self.config
        rows = sample.has_behavior
        if not bool(rows.any()):
            raise ValueError("the fit sample has no item with a behavior embedding")
        X = torch.cat([sample.content[m][rows] for m in c.content_modalities], -1).double()  # (n, d_c)
        Y = sample.behavior[rows].double()  # (n, d_b)
        a = self._trust(sample)[rows]  # (n, 1)
        mx, my = (a * X).sum(0) / a.sum(), (a * Y).sum(0) / a.sum()
        Xc, Yc = X - mx, Y - my
        gram = Xc.t() @ (a * Xc) + c.behavior_prior_ridge * torch.eye(X.shape[1], dtype=torch.float64)
        W = torch.linalg.solve(gram, Xc.t() @ (a * Yc))  # (d_c, d_b)
        self.behavior_prior.weight.copy_(W.t().to(self.behavior_prior.weight))
        self.behavior_prior.bias.copy_((my - mx @ W).to(self.behavior_prior.bias))

    def shrink_behavior(self, x: ModelInput) -> ModelInput:
        """x with e_b' = a e_b + (1 - a) W [e_m] (behavior_shrinkage; x unchanged when off)."""
        c = self.config
        if not (c.has_behavior and c.behavior_shrinkage > 0):
            return x
        if not bool(x.has_behavior.any()):
            return x  # nothing reads a missing row's e_b
        prior = self.behavior_prior(torch.cat([x.content[m] for m in c.content_modalities], -1))  # (B, d_b)
        a = self._trust(x).to(prior.dtype)  # (B, 1)
        e_b = torch.where(x.has_behavior.unsqueeze(-1), a * x.behavior + (1 - a) * prior, x.behavior)
        return ModelInput(x.content, e_b, x.has_behavior, x.popularity)

    @torch.no_grad()
    def set_weight_scale(self, mean_r: torch.Tensor) -> None:
        """mean_r (N_b,): mean R(e_b) per expert over the catalog's items with behavior.
        With behavior_weight_scale="unit_mean" the reported weights are divided by it (an
        expert whose mean is 0, closed for every item, keeps divisor 1); no-op for "raw"."""
        if self.config.behavior_weight_scale != "unit_mean":
            return
        mean_r = mean_r.to(self.weight_scale)
        self.weight_scale.copy_(torch.where(mean_r > 0, mean_r, torch.ones_like(mean_r)))

    def richness_signal(self, e_b: torch.Tensor, popularity: torch.Tensor | None) -> torch.Tensor:
        """(B,) raw richness of items with behavior: ||e_b|| or log(1 + popularity)."""
        if self.config.richness_signal == "popularity":
            if popularity is None and e_b.shape[0] == 0:  # no item with behavior in this batch
                return e_b.new_zeros(0)
            if popularity is None:
                raise ValueError("richness_signal='popularity' needs each item's 'popularity' (column or field)")
            return invariant.pointwise(torch.log1p, popularity.to(torch.float64).clamp_min(0.0)).to(e_b.dtype)
        return invariant.row_norm(e_b)

    def host_stats(self) -> tuple[float, float, bool]:
        """(N_min, N_max, quantiles set) as host values, read from the buffers once after each
        change (set_catalog_stats, fit_input_stats, load_state_dict), not on every forward:
        on a GPU each read would be a device-to-host sync."""
        if getattr(self, "_host_stats", None) is None:
            q = self.richness_quantiles
            self._host_stats = (float(self.n_min), float(self.n_max), bool(q[-1] > q[0]))
        return self._host_stats

    def _load_from_state_dict(self, *args, **kwargs):
        self._host_stats = None  # the buffers are about to change
        super()._load_from_state_dict(*args, **kwargs)

    def richness(self, e_b: torch.Tensor, popularity: torch.Tensor | None = None) -> torch.Tensor:
        """e_b (B, d_b) (and popularity (B,) for that signal) -> N_norm (B,) in [0, 1]:
        eq. 16 or its quantile form, of ||e_b|| or log(1 + popularity)."""
        c = self.config
        q = self.richness_quantiles
        n_min, n_max, quantiles_set = self.host_stats()
        if c.richness_normalization == "minmax" and c.richness_signal == "norm":
            return normalized_norm(e_b, n_min, n_max)
        if not quantiles_set:
            raise ValueError("richness quantiles are not set (or the signal is constant over the fit sample): "
                             "call fit_input_stats (init_codebooks) first")
        signal = self.richness_signal(e_b, popularity)
        if c.richness_normalization == "quantile":
            return quantile_normalized(signal, q)
        # min-max of log-popularity over the fit sample's range (eq. 16's form)
        return ((signal - q[0]) / (q[-1] - q[0])).clamp(0.0, 1.0)

    def cold_consistency(self, h: dict[str, torch.Tensor], warm: torch.Tensor, rows: torch.Tensor,
                         n_norm: torch.Tensor, shared_z: list[torch.Tensor]) -> torch.Tensor:
        """sum_i (1 - w_i) * sum_s (1 - cos(z_s(i), z_s(i | behavior withheld))) / B_b over the items
        whose behavior this step fed (``rows``: items with behavior, ``n_norm`` their richness;
        ``warm``: (B,) not dropped out) and whose N_norm is below ``cold_consistency_below``.
        Gradients reach both paths: the cold path learns where thin warm items land, and thin
        items' shared latents stay near their content-only ones."""
        c = self.config
        fed = warm[rows]  # (B_b,)
        r = rows[fed]
        if r.numel() == 0:
            return torch.zeros((), device=warm.device)
        cold_in = torch.cat([h[m][r] for m in c.content_modalities] + [self.missing_h_b.expand(r.numel(), -1)],
                            dim=-1)
        thin = 1 - alignment_strength(n_norm[fed], c.alpha, c.beta).detach() if c.use_alignment_controller \
            else torch.ones(r.numel(), device=warm.device)
        if c.cold_consistency_below < 1:
            thin = thin * (n_norm[fed] < c.cold_consistency_below)
        gap = sum(1 - torch.nn.functional.cosine_similarity(z[r], expert(cold_in), dim=-1)
                  for z, expert in zip(shared_z, self.shared_experts))
        return (thin * gap).sum() / rows.numel()

    # ------------------------------------------------------------------------------
    def shared_input(self, x: ModelInput, warm: torch.Tensor):
        """The content projections h_m (B, H) per modality (eq. 2), h_b = D_b(e_b) (B, H) or None,
        and the shared experts' input [h_t, h_v, h_b] (B, sum H) where rows not ``warm`` (B,) bool
        read the learned missing-behavior vector instead of h_b."""
        c = self.config
        h = {m: self.proj[m](x.content[m]) for m in c.content_modalities}  # (B, H) each
        if not c.has_behavior:
            return h, None, torch.cat([h[m] for m in c.content_modalities], dim=-1)
        h_b = self.proj_b(x.behavior)  # (B, H)
        h_b_used = torch.where(warm.unsqueeze(-1), h_b, self.missing_h_b.expand(x.batch_size, -1))
        return h, h_b, torch.cat([h[m] for m in c.content_modalities] + [h_b_used], dim=-1)

    # ------------------------------------------------------------------------------
    def forward(self, x: ModelInput, *, behavior_dropout: float = 0.0,
                generator: torch.Generator | None = None, codes_only: bool = False,
                candidates: int = 0) -> ModelOutput:
        """The training path: codes, weights, losses and latents. codes_only (inference) runs
        sidserve/tokenizers/adc_sid/model/encode.py instead: codes and behavior weights only,
        with candidates=k also the k best codes per position and their cosines."""
        if candidates and not codes_only:
            raise ValueError("candidates come with codes_only=True")
        if codes_only:
            if self.training or behavior_dropout > 0:
                raise ValueError("codes_only is for inference: call model.eval() first, no behavior_dropout")
            return encode(self, x, candidates)
        c = self.config
        B = x.batch_size
        dev = x.has_behavior.device
        x = self.shrink_behavior(x)  # e_b' for every part below (behavior_shrinkage)
        # behavior: which rows have e_b, which are fed to the shared experts (dropout)
        has_b = x.has_behavior
        warm = has_b
        if c.has_behavior and behavior_dropout > 0:
            drop = torch.rand(B, generator=generator).to(dev) < behavior_dropout
            warm = has_b & ~drop
        h, h_b, shared_in = self.shared_input(x, warm)

        latents: list[torch.Tensor] = []
        z_parts: list[torch.Tensor] = []
        zq_parts: list[torch.Tensor] = []
        codes: list[torch.Tensor] = []
        vq = torch.zeros((), device=dev)

        def quantize(book: CosineCodebook, z: torch.Tensor, weight: torch.Tensor | None):
            nonlocal vq
            z_hat, z_q, idx, loss = book(z)
            vq = vq + loss
            latents.append(z)
            w = 1.0 if weight is None else weight.unsqueeze(-1)
            z_parts.append(w * z_hat)
            zq_parts.append(w * z_q)
            codes.append(idx)

        shared_z: list[torch.Tensor] = []  # (B, D) per shared expert, for the cold consistency term
        for expert, book in zip(self.shared_experts, self.shared_codebooks):
            shared_z.append(expert(shared_in))
            quantize(book, shared_z[-1], None)
        for m in c.content_modalities:
            g = self.content_gates[m](x.content[m])  # (B, N_m)
            for i, (expert, book) in enumerate(zip(self.content_experts[m], self.content_codebooks[m])):
                quantize(book, expert(x.content[m]), g[:, i])

        r_full = None
        gates_raw = n_norm = None
        if c.has_behavior:
            rows = torch.nonzero(has_b).flatten()
            e_b = x.behavior[rows]  # (B_b, d_b)
            n_norm = self.richness(e_b, _rows(x.popularity, has_b))  # (B_b,)
            if c.use_behavior_gate:
                gates_raw, gates_fuse = self.behavior_gate(e_b, n_norm)  # (B_b, N_b) each
            else:
                gates_raw = gates_fuse = torch.ones(rows.numel(), c.num_behavior_experts, device=dev)
            r_full = torch.zeros(B, c.num_behavior_experts, device=dev)
            r_full = r_full.index_put((rows,), gates_fuse)
            r_full = r_full * warm.unsqueeze(-1)  # dropped-out items fuse no behavior
            residual = c.behavior_quantization != "parallel"
            r_b = self.behavior_residual(e_b)  # (B_b, D or d_b); None for parallel experts
            for i, book in enumerate(self.behavior_codebooks):
                full_idx = torch.full((B,), c.missing_code, dtype=torch.long, device=dev)
                z_hat, z_q, idx, loss = book(r_b if residual else self.behavior_experts[i](e_b))
                vq = vq + loss
                latents.append(z_hat)
                if c.behavior_quantization == "residual_input":
                    # e_b has no encoder to train: the codewords follow their own loss (online
                    # k-means of each level's residual), the fusion reads them through a map
                    r_b = r_b - z_q.detach()
                    z_hat = z_q = self.behavior_out(z_q.detach())  # (B_b, D)
                elif residual:
                    # value z_q, gradient to the expert through this level's residual; the
                    # next level gets what is left, the codeword held fixed (RQ-VAE)
                    z_hat = z_hat + (z_q - z_hat).detach()
                    r_b = r_b - z_q.detach()
                z_parts.append(r_full[:, i:i + 1] * _scatter_rows(z_hat, rows, B))
                zq_parts.append(r_full[:, i:i + 1] * _scatter_rows(z_q, rows, B))
                codes.append(full_idx.index_put((rows,), idx))

        z = torch.stack(z_parts).sum(0)  # (B, D)
        z_q = torch.stack(zq_parts).sum(0)  # (B, D)
        decoded = self.decoder(z + (z_q - z).detach())  # (B, sum d), eq. 14 straight-through

        # reconstruction over the modalities each item has (behavior masked when missing)
        targets = [x.content[m] for m in c.content_modalities]
        masks = [torch.ones_like(t) for t in targets]
        if c.has_behavior:
            targets.append(x.behavior)
            masks.append(has_b.unsqueeze(-1).float().expand_as(x.behavior))
        target = torch.cat(targets, dim=-1)
        mask = torch.cat(masks, dim=-1)
        sq = ((decoded - target) ** 2) * mask  # (B, sum d)
        recon = sq.sum(-1) / mask.sum(-1)  # (B,) per element, the reported metric
        scale = torch.repeat_interleave(self.recon_scale, torch.tensor([t.shape[-1] for t in targets], device=dev))
        sq_sum = (sq * scale).sum(-1)  # (B,) ||e - e_hat||^2 over present parts, balanced

        losses = {"recon": sq_sum.mean() if c.recon_reduction == "sum" else recon.mean(), "vq": vq}
        zero = torch.zeros((), device=dev)
        if not self.training:  # inference: the O(B^2) contrastive terms are not needed
            pass
        elif c.use_alignment_loss:
            align = content_alignment_loss(h, c.tau)
            if c.has_behavior:
                w = alignment_strength(n_norm, c.alpha, c.beta) if c.use_alignment_controller \
                    else torch.ones_like(n_norm)
                align = align + behavior_alignment_loss(
                    {m: h[m][rows] for m in h}, h_b[rows], w.detach(), c.tau)
            losses["align"] = align
        else:
            losses["align"] = zero
        if self.training and c.has_behavior and c.use_sparsity and c.use_behavior_gate:
            losses["reg"] = self.sparsity(gates_raw, n_norm)
        else:
            losses["reg"] = zero
        losses.setdefault("align", zero)
        if self.training and c.has_behavior and c.cold_consistency_weight > 0:
            losses["consistency"] = self.cold_consistency(h, warm, rows, n_norm, shared_z)
        else:
            losses["consistency"] = zero
        losses["total"] = (losses["recon"] + losses["vq"] + c.align_weight * losses["align"] + losses["reg"]
                           + c.cold_consistency_weight * losses["consistency"])

        weights = (r_full / self.weight_scale).detach() if r_full is not None else torch.zeros(B, 0, device=dev)
        return ModelOutput(
            codes=torch.stack(codes, dim=-1),
            behavior_weights=weights,
            losses=losses,
            latents=latents,
            gates_raw=gates_raw,
            n_norm=n_norm,
            recon=recon.detach(),
        )


def _rows(values: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values[mask]


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """values (n_rows, d) placed at ``rows`` of a zero (n, d) tensor."""
    out = values.new_zeros(n, values.shape[-1])
    return out.index_put((rows,), values)
