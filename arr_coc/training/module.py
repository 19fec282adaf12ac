"""Stage 2: train the allocator modules on top of a frozen VLM (``ARRCOCModule``).

```
image ──host.encode_image──> [B, P+N, Dv] ──host.project──> [B, P+N, Dl] ─┐   (frozen, no grad)
question ──host.query──> [B, T, Dl] ──────────────────────────────────────┴─ allocator  (trained)
kept tokens [B, K, Dl] ──host.answer──> answer loss   (frozen; the gradient flows through)
```
(``allocate_after_projection=False`` allocates among the ViT tokens and projects the kept ones.)

The host (:mod:`arr_coc.training.hosts`) is the embedded base VLM (one-word answers), a
``transformers`` LLaVA or a Qwen2-VL / Qwen2.5-VL model (multi-token answers of whole
conversations, teacher forcing); only the allocator's parameters train, the host stays in
eval mode without gradients.

Loss = ``ce`` * answer cross-entropy (an upper bound on H(answer | tokens, question), so
minimising it maximises a lower bound on I(tokens; answer)) + ``rate`` * the IB rate term +
``critic`` * the InfoNCE critic loss + ``distill`` * the distillation loss from the exact
greedy (``arr_coc_adapter`` reports it in training; the answer loss alone through its
straight-through top-k collapses it to pooled tokens), the last three as the allocator
reports them (see :func:`allocator_loss_terms`), + ``relevance`` * the listwise cross-entropy
against the batch's ground-truth relevance mask (off by default; for an allocator that
reports ``relevance_logits``, ``arr_coc_host_trained``); an allocator that reports none trains on
the answer alone, and one without trainable parameters is only evaluated. An allocator that
reads host signals (``reads_host``) gets the embedded base VLM's
:class:`~arr_coc.training.base_host.BaseVLMHost` of the batch, as in evaluation.

The frozen VLM is never written into a checkpoint: ``on_save_checkpoint`` drops its weights
and stores the backbone references (names / paths, as given in ``backbones``) and a
fingerprint; ``on_load_checkpoint`` puts the live VLM's weights back and refuses a
checkpoint trained on another backbone. The global RNG state is saved and restored so that a
resumed run continues exactly like an uninterrupted one.

Validation (and test) metrics: ``val/acc`` (and ``val/acc_<question type>``; on a
transformers host the fraction of conversations whose every answer token is the argmax under
teacher forcing), ``val/tokens``
(kept tokens per example), ``val/recall`` (fraction of the ground-truth relevant patches
covered by the kept tokens, a pooled token covering its whole region), ``val/recall_fine``
(covered by fine tokens only), ``val/mi_selected_query`` (the allocator's own estimate of
I(selected; query) in nats, where it defines one), ``val/mi_infonce`` (the adapter critic's
InfoNCE lower bound on I(image; query)), ``val/throughput`` (examples per second through
the whole pipeline), and the loss terms ``val/ce``, ``val/rate``, ``val/critic``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from arr_coc.allocators import AllocationOutput
from arr_coc.pyramid import build_pyramid, coverage_mask, pyramid_positions

__all__ = [
    "ARRCOCModule",
    "allocator_loss_terms",
    "build_vlm",
    "coverage_mask",
    "module_fingerprint",
    "relevance_recall",
    "repool_in_vision_space",
]

_LOSS_KEYS = ("ce", "rate", "critic", "distill")


# ---------------------------------------------------------------------------- metrics
def relevance_recall(
    positions: torch.Tensor, mask: torch.Tensor, relevance: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Fraction of ground-truth relevant patches covered by the kept tokens, per example.

    relevance: [B, gh, gw] bool on the task's grid; when it differs from the token grid
    (H, W), it is mapped by nearest-neighbour resampling (exact for integer ratios).
    Returns [B] float; NaN for an example with no relevant patch (recall undefined).
    """
    if relevance.dim() != 3 or relevance.shape[0] != positions.shape[0]:
        raise ValueError(f"relevance: expected [B={positions.shape[0]}, gh, gw], got {tuple(relevance.shape)}")
    rel = relevance.bool()
    if tuple(rel.shape[1:]) != tuple(grid):
        rel = F.interpolate(rel[:, None].float(), size=tuple(grid), mode="nearest")[:, 0] > 0.5
    covered = coverage_mask(positions, mask, grid)
    hit = (covered & rel).flatten(1).sum(1).float()
    total = rel.flatten(1).sum(1).float()
    return torch.where(total > 0, hit / total.clamp(min=1), torch.full_like(total, float("nan")))


@torch.no_grad()
def repool_in_vision_space(
    kept: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    fine_vision: torch.Tensor,
    fine_projected: torch.Tensor,
    grid: tuple[int, int],
    project: Callable[[torch.Tensor], torch.Tensor],
    *,
    atol: float = 1e-5,
) -> torch.Tensor:
    """Replace pooled tokens that were pooled after the projector by project(pool(ViT tokens)).

    An allocator working among projected tokens pools them in the LLM's space, but the base
    VLM learned pooled tokens as ``project(mean of ViT tokens)``; the MLP projector is not
    linear, so the two differ. For every kept token at level > 0 that equals the pyramid
    candidate at its position (a selected pooled candidate, not a merged token), this
    returns the ViT-space version; everything else is returned unchanged.

    kept: [B, K, Dl]; positions: [B, K, 3]; mask: [B, K]; fine_vision: [B, N, Dv];
    fine_projected: [B, N, Dl] (= project(fine_vision)). Returns [B, K, Dl] (no grad).
    """
    level = positions[..., 2]
    pooled = mask & (level > 0)
    if not pooled.any():
        return kept
    h, w = grid
    max_level = int(level[pooled].max())
    levels = tuple(range(1, max_level + 1))
    pos_all, _ = pyramid_positions(grid, levels, device=kept.device)  # [M, 3]
    table = torch.full((max_level + 1, h, w), -1, dtype=torch.long, device=kept.device)
    table[pos_all[:, 2], pos_all[:, 0], pos_all[:, 1]] = torch.arange(pos_all.shape[0], device=kept.device)
    r = positions[..., 0].clamp(0, h - 1)
    c = positions[..., 1].clamp(0, w - 1)
    idx = table[level.clamp(0, max_level), r, c]  # [B, K]
    pooled = pooled & (idx >= 0)
    safe = idx.clamp(min=0)
    cand_l = build_pyramid(fine_projected, grid, levels).candidates  # [B, M, Dl]
    cand_v = build_pyramid(fine_vision, grid, levels).candidates  # [B, M, Dv]
    got_l = cand_l.gather(1, safe[..., None].expand(-1, -1, cand_l.shape[-1]))
    got_v = cand_v.gather(1, safe[..., None].expand(-1, -1, cand_v.shape[-1]))
    same = (kept - got_l).abs().amax(-1) <= atol * (1 + got_l.abs().amax(-1))
    replace = pooled & same
    if not replace.any():
        return kept
    return torch.where(replace[..., None], project(got_v).to(kept.dtype), kept)


@torch.no_grad()
def module_fingerprint(module: nn.Module) -> list[float]:
    """A cheap identity check of a module's weights: [number of tensors, sum, sum of squares]."""
    tensors = list(module.state_dict().values())
    s = sum((t.double().sum() for t in tensors if t.is_floating_point()), torch.zeros((), dtype=torch.float64))
    q = sum((t.double().square().sum() for t in tensors if t.is_floating_point()), torch.zeros((), dtype=torch.float64))
    return [float(len(tensors)), float(s), float(q)]


def allocator_loss_terms(
    allocator: nn.Module,
    out: AllocationOutput,
    *,
    tokens: torch.Tensor | None = None,
    query: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    budget: int = 0,
    rate: str = "kl",
    rate_prior: float | None = None,
    relevance: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The IB rate and InfoNCE critic terms of an allocator's output (scalars, nats).

    In order of precedence:

    - ``out.extras["losses"]`` ``{"rate": ..., "critic": ..., "distill": ...}`` (or
      ``rate_loss`` / ``critic_loss`` / ``distill_loss``): terms the allocator computes
      itself ([B] tensors are averaged);
    - rate from ``out.extras["keep_prob"]`` [B, M] (the relaxed keep probabilities of
      ``arr_coc`` / ``arr_coc_adapter``): ``rate="kl"`` is the variational IB bound
      sum_j KL(Bernoulli(p_j) || Bernoulli(r)) with the prior keep rate r = ``rate_prior``
      or budget / M; ``rate="tokens"`` the expected number of kept tokens;
    - critic from an allocator with a ``scorer`` and a critic (``arr_coc_adapter``): per its
      ``critic_kind``, its :class:`arr_coc.adapter.TokenCritic` (``"token"``) or its adapter's
      critic matrix (``"adapter"``) between the images and questions of the batch, whose
      InfoNCE loss is returned as ``critic`` and ``log B - loss`` (a lower bound on
      I(image; question)) as ``mi_infonce``; ``critic_kind`` None: no critic term. This needs
      ``tokens`` [B, P+N, D], ``query``, ``grid``;
    - relevance, given the batch's ground-truth ``relevance`` [B, gh, gw] and an allocator that
      reports ``extras["relevance_logits"]`` [B, N] (``arr_coc_host_trained``): the listwise
      cross-entropy of :func:`arr_coc.allocators.arr_coc_host_trained.relevance_listwise_loss`
      (supervision by the training split's masks, which the published pruners do not use).
    """
    from arr_coc.balancing import bernoulli_rate, expected_tokens

    if rate not in ("kl", "tokens"):
        raise ValueError(f"rate: expected 'kl' or 'tokens', got {rate!r}")
    extras = out.extras if isinstance(out.extras, Mapping) else {}
    terms: dict[str, torch.Tensor] = {}
    given = extras.get("losses", {}) or {}
    for key in ("rate", "critic", "distill"):
        val = given.get(key, extras.get(f"{key}_loss"))
        if val is not None:
            val = torch.as_tensor(val)
            terms[key] = val.mean() if val.dim() else val
    rel_logits = extras.get("relevance_logits")
    if relevance is not None and isinstance(rel_logits, torch.Tensor):
        from arr_coc.allocators.arr_coc_host_trained import relevance_listwise_loss

        exclude = extras.get("relevance_exclude")
        fallback = bool(extras.get("relevance_exclude_fallback", False))
        terms["relevance"] = relevance_listwise_loss(
            rel_logits, relevance.to(rel_logits.device), exclude=exclude, exclude_fallback=fallback
        ).mean()
    keep = extras.get("keep_prob")
    if "rate" not in terms and isinstance(keep, torch.Tensor) and keep.dim() == 2:
        if rate == "tokens":
            terms["rate"] = expected_tokens(keep.float()).mean()
        else:
            m = keep.shape[1]
            prior = rate_prior if rate_prior is not None else min(max(budget / m, 1e-3), 1 - 1e-3)
            terms["rate"] = bernoulli_rate(keep.float(), prior).mean()
    scorer, adapter = getattr(allocator, "scorer", None), getattr(allocator, "adapter", None)
    critic_kind = getattr(allocator, "critic_kind", "adapter")  # "token", "adapter" or None (no critic term)
    token_critic = getattr(allocator, "critic", None) if critic_kind == "token" else None
    if (
        "critic" not in terms
        and scorer is not None
        and (token_critic is not None or (critic_kind == "adapter" and hasattr(adapter, "critic_matrix")))
        and tokens is not None
        and query is not None
        and grid is not None
        and tokens.shape[0] > 1
    ):
        from arr_coc.adapter import infonce_bound

        pyr = build_pyramid(tokens[:, num_prefix_tokens:], grid, tuple(getattr(allocator, "pyramid_levels", ())))
        so = scorer(pyr.candidates, query, query_mask)
        if token_critic is not None:  # each question token's best match among the image's candidates
            critic = token_critic(so.candidate_emb, so.query_emb, query_mask)
        else:
            critic = adapter.critic_matrix(so.candidate_emb, so.query_summary, pyr.positions[:, 2])
        loss, bound = infonce_bound(critic)
        terms["critic"] = loss
        terms["mi_infonce"] = bound.detach()
    return terms


# ---------------------------------------------------------------------------- builder
def build_vlm(
    *,
    vision: Any,
    llm: Any,
    projector: Mapping[str, Any] | None = None,
    task: Any = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> nn.Module:
    """A ``BaseVLM`` built from backbone configs (what ``conf/model/*.yaml`` instantiate).

    vision: a ``VisionConfig`` (or its fields); llm: an ``LLMConfig`` (or its fields);
    projector: ``{"hidden": width or None}``; task: the ``VQATask`` whose vocabulary the LLM
    reads (default ``VQATask()``); tokenizer: default the task's word-level one.
    """
    from arr_coc.training.backbones import LLMConfig, VisionConfig
    from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig
    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer

    if isinstance(vision, Mapping):
        vision = VisionConfig(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in vision.items()})
    if isinstance(llm, Mapping):
        llm = LLMConfig(**llm)
    projector = dict(projector or {})
    unknown = set(projector) - {"hidden"}
    if unknown:
        raise ValueError(f"projector: unknown keys {sorted(unknown)}; expected 'hidden'")
    task = VQATask() if task is None else task
    tokenizer = build_tokenizer(task) if tokenizer is None else tokenizer
    cfg = BaseVLMConfig.for_task(
        task, tokenizer, vision=vision, llm=llm, projector_hidden=projector.get("hidden"), **overrides
    )
    return BaseVLM(cfg)


# ---------------------------------------------------------------------------- module
class ARRCOCModule(L.LightningModule):
    """Trains an allocator on a frozen VLM (see the module docstring).

    Args:
        vlm: the frozen host: a :class:`~arr_coc.training.hosts.Host`, a ``BaseVLM``, a
            ``transformers`` LLaVA or Qwen2-VL / Qwen2.5-VL model (wrapped by
            :func:`~arr_coc.training.hosts.as_host`); ``self.vlm`` is its ``nn.Module``.
        allocator: any registered allocator (``arr_coc.allocators.create_allocator``).
        optimizer: a partial optimizer (``params`` left open), finished in
            ``configure_optimizers``.
        scheduler: optional partial LR scheduler (``optimizer`` left open).
        budget: token budget during training (int).
        val_budget: token budget during validation / test (default: ``budget``).
        loss_weights: ``{"ce": 1.0, "rate": ..., "critic": ..., "distill": ...}`` (unset terms:
            ce 1, rate 0, critic 0, distill 1).
        use_positions: pass the kept tokens' (row, col, level) to the VLM.
        allocate_after_projection: allocate among the projected tokens [B, P+N, Dl] (the
            LLM's space, where the query lives; pooled tokens are means of projected
            tokens), else among the ViT tokens [B, P+N, Dv] and project the kept ones.
        repool_in_vision_space: feed a selected pooled candidate as project(mean of ViT
            tokens), as the embedded base VLM was trained (:func:`repool_in_vision_space`);
            only for hosts with ``pooled_in_vision_space`` (the transformers hosts get the
            mean of projected tokens, as the plug-ins feed them at inference).
        rate / rate_prior: the IB rate term (see :func:`allocator_loss_terms`).
        backbones: what rebuilds the frozen VLM (names, paths); stored in checkpoints.
        allocator_spec: ``{"name": ..., "config": {...}}``, the ``create_allocator`` arguments
            that rebuild the allocator; stored in checkpoints so that
            ``arr_coc.training.hub.load_allocator("last.ckpt")`` needs nothing else.
        question_types: names of the question types, to log per-type accuracy.
    """

    def __init__(
        self,
        vlm: nn.Module,
        allocator: nn.Module,
        *,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        budget: int = 16,
        val_budget: int | None = None,
        loss_weights: Mapping[str, float] | None = None,
        use_positions: bool = True,
        allocate_after_projection: bool = True,
        repool_in_vision_space: bool = True,
        rate: str = "kl",
        rate_prior: float | None = None,
        backbones: Mapping[str, Any] | None = None,
        question_types: Iterable[str] | None = None,
        allocator_spec: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(f"budget: expected an int >= 0, got {budget!r}")
        if val_budget is not None and (not isinstance(val_budget, int) or val_budget < 0):
            raise ValueError(f"val_budget: expected an int >= 0 or None, got {val_budget!r}")
        # distill is on by default: only an allocator that reports it (arr_coc_adapter) pays it
        # relevance (supervision by the ground-truth relevance mask) is off unless asked for
        weights = {"ce": 1.0, "rate": 0.0, "critic": 0.0, "distill": 1.0, "relevance": 0.0}
        for k, v in dict(loss_weights or {}).items():
            if k not in weights:
                raise ValueError(f"loss_weights: unknown term {k!r}; expected some of {list(weights)}")
            if float(v) < 0:
                raise ValueError(f"loss_weights: {k} must be >= 0, got {v}")
            weights[k] = float(v)
        # plain values only in the checkpoint's hyper-parameters (weights_only loading)
        self.save_hyperparameters(logger=False, ignore=["vlm", "allocator", "optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        from arr_coc.training.hosts import as_host

        self.host = as_host(vlm)  # a plain object: the weights are registered once, as self.vlm
        self.vlm = self.host.model
        self.vlm.requires_grad_(False)
        self.vlm.eval()
        self.allocator = allocator
        self.budget = budget
        self.val_budget = budget if val_budget is None else val_budget
        self.loss_weights = weights
        self.use_positions = use_positions
        self.allocate_after_projection = allocate_after_projection
        self.repool_in_vision_space = repool_in_vision_space
        if rate not in ("kl", "tokens"):
            raise ValueError(f"rate: expected 'kl' or 'tokens', got {rate!r}")
        if rate_prior is not None and not 0.0 < rate_prior < 1.0:
            raise ValueError(f"rate_prior: expected a keep rate in (0, 1) or None, got {rate_prior!r}")
        self.rate_kind, self.rate_prior = rate, rate_prior
        self.backbones = dict(backbones or {})
        if allocator_spec is not None and (not isinstance(allocator_spec.get("name"), str) or
                                           not isinstance(allocator_spec.get("config", {}), Mapping)):
            raise ValueError(f"allocator_spec: expected {{'name': str, 'config': dict}}, got {allocator_spec!r}")
        self.allocator_spec = None if allocator_spec is None else {
            "name": allocator_spec["name"], "config": dict(allocator_spec.get("config") or {})}
        self.question_types = list(question_types or [])
        self._vlm_fingerprint: list[float] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self.val_type_acc = nn.ModuleDict({t: MeanMetric() for t in self.question_types})
        self._val_examples = 0
        self._val_seconds = 0.0
        self._materialize_lazy_parameters()

    def _materialize_lazy_parameters(self) -> None:
        """Run the allocator once on random inputs of the right shapes if it has lazy
        (uninitialised) parameters, so that the optimizer and DDP see real ones."""
        from torch.nn.parameter import is_lazy

        if not any(is_lazy(p) for p in self.allocator.parameters()):
            return
        scorer = getattr(self.allocator, "scorer", None)
        if getattr(self.allocator, "in_llm", False) and callable(getattr(scorer, "materialize", None)):
            scorer.materialize(self.host.llm_dim, self.host.llm_dim)  # it reads the LLM's hidden states
            if not any(is_lazy(q) for q in self.allocator.parameters()):
                return
        gen = torch.Generator().manual_seed(0)
        p, (h, w) = int(self.host.num_prefix_tokens), self.grid
        dim = self.host.llm_dim if self.allocate_after_projection else self.host.vision_dim
        x = torch.randn(2, p + h * w, dim, generator=gen)
        q = torch.randn(2, 3, self.host.llm_dim, generator=gen)
        was_training = self.allocator.training
        self.allocator.train()
        with torch.enable_grad():
            self.allocator(x, query=q, budget=min(4, h * w), grid=(h, w), num_prefix_tokens=p)
        self.allocator.train(was_training)
        if any(is_lazy(q) for q in self.allocator.parameters()):
            raise ValueError("allocator: lazy parameters stay uninitialised after a dry run; pass its dims explicitly")

    # ------------------------------------------------------------------ structure
    def train(self, mode: bool = True) -> ARRCOCModule:
        """The VLM stays in eval mode (no dropout, frozen statistics) whatever ``mode``."""
        super().train(mode)
        self.vlm.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.allocator.parameters() if p.requires_grad]

    @property
    def grid(self) -> tuple[int, int]:
        """The host's default candidate grid (a batch may report its own, see ``forward``)."""
        g = self.host.grid
        return (int(g), int(g)) if isinstance(g, int) else (int(g[0]), int(g[1]))

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, torch.Tensor], budget: int | torch.Tensor | None = None) -> dict[str, Any]:
        """Run the pipeline on a batch.

        Returns ``answer`` (the host's :class:`~arr_coc.training.hosts.HostAnswer`: ``loss``,
        ``correct`` [B], ``logits``), ``logits``, the allocation ``out``, the candidate
        ``tokens`` [B, P+N, D], the ``query`` [B, T, Dl] and ``query_mask``, the batch's ``grid``.

        batch: what the host reads; for the embedded base VLM ``pixels`` [B, 3, H, W],
        ``question_ids`` [B, T] long, ``question_mask`` [B, T] bool, ``answer`` [B] long.
        """
        budget = self.budget if budget is None else budget
        with torch.no_grad():
            enc = self.host.encode_image(batch)
            vision_tokens, grid, p = enc.tokens, enc.grid, int(enc.num_prefix_tokens)  # [B, P+N, Dv]
            tokens = self.host.project(vision_tokens) if self.allocate_after_projection else vision_tokens
            query, q_mask = self.host.query(batch)  # [B, T, Dl], [B, T]
        if getattr(self.allocator, "in_llm", False):
            return self._forward_in_llm(batch, budget, vision_tokens, tokens, grid, p, query, q_mask)
        host_kw = {}
        if getattr(self.allocator, "reads_host", False) and self.allocate_after_projection:
            from arr_coc.training.hosts import EmbeddedHost

            if isinstance(self.host, EmbeddedHost):  # the base VLM's signals (LLM attention, ...)
                from arr_coc.training.base_host import BaseVLMHost

                host_kw["host"] = BaseVLMHost(
                    self.vlm, batch.get("pixels"), vision_tokens, batch["question_ids"], batch["question_mask"]
                )
        out = self.allocator(
            tokens,
            query=query,
            query_mask=q_mask,
            budget=budget,
            grid=grid,
            num_prefix_tokens=p,
            **host_kw,
        )
        if self.allocate_after_projection:
            visual = out.tokens  # [B, K, Dl]
            if self.repool_in_vision_space and self.host.pooled_in_vision_space:
                fixed = repool_in_vision_space(
                    out.tokens.detach(), out.positions, out.mask, vision_tokens[:, p:], tokens[:, p:],
                    grid, self.host.project,
                )
                visual = visual + (fixed - visual.detach())  # the value of ViT-space pooling, the allocator's gradient
            prefix = tokens[:, :p]
        else:
            visual = self.host.project(out.tokens)  # [B, K, Dl]
            with torch.no_grad():
                prefix = self.host.project(vision_tokens[:, :p]) if p else tokens[:, :0]
        answer = self.host.answer(
            visual, out.mask, out.positions if self.use_positions else None, batch, prefix=prefix
        )
        return {
            "answer": answer, "logits": answer.logits, "out": out, "tokens": tokens,
            "query": query, "query_mask": q_mask, "grid": grid, "num_prefix_tokens": p,
        }

    def _forward_in_llm(self, batch, budget, vision_tokens, tokens, grid, p, query, q_mask) -> dict[str, Any]:
        """An in-LLM allocator (``in_llm``: FastV, ``arr_coc_host_llm_trained``) prunes inside the
        embedded base VLM's LLM (``BaseVLMHost.answer_in_llm``), as in evaluation. The kept set is
        discrete, so the answer loss has no path to the allocator: it trains on the terms its
        prune calls report (``relevance_logits``, ``losses``), merged into ``out.extras``."""
        from arr_coc.allocators import AllocationOutput
        from arr_coc.training.base_host import BaseVLMHost
        from arr_coc.training.hosts import EmbeddedHost, HostAnswer

        if not isinstance(self.host, EmbeddedHost) or not self.allocate_after_projection:
            raise ValueError(
                "allocator: an in-LLM allocator trains on the embedded base VLM with allocate_after_projection=True"
            )
        host = BaseVLMHost(self.vlm, batch.get("pixels"), vision_tokens, batch["question_ids"], batch["question_mask"])
        fine = tokens[:, p:]
        logits, trace = host.answer_in_llm(
            self.allocator, fine, None, None, batch["question_ids"], batch["question_mask"], budget, return_trace=True
        )
        answer = HostAnswer(
            loss=F.cross_entropy(logits.float(), batch["answer"]), correct=logits.argmax(-1) == batch["answer"], logits=logits
        )
        positions = host.kept_positions(trace)
        extras: dict[str, Any] = {}
        for e in trace.extras:
            extras.update(e)
        kept = fine.gather(1, trace.kept.clamp(min=0)[..., None].expand(-1, -1, fine.shape[-1]))
        out = AllocationOutput(
            indices=trace.kept, tokens=kept * trace.mask[..., None], mask=trace.mask, positions=positions,
            gain=extras.get("gain"), extras=extras,
        )
        return {
            "answer": answer, "logits": logits, "out": out, "tokens": tokens,
            "query": query, "query_mask": q_mask, "grid": grid, "num_prefix_tokens": p,
        }

    def _loss(self, batch: Mapping[str, torch.Tensor], budget: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        res = self(batch, budget)
        terms = {"ce": res["answer"].loss}
        terms.update(
            allocator_loss_terms(
                self.allocator,
                res["out"],
                tokens=res["tokens"],
                query=res["query"],
                query_mask=res["query_mask"],
                grid=res["grid"],
                num_prefix_tokens=res["num_prefix_tokens"],
                budget=int(budget),
                rate=self.rate_kind,
                rate_prior=self.rate_prior,
                relevance=batch.get("relevance") if self.loss_weights["relevance"] > 0 else None,
            )
        )
        total = sum(self.loss_weights[k] * v for k, v in terms.items() if k in self.loss_weights)
        return total, terms, res

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        total, terms, res = self._loss(batch, self.budget)
        b = int(res["out"].mask.shape[0])
        for k, v in terms.items():
            self.log(f"train/{k}", v.detach(), batch_size=b)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=b)
        self.log("train/tokens", res["out"].mask.sum(1).float().mean(), batch_size=b)
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            return None  # nothing to train (a parameter-free allocator): evaluation only
        return total

    def on_validation_epoch_start(self) -> None:
        self._val_examples, self._val_seconds = 0, 0.0

    def _eval_step(self, batch: Mapping[str, torch.Tensor], stage: str) -> None:
        t0 = time.perf_counter()
        total, terms, res = self._loss(batch, self.val_budget)
        dt = time.perf_counter() - t0
        out = res["out"]
        b = int(out.mask.shape[0])
        self._val_examples += b
        self._val_seconds += dt
        correct = res["answer"].correct.float()
        self.log(f"{stage}/acc", correct.mean(), prog_bar=True, batch_size=b, sync_dist=True)
        self.log(f"{stage}/loss", total, batch_size=b, sync_dist=True)
        for k, v in terms.items():
            self.log(f"{stage}/{k}", v, batch_size=b, sync_dist=True)
        self.log(f"{stage}/tokens", out.mask.sum(1).float().mean(), batch_size=b, sync_dist=True)
        if "relevance" in batch:
            rec = relevance_recall(out.positions, out.mask, batch["relevance"], res["grid"])
            ok = ~torch.isnan(rec)
            if ok.any():
                self.log(f"{stage}/recall", rec[ok].mean(), batch_size=int(ok.sum()), sync_dist=True)
                # the same, counting fine (level 0) tokens only: how much is seen at full detail
                fine = out.mask & (out.positions[..., 2] == 0)
                rec_fine = relevance_recall(out.positions, fine, batch["relevance"], res["grid"])
                self.log(f"{stage}/recall_fine", rec_fine[ok].mean(), batch_size=int(ok.sum()), sync_dist=True)
        if out.gain is not None:
            self.log(f"{stage}/mi_selected_query", out.gain.detach().float().mean(), batch_size=b, sync_dist=True)
        if "question_type" in batch and self.question_types:
            for i, name in enumerate(self.question_types):
                sel = batch["question_type"] == i
                if sel.any():
                    self.val_type_acc[name].update(correct[sel])
                    self.log(f"{stage}/acc_{name}", self.val_type_acc[name], batch_size=int(sel.sum()))

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self._val_seconds > 0:
            # examples per second through the whole pipeline (timing: not bit-reproducible)
            self.log("val/throughput", self._val_examples / self._val_seconds, sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            return None
        opt = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt), "interval": "epoch"}}

    # ------------------------------------------------------------------ checkpoints
    def setup(self, stage: str) -> None:
        # the frozen host's fingerprint, taken before a strategy (FSDP) shards its weights
        self._frozen_fingerprint()

    def _frozen_fingerprint(self) -> list[float]:
        if self._vlm_fingerprint is None:
            self._vlm_fingerprint = module_fingerprint(self.vlm)
        return self._vlm_fingerprint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("vlm.")]:
            del state[key]
        checkpoint["arr_coc"] = {
            "backbones": self.backbones,
            "allocator": self.allocator_spec,
            "vlm_fingerprint": self._frozen_fingerprint(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("arr_coc", {})
        saved = meta.get("vlm_fingerprint")
        if saved is not None:
            now = self._frozen_fingerprint()
            if not torch.allclose(torch.tensor(saved), torch.tensor(now), rtol=1e-9, atol=1e-6):
                raise ValueError(
                    f"checkpoint: trained on another frozen VLM (backbones {meta.get('backbones')}); "
                    f"fingerprint {saved} != {now}"
                )
        state = checkpoint["state_dict"]
        for k, v in self.vlm.state_dict().items():
            state.setdefault(f"vlm.{k}", v)
        self._pending_rng = meta.get("rng")

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng["torch"])
            if self._pending_rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._pending_rng["cuda"])
            self._pending_rng = None
