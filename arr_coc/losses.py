"""Contrastive objectives, each reporting the mutual-information lower bound it implies.

Every loss is an ``nn.Module`` whose ``forward`` returns a dict of named terms (open_clip
style; the distributed settings ``rank``, ``world_size``, ``group`` go to ``__init__``):

- ``loss``: the scalar to minimise (differentiable);
- ``mi_lower_bound``: the InfoNCE bound ``log N - CE`` in nats (detached), where ``N`` is
  the number of candidates per query and ``CE`` the mean cross-entropy of picking the
  positive among them with the loss's critic;
- ``log_n``: ``log N``; ``saturated``: True when the bound is within ``saturation_margin``
  nats of ``log N``. The bound can never exceed ``log N`` (CE >= 0), so a saturated bound
  only says "I >= about log N": use more negatives (a bigger batch or a
  :class:`NegativeQueue`) to measure more;
- plus loss-specific terms (temperature, logit scale and bias, number of negatives).

The bound (van den Oord et al. 2018, "CPC"; Poole et al. 2019, "On variational bounds of
MI"): for any critic ``f`` and a positive ``y_1 ~ p(y | x)`` among ``N - 1`` negatives drawn
independently from ``p(y)``,

    I(X; Y) >= E[ log( exp f(x, y_1) / ((1/N) sum_j exp f(x, y_j)) ) ] = log N - E[CE].

It holds for in-batch negatives and for queue keys (samples of the key marginal, from an
older encoder); it is NOT a valid MI bound when explicit negatives are chosen as hard
negatives, since they are then not draws from ``p(y)``.

Contents: :class:`NegativeQueue` (MoCo memory bank), :class:`InfoNCELoss`,
:class:`ClipLoss` (symmetric softmax cross-entropy), :class:`SigLipLoss` (pairwise sigmoid;
chunked path with memory ``O(chunk x N)`` in the forward AND the backward pass).

Distributed convention (the one DistributedDataParallel expects, as in open_clip): each
rank returns the loss of its own rows; the mean over ranks equals the one-process loss on
the concatenated batch, and after DDP averages the parameter gradients over ranks they
equal the one-process gradients. (The gradient each rank sees on its own embeddings is
``world_size`` times the one-process gradient of those rows; DDP's averaging undoes it.)
Likewise each rank's ``mi_lower_bound`` is that of its own rows (``log_n`` counts all
W * B candidates): average it over ranks. :class:`InfoNCELoss` and :class:`NegativeQueue`
are single-process; under DDP gather the keys (``all_gather_with_grad`` in
``arr_coc._distributed``) before passing them, as MoCo does before enqueueing.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from arr_coc._distributed import all_gather_with_grad, check_distributed, check_same_shape, ring_exchange

__all__ = ["ClipLoss", "InfoNCELoss", "NegativeQueue", "SigLipLoss", "siglip_pair_loss_sum"]

_CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


# --------------------------------------------------------------------------- validation


def _check_embeddings(name: str, x: object, *, check_finite: bool) -> torch.Tensor:
    """``x`` must be a [B, D] floating tensor with B, D >= 1 (and finite, if asked)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, D], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [B, D], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); B must be >= 1")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding dimension 0 (shape {tuple(x.shape)}); D must be >= 1")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    # Half precision logits over thousands of candidates lose too much: compute in float32.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_pair(a_name: str, a: object, b_name: str, b: object, *, check_finite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a = _check_embeddings(a_name, a, check_finite=check_finite)
    b = _check_embeddings(b_name, b, check_finite=check_finite)
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same shape [B, D] (row i of one pairs with row i "
            f"of the other), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on one device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    return a, b


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _bound_terms(ce: torch.Tensor, num_candidates: torch.Tensor | int, margin: float, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mi_lower_bound = log N - CE``, ``log_n``, ``saturated`` (all detached)."""
    n = torch.as_tensor(num_candidates, device=ref.device)
    log_n = torch.log(n.to(ref.dtype))
    bound = log_n - ce.detach().to(ref.dtype)
    return {"mi_lower_bound": bound, "log_n": log_n, "saturated": bound >= log_n - margin}


def _scale_from_log(log_scale: torch.Tensor, max_scale: float | None) -> torch.Tensor:
    """exp(log_scale), clamped so it never exceeds ``max_scale`` (gradient 0 beyond the cap)."""
    if max_scale is not None:
        log_scale = log_scale.clamp(max=math.log(max_scale))
    return log_scale.exp()


# --------------------------------------------------------------------------- negative queue


class NegativeQueue(nn.Module):
    """MoCo-style FIFO memory bank of detached, L2-normalised keys.

    Buffers (so they follow ``.to(device)`` and survive ``state_dict`` round trips):
    ``keys`` [size, D], ``ptr`` (next write slot) and ``count`` (filled slots, <= size).
    Enqueueing B keys is the same as enqueueing them one by one: the write wraps around the
    end, and when B > size only the last ``size`` keys stay. No host synchronisation.

    Args:
        dim: D, the key dimension.
        size: number of slots (>= 1).
        normalize: L2-normalise keys on the way in (the losses normalise their queries).
        dtype: storage dtype of the keys.
    """

    keys: torch.Tensor
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, dim: int, size: int, *, normalize: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.dim, self.size, self.normalize = dim, size, normalize
        self.register_buffer("keys", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, normalize={self.normalize}"

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append ``keys`` [B, D] (detached; normalised if ``normalize``), oldest out first."""
        keys = _check_embeddings("keys", keys, check_finite=True)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must have dimension {self.dim} (the queue's dim), got shape {tuple(keys.shape)}")
        keys = keys.detach()
        if self.normalize:
            keys = F.normalize(keys, dim=-1)
        n = keys.shape[0]
        start = self.ptr
        if n > self.size:  # only the last `size` keys survive, at the slots they would have reached
            start = (self.ptr + (n - self.size)) % self.size
            keys = keys[-self.size :]
        slots = (start + torch.arange(keys.shape[0], device=self.keys.device)) % self.size
        self.keys.index_copy_(0, slots, keys.to(device=self.keys.device, dtype=self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``keys`` [size, D], ``valid`` [size] bool): a snapshot of the slots filled so far.

        The keys are a copy, so enqueueing before the backward pass of a loss that used
        them is safe (the buffer itself is updated in place).
        """
        valid = torch.arange(self.size, device=self.keys.device) < self.count
        return self.keys.clone(), valid

    @torch.no_grad()
    def reset(self) -> None:
        self.keys.zero_()
        self.ptr.zero_()
        self.count.zero_()

    def __len__(self) -> int:
        return int(self.count)


# --------------------------------------------------------------------------- InfoNCE


class InfoNCELoss(nn.Module):
    """InfoNCE: pick each query's positive key among N candidates.

    Candidates of query i: its key ``key[i]``; the other keys of the batch when
    ``in_batch_negatives``; the explicit ``negatives`` passed to ``forward``; the filled
    slots of ``queue``. Critic: ``<q, k> / temperature`` (cosine similarity when
    ``normalize``). With a queue, ``forward`` enqueues the batch's keys after using the
    queue (``update_queue=True``), so K micro-batches of gradient accumulation each see
    the previous keys as negatives.

    Args:
        temperature: tau > 0 (logits are ``<q, k> / tau``).
        learnable: learn ``log(1 / tau)`` (a Parameter; the scale ``1 / tau`` is capped at
            ``max_logit_scale``); otherwise tau is a fixed buffer.
        in_batch_negatives: use the other keys of the batch as negatives.
        normalize: L2-normalise queries, keys and negatives.
        queue: optional :class:`NegativeQueue` (a submodule: saved with the loss).
        max_logit_scale: cap on ``1 / tau`` when learnable.
        saturation_margin: ``saturated`` when the bound is within this many nats of log N.
        check_finite: raise ValueError on nan/inf inputs (costs one host sync per input).
    """

    logit_scale: torch.Tensor

    def __init__(
        self,
        temperature: float = 0.1,
        learnable: bool = False,
        *,
        in_batch_negatives: bool = True,
        normalize: bool = True,
        queue: NegativeQueue | None = None,
        max_logit_scale: float = 100.0,
        saturation_margin: float = 0.1,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        _check_positive("max_logit_scale", max_logit_scale)
        if learnable and 1 / temperature > max_logit_scale:
            raise ValueError(f"1 / temperature = {1 / temperature:.4g} exceeds max_logit_scale = {max_logit_scale}")
        if queue is not None and not isinstance(queue, NegativeQueue):
            raise ValueError(f"queue must be a NegativeQueue or None, got {type(queue).__name__}")
        init = torch.tensor(math.log(1 / temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.learnable, self.in_batch_negatives, self.normalize = learnable, in_batch_negatives, normalize
        self.queue = queue
        self.max_logit_scale, self.saturation_margin, self.check_finite = max_logit_scale, saturation_margin, check_finite

    @property
    def temperature(self) -> float:
        return float(1 / self._scale().detach())

    def _scale(self) -> torch.Tensor:
        return _scale_from_log(self.logit_scale, self.max_logit_scale if self.learnable else None)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        *,
        negatives: torch.Tensor | None = None,
        update_queue: bool = True,
    ) -> dict[str, torch.Tensor]:
        """query [B, D], key [B, D] (row i is query i's positive),
        negatives [M, D] (shared by all queries) or [B, M, D] (per query) or None.

        Returns loss, mi_lower_bound, log_n, saturated, num_candidates (N, long),
        num_negatives (N - 1), temperature.
        """
        q, k = _check_pair("query", query, "key", key, check_finite=self.check_finite)
        b, d = q.shape
        if self.normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.in_batch_negatives:
            parts = [q @ k.T]  # [B, B], positive on the diagonal
            target = torch.arange(b, device=q.device)
        else:
            parts = [(q * k).sum(dim=-1, keepdim=True)]  # [B, 1]
            target = torch.zeros(b, dtype=torch.long, device=q.device)
        count: torch.Tensor | int = parts[0].shape[1]

        if negatives is not None:
            if not isinstance(negatives, torch.Tensor) or negatives.ndim not in (2, 3):
                raise ValueError("negatives must be a tensor [M, D] or [B, M, D]")
            if negatives.shape[-1] != d or (negatives.ndim == 3 and negatives.shape[0] != b):
                raise ValueError(
                    f"negatives must have shape [M, {d}] or [{b}, M, {d}] to match query {tuple(q.shape)}, "
                    f"got {tuple(negatives.shape)}"
                )
            if self.check_finite and not bool(torch.isfinite(negatives).all()):
                raise ValueError("negatives contains non-finite values (nan or inf)")
            neg = negatives.to(device=q.device, dtype=q.dtype)
            if self.normalize:
                neg = F.normalize(neg, dim=-1)
            parts.append(q @ neg.T if neg.ndim == 2 else torch.einsum("bd,bmd->bm", q, neg))
            count = count + neg.shape[-2]

        scale = self._scale().to(q.dtype)
        logits = torch.cat(parts, dim=1) * scale
        if self.queue is not None:
            if self.queue.dim != d:
                raise ValueError(f"the queue holds keys of dimension {self.queue.dim} but query has dimension {d}")
            qkeys, valid = self.queue.get()
            q_logits = (q @ qkeys.to(device=q.device, dtype=q.dtype).T) * scale
            logits = torch.cat([logits, q_logits.masked_fill(~valid.to(q.device), float("-inf"))], dim=1)
            count = valid.sum() + count

        ce = F.cross_entropy(logits, target)
        if self.queue is not None and update_queue:
            self.queue.enqueue(key)
        n = torch.as_tensor(count, device=q.device)
        out = {"loss": ce, **_bound_terms(ce, n, self.saturation_margin, q)}
        out.update(num_candidates=n, num_negatives=n - 1, temperature=(1 / scale).detach())
        return out


# --------------------------------------------------------------------------- CLIP


class _SymmetricCrossEntropy(Function):
    """(mean_i CE(row i, label i), mean_j CE(column j, label j)) of a square logit matrix.

    The value of ``F.cross_entropy(l, arange)`` and ``F.cross_entropy(l.T, arange)``, but it
    saves only the logits and two [N] log-sum-exp vectors, and its backward builds the
    gradient ``(softmax_rows - I) g1 / N + (softmax_cols - I) g2 / N`` in one [N, N] buffer
    (column blocks for the second term): about half the memory of the two autograd
    cross-entropies, with the same numerical stability.
    """

    @staticmethod
    def forward(ctx, logits):  # type: ignore[override]
        lse_rows, lse_cols = torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)
        diag = logits.diagonal()
        ctx.save_for_backward(logits, lse_rows, lse_cols)
        return (lse_rows - diag).mean(), (lse_cols - diag).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_rows, g_cols):  # type: ignore[override]
        logits, lse_rows, lse_cols = ctx.saved_tensors
        n = logits.shape[0]
        grad = torch.sub(logits, lse_rows[:, None]).exp_().mul_(g_rows / n)
        step = max(1, n // 8)
        for j0 in range(0, n, step):
            block = torch.sub(logits[:, j0 : j0 + step], lse_cols[None, j0 : j0 + step]).exp_()
            grad[:, j0 : j0 + step].add_(block.mul_(g_cols / n))
        grad.diagonal().sub_((g_rows + g_cols) / n)
        return grad



class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP (Radford et al. 2021), as in open_clip.

    ``logits = s * <u_i, v_j> (+ b)`` with u, v L2-normalised, ``s = exp(logit_scale)``
    learnable (initialised at 1/0.07, capped at ``max_logit_scale`` = 100);
    ``loss = (CE(image -> text) + CE(text -> image)) / 2``.

    A logit bias is accepted for API parity with open_clip, but it adds the same constant
    to every logit of a row, so it cancels in the softmax: it changes neither the loss nor
    any gradient (its own gradient is exactly 0). It matters only for :class:`SigLipLoss`.

    Distributed (``world_size > 1``): embeddings are gathered from every rank WITH
    gradients. ``local_loss=True``: this rank's B rows against all W * B columns (labels
    offset by ``rank * B``), memory O(B x W B); ``local_loss=False``: every rank computes
    the full (W B) x (W B) matrix. Both give the one-process loss and, after DDP's
    averaging, its gradients (see the module docstring).

    Args:
        init_logit_scale: initial log of the scale (log(1/0.07) ~ 2.659).
        learnable_scale: whether the scale is a Parameter (else a buffer).
        max_logit_scale: the scale never exceeds this (clamped in forward).
        init_logit_bias: None (no bias) or an initial value of a learnable bias.
        normalize: L2-normalise the embeddings.
        local_loss, rank, world_size, group: distributed settings.
        saturation_margin, check_finite: as in :class:`InfoNCELoss`.
    """

    logit_scale: torch.Tensor

    def __init__(
        self,
        *,
        init_logit_scale: float = _CLIP_INIT_LOGIT_SCALE,
        learnable_scale: bool = True,
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
        normalize: bool = True,
        local_loss: bool = False,
        rank: int = 0,
        world_size: int = 1,
        group: torch.distributed.ProcessGroup | None = None,
        saturation_margin: float = 0.1,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        _check_positive("max_logit_scale", max_logit_scale)
        if not math.isfinite(init_logit_scale) or init_logit_scale > math.log(max_logit_scale) + 1e-12:
            raise ValueError(f"exp(init_logit_scale) = {math.exp(init_logit_scale):.4g} must be finite and <= max_logit_scale = {max_logit_scale}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        init = torch.tensor(float(init_logit_scale))
        if learnable_scale:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.max_logit_scale, self.normalize, self.local_loss = max_logit_scale, normalize, local_loss
        self.rank, self.world_size, self.group = rank, world_size, group
        self.saturation_margin, self.check_finite = saturation_margin, check_finite

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """image_features [B, D], text_features [B, D] (row i of each is a pair).

        Returns loss, image_to_text, text_to_image (the two cross-entropies),
        mi_lower_bound, log_n (N = W * B texts per image), saturated, logit_scale (the scale
        s itself, detached).
        """
        u, v = _check_pair("image_features", image_features, "text_features", text_features, check_finite=self.check_finite)
        check_distributed(self.rank, self.world_size, self.group)
        if self.normalize:
            u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        scale = _scale_from_log(self.logit_scale, self.max_logit_scale).to(u.dtype)
        b = u.shape[0]
        if self.world_size > 1:
            all_u, all_v = all_gather_with_grad(u, self.group), all_gather_with_grad(v, self.group)
        else:
            all_u, all_v = u, v
        if self.local_loss and self.world_size > 1:
            labels = torch.arange(b, device=u.device) + self.rank * b
            logits_i2t = scale * u @ all_v.T  # [B, W B], positives at (i, rank * B + i)
            logits_t2i = scale * v @ all_u.T  # [B, W B]
            if self.logit_bias is not None:
                logits_i2t, logits_t2i = logits_i2t + self.logit_bias, logits_t2i + self.logit_bias
            i2t, t2i = F.cross_entropy(logits_i2t, labels), F.cross_entropy(logits_t2i, labels)
        else:  # one [W B, W B] matrix, read along rows (image -> text) and columns
            logits = scale * all_u @ all_v.T
            if self.logit_bias is not None:
                logits = logits + self.logit_bias
            i2t, t2i = _SymmetricCrossEntropy.apply(logits)
        loss = (i2t + t2i) / 2
        out = {"loss": loss, "image_to_text": i2t, "text_to_image": t2i}
        out.update(_bound_terms(loss, self.world_size * b, self.saturation_margin, u))
        out["logit_scale"] = scale.detach()
        return out


# --------------------------------------------------------------------------- SigLIP


def _softplus_sum(x: torch.Tensor) -> torch.Tensor:
    """sum log(1 + exp(x)), exact for large x (F.softplus switches to x above 20)."""
    return -F.logsigmoid(-x).sum()


def _positive_cells(i0: int, i1: int, offset: int | None, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows within the chunk, columns) of the positives of rows i0..i1, or None."""
    if offset is None:
        return None
    rows = torch.arange(i0, i1, device=device)
    cols = rows + offset
    keep = cols < n
    return rows[keep] - i0, cols[keep]


class _SigLipChunked(Function):
    """sum_ij softplus(l_ij) - sum_{positives} l_ij with l = t * u v^T + b, chunked over rows.

    Equal to -sum_ij log sigmoid(z_ij l_ij) with z = +1 on the positives, -1 elsewhere
    (softplus(-x) = softplus(x) - x). Forward and backward each hold at most two
    [chunk, N] blocks at a time (the backward recomputes the logits block by block rather
    than saving them): memory O(chunk x N + (B + N) x D) instead of O(B x N).
    Also returns, detached, the row log-sum-exp of ``t * u v^T`` (for the InfoNCE bound).
    """

    @staticmethod
    def forward(ctx, u, v, scale, bias, offset, chunk):  # type: ignore[override]
        n = v.shape[0]
        total = u.new_zeros(())
        lse = u.new_empty(u.shape[0])
        for i0 in range(0, u.shape[0], chunk):
            i1 = min(i0 + chunk, u.shape[0])
            logits = u[i0:i1] @ v.T  # [c, N]; the only block kept, plus one temporary
            logits.mul_(scale)
            lse[i0:i1] = torch.logsumexp(logits, dim=1)
            logits.add_(bias)
            cells = _positive_cells(i0, i1, offset, n, u.device)
            if cells is not None:
                total -= logits[cells].sum()
            total -= F.logsigmoid(logits.neg_()).sum()  # + sum softplus(logits)
        ctx.save_for_backward(u, v, scale, bias)
        ctx.offset, ctx.chunk = offset, chunk
        ctx.mark_non_differentiable(lse)
        return total, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_lse):  # type: ignore[override]
        u, v, scale, bias = ctx.saved_tensors
        n = v.shape[0]
        grad_u = torch.empty_like(u)
        grad_v = torch.zeros_like(v)
        grad_scale = u.new_zeros(())
        grad_bias = u.new_zeros(())
        for i0 in range(0, u.shape[0], ctx.chunk):
            i1 = min(i0 + ctx.chunk, u.shape[0])
            uc = u[i0:i1]
            sim = uc @ v.T  # [c, N]
            g = (sim * scale).add_(bias).sigmoid_()  # d loss / d logit = sigmoid(l) - [positive]
            cells = _positive_cells(i0, i1, ctx.offset, n, u.device)
            if cells is not None:
                g[cells] -= 1
            g.mul_(grad_total)
            grad_u[i0:i1] = g @ v
            grad_v.addmm_(g.T, uc)
            grad_scale += torch.dot(g.view(-1), sim.view(-1))
            grad_bias += g.sum()
        grad_u.mul_(scale)
        grad_v.mul_(scale)
        return grad_u, grad_v, grad_scale.reshape(scale.shape), grad_bias.reshape(bias.shape), None, None


def siglip_pair_loss_sum(
    u: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    positive_offset: int | None = 0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over all pairs of the sigmoid loss, ``-sum_ij log sigmoid(z_ij (t <u_i, v_j> + b))``.

    u [B, D], v [N, D], scale t and bias b 0-d tensors (bias None: 0). z_ij = +1 where
    ``j == i + positive_offset`` (None: no positives, the block of another rank), else -1.
    ``chunk_size``: None computes the [B, N] matrix with plain autograd; an int processes
    ``chunk_size`` rows at a time in forward and backward (memory O(chunk_size x N)).

    Returns (the sum, a scalar; the row log-sum-exp of ``t <u_i, v_j>`` over j, [B],
    detached).
    """
    if bias is None:
        bias = scale.new_zeros(())
    if chunk_size is None:
        sim = u @ v.T
        logits = scale * sim + bias  # [B, N]
        total = _softplus_sum(logits)
        if positive_offset is not None:
            total = total - torch.diagonal(logits, offset=positive_offset).sum()
        with torch.no_grad():
            lse = torch.logsumexp(scale * sim, dim=1)
        return total, lse
    return _SigLipChunked.apply(u, v, scale, bias.to(scale.dtype), positive_offset, int(chunk_size))


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023), as published.

    ``logits = t <u_i, v_j> + b`` with u, v L2-normalised, ``t = exp(t')`` (t' learnable,
    initialised at log 10) and a learnable bias b (initialised at -10, or at log(1/N) with
    ``init_logit_bias="log_inv_n"`` and ``batch_size=N``); labels z = +1 on the pairs, -1
    elsewhere; ``loss = -(1/B) sum_ij log sigmoid(z_ij * logits_ij)``.

    ``chunk_size``: process that many image rows at a time (forward and backward), so
    peak memory is O(chunk_size x N) rather than O(B x N); None: the plain [B, N] path.

    Distributed (``world_size > 1``): this rank's B images against all W * B texts (the
    loss of rank r is its rows' sum divided by B; the mean over ranks is the one-process
    loss). ``dist_mode="gather"`` all-gathers the texts with gradients; ``"ring"``
    passes text blocks around the ring (W - 1 point-to-point exchanges, as in the paper's
    chunked implementation), all of them negatives but the rank's own block.

    The reported ``mi_lower_bound`` is the InfoNCE bound of the same critic
    ``t <u, v>`` (image -> text; the bias cancels in it), N = W * B texts per image.

    Args:
        init_logit_scale: t' at init (t = exp(t') = 10).
        init_logit_bias: float, or "log_inv_n" (b = -log batch_size).
        batch_size: N for "log_inv_n" (the global number of texts per image).
        learnable: t' and b are Parameters (else buffers).
        max_logit_scale: optional cap on t (None: no cap, as in the paper).
        normalize, chunk_size, rank, world_size, group, dist_mode: see above.
        saturation_margin, check_finite: as in :class:`InfoNCELoss`.
    """

    logit_scale: torch.Tensor
    logit_bias: torch.Tensor

    def __init__(
        self,
        *,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float | Literal["log_inv_n"] = -10.0,
        batch_size: int | None = None,
        learnable: bool = True,
        max_logit_scale: float | None = None,
        normalize: bool = True,
        chunk_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        dist_mode: Literal["gather", "ring"] = "gather",
        group: torch.distributed.ProcessGroup | None = None,
        saturation_margin: float = 0.1,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if init_logit_bias == "log_inv_n":
            if not (isinstance(batch_size, int) and batch_size >= 1):
                raise ValueError(f'init_logit_bias="log_inv_n" needs batch_size, an int >= 1, got {batch_size!r}')
            bias = -math.log(batch_size)
        elif isinstance(init_logit_bias, (int, float)) and math.isfinite(init_logit_bias):
            bias = float(init_logit_bias)
        else:
            raise ValueError(f'init_logit_bias must be a finite float or "log_inv_n", got {init_logit_bias!r}')
        if not math.isfinite(init_logit_scale):
            raise ValueError(f"init_logit_scale must be finite, got {init_logit_scale}")
        if max_logit_scale is not None:
            _check_positive("max_logit_scale", max_logit_scale)
        if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        if dist_mode not in ("gather", "ring"):
            raise ValueError(f'dist_mode must be "gather" or "ring", got {dist_mode!r}')
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        scale_t, bias_t = torch.tensor(float(init_logit_scale)), torch.tensor(bias)
        if learnable:
            self.logit_scale, self.logit_bias = nn.Parameter(scale_t), nn.Parameter(bias_t)
        else:
            self.register_buffer("logit_scale", scale_t)
            self.register_buffer("logit_bias", bias_t)
        self.max_logit_scale, self.normalize, self.chunk_size = max_logit_scale, normalize, chunk_size
        self.rank, self.world_size, self.dist_mode, self.group = rank, world_size, dist_mode, group
        self.saturation_margin, self.check_finite = saturation_margin, check_finite

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """image_features [B, D], text_features [B, D] (row i of each is a pair).

        Returns loss, mi_lower_bound, log_n, saturated, logit_scale (t), logit_bias (b).
        """
        u, v = _check_pair("image_features", image_features, "text_features", text_features, check_finite=self.check_finite)
        check_distributed(self.rank, self.world_size, self.group)
        if self.normalize:
            u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        t = _scale_from_log(self.logit_scale, self.max_logit_scale).to(u.dtype)
        bias = self.logit_bias.to(u.dtype)
        b = u.shape[0]
        kw = {"chunk_size": self.chunk_size}
        if self.world_size == 1:
            total, lse = siglip_pair_loss_sum(u, v, t, bias, positive_offset=0, **kw)
        elif self.dist_mode == "gather":
            all_v = all_gather_with_grad(v, self.group)  # [W B, D]
            total, lse = siglip_pair_loss_sum(u, all_v, t, bias, positive_offset=self.rank * b, **kw)
        else:
            check_same_shape(v, self.group)
            total, lse = siglip_pair_loss_sum(u, v, t, bias, positive_offset=0, **kw)
            block = v
            for _ in range(self.world_size - 1):
                block = ring_exchange(block, self.group)  # the texts of rank r - 1, then r - 2, ...
                part, part_lse = siglip_pair_loss_sum(u, block, t, bias, positive_offset=None, **kw)
                total = total + part
                lse = torch.logaddexp(lse, part_lse)
        loss = total / b
        with torch.no_grad():
            ce = (lse - t * (u * v).sum(dim=-1)).mean()
        out = {"loss": loss, **_bound_terms(ce, self.world_size * b, self.saturation_margin, u)}
        out.update(logit_scale=t.detach(), logit_bias=bias.detach())
        return out
