"""Collectives that carry gradients, for the contrastive losses in :mod:`arr_coc.losses`.

``torch.distributed.all_gather`` returns tensors with no autograd history: a loss computed
on them sends no gradient back to the other ranks' embeddings, which silently trains a
different objective. The two autograd Functions here do carry it:

- :func:`all_gather_with_grad`: every rank gets ``[W * B, ...]``; the backward pass sums the
  gradient of the gathered tensor over ranks (all-reduce) and hands each rank its own
  rows. With a loss that is the *mean* over ranks of per-rank losses (which is what
  DistributedDataParallel's gradient averaging computes), each rank's embedding gradient
  is ``W`` times the gradient of that mean, and the parameter gradients after DDP's
  division by ``W`` are exactly those of one process on the concatenated batch.
- :func:`ring_exchange`: send to rank ``r + 1``, receive from rank ``r - 1`` (SigLIP's
  "chunked" distributed loss); its backward pass sends the gradient back the other way.

Both work with any backend that supports the ops they use (gloo, nccl: all-reduce,
all-gather, point-to-point send/recv).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function

__all__ = ["all_gather_with_grad", "check_distributed", "check_same_shape", "ring_exchange"]


def check_distributed(rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> None:
    """Validate the distributed settings a loss was built with (cheap: no collective).

    Raises ValueError when ``world_size < 1``, ``rank`` is outside ``[0, world_size)``, or
    ``world_size > 1`` and ``torch.distributed`` is not initialised or disagrees.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if world_size == 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"world_size={world_size} needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before the loss is called"
        )
    actual_world, actual_rank = dist.get_world_size(group), dist.get_rank(group)
    if (actual_world, actual_rank) != (world_size, rank):
        raise ValueError(
            f"the loss was built with rank={rank}, world_size={world_size} but the process group "
            f"has rank={actual_rank}, world_size={actual_world}"
        )


def check_same_shape(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """All ranks must pass tensors of one shape; raise ValueError on every rank otherwise.

    One tiny all-gather of the shapes; every rank sees the same gathered shapes, so every
    rank raises together (no rank is left waiting in the next collective).
    """
    world = dist.get_world_size(group)
    shape = torch.tensor([tensor.ndim, *tensor.shape, *([0] * (4 - tensor.ndim))], dtype=torch.long)
    shape = shape.to(tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        listed = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(f"every rank must pass embeddings of the same shape, got {listed} by rank")


class _AllGatherWithGrad(Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Every rank's loss may depend on every rank's rows: sum the gradients over ranks,
        # then keep this rank's slice (a reduce-scatter written with all-reduce, which
        # every backend supports).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Gather ``tensor`` [B, ...] from every rank into [W * B, ...] (rank order), with gradients.

    All ranks must pass the same shape (checked: ValueError on every rank otherwise).
    """
    check_same_shape(tensor, group)
    return _AllGatherWithGrad.apply(tensor, group)


def _peer(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group`` (point-to-point ops take global ranks)."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _send_recv(tensor: torch.Tensor, to_rank: int, from_rank: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, _peer(group, to_rank), group=group),
        dist.P2POp(dist.irecv, received, _peer(group, from_rank), group=group),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _RingExchange(Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.right, ctx.left = group, (rank + 1) % world, (rank - 1) % world
        return _send_recv(tensor.contiguous(), ctx.right, ctx.left, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # The output came from the left neighbour: its gradient goes back there, and the
        # gradient of what we sent to the right comes back from the right.
        return _send_recv(grad.contiguous(), ctx.left, ctx.right, ctx.group), None


def ring_exchange(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Send ``tensor`` to rank ``r + 1`` and return the one received from rank ``r - 1`` (mod W).

    Differentiable: the gradient of the result flows back to the sender.
    All ranks must pass tensors of one shape (the caller checks it once with
    :func:`check_same_shape`; a mismatch would otherwise fail inside the backend).
    """
    return _RingExchange.apply(tensor, group)
