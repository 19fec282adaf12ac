"""``arr_coc`` (exact greedy conditional MI) and ``arr_coc_adapter`` (learned fast path).

Both run the same front end on the candidate pyramid (fine tokens plus 2x2 and 4x4 pooled
tokens, each candidate one token):

    knowing   (:class:`arr_coc.knowing.ParticipatoryScorer`): relevance-space embeddings, pmi
    balancing (:class:`arr_coc.balancing.Balancer`): alpha and price per example

then ``arr_coc`` runs :func:`arr_coc.attending.greedy_conditional_mi` and reports the
chain-rule total ``I(c_S ; Q)`` as ``gain``, while ``arr_coc_adapter`` scores every
candidate with :class:`arr_coc.adapter.QualityAdapter` and keeps the top-k (one forward).

Without a query, or for a row whose query is all padding, the query carries no
information: alpha is 0 and the choice is coverage only.

Training. The submodules are attributes (``scorer``, ``balancer``, ``adapter``) so a
training module can optimise and save them. In training mode with gradients on, the
returned tokens carry a straight-through factor (value 1, gradient of a relaxed keep
probability): ``sigmoid(pmi / st_temperature)`` for ``arr_coc`` (the greedy itself is
discrete) times, per pick, the relaxed "gain >= price" ``sigmoid((gain(alpha) - price) /
price_temperature)`` (the gain is linear in alpha, so a learned balancer gets gradients too),
and, for ``arr_coc_adapter``, each kept token carries the gradient of its relaxed pick
(the successive softmaxes of the Gumbel top-k of the adapter scores, times the candidates),
and ``extras["losses"]["distill"]`` holds the distillation loss from the exact greedy run
at the same budget (the anchor that keeps the answer loss from collapsing the adapter).
``arr_coc`` also returns a differentiable ``gain`` (the set's log-det MI). ``extras`` holds
``keep_prob`` [B, M] for the rate term of :class:`arr_coc.balancing.IBLoss`, ``pmi`` [B, M],
``alpha`` [B], ``price`` [B], and per method the pick order and per-step gains
(``arr_coc``) or the adapter ``scores`` (``arr_coc_adapter``, for
:func:`arr_coc.adapter.distillation_loss` against an ``arr_coc`` built on the same scorer:
``create_allocator("arr_coc", scorer=adapter_allocator.scorer)``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from arr_coc.adapter import QualityAdapter, TokenCritic, distillation_loss, relaxed_topk, shortlist_recall_loss
from arr_coc.allocators.base import (
    AllocationContext,
    Allocator,
    Selection,
    topk_indices,
)
from arr_coc.allocators.registry import register_allocator
from arr_coc.attending import (
    PyramidGram,
    gaussian_set_mi,
    greedy_conditional_mi,
    pyramid_gram,
)
from arr_coc.balancing import Balancer, soft_keep
from arr_coc.knowing import (
    ParticipatoryScorer,
    PerspectivalScorer,
    PropositionalScorer,
    ScorerOutput,
    masked_mean,
    pyramid_scores,
)

__all__ = ["ArrCocAdapterAllocator", "ArrCocAllocator"]


@register_allocator("arr_coc")
class ArrCocAllocator(Allocator):
    """Exact greedy conditional-MI allocation over the candidate pyramid.

    Args:
        alpha: query focus in [0, 1] (fixed), or None for a learned balancer.
        price: nats per token >= 0 (fixed; > 0 makes the budget adaptive), or None (learned).
        levels: pooled pyramid levels (log2 of the pooling factor); () = fine tokens only.
        kernel, jitter, var_floor, distortion, bandwidth: see :func:`greedy_conditional_mi`.
        vision_dim, query_dim, relevance_dim, num_heads, rank, prior: the
            :class:`ParticipatoryScorer` (dims None = lazy, identity until trained).
        scorer, balancer: ready-made modules instead (shared with another allocator).
        st_temperature: temperature of the straight-through keep probability sigmoid(pmi / t).
        price_temperature: temperature of the relaxed "gain >= price" of each pick (gives the
            balancer its gradient in training).
        fuse: query-agnostic scorers fused into the selection, any of "propositional"
            (token norm) and "perspectival" (global-token attention); () = participatory only.
            Each scorer's per-patch scores, standardised per image, become a salience
            distribution p over the candidates (softmax); its information relative to uniform,
            max(0, log(M p_j)) nats, times ``fuse_weight`` is added to every non-redundant
            candidate's gain (``greedy_conditional_mi(unary=...)``). The reported
            I(selected; query) is unchanged by it.
        fuse_weight: weight of the fused term (nats per nat).
    """

    def __init__(
        self,
        alpha: float | None = 0.9,
        price: float | None = 0.0,
        *,
        levels: tuple[int, ...] = (1, 2),
        kernel: str = "cosine",
        jitter: float = 1e-6,
        var_floor: float = 1e-4,
        distortion: float = 1e-2,
        bandwidth: float | None = None,
        vision_dim: int | None = None,
        query_dim: int | None = None,
        relevance_dim: int | None = None,
        num_heads: int = 8,
        rank: int = 16,
        prior: str = "uniform",
        scorer: ParticipatoryScorer | None = None,
        balancer: Balancer | None = None,
        st_temperature: float = 1.0,
        price_temperature: float = 0.05,
        fuse: tuple[str, ...] = (),
        fuse_weight: float = 0.1,
    ):
        super().__init__()
        fuse = tuple(fuse)
        unknown = [f for f in fuse if f not in ("propositional", "perspectival")]
        if unknown:
            raise ValueError(f"fuse: expected any of 'propositional', 'perspectival', got {unknown}")
        if not fuse_weight >= 0:
            raise ValueError(f"fuse_weight: expected >= 0, got {fuse_weight!r}")
        self.fuse, self.fuse_weight = fuse, float(fuse_weight)
        self.fused_scorers = nn.ModuleDict(
            {
                name: (PropositionalScorer() if name == "propositional" else PerspectivalScorer())
                for name in fuse
            }
        )
        if any((not isinstance(lv, int)) or lv < 1 for lv in levels):
            raise ValueError(f"levels: expected positive ints (log2 pooling factors), got {levels!r}")
        if kernel not in ("cosine", "rbf"):
            raise ValueError(f"kernel: expected 'cosine' or 'rbf', got {kernel!r}")
        if not st_temperature > 0:
            raise ValueError(f"st_temperature: expected > 0, got {st_temperature!r}")
        if not price_temperature > 0:
            raise ValueError(f"price_temperature: expected > 0, got {price_temperature!r}")
        self.price_temperature = float(price_temperature)
        self.pyramid_levels = tuple(levels)
        self.kernel, self.jitter, self.var_floor = kernel, float(jitter), float(var_floor)
        self.distortion, self.bandwidth, self.st_temperature = float(distortion), bandwidth, float(st_temperature)
        self.scorer = scorer if scorer is not None else ParticipatoryScorer(
            vision_dim, query_dim, relevance_dim, num_heads, rank=rank, prior=prior
        )
        self.balancer = balancer if balancer is not None else Balancer(alpha, price)
        self.fixed_budget = not self.balancer.adaptive

    # ------------------------------------------------------------------ shared front end
    def _front(self, ctx: AllocationContext):
        out: ScorerOutput = self.scorer(ctx.candidates, ctx.query, ctx.query_mask)
        b = ctx.batch_size
        bal = self.balancer(
            out.query_summary if out.query_emb is not None else None, out.has_query, batch_size=b, device=ctx.fine.device
        )
        return out, bal

    def _pyramid_gram(self, ctx: AllocationContext, emb: torch.Tensor) -> PyramidGram | None:
        """Raw Gram of the candidate embeddings, held as the fine tokens' Gram [B, N, N].

        The scorer's candidate map is linear, so a pooled candidate's embedding is the mean of
        its children's and its inner products are means of theirs: an N x N Gram, pooled
        row by row as the greedy reads them (:class:`arr_coc.attending.PyramidGram`), instead
        of an M x M Gram (M = 756 vs N = 576 on a 24 x 24 grid: ~40% fewer flops, and no
        M x M matrix is built). Only on CPU, where the greedy precomputes its kernel anyway.
        """
        if not self.pyramid_levels or emb.device.type != "cpu" or not isinstance(self.scorer, ParticipatoryScorer):
            return None
        b, m = emb.shape[:2]
        if b * m * m > 2**26:
            return None
        dtype = torch.float64 if emb.dtype == torch.float64 else torch.float32
        return pyramid_gram(emb[:, : ctx.num_fine].to(dtype), ctx.grid, self.pyramid_levels)

    def _fused_unary(self, ctx: AllocationContext) -> torch.Tensor | None:
        """[B, M] nats: the fused query-agnostic information of each candidate (see ``fuse``)."""
        if not self.fuse or self.fuse_weight == 0:
            return None
        total = None
        m = ctx.num_candidates
        for name, scorer in self.fused_scorers.items():
            fine = ctx.fine.float()
            s = scorer(fine) if name == "propositional" else scorer(fine, prefix=ctx.prefix.float())
            z = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-6)
            p = torch.softmax(pyramid_scores(z, ctx.grid, self.pyramid_levels), dim=1)
            u = (p * m).log().clamp_min(0) * self.fuse_weight
            total = u if total is None else total + u
        return total.detach()

    def _training(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _gather_tokens(self, ctx: AllocationContext, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Candidates at idx [B, K] times the straight-through factor keep [B, M] (value 1 where kept)."""
        cand = ctx.candidates
        tok = cand.gather(1, idx.clamp_min(0)[..., None].expand(-1, -1, cand.shape[-1]))
        w = keep.gather(1, idx.clamp_min(0))
        return (tok * w[..., None].to(tok.dtype)).to(cand.dtype)

    # ------------------------------------------------------------------ selection
    def select(self, ctx: AllocationContext) -> Selection:
        out, bal = self._front(ctx)
        qemb = out.query_emb
        res = greedy_conditional_mi(
            out.candidate_emb.detach(),
            qemb.detach() if qemb is not None else None,
            ctx.query_mask if qemb is not None else None,
            ctx.budget,
            bal.alpha.detach(),
            bal.price.detach(),
            kernel=self.kernel,
            jitter=self.jitter,
            var_floor=self.var_floor,
            distortion=self.distortion,
            bandwidth=self.bandwidth,
            check_finite=False,  # the tokens were validated; the scorer keeps them finite
            cand_gram=self._pyramid_gram(ctx, out.candidate_emb.detach()),
            unary=self._fused_unary(ctx),
        )
        keep_prob = torch.sigmoid(out.pmi / self.st_temperature)
        extras = dict(
            pick_order=res.indices,
            step_gains=res.gains,
            query_gains=res.query_gains,
            coverage_gains=res.coverage_gains,
            alpha=bal.alpha,
            price=bal.price,
            pmi=out.pmi,
            keep_prob=keep_prob,
        )
        tokens, gain = None, res.total
        if self._training():
            st = keep_prob - keep_prob.detach() + 1.0  # value 1, gradient of keep_prob
            tokens = self._gather_tokens(ctx, res.indices, st)
            # the balancer's gradient: each pick's gain is linear in alpha, and it is kept iff
            # it is worth its price, relaxed as soft_keep (value 1 in the forward pass)
            valid = res.indices >= 0
            g_pick = torch.lerp(res.coverage_gains, res.query_gains, bal.alpha[:, None].to(res.gains.dtype))
            pk = torch.where(valid, soft_keep(g_pick, bal.price.to(g_pick.dtype), self.price_temperature), 1.0)
            tokens = tokens * (pk - pk.detach() + 1.0)[..., None].to(tokens.dtype)
            idx = res.indices.clamp_min(0)
            kept = keep_prob.gather(1, idx) * pk.to(keep_prob.dtype)
            keep_prob = keep_prob.scatter(1, idx, torch.where(valid, kept, keep_prob.gather(1, idx)))
            extras["keep_prob"] = keep_prob
            if qemb is not None:
                gain = gaussian_set_mi(
                    out.candidate_emb, qemb, res.indices, ctx.query_mask,
                    kernel=self.kernel, jitter=self.jitter, var_floor=self.var_floor, bandwidth=self.bandwidth,
                )
        return Selection(indices=res.indices, tokens=tokens, gain=gain, extras=extras)


@register_allocator("arr_coc_adapter")
class ArrCocAdapterAllocator(ArrCocAllocator):
    """The fast path: the adapter scores every candidate in one forward, then (``mode``):

    - ``"shortlist"`` (default): the exact greedy runs only on the adapter's top
      ``L = ceil(shortlist * K)`` candidates (the budget K spent there). Conditional
      variances depend only on the candidate and the picks, so a shortlisted candidate's
      gain is the exact greedy's: the picks equal the exact greedy's as long as its every pick
      is in the shortlist, ``gain`` is the chain-rule I(c_S ; Q) of the picks at no extra
      cost, and a ``price`` works as in ``arr_coc``. Cost O(L K (T + K) + L^2 R) instead of
      O(M K (T + K) + N^2 R), and the scorer's pointwise MI (a softmax per head and query
      token over all M candidates) is not computed unless ``use_pmi``. With ``fill="scores"``
      the greedy stops once no shortlisted candidate has a positive gain (every one is within
      the numerical floor of what the picks already explain) and the rest of the budget is
      the best-scoring remaining candidates: the exact greedy's picks past that point are
      ordered by residual variances below the floor (its float32 and float64 runs disagree
      on them), so they are not worth K more sequential steps.
    - ``"topk"``: keep the adapter's top-k (the one-pass design; Gumbel top-k in training).

    Args: those of :class:`ArrCocAllocator` (``price`` is used in ``"shortlist"`` mode only),
    plus ``adapter`` (a ready-made :class:`QualityAdapter`), ``proj_dim``, ``hidden`` and
    ``max_residual`` (its size and residual bound), ``mode``, ``shortlist`` (L / K >= 1),
    ``fill`` (``"greedy"``: the greedy spends the whole budget; ``"scores"``: see above),
    ``use_pmi`` (feed the scorer's pmi to the adapter; None: only in ``"topk"`` mode, as the
    adapter was first trained), ``gumbel_temperature`` and ``gumbel`` (the ``"topk"``
    training relaxation), ``straight_through`` and ``report_gain`` (``"topk"``: compute
    I(c_S ; Q) of the kept set, a small extra cost), ``distill``, ``critic`` (the stage-2
    InfoNCE critic between images and questions that
    :func:`arr_coc.training.module.allocator_loss_terms` trains and reports: ``"adapter"``
    (default, unchanged), the adapter's own :meth:`QualityAdapter.critic_matrix`, which did not
    learn on benchmark v2 (experiments/results/adapter_v2.md); ``"token"``, a
    :class:`arr_coc.adapter.TokenCritic` held as ``self.critic`` (each question token's best
    match among the candidates; not yet measured on v2); None: no critic term).

    Training signals (in training mode with gradients on):

    - ``distill`` (default on): the exact greedy at the same budget, alpha and scorer is
      run as a teacher (detached). ``"shortlist"``: :func:`arr_coc.adapter.shortlist_recall_loss`
      of the adapter scores for the teacher's picks with a positive gain (the picks after the
      gains vanish are set by residual variances below the numerical floor: float32 and
      float64 runs of the greedy disagree on them), at the shortlist size; ``"topk"``:
      :func:`arr_coc.adapter.distillation_loss` against its pick order and gains. Returned as
      ``extras["losses"]["distill"]`` (weighted by ``loss_weights.distill`` in
      :class:`arr_coc.training.module.ARRCOCModule`). The answer loss alone, through any
      straight-through top-k, is a biased first-order signal: it drove the one-pass adapter
      to keep pooled tokens only (fine-token recall -> 0); the teacher anchors it.
    - ``"shortlist"``: each kept token carries the gradient of its relaxed shortlist
      membership ``sigmoid((score - t) / gumbel_temperature)`` (value 1; t the L-th score).
    - ``"topk"``, ``straight_through="slot"`` (default): each kept token carries the gradient
      of its relaxed pick, the successive softmax of :func:`relaxed_topk` times the
      candidates, so the answer loss compares the pick with every alternative (centred);
      ``"scale"``: the old estimator (the kept token times its relaxed keep probability).
    """

    def __init__(
        self,
        alpha: float | None = 0.9,
        *,
        adapter: QualityAdapter | None = None,
        proj_dim: int = 16,
        hidden: int = 64,
        max_residual: float | None = None,
        mode: str = "shortlist",
        shortlist: float = 3.0,
        fill: str = "greedy",
        use_pmi: bool | None = None,
        gumbel_temperature: float = 0.5,
        gumbel: bool = True,
        straight_through: str = "slot",
        report_gain: bool = True,
        distill: bool = True,
        distill_mse_weight: float = 0.0,
        distill_temperature: float = 0.1,
        critic: str | None = "adapter",
        critic_dim: int = 32,
        **kwargs,
    ):
        kwargs.setdefault("price", 0.0)
        super().__init__(alpha, **kwargs)
        if mode not in ("shortlist", "topk"):
            raise ValueError(f"mode: expected 'shortlist' or 'topk', got {mode!r}")
        if not (isinstance(shortlist, (int, float)) and shortlist >= 1):
            raise ValueError(f"shortlist: expected a number >= 1 (shortlist size / budget), got {shortlist!r}")
        if not gumbel_temperature > 0:
            raise ValueError(f"gumbel_temperature: expected > 0, got {gumbel_temperature!r}")
        if straight_through not in ("slot", "scale"):
            raise ValueError(f"straight_through: expected 'slot' or 'scale', got {straight_through!r}")
        if not distill_mse_weight >= 0:
            raise ValueError(f"distill_mse_weight: expected >= 0, got {distill_mse_weight!r}")
        if not distill_temperature > 0:
            raise ValueError(f"distill_temperature: expected > 0, got {distill_temperature!r}")
        if fill not in ("greedy", "scores"):
            raise ValueError(f"fill: expected 'greedy' or 'scores', got {fill!r}")
        if critic not in ("token", "adapter", None):
            raise ValueError(f"critic: expected 'token', 'adapter' or None, got {critic!r}")
        self.mode, self.shortlist, self.fill = mode, float(shortlist), fill
        self.critic_kind = critic
        self.critic = TokenCritic(proj_dim=critic_dim) if critic == "token" else None
        self.use_pmi = (mode == "topk") if use_pmi is None else bool(use_pmi)
        self.distill_temperature = float(distill_temperature)
        self.adapter = adapter if adapter is not None else QualityAdapter(
            proj_dim=proj_dim, hidden=hidden, distortion=self.distortion, var_floor=self.var_floor,
            max_residual=max_residual,
        )
        self.gumbel_temperature, self.gumbel, self.report_gain = float(gumbel_temperature), bool(gumbel), bool(report_gain)
        self.straight_through = straight_through
        self.distill, self.distill_mse_weight = bool(distill), float(distill_mse_weight)
        self.fixed_budget = True if mode == "topk" else not self.balancer.adaptive

    def _lean_front(self, ctx: AllocationContext):
        """The front end without the scorer's pointwise MI (pmi = 0): relevance-space
        embeddings and the query summary only (the adapter's inputs when ``use_pmi`` is off)."""
        sc = self.scorer
        if self.use_pmi or not isinstance(sc, ParticipatoryScorer):
            return self._front(ctx)
        cand = ctx.candidates
        b, m = ctx.batch_size, ctx.num_candidates
        dtype = torch.float64 if cand.dtype == torch.float64 else torch.float32
        grow = self._training()
        emb = sc.candidate_map(cand.to(dtype), materialize=grow)  # [B, M, R]
        r = emb.shape[-1]
        zeros = torch.zeros(b, m, dtype=dtype, device=emb.device)
        query = ctx.query
        if query is None or query.shape[1] == 0:
            qemb, summary = None, torch.zeros(b, r, dtype=dtype, device=emb.device)
            has_query = torch.zeros(b, dtype=torch.bool, device=emb.device)
        else:
            t = query.shape[1]
            mask = torch.ones(b, t, dtype=torch.bool, device=emb.device) if ctx.query_mask is None else ctx.query_mask.bool()
            qemb = sc.query_map(query.to(dtype), out_dim=r, materialize=grow)  # [B, T, R]
            summary, has_query = masked_mean(qemb, mask), mask.any(1)
        out = ScorerOutput(pmi=zeros, candidate_emb=emb, query_emb=qemb, query_summary=summary,
                           has_query=has_query, log_prior=zeros - math.log(m))
        bal = self.balancer(summary if qemb is not None else None, has_query, batch_size=b, device=ctx.fine.device)
        return out, bal

    def _teacher(self, ctx: AllocationContext, out: ScorerOutput, alpha: torch.Tensor):
        """The exact greedy at the same budget, alpha and scorer (no gradient, price 0)."""
        qemb = out.query_emb
        emb = out.candidate_emb.detach()
        return greedy_conditional_mi(
            emb,
            qemb.detach() if qemb is not None else None,
            ctx.query_mask if qemb is not None else None,
            ctx.budget,
            alpha.detach(),
            0.0,
            kernel=self.kernel,
            jitter=self.jitter,
            var_floor=self.var_floor,
            distortion=self.distortion,
            bandwidth=self.bandwidth,
            check_finite=False,
            cand_gram=self._pyramid_gram(ctx, emb),
        )

    def shortlist_size(self, budget: int, num_candidates: int) -> int:
        """L = min(M, ceil(shortlist * K))."""
        return min(int(num_candidates), int(math.ceil(self.shortlist * int(budget))))

    def _shortlist_greedy(self, ctx: AllocationContext, out: ScorerOutput, bal, scores: torch.Tensor):
        """The exact greedy on each row's top-L candidates by ``scores`` (L from the row's own budget).

        Rows are grouped by budget (one greedy call per distinct budget; one call for an int
        budget), so a row's picks never depend on its batch mates. Returns (indices [B, K]
        into the M candidates in pick order, -1 padded; step gains, query gains, coverage gains
        [B, K]; total I(c_S ; Q) [B]; the shortlists [B, L_max], -1 padded).
        """
        emb = out.candidate_emb.detach()
        qemb = out.query_emb.detach() if out.query_emb is not None else None
        b, m, r = emb.shape
        bandwidth = self.bandwidth
        if self.kernel == "rbf" and bandwidth is None:
            # the full candidate set's bandwidth (the greedy would take the shortlist's): scale, then bandwidth 1
            x = emb.to(torch.float64 if emb.dtype == torch.float64 else torch.float32)
            ell2 = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(-1).mean(dim=1)
            scale = torch.where(ell2 > 0, ell2, torch.ones_like(ell2)).sqrt()[:, None, None]
            emb = emb / scale.to(emb.dtype)
            qemb = qemb / scale.to(qemb.dtype) if qemb is not None else None
            bandwidth = 1.0
        unary = self._fused_unary(ctx)
        price = bal.price.detach()
        fill = self.fill == "scores" and not bool((price > 0).any())
        kmax = ctx.max_budget
        dtype = torch.float64 if emb.dtype == torch.float64 else torch.float32
        idx = torch.full((b, kmax), -1, dtype=torch.long, device=emb.device)
        gains = torch.zeros(3, b, kmax, dtype=dtype, device=emb.device)
        total = torch.zeros(b, dtype=dtype, device=emb.device)
        shortlists = torch.full((b, self.shortlist_size(kmax, m)), -1, dtype=torch.long, device=emb.device)
        sc = scores.detach()
        for u in ctx.budget.unique().tolist():
            if u <= 0:
                continue
            rows = (ctx.budget == u).nonzero()[:, 0]
            whole = rows.numel() == b
            pick = (lambda t: t) if whole else (lambda t: t.index_select(0, rows))  # noqa: E731
            size = self.shortlist_size(u, m)
            short = pick(sc).topk(size, dim=1).indices  # [b', L]
            sub = pick(emb).gather(1, short[..., None].expand(-1, -1, r))
            res = greedy_conditional_mi(
                sub,
                pick(qemb) if qemb is not None else None,
                pick(ctx.query_mask) if (qemb is not None and ctx.query_mask is not None) else None,
                u,
                pick(bal.alpha.detach()),
                pick(price).clamp_min(1e-12) if fill else pick(price),  # fill: a row stops when no gain is positive
                kernel=self.kernel,
                jitter=self.jitter,
                var_floor=self.var_floor,
                distortion=self.distortion,
                bandwidth=bandwidth,
                check_finite=False,
                unary=pick(unary).gather(1, short) if unary is not None else None,
            )
            sel = torch.where(res.indices >= 0, short.gather(1, res.indices.clamp_min(0)), -1)  # [b', u]
            if fill and bool((res.counts < u).any()):
                # the rest of the budget: the row's best-scoring candidates not yet picked, in score order
                rs = pick(sc)
                free = rs.scatter(1, sel.clamp_min(0), torch.where(sel >= 0, -math.inf, rs.gather(1, sel.clamp_min(0))))
                extra = free.topk(u, dim=1).indices
                slot = torch.arange(u, device=sel.device)[None]
                filled = extra.gather(1, (slot - res.counts[:, None]).clamp_min(0))
                sel = torch.where(sel >= 0, sel, filled)
            g = torch.stack([res.gains, res.query_gains, res.coverage_gains]).to(dtype)
            if whole:
                idx[:, :u], gains[:, :, :u], total[:], shortlists[:, :size] = sel, g, res.total.to(dtype), short
            else:
                idx[rows, :u], total[rows] = sel, res.total.to(dtype)
                gains[:, rows, :u] = g
                shortlists[rows, :size] = short
        return idx, gains, total, shortlists

    def select(self, ctx: AllocationContext) -> Selection:
        out, bal = self._lean_front(ctx)
        if self.critic is not None and self._training():  # the critic reads the relevance space: create it
            r = out.candidate_emb.shape[-1]  # with the allocator's other parameters (before the optimizer)
            self.critic.materialize(r, r)
        pred = self.adapter(
            out.candidate_emb,
            out.query_summary if out.query_emb is not None else None,
            out.pmi if self.use_pmi else None,
            bal.alpha,
            ctx.pyramid.positions[:, 2],
            out.has_query,
        )
        scores = pred.score
        if self.mode == "shortlist":
            return self._select_shortlist(ctx, out, bal, scores)
        tokens = None
        losses: dict[str, torch.Tensor] = {}
        if self._training():
            idx, keep, slots = relaxed_topk(
                scores, ctx.budget, temperature=self.gumbel_temperature, gumbel=self.gumbel, return_slots=True
            )
            if self.straight_through == "scale":
                tokens = self._gather_tokens(ctx, idx, keep)
            else:
                cand = ctx.candidates
                hard = cand.gather(1, idx.clamp_min(0)[..., None].expand(-1, -1, cand.shape[-1]))
                soft = torch.einsum("bkm,bmd->bkd", slots.to(cand.dtype), cand)  # relaxed token per slot
                tokens = hard + (soft - soft.detach())
            if self.distill:
                teacher = self._teacher(ctx, out, bal.alpha)
                losses["distill"] = distillation_loss(
                    scores, teacher.indices, teacher.gains.to(scores.dtype), mse_weight=self.distill_mse_weight,
                    temperature=self.distill_temperature,
                )
        else:
            idx = topk_indices(scores.detach(), ctx.budget)
            keep = torch.zeros_like(scores).scatter_add(1, idx.clamp_min(0), (idx >= 0).to(scores.dtype))
        gain = None
        if self.report_gain:
            if out.query_emb is not None:
                gain = gaussian_set_mi(
                    out.candidate_emb, out.query_emb, idx, ctx.query_mask,
                    kernel=self.kernel, jitter=self.jitter, var_floor=self.var_floor, bandwidth=self.bandwidth,
                )
            else:
                gain = torch.zeros(ctx.batch_size, dtype=scores.dtype, device=scores.device)
            if not self._training():
                gain = gain.detach()
        extras = dict(scores=scores, alpha=bal.alpha, price=bal.price, pmi=out.pmi, keep_prob=keep)
        if losses:
            extras["losses"] = losses
        return Selection(indices=idx, tokens=tokens, gain=gain, extras=extras)

    def _select_shortlist(self, ctx: AllocationContext, out: ScorerOutput, bal, scores: torch.Tensor) -> Selection:
        idx, gains, total, short = self._shortlist_greedy(ctx, out, bal, scores)
        m = scores.shape[1]
        valid = idx >= 0
        keep = torch.zeros_like(scores).scatter_add(1, idx.clamp_min(0), valid.to(scores.dtype))
        extras = dict(
            scores=scores, shortlist=short, pick_order=idx, step_gains=gains[0], query_gains=gains[1],
            coverage_gains=gains[2], alpha=bal.alpha, price=bal.price, pmi=out.pmi, keep_prob=keep,
        )
        tokens, gain = None, total
        if self._training():
            size = (short >= 0).sum(1, keepdim=True).clamp_min(1)  # each row's L
            thr = scores.detach().gather(1, short.gather(1, size - 1).clamp_min(0))  # [B, 1] the row's L-th score
            member = torch.sigmoid((scores - thr) / self.gumbel_temperature)  # relaxed shortlist membership
            tokens = self._gather_tokens(ctx, idx, member - member.detach() + 1.0)
            extras["keep_prob"] = torch.where(keep > 0, member, member.detach() * 0)
            if out.query_emb is not None:  # differentiable I(c_S ; Q) of the picks, as arr_coc returns in training
                gain = gaussian_set_mi(
                    out.candidate_emb, out.query_emb, idx, ctx.query_mask,
                    kernel=self.kernel, jitter=self.jitter, var_floor=self.var_floor, bandwidth=self.bandwidth,
                )
            if self.distill:
                teacher = self._teacher(ctx, out, bal.alpha)
                determined = torch.where(teacher.gains > 0, teacher.indices, -1)
                extras.setdefault("losses", {})["distill"] = shortlist_recall_loss(
                    scores, determined, self.shortlist_size(ctx.max_budget, m), temperature=self.distill_temperature
                )
        return Selection(indices=idx, tokens=tokens, gain=gain, extras=extras)
