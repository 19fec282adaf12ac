"""Balancing: query focus vs. image coverage, and when to stop spending tokens.

Per example the :class:`Balancer` gives

- ``alpha`` in [0, 1]: the weight of the query information ``I(c_j ; Q | c_S)`` against the
  coverage term in the greedy gain (see :mod:`arr_coc.attending`). Without a real query
  token ``alpha = 0``: the query carries no information, so coverage is the right answer.
- ``price`` (nats per token, >= 0): the greedy stops when its best gain falls below it, so
  an easy query spends fewer tokens than the budget cap.

Each is a fixed value or predicted from the query summary by a small network (initialised
to a given constant, so an untrained balancer behaves like the fixed one).

The information bottleneck for training: maximise ``I(Z ; answer)`` while paying for the
rate ``I(Z ; image)``. The task cross-entropy upper-bounds ``H(answer | Z)``; for a
stochastic keep mask ``Z_j ~ Bernoulli(p_j)`` the rate is bounded by
``sum_j KL(Bernoulli(p_j) || Bernoulli(r))`` (the variational IB bound with a prior keep
rate ``r``), or counted as expected tokens. ``price`` is the Lagrange multiplier of that
trade-off: keep a token iff its information is worth its price, relaxed for gradients by
:func:`soft_keep`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BalanceOutput", "Balancer", "IBLoss", "bernoulli_rate", "expected_tokens", "soft_keep"]


@dataclass
class BalanceOutput:
    """alpha [B] in [0, 1]; price [B] >= 0 (nats per token)."""

    alpha: torch.Tensor
    price: torch.Tensor


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _softplus_inv(y: float) -> float:
    y = max(y, 1e-6)
    return y + math.log(-math.expm1(-y))


class Balancer(nn.Module):
    """Per-example ``alpha`` and ``price``, fixed or predicted from the query summary.

    Args:
        alpha: a float in [0, 1] (fixed) or None (predicted, starting at ``alpha_init``).
        price: a float >= 0 (fixed) or None (predicted, starting at ``price_init``).
        query_dim: width of the query summary (None: inferred on the first forward).
        hidden: width of the predictor.

    forward(query_summary [B, R] | None, has_query [B] bool | None, batch_size=None) -> :class:`BalanceOutput`.
    """

    def __init__(
        self,
        alpha: float | None = 0.9,
        price: float | None = 0.0,
        *,
        query_dim: int | None = None,
        hidden: int = 64,
        alpha_init: float = 0.9,
        price_init: float = 0.05,
    ):
        super().__init__()
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha: expected a float in [0, 1] or None (learned), got {alpha!r}")
        if price is not None and not (isinstance(price, (int, float)) and math.isfinite(price) and price >= 0):
            raise ValueError(f"price: expected a float >= 0 or None (learned), got {price!r}")
        self.fixed_alpha = None if alpha is None else float(alpha)
        self.fixed_price = None if price is None else float(price)
        self.net = None
        if alpha is None or price is None:
            first = nn.Linear(query_dim, hidden) if query_dim is not None else nn.LazyLinear(hidden)
            head = nn.Linear(hidden, 2)
            nn.init.zeros_(head.weight)
            with torch.no_grad():
                head.bias.copy_(torch.tensor([_logit(alpha_init), _softplus_inv(price_init)]))
            self.net = nn.Sequential(first, nn.GELU(), head)

    @property
    def adaptive(self) -> bool:
        """Whether the price may stop the greedy before the budget (learned or > 0)."""
        return self.fixed_price is None or self.fixed_price > 0

    def forward(
        self,
        query_summary: torch.Tensor | None,
        has_query: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
        device: torch.device | None = None,
    ) -> BalanceOutput:
        if query_summary is not None:
            b, device, dtype = query_summary.shape[0], query_summary.device, query_summary.dtype
            if not query_summary.is_floating_point() or query_summary.dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
        else:
            if batch_size is None:
                raise ValueError("batch_size: needed when query_summary is None")
            b, dtype = batch_size, torch.float32
        if has_query is None:
            has_query = torch.full((b,), query_summary is not None, dtype=torch.bool, device=device)
        raw = None
        if self.net is not None and query_summary is not None:
            raw = self.net(query_summary.to(dtype))  # [B, 2]
        if self.fixed_alpha is not None:
            alpha = torch.full((b,), self.fixed_alpha, dtype=dtype, device=device)
        elif raw is not None:
            alpha = torch.sigmoid(raw[:, 0])
        else:
            alpha = torch.zeros(b, dtype=dtype, device=device)
        if self.fixed_price is not None:
            price = torch.full((b,), self.fixed_price, dtype=dtype, device=device)
        elif raw is not None:
            price = F.softplus(raw[:, 1])
        else:
            price = F.softplus(self.net[-1].bias[1]).to(dtype).expand(b)
        # no real query token: the query carries no information, coverage only
        alpha = torch.where(has_query.to(device), alpha, torch.zeros_like(alpha))
        return BalanceOutput(alpha=alpha, price=price)


# ---------------------------------------------------------------------- IB terms
def soft_keep(gains: torch.Tensor, price: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Relaxed "keep iff gain >= price": sigmoid((gain - price) / temperature), gains [B, K], price [B] -> [B, K]."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    return torch.sigmoid((gains - price[:, None]) / temperature)


def expected_tokens(keep_prob: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Expected number of kept tokens: keep_prob [B, M] (mask [B, M]) -> [B]."""
    if mask is not None:
        keep_prob = keep_prob * mask.to(keep_prob.dtype)
    return keep_prob.sum(-1)


def bernoulli_rate(keep_prob: torch.Tensor, prior: float | torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j KL(Bernoulli(p_j) || Bernoulli(r)) in nats: keep_prob [B, M] -> [B].

    The variational information-bottleneck upper bound on I(Z ; image) for a keep mask Z
    with independent Bernoulli(p_j) entries and a prior keep rate r in (0, 1).
    """
    r = torch.as_tensor(prior, dtype=keep_prob.dtype, device=keep_prob.device)
    if ((r <= 0) | (r >= 1)).any():
        raise ValueError(f"prior: expected a keep rate in (0, 1), got {prior!r}")
    p = keep_prob.clamp(0, 1)
    kl = torch.special.xlogy(p, p) - p * torch.log(r) + torch.special.xlogy(1 - p, 1 - p) - (1 - p) * torch.log1p(-r)
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    return kl.sum(-1)


class IBLoss(nn.Module):
    """Information-bottleneck objective: ``task + beta * rate`` (all terms returned by name).

    rate="tokens": expected kept tokens (nats if beta is a price per token);
    rate="kl": :func:`bernoulli_rate` against ``prior`` (the keep rate of the budget).

    forward(task_loss scalar, keep_prob [B, M], mask [B, M] | None) -> dict(loss, task, rate).
    """

    def __init__(self, beta: float = 0.01, *, rate: str = "kl", prior: float = 0.1):
        super().__init__()
        if rate not in ("tokens", "kl"):
            raise ValueError(f"rate: expected 'tokens' or 'kl', got {rate!r}")
        if not beta >= 0:
            raise ValueError(f"beta: expected >= 0, got {beta!r}")
        self.beta, self.rate_kind, self.prior = float(beta), rate, float(prior)

    def forward(self, task_loss: torch.Tensor, keep_prob: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        if self.rate_kind == "tokens":
            rate = expected_tokens(keep_prob, mask).mean()
        else:
            rate = bernoulli_rate(keep_prob, self.prior, mask).mean()
        return {"loss": task_loss + self.beta * rate, "task": task_loss.detach(), "rate": rate}
