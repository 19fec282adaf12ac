"""The one forward contract every allocator follows (ours and the published baselines).

```python
out = allocator(patch_tokens,        # [B, P + N, D]; P prefix tokens (CLS, registers), N = H x W
                query=query_tokens,  # [B, T, Dq] or None (query-agnostic methods)
                query_mask=mask,     # [B, T] bool or None (True = real token)
                budget=64,           # int cap, or [B] tensor of ints
                grid=(H, W), num_prefix_tokens=P,
                host=None)           # optional HostSignals (arr_coc.allocators.host)
out.indices    # [B, K] long, indices into the candidate list, raster order, -1 where padded
out.tokens     # [B, K, D] tokens for the LLM (zeros where padded)
out.mask       # [B, K] bool, which entries are real
out.positions  # [B, K, 3] long (row, col, level), -1 where padded
out.gain       # [B] estimated I(selected; query) in nats, or None
```

Subclasses implement :meth:`Allocator.select`, which receives a validated
:class:`AllocationContext` and returns a :class:`Selection`; the base class validates the
input, builds the candidate list, handles ``budget >= N`` (every fine token, unchanged)
and ``budget == 0`` (nothing), orders the result in raster order and pads ragged batches.

``host`` (optional, default None) gives access to signals of the model the allocator runs
in: the vision tower's attention and keys, the text tower's instruction features
(:class:`arr_coc.allocators.host.HostSignals`). It is carried in ``AllocationContext.host``;
methods that do not read it ignore it. In-LLM methods (``in_llm = True``) are run by the
host between LLM layers instead (:class:`arr_coc.allocators.host.InLLMPruner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from arr_coc._finite import all_finite
from arr_coc.pyramid import Pyramid, build_pyramid, raster_key

__all__ = ["AllocationContext", "AllocationOutput", "Allocator", "Selection", "topk_indices"]


@dataclass
class AllocationOutput:
    """What every allocator returns (see the module docstring for shapes)."""

    indices: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    gain: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> torch.Tensor:
        """[B] number of tokens kept per example."""
        return self.mask.sum(dim=1)


@dataclass
class AllocationContext:
    """Validated input handed to :meth:`Allocator.select`.

    prefix:     [B, P, D] prefix tokens (CLS, registers); P may be 0.
    fine:       [B, N, D] patch tokens in raster order of ``grid``.
    pyramid:    candidates [B, M, D] with positions [M, 3] (M = N when the method uses no
                pooled levels).
    query:      [B, T, Dq] or None.
    query_mask: [B, T] bool or None (None with a query means every token is real).
    budget:     [B] long, already clamped to [0, M]; rows with budget >= N never reach
                ``select`` with a different answer than "all fine tokens" (the base class
                overrides them), so methods need no special case for them.
    grid:       (H, W) of the fine tokens.
    host:       the host's signals (:class:`arr_coc.allocators.host.HostSignals`) or None.
    """

    prefix: torch.Tensor
    fine: torch.Tensor
    pyramid: Pyramid
    query: torch.Tensor | None
    query_mask: torch.Tensor | None
    budget: torch.Tensor
    grid: tuple[int, int]
    host: Any = None

    @property
    def candidates(self) -> torch.Tensor:
        return self.pyramid.candidates

    @property
    def batch_size(self) -> int:
        return self.fine.shape[0]

    @property
    def num_fine(self) -> int:
        return self.fine.shape[1]

    @property
    def num_candidates(self) -> int:
        return self.pyramid.candidates.shape[1]

    @property
    def max_budget(self) -> int:
        return int(self.budget.max().item()) if self.budget.numel() else 0

    def budget_mask(self, k: int | None = None) -> torch.Tensor:
        """[B, k] bool: True for the first budget[b] slots of each row."""
        k = self.max_budget if k is None else k
        return torch.arange(k, device=self.budget.device)[None, :] < self.budget[:, None]


@dataclass
class Selection:
    """What a method returns to the base class.

    indices: [B, K] long candidate indices (any order); entries < 0 are padding.
    tokens:  optional [B, K, D] replacement tokens for merging methods (aligned with
             ``indices``); None means "gather the candidates".
    gain:    optional [B] information estimate in nats.
    extras:  anything worth reporting (per-step gains, alpha, scores...).
    """

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    gain: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")


class Allocator(nn.Module):
    """Base class: validation, candidates, budget semantics, raster order, padding.

    Class attributes a method may set:
    ``pyramid_levels`` - pooled levels added to the candidates (() = fine tokens only);
    ``requires_query`` - raise when no query is given;
    ``fixed_budget``   - the method always spends exactly min(budget, N) tokens;
    ``ignores_budget`` - the method keeps every token whatever the budget (``full``);
    ``permutation_equivariant`` - the choice looks only at token content, so permuting the
                         patch tokens permutes the choice (not true of spatial methods);
    ``reads_host``     - the method reads host signals (``host=``) when a host is given;
    ``in_llm``         - the method prunes inside the LLM: a host that can run the LLM layer
                         by layer calls its ``prune`` between layers (``host.answer_in_llm``);
                         called as a plain allocator it uses its documented fallback.
    """

    pyramid_levels: tuple[int, ...] = ()
    requires_query: bool = False
    fixed_budget: bool = True
    ignores_budget: bool = False
    permutation_equivariant: bool = False
    reads_host: bool = False
    in_llm: bool = False

    def select(self, ctx: AllocationContext) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate(
        patch_tokens: torch.Tensor,
        query: torch.Tensor | None,
        query_mask: torch.Tensor | None,
        budget: int | torch.Tensor,
        grid: tuple[int, int] | None,
        num_prefix_tokens: int,
    ) -> tuple[tuple[int, int], torch.Tensor]:
        if not isinstance(patch_tokens, torch.Tensor) or patch_tokens.dim() != 3:
            shape = tuple(patch_tokens.shape) if isinstance(patch_tokens, torch.Tensor) else type(patch_tokens)
            raise ValueError(f"patch_tokens: expected a [B, P + N, D] tensor, got {shape}")
        b, n_total, _ = patch_tokens.shape
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0 or num_prefix_tokens > n_total:
            raise ValueError(
                f"num_prefix_tokens: expected an int in [0, {n_total}], got {num_prefix_tokens!r}"
            )
        n = n_total - num_prefix_tokens
        if grid is None:
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(
                    f"grid: {n} patch tokens do not form a square grid; pass grid=(H, W) explicitly"
                )
            grid = (side, side)
        if len(grid) != 2 or int(grid[0]) * int(grid[1]) != n or min(grid) <= 0:
            raise ValueError(
                f"grid: expected (H, W) with H * W == {n} patch tokens "
                f"({n_total} tokens - {num_prefix_tokens} prefix), got {tuple(grid)}"
            )
        grid = (int(grid[0]), int(grid[1]))
        _check_finite("patch_tokens", patch_tokens)
        if query is not None:
            if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[0] != b:
                shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query)
                raise ValueError(f"query: expected a [B={b}, T, Dq] tensor, got {shape}")
            _check_finite("query", query)
            if query_mask is not None:
                if query_mask.shape != query.shape[:2]:
                    raise ValueError(
                        f"query_mask: expected shape {tuple(query.shape[:2])} matching query, "
                        f"got {tuple(query_mask.shape)}"
                    )
        elif query_mask is not None:
            raise ValueError("query_mask: given without a query")
        if isinstance(budget, torch.Tensor):
            if budget.dim() == 0:
                budget = budget.expand(b)
            if budget.shape != (b,):
                raise ValueError(f"budget: expected an int or a [B={b}] tensor, got shape {tuple(budget.shape)}")
            if budget.is_floating_point() and not torch.equal(budget, budget.round()):
                raise ValueError("budget: expected integer values")
            budget_t = budget.to(device=patch_tokens.device, dtype=torch.long)
        elif isinstance(budget, (int,)) and not isinstance(budget, bool):
            budget_t = torch.full((b,), int(budget), dtype=torch.long, device=patch_tokens.device)
        else:
            raise ValueError(f"budget: expected an int or a [B] tensor, got {budget!r}")
        if (budget_t < 0).any():
            raise ValueError(f"budget: expected values >= 0, got {budget_t.tolist()}")
        return grid, budget_t

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        patch_tokens: torch.Tensor,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        budget: int | torch.Tensor = 64,
        grid: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        *,
        host: Any = None,
    ) -> AllocationOutput:
        grid, budget_t = self._validate(patch_tokens, query, query_mask, budget, grid, num_prefix_tokens)
        if self.requires_query and query is None:
            raise ValueError(f"query: {type(self).__name__} needs a query tensor [B, T, Dq]")
        if query_mask is not None:
            query_mask = query_mask.to(device=patch_tokens.device, dtype=torch.bool)
        prefix = patch_tokens[:, :num_prefix_tokens]
        fine = patch_tokens[:, num_prefix_tokens:]
        n = fine.shape[1]
        pyramid = build_pyramid(fine, grid, self.pyramid_levels)
        m = pyramid.candidates.shape[1]
        full_rows = budget_t >= n
        ctx = AllocationContext(
            prefix=prefix,
            fine=fine,
            pyramid=pyramid,
            query=query,
            query_mask=query_mask,
            budget=torch.where(full_rows, torch.zeros_like(budget_t), budget_t.clamp(max=m)),
            grid=grid,
            host=host,
        )
        if ctx.max_budget > 0:
            sel = self.select(ctx)
        else:
            empty = torch.empty(fine.shape[0], 0, dtype=torch.long, device=fine.device)
            sel = Selection(indices=empty)
        return self._assemble(sel, ctx, full_rows)

    def _assemble(self, sel: Selection, ctx: AllocationContext, full_rows: torch.Tensor) -> AllocationOutput:
        b, n = ctx.batch_size, ctx.num_fine
        device = ctx.fine.device
        indices = sel.indices.long()
        tokens = sel.tokens
        if full_rows.any():
            # budget >= N: every fine token, unchanged, whatever the method.
            k = max(indices.shape[1], n)
            all_fine = torch.arange(n, device=device).expand(b, n)
            pad = torch.full((b, k - n), -1, dtype=torch.long, device=device)
            pad_sel = torch.full((b, k - indices.shape[1]), -1, dtype=torch.long, device=device)
            indices = torch.where(
                full_rows[:, None], torch.cat([all_fine, pad], 1), torch.cat([indices, pad_sel], 1)
            )
            if tokens is not None:
                tok_pad = tokens.new_zeros(b, k - tokens.shape[1], tokens.shape[2])
                fine_pad = ctx.fine.new_zeros(b, k - n, ctx.fine.shape[2])
                tokens = torch.where(
                    full_rows[:, None, None], torch.cat([ctx.fine, fine_pad], 1), torch.cat([tokens, tok_pad], 1)
                )
        valid = indices >= 0
        safe = indices.clamp(min=0)
        pos_all = ctx.pyramid.positions  # [M, 3]
        positions = pos_all[safe]  # [B, K, 3]
        # raster order; padding goes last
        key = raster_key(positions, ctx.grid)
        key = torch.where(valid, key, torch.full_like(key, torch.iinfo(torch.long).max))
        order = key.argsort(dim=1, stable=True)
        indices = indices.gather(1, order)
        valid = valid.gather(1, order)
        positions = positions.gather(1, order[..., None].expand(-1, -1, 3))
        if tokens is None:
            gathered = ctx.candidates.gather(
                1, indices.clamp(min=0)[..., None].expand(-1, -1, ctx.candidates.shape[-1])
            )
        else:
            gathered = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        # trim to the batch's longest row
        k_max = int(valid.sum(1).max().item()) if valid.numel() else 0
        indices, valid = indices[:, :k_max], valid[:, :k_max]
        positions, gathered = positions[:, :k_max], gathered[:, :k_max]
        indices = torch.where(valid, indices, torch.full_like(indices, -1))
        positions = torch.where(valid[..., None], positions, torch.full_like(positions, -1))
        gathered = torch.where(valid[..., None], gathered, torch.zeros_like(gathered))
        gain = sel.gain
        return AllocationOutput(indices, gathered, valid, positions, gain, dict(sel.extras))


def topk_indices(scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Per-example top-k of scores [B, M] with ragged budgets [B] -> [B, max(budget)], -1 padded.

    The shared last step of every score-then-keep method.
    """
    k = int(budget.max().item()) if budget.numel() else 0
    k = min(k, scores.shape[1])
    idx = scores.topk(k, dim=1).indices
    keep = torch.arange(k, device=scores.device)[None, :] < budget[:, None]
    return torch.where(keep, idx, torch.full_like(idx, -1))
