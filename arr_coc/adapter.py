"""A learned, cheap estimate of each candidate's greedy gain: the fast inference path.

:class:`QualityAdapter` scores every candidate in one forward pass; the allocator then
keeps the top-k. Its prediction is a closed-form base plus a learned residual (zero at
initialisation, so an untrained adapter is already sensible):

```
base_j = alpha * (-1/2 log(1 - cos^2(c_j, q)))            (first greedy step's I(c_j ; q), one query token)
       + (1 - alpha) * 1/2 log+((1 - cos^2(c_j, c_mean)) / D)   (what c_j holds beyond the image mean)
pred_j = base_j + MLP([P c_j, P c_j * P q, pmi_j, cos(c_j, q), cos(c_j, c_mean), level_j])
```

``q`` is the query summary and ``P`` a small projection, so the cost is O(M R p) with a
small p, far below the exact greedy's O(M K (R + K)) sequential steps.

Training (any mix):
- :func:`distillation_loss`: the Plackett-Luce likelihood of the exact greedy's pick order
  under the adapter's scores (so top-k reproduces the greedy) plus a squared error on the
  picked gains (so predictions stay in nats and can be compared with a price);
- :meth:`QualityAdapter.critic_matrix` + :func:`infonce_bound`: the adapter as an InfoNCE
  critic between images and queries, a lower bound on I(image ; query) (log B - loss);
- end to end through a downstream loss with :func:`relaxed_topk` (Gumbel top-k with a
  straight-through estimator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import UninitializedParameter

from arr_coc.info.bounds import infonce_lower_bound
from arr_coc.knowing import _Lazy

__all__ = [
    "AdapterOutput",
    "QualityAdapter",
    "TokenCritic",
    "distillation_loss",
    "infonce_bound",
    "relaxed_topk",
    "shortlist_recall_loss",
]


@dataclass
class AdapterOutput:
    """score [B, M] predicted gain (nats); base [B, M] its closed-form part."""

    score: torch.Tensor
    base: torch.Tensor


class _LazyProjection(_Lazy):
    """x [.., R] -> x W^T [.., p], W created on demand (see :class:`arr_coc.knowing._Lazy`)."""

    def __init__(self, in_dim: int | None, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.weight = UninitializedParameter()
        if in_dim is not None:
            self.initialize_parameters(in_dim)

    def initialize_parameters(self, d: int) -> None:  # type: ignore[override]
        if self.materialized:
            return
        with torch.no_grad():
            self.weight.materialize((self.out_dim, d), device=self.weight.device)
            nn.init.normal_(self.weight, std=1.0)  # unit-norm inputs -> O(1) features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.initialize_parameters(x.shape[-1])
        if x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"candidate_emb: this adapter was built for width {self.weight.shape[1]}, got {x.shape[-1]}")
        return x @ self.weight.to(x.dtype).T


class QualityAdapter(nn.Module):
    """Predicts each candidate's gain from its embedding, the query summary and the scorer's pmi.

    Args:
        relevance_dim: R (None: lazy; until the projection exists - first training forward,
            or :meth:`materialize` - the adapter is its closed-form base for any width).
        proj_dim: width p of the learned candidate / query projection.
        hidden: hidden width of the residual MLP.
        num_levels: pyramid levels encoded one-hot (levels above are clipped).
        distortion: D of the coverage term (as in :func:`arr_coc.attending.greedy_conditional_mi`).
        var_floor: floor on 1 - cos^2 (caps the information of a query twin).
        max_residual: bound on the learned residual, in nats (``r tanh(mlp / r)``: the
            identity near 0, so an untrained adapter is unchanged). It keeps training from
            overriding the closed-form base wholesale (e.g. a learned level bias that ranks
            every pooled token above every fine one); None: unbounded.

    forward(candidate_emb [B, M, R], query_summary [B, R] | None, pmi [B, M] | None,
            alpha [B] | None, levels [M] long | None, has_query [B] bool | None) -> :class:`AdapterOutput`.
    """

    def __init__(
        self,
        relevance_dim: int | None = None,
        *,
        proj_dim: int = 16,
        hidden: int = 64,
        num_levels: int = 4,
        distortion: float = 1e-2,
        var_floor: float = 1e-4,
        max_residual: float | None = None,
    ):
        super().__init__()
        if not (distortion > 0 and var_floor > 0):
            raise ValueError(f"distortion, var_floor: expected > 0, got {distortion!r}, {var_floor!r}")
        if max_residual is not None and not max_residual > 0:
            raise ValueError(f"max_residual: expected > 0 or None, got {max_residual!r}")
        self.max_residual = None if max_residual is None else float(max_residual)
        self.num_levels, self.distortion, self.var_floor = num_levels, float(distortion), float(var_floor)
        self.proj = _LazyProjection(relevance_dim, proj_dim)
        n_in = 2 * proj_dim + 3 + num_levels
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def materialize(self, relevance_dim: int) -> "QualityAdapter":
        """Create the projection for this width now (before building an optimizer)."""
        self.proj.initialize_parameters(relevance_dim)
        return self

    def _residual(self, feats: torch.Tensor) -> torch.Tensor:
        """The bounded residual [..] of features [.., F]."""
        raw = self.mlp(feats)[..., 0]
        if self.max_residual is None:
            return raw
        return self.max_residual * torch.tanh(raw / self.max_residual)

    def _base(self, cos_q: torch.Tensor, cos_m: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        iq = -0.5 * (1 - cos_q.pow(2)).clamp_min(self.var_floor).log()
        cov = (0.5 * ((1 - cos_m.pow(2)).clamp_min(self.var_floor) / self.distortion).log()).clamp_min(0)
        a = alpha[..., None]
        return a * iq + (1 - a) * cov

    def forward(
        self,
        candidate_emb: torch.Tensor,
        query_summary: torch.Tensor | None = None,
        pmi: torch.Tensor | None = None,
        alpha: torch.Tensor | None = None,
        levels: torch.Tensor | None = None,
        has_query: torch.Tensor | None = None,
    ) -> AdapterOutput:
        if candidate_emb.dim() != 3:
            raise ValueError(f"candidate_emb: expected [B, M, R], got {tuple(candidate_emb.shape)}")
        b, m, r = candidate_emb.shape
        dtype = torch.float64 if candidate_emb.dtype == torch.float64 else torch.float32
        x = candidate_emb.to(dtype)
        device = x.device
        if query_summary is None:
            q = torch.zeros(b, r, dtype=dtype, device=device)
            has_query = torch.zeros(b, dtype=torch.bool, device=device)
        else:
            if query_summary.shape != (b, r):
                raise ValueError(f"query_summary: expected [B={b}, R={r}], got {tuple(query_summary.shape)}")
            q = F.normalize(query_summary.to(dtype), dim=-1)
            if has_query is None:
                has_query = torch.ones(b, dtype=torch.bool, device=device)
        pmi = torch.zeros(b, m, dtype=dtype, device=device) if pmi is None else pmi.to(dtype)
        alpha = (has_query.to(dtype) if alpha is None else alpha.to(dtype)).to(device)
        levels = torch.zeros(m, dtype=torch.long, device=device) if levels is None else levels.to(device)
        inv, cos_m, cos_q = _geometry(x, q[:, None])
        cos_q = cos_q * has_query[:, None, None].to(dtype)
        base = self._base(cos_q[:, 0], cos_m, alpha)
        if not self.proj.materialized and not (self.training and torch.is_grad_enabled()):
            # untrained (the residual's last layer is still zero): the closed form alone, any width
            return AdapterOutput(score=base, base=base)
        # the matched pair only: the critic's diagonal
        feats = self._pair_features(x, inv, q[:, None], cos_q, cos_m, pmi, levels)
        resid = self._residual(feats)[:, 0]  # [B, M]
        return AdapterOutput(score=base + resid, base=base)

    def _pair_features(self, x, inv, q, cos_q, cos_m, pmi, levels):
        """Features of every candidate of image b with query directions q[b, i] -> [B, Bq, M, F].

        x [B, M, R] raw candidates, inv [B, M] their inverse norms (the projection is linear,
        so P (x / |x|) = (P x) / |x| and no normalised copy of x is made).
        """
        b, m, _ = x.shape
        h = self.proj(x) * inv[..., None]  # [B, M, p]
        g = self.proj(q)  # [B, Bq, p]
        bq = q.shape[1]
        onehot = F.one_hot(levels.clamp(0, self.num_levels - 1), self.num_levels).to(x.dtype)
        return torch.cat(
            [
                h[:, None].expand(-1, bq, -1, -1),
                h[:, None] * g[:, :, None],
                pmi[:, None, :, None].expand(-1, bq, -1, -1),
                cos_q[..., None],
                cos_m[:, None, :, None].expand(-1, bq, -1, -1),
                onehot.expand(b, bq, m, -1),
            ],
            dim=-1,
        )

    def critic_matrix(
        self, candidate_emb: torch.Tensor, query_summary: torch.Tensor, levels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Critic scores S [B, B]: S[a, b] = log mean_j exp(score(c^a_j ; q^b)) (alpha = 1, no pmi).

        Positives on the diagonal; feed to :func:`infonce_bound`.
        """
        b, m, r = candidate_emb.shape
        dtype = torch.float64 if candidate_emb.dtype == torch.float64 else torch.float32
        x = candidate_emb.to(dtype)
        q = F.normalize(query_summary.to(dtype), dim=-1)[None].expand(b, -1, -1)  # every image x every query
        levels = torch.zeros(m, dtype=torch.long, device=x.device) if levels is None else levels
        pmi = torch.zeros(b, m, dtype=dtype, device=x.device)
        inv, cos_m, cos_q = _geometry(x, q)
        feats = self._pair_features(x, inv, q, cos_q, cos_m, pmi, levels)
        score = self._base(cos_q, cos_m[:, None], torch.ones(b, b, dtype=dtype, device=x.device)) + self._residual(feats)
        return torch.logsumexp(score, dim=-1) - math.log(m)


class TokenCritic(nn.Module):
    """An InfoNCE critic between images and questions that reads the question token by token.

    ``S[a, b] = tau * mean_t max_j cos(A c^a_j, B q^b_t)`` over the real tokens t of question b
    and the candidates j of image a (candidates centred on their image's mean, tokens on their
    question's mean): each question word looks for its best match in the image
    (a question names objects that are in its image), ``tau`` a learned inverse temperature.
    :meth:`QualityAdapter.critic_matrix` instead scores each candidate against the mean of the
    question's tokens, in nats of the closed-form gain, and averages over all candidates: on the
    v2 tokens its scores barely depend on the question (see experiments/results/adapter_v2.md).

    Args:
        proj_dim: width p of the two projections A, B (created on first use for the widths seen).
        temperature: initial tau.

    forward(candidate_emb [B, M, R], query_emb [B, T, Rq], query_mask [B, T] | None) -> S [B, B]
    (positives on the diagonal; feed to :func:`infonce_bound`).
    """

    def __init__(self, proj_dim: int = 32, temperature: float = 10.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature!r}")
        self.cand_proj = _LazyProjection(None, proj_dim)
        self.query_proj = _LazyProjection(None, proj_dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)))
        self.register_load_state_dict_post_hook(_absent_critic_is_untrained)

    def materialize(self, relevance_dim: int, query_dim: int | None = None) -> "TokenCritic":
        """Create the projections for these widths now (before building an optimizer)."""
        fresh = not self.cand_proj.materialized
        self.cand_proj.initialize_parameters(relevance_dim)
        self.query_proj.initialize_parameters(relevance_dim if query_dim is None else query_dim)
        if fresh and self.query_proj.weight.shape == self.cand_proj.weight.shape:
            with torch.no_grad():  # one space at the start: a token matches the candidate it copies
                self.query_proj.weight.copy_(self.cand_proj.weight)
        return self

    def forward(
        self, candidate_emb: torch.Tensor, query_emb: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if candidate_emb.dim() != 3 or query_emb.dim() != 3 or query_emb.shape[0] != candidate_emb.shape[0]:
            raise ValueError(
                f"candidate_emb, query_emb: expected [B, M, R], [B, T, Rq]; got {tuple(candidate_emb.shape)}, {tuple(query_emb.shape)}"
            )
        dtype = torch.float64 if candidate_emb.dtype == torch.float64 else torch.float32
        w = (torch.ones(query_emb.shape[:2], dtype=dtype, device=query_emb.device) if query_mask is None else query_mask.to(dtype))
        # centre each image's candidates on their mean and each question's tokens on theirs: the
        # shared direction (97% of a v2 image's token energy; the question template) says nothing
        # about which image goes with which question and would dominate every cosine
        x = candidate_emb.to(dtype)
        x = x - x.mean(1, keepdim=True)
        y = query_emb.to(dtype)
        y = y - (y * w[..., None]).sum(1, keepdim=True) / w.sum(1).clamp_min(1)[:, None, None]
        c = F.normalize(self.cand_proj(x), dim=-1)  # [B, M, p]
        q = F.normalize(self.query_proj(y), dim=-1)  # [B, T, p]
        best = torch.einsum("amp,btp->abtm", c, q).amax(-1)  # [B_img, B_q, T]: best match of each question token
        mean = (best * w[None]).sum(-1) / w.sum(-1).clamp_min(1)[None]
        return self.log_tau.to(dtype).clamp(max=math.log(100.0)).exp() * mean


_CRITIC_KEYS = ("cand_proj.weight", "query_proj.weight", "log_tau")


def _absent_critic_is_untrained(module: nn.Module, incompatible) -> None:
    """Load-state-dict post-hook of :class:`TokenCritic`: a checkpoint saved before the critic
    existed (all of its keys missing) loads with the critic untrained (a training-time term only)."""
    prefixes = {k[: -len(s)] for k in incompatible.missing_keys for s in _CRITIC_KEYS if k.endswith(s)}
    for prefix in prefixes:
        keys = [prefix + s for s in _CRITIC_KEYS]
        if all(k in incompatible.missing_keys for k in keys):
            for k in keys:
                incompatible.missing_keys.remove(k)


def _geometry(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, M, R] raw candidates, q [B, Bq, R] unit query directions ->
    (inv [B, M] = 1 / |x_j| (0 for a zero vector), cos_m [B, M] = cos(x_j, mean direction),
    cos_q [B, Bq, M] = cos(x_j, q_i)), reading x twice and never copying it."""
    m = x.shape[1]
    n = torch.linalg.vector_norm(x, dim=-1)
    inv = torch.where(n > 0, 1.0 / n.clamp_min(torch.finfo(n.dtype).tiny), torch.zeros_like(n))
    mean_dir = F.normalize(torch.bmm(inv[:, None, :], x)[:, 0] / m, dim=-1)  # mean of the unit vectors
    dots = torch.bmm(torch.cat([mean_dir[:, None], q], 1), x.transpose(1, 2)) * inv[:, None, :]
    return inv, dots[:, 0], dots[:, 1:]


# ---------------------------------------------------------------------- training signals
def infonce_bound(critic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE from a critic matrix [B, B] (positives on the diagonal).

    Returns (loss, bound) with bound = log B - loss <= I(image ; query) in nats.
    """
    if critic.dim() != 2 or critic.shape[0] != critic.shape[1]:
        raise ValueError(f"critic: expected a square [B, B] matrix, got {tuple(critic.shape)}")
    bound = infonce_lower_bound(critic).to(critic.dtype)
    return math.log(critic.shape[0]) - bound, bound


def distillation_loss(
    pred: torch.Tensor,
    indices: torch.Tensor,
    gains: torch.Tensor,
    *,
    mse_weight: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Fit the adapter to the exact greedy: pred [B, M], greedy indices [B, K] (-1 padded, pick order), gains [B, K].

    Plackett-Luce negative log-likelihood of the pick order under ``pred / temperature``
    (each pick is a softmax over the candidates not yet picked) plus ``mse_weight`` times
    the squared error on the picked gains.

    Scores in nats are close together (a softmax over them is nearly flat), so with
    ``temperature`` 1 the likelihood can only rise by inflating the scores; a small
    temperature lets it rank without rescaling. The greedy's gains are conditional (a later
    pick's gain is below its first-step gain), while the adapter scores each candidate on
    its own: the squared error pulls the picked candidates below those left out, against
    the ranking, so allocators distilling for top-k use ``mse_weight`` 0.
    """
    if pred.dim() != 2 or indices.shape != gains.shape or indices.shape[0] != pred.shape[0]:
        raise ValueError(
            f"pred, indices, gains: expected [B, M], [B, K], [B, K]; got {tuple(pred.shape)}, {tuple(indices.shape)}, {tuple(gains.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    valid = indices >= 0
    if not valid.any():
        return pred.sum() * 0
    mse = (((pred.gather(1, indices.clamp_min(0)) - gains.to(pred.dtype)) ** 2) * valid).sum() / valid.sum()
    pred = pred / temperature
    picked = pred.gather(1, indices.clamp_min(0))  # [B, K]
    top = pred.max(dim=1, keepdim=True).values.detach()
    total = (pred - top).exp().sum(1, keepdim=True)  # [B, 1]
    removed = torch.cumsum(((picked - top).exp() * valid), dim=1) - (picked - top).exp() * valid  # before step k
    log_denom = (total - removed).clamp_min(torch.finfo(pred.dtype).tiny).log() + top
    nll = -((picked - log_denom) * valid).sum() / valid.sum()
    return nll + mse_weight * mse


def shortlist_recall_loss(
    pred: torch.Tensor, picks: torch.Tensor, size: int, *, temperature: float = 0.1
) -> torch.Tensor:
    """Train the adapter so that the exact greedy's picks land in its top-``size`` shortlist.

    pred [B, M] scores, picks [B, K] candidate indices (-1 padded; pass the picks to recall,
    e.g. those with a positive greedy gain), size L. Row b's top-L holds all its n_b picks iff
    every pick scores above the (L - n_b + 1)-th best non-pick, the threshold t_b. The loss is
    the pairwise logistic loss ``softplus((t_b - pred_i) / temperature)`` averaged over the
    real picks (its gradient raises the pick and lowers the threshold candidate); 0 for a row
    whose non-picks all fit in the shortlist (L - n_b + 1 > M - n_b) or with no pick.
    """
    if pred.dim() != 2 or picks.dim() != 2 or picks.shape[0] != pred.shape[0]:
        raise ValueError(f"pred, picks: expected [B, M], [B, K]; got {tuple(pred.shape)}, {tuple(picks.shape)}")
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    b, m = pred.shape
    valid = picks >= 0
    n = valid.sum(1)  # [B]
    if not valid.any():
        return pred.sum() * 0
    is_pick = torch.zeros(b, m, dtype=torch.bool, device=pred.device).scatter_(1, picks.clamp_min(0), valid)
    others = pred.masked_fill(is_pick, -math.inf)
    rank = (size - n).clamp_min(0)  # 0-based rank of the threshold among the non-picks
    order = others.detach().argsort(dim=1, descending=True)
    thr_idx = order.gather(1, rank.clamp(max=m - 1)[:, None])  # [B, 1]
    thr = pred.gather(1, thr_idx)
    live = (rank < (m - n)) & (n > 0)  # a threshold non-pick exists
    loss = F.softplus((thr - pred.gather(1, picks.clamp_min(0))) / temperature)  # [B, K]
    w = valid & live[:, None]
    return (loss * w).sum() / valid.sum()


def relaxed_topk(
    scores: torch.Tensor,
    budget: torch.Tensor,
    *,
    temperature: float = 0.5,
    gumbel: bool = True,
    generator: torch.Generator | None = None,
    return_slots: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gumbel top-k with a straight-through relaxation.

    scores [B, M], budget [B] long -> (indices [B, K] -1 padded, keep [B, M]) where ``keep``
    equals the hard 0/1 selection in the forward pass and carries the gradient of the
    relaxed subset (k successive softmaxes, Xie and Ermon 2019) in the backward pass.

    ``return_slots``: also return ``slots`` [B, K, M], the i-th successive softmax (the
    relaxed i-th pick, a distribution over the candidates; zero rows past the budget), whose
    hard counterpart is the one-hot of ``indices[:, i]`` (top-k lists picks in the same
    order, best first). ``slots @ candidates`` is the relaxed token of each slot: its
    straight-through gradient compares a pick with every alternative candidate (centred by
    the softmax), unlike ``keep``, which only says whether a kept token should be scaled.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    b, m = scores.shape
    k = int(budget.max().item()) if budget.numel() else 0
    k = min(k, m)
    s = scores
    if gumbel:
        u = torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype).clamp(1e-10, 1 - 1e-10)
        s = s - torch.log(-torch.log(u))
    idx = s.detach().topk(k, dim=1).indices
    live = torch.arange(k, device=s.device)[None] < budget[:, None]
    idx = torch.where(live, idx, torch.full_like(idx, -1))
    hard = torch.zeros_like(s).scatter_add(1, idx.clamp_min(0), live.to(s.dtype))
    soft = torch.zeros_like(s)
    logits = s / temperature
    slots = []
    for i in range(k):
        p = logits.softmax(dim=1)
        p_live = p * live[:, i : i + 1].to(s.dtype)
        slots.append(p_live)
        soft = soft + p_live
        logits = logits + torch.log1p(-p.clamp(max=1 - 1e-6))
    keep = hard + soft - soft.detach()
    if return_slots:
        return idx, keep, (torch.stack(slots, 1) if slots else s.new_zeros(b, 0, m))
    return idx, keep
