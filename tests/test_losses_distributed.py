"""Distributed ClipLoss / SigLipLoss on 2 CPU processes (gloo) equal one process on the
concatenated batch: the loss, the MI bound, the embedding gradients and (after the
averaging DDP does) the parameter gradients, in float64 to 1e-6; and a real
DistributedDataParallel step over two encoders gives the one-process parameter gradients.

A negative control shows the check can fail: the same local CLIP loss gathered with plain
``dist.all_gather`` (no gradient through the other ranks' rows) gives wrong gradients.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from arr_coc.losses import ClipLoss, SigLipLoss

WORLD, B, D = 2, 5, 4
F64 = torch.float64


def _cases(rank: int, world: int) -> dict:
    kw = {"rank": rank, "world_size": world}
    return {
        "clip_global": lambda: ClipLoss(local_loss=False, init_logit_bias=0.5, **kw),
        "clip_local": lambda: ClipLoss(local_loss=True, **kw),
        "siglip_gather": lambda: SigLipLoss(dist_mode="gather", **kw),
        "siglip_gather_chunked": lambda: SigLipLoss(dist_mode="gather", chunk_size=2, **kw),
        "siglip_ring": lambda: SigLipLoss(dist_mode="ring", **kw),
        "siglip_ring_chunked": lambda: SigLipLoss(dist_mode="ring", chunk_size=3, **kw),
    }


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    return torch.randn(WORLD * B, D, generator=gen, dtype=F64), torch.randn(WORLD * B, D, generator=gen, dtype=F64)


def _run(loss_fn, img: torch.Tensor, txt: torch.Tensor) -> dict:
    """Loss, bound, embedding and parameter gradients of one call."""
    loss_fn = loss_fn.double()
    with torch.no_grad():  # logits of both signs for SigLIP, so every term matters
        if isinstance(loss_fn, SigLipLoss):
            loss_fn.logit_bias.fill_(-1.5)
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    out = loss_fn(img, txt)
    out["loss"].backward()
    return {
        "loss": out["loss"].detach(),
        "bound": out["mi_lower_bound"],
        "log_n": out["log_n"],
        "img_grad": img.grad,
        "txt_grad": txt.grad,
        "params": {n: p.grad.clone() for n, p in loss_fn.named_parameters()},
    }


class _Encoders(torch.nn.Module):
    """Two linear encoders and a loss: what a CLIP-style training step differentiates."""

    def __init__(self, loss_fn: torch.nn.Module) -> None:
        super().__init__()
        torch.manual_seed(7)  # the same initial weights in every process
        self.img, self.txt = torch.nn.Linear(D, 3, dtype=F64), torch.nn.Linear(D, 3, dtype=F64)
        self.loss_fn = loss_fn.double()
        if isinstance(loss_fn, SigLipLoss):
            with torch.no_grad():
                self.loss_fn.logit_bias.fill_(-1.5)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.img(img), self.txt(txt))["loss"]


def _train_step_grads(loss_fn: torch.nn.Module, img: torch.Tensor, txt: torch.Tensor, *, ddp: bool) -> dict:
    model = _Encoders(loss_fn)
    runner = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    runner(img, txt).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _plain_gather_clip_local(img: torch.Tensor, txt: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The classic mistake: ``dist.all_gather`` carries no gradient to the other ranks."""
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    u, v = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    all_u, all_v = [torch.empty_like(u) for _ in range(world)], [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(all_u, u.detach())
    dist.all_gather(all_v, v.detach())
    all_u[rank], all_v[rank] = u, v  # open_clip's "local grads only" fallback
    all_u, all_v = torch.cat(all_u), torch.cat(all_v)
    labels = torch.arange(u.shape[0]) + rank * u.shape[0]
    s = 1 / 0.07
    loss = (F.cross_entropy(s * u @ all_v.T, labels) + F.cross_entropy(s * v @ all_u.T, labels)) / 2
    loss.backward()
    return img.grad


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        img, txt = _data()
        rows = slice(rank * B, (rank + 1) * B)
        results = {name: _run(make(), img[rows], txt[rows]) for name, make in _cases(rank, WORLD).items()}
        results["ddp"] = {name: _train_step_grads(make(), img[rows], txt[rows], ddp=True) for name, make in _cases(rank, WORLD).items()}
        results["plain_gather_img_grad"] = _plain_gather_clip_local(img[rows], txt[rows], rank, WORLD)
        # Ranks disagreeing on the batch size: a ValueError on every rank, not a hang.
        extra = 1 if rank == 1 else 0
        errors = []
        for make in (_cases(rank, WORLD)["clip_local"], _cases(rank, WORLD)["siglip_ring"]):
            try:
                make().double()(torch.randn(B + extra, D, dtype=F64), torch.randn(B + extra, D, dtype=F64))
            except ValueError as err:
                errors.append(str(err))
        results["shape_errors"] = errors
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(_cases(0, 1)))
def test_two_process_loss_and_gradients_equal_one_process(ranks, case):
    img, txt = _data()
    single = _run(_cases(0, 1)[case](), img, txt)
    got = [r[case] for r in ranks]
    if case == "clip_global":  # every rank computes the whole matrix
        for r in got:
            _close(r["loss"], single["loss"])
    # The mean over ranks of the per-rank loss (and bound) is the one-process value.
    _close(sum(r["loss"] for r in got) / WORLD, single["loss"])
    _close(sum(r["bound"] for r in got) / WORLD, single["bound"])
    for r in got:
        _close(r["log_n"], single["log_n"])  # N = W * B candidates per query
    # Embedding gradients: W times the one-process gradient of the rank's rows (the factor
    # DDP's averaging removes) ...
    for name in ("img_grad", "txt_grad"):
        _close(torch.cat([r[name] for r in got]) / WORLD, single[name])
    # ... so the parameter gradients DDP produces (mean over ranks) are the one-process ones.
    for pname, grad in single["params"].items():
        _close(sum(r["params"][pname] for r in got) / WORLD, grad)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(_cases(0, 1)))
def test_ddp_training_step_gradients_equal_one_process(ranks, case):
    """Real DistributedDataParallel around two encoders and the loss: every parameter
    gradient (encoders, scale, bias) equals one process's on the concatenated batch."""
    img, txt = _data()
    single = _train_step_grads(_cases(0, 1)[case](), img, txt, ddp=False)
    for r in ranks:
        assert set(r["ddp"][case]) == set(single)
        for name, grad in single.items():
            _close(r["ddp"][case][name], grad)


@pytest.mark.timeout(180)
def test_plain_all_gather_gives_wrong_gradients(ranks):
    img, txt = _data()
    single = _run(_cases(0, 1)["clip_local"](), img, txt)
    wrong = torch.cat([r["plain_gather_img_grad"] for r in ranks])
    right = single["img_grad"]
    # Not even a rescaling of the right gradient (a scale would only change the step size).
    best_scale = (wrong * right).sum() / (right * right).sum()
    assert float((wrong - best_scale * right).abs().max()) > 1e-3


@pytest.mark.timeout(180)
def test_mismatched_batch_sizes_across_ranks_raise_on_every_rank(ranks):
    for r in ranks:
        assert len(r["shape_errors"]) == 2
        assert all("same shape" in e for e in r["shape_errors"])
