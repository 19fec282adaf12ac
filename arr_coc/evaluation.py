"""Evaluate any allocator on a frozen base VLM over a fixed evaluation set at given budgets.

```python
from arr_coc.evaluation import EvalConfig, build_eval_batches, evaluate_allocators, ORACLE
batches = build_eval_batches(task, tokenizer, start=1_000_000, size=512, batch_size=64)
rows = evaluate_allocators(vlm, {"random": create_allocator("random", seed=0), ORACLE: ORACLE},
                           batches, budgets=[16, 7, 4])
# one dict per (allocator, budget): accuracy, retained_pct, recall, recall_fine, tokens,
# alloc_ms, acc_<question type>, acc_<category>, oracle_fit (the oracle row), n
```

The pipeline is the stage-2 one (:class:`arr_coc.training.module.ARRCOCModule`):
``vlm.encode_image`` -> ``vlm.project`` (allocation among projected tokens, where the query
lives) -> allocator(budget) -> pooled tokens re-pooled in the ViT space
(:func:`arr_coc.training.module.repool_in_vision_space`, what the base VLM learned) ->
``vlm.answer_logits`` with the kept tokens' (row, col, level).

Metrics per (allocator, budget), over the examples of the set:

- ``accuracy``: answer accuracy; ``acc_<type>`` per question type and ``acc_<category>``
  per category (single-object: shape, colour, side; relational: nearest; counting: count).
- ``retained_pct``: 100 x accuracy / accuracy with all N fine tokens on the same examples.
- ``recall``: fraction of the ground-truth relevant patches covered by the kept tokens, a
  pooled token covering its whole region (mean over examples with a relevant patch);
  ``recall_fine``: the same with fine (level 0) tokens only.
- ``tokens``: tokens actually kept per example (an adaptive allocator may keep fewer).
- ``alloc_ms``: wall time of the allocator call alone, per example, in milliseconds.

The ``oracle`` (:data:`ORACLE`) is not an allocator: it reads the ground-truth relevance mask,
which the allocator contract does not carry. It keeps the relevant fine patches first (a
seeded random subset when there are more than the budget), then fills the rest of the budget
with random other fine patches, so it spends exactly the budget like the fixed-budget
baselines. Its row also reports ``oracle_fit``: the fraction of questions whose relevant
patches all fit within the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arr_coc.allocators import AllocationOutput

__all__ = [
    "CATEGORIES",
    "ORACLE",
    "AllocationResult",
    "allocation_metrics",
    "build_eval_batches",
    "evaluate_allocators",
    "full_accuracy",
    "full_correctness",
    "oracle_allocation",
    "retained_percent",
    "run_allocation",
    "summarize",
]

ORACLE = "oracle"
# question type -> category (what the README reports: where focus helps, where coverage does)
CATEGORIES: dict[str, str] = {
    "shape": "single_object",
    "colour": "single_object",
    "side": "single_object",
    "nearest": "relational",
    "compare": "relational",
    "count": "counting",
    "exists": "existence",
}


# ---------------------------------------------------------------------------- data
def build_eval_batches(
    task: Any, tokenizer: Any, *, start: int = 1_000_000, size: int = 512, batch_size: int = 64
) -> list[dict[str, torch.Tensor]]:
    """A fixed evaluation set: examples ``start .. start + size - 1`` of ``task``, collated.

    Returns a list of batch dicts (``pixels``, ``question_ids``, ``question_mask``,
    ``answer``, ``relevance``, ``question_type``), see :mod:`arr_coc.training.datamodule`.
    """
    from arr_coc.training.datamodule import EmbeddedVQADataset, VQACollator
    from arr_coc.training.task import QUESTION_TYPES

    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    ds = EmbeddedVQADataset(task, start, size)
    collate = VQACollator(tokenizer, getattr(task, "question_types", QUESTION_TYPES))
    return [collate([ds[i] for i in range(s, min(s + batch_size, size))]) for s in range(0, size, batch_size)]


# ---------------------------------------------------------------------------- oracle
def oracle_allocation(
    relevance: torch.Tensor,
    budget: int,
    *,
    fill: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground-truth relevant fine patches first, then (``fill``) random others up to ``budget``.

    relevance: [B, H, W] bool on the token grid; budget: int >= 0.
    Returns ``indices`` [B, K] (fine-token indices in raster order, -1 padded), ``positions``
    [B, K, 3] (row, col, 0; -1 padded), ``mask`` [B, K] bool and ``fits`` [B] bool (every
    relevant patch is kept). K = min(budget, H * W) (or the largest count without ``fill``).
    """
    if not isinstance(relevance, torch.Tensor) or relevance.dim() != 3:
        raise ValueError(f"relevance: expected a [B, H, W] bool tensor, got {getattr(relevance, 'shape', relevance)!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget: expected an int >= 0, got {budget!r}")
    b, h, w = relevance.shape
    n = h * w
    rel = relevance.reshape(b, n).bool()
    k = min(budget, n)
    noise = torch.rand(b, n, generator=generator).to(rel.device)  # random order within each group
    score = rel.float() * 2.0 + noise  # relevant (2..3) before the rest (0..1)
    order = score.argsort(dim=1, descending=True)[:, :k]  # [B, k]
    keep = torch.ones_like(order, dtype=torch.bool)
    if not fill:
        keep = rel.gather(1, order)
    n_rel = rel.sum(1)
    fits = n_rel <= k
    idx = torch.where(keep, order, torch.full_like(order, n))  # padding sorts last
    idx = idx.sort(dim=1).values
    mask = idx < n
    if not fill:
        kk = int(mask.sum(1).max()) if mask.numel() else 0
        idx, mask = idx[:, :kk], mask[:, :kk]
    idx = torch.where(mask, idx, torch.full_like(idx, -1))
    row = torch.div(idx, w, rounding_mode="floor")
    col = idx % w
    pos = torch.stack([row, col, torch.zeros_like(idx)], dim=-1)
    pos = torch.where(mask[..., None], pos, torch.full_like(pos, -1))
    return idx, pos, mask, fits


# ---------------------------------------------------------------------------- metrics
def retained_percent(accuracy: float, full_accuracy: float) -> float:
    """100 x accuracy / full-token accuracy (``ValueError`` when the full accuracy is not > 0)."""
    if not (isinstance(full_accuracy, (int, float)) and full_accuracy > 0 and math.isfinite(full_accuracy)):
        raise ValueError(f"full_accuracy: expected a finite value > 0, got {full_accuracy!r}")
    if not (0.0 <= accuracy <= 1.0):
        raise ValueError(f"accuracy: expected a value in [0, 1], got {accuracy!r}")
    return 100.0 * float(accuracy) / float(full_accuracy)


def allocation_metrics(
    positions: torch.Tensor, mask: torch.Tensor, relevance: torch.Tensor, grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Per-example ``recall``, ``recall_fine`` ([B] float, NaN without relevant patches) and
    ``tokens`` ([B] float) of one allocation. positions [B, K, 3], mask [B, K], relevance [B, gh, gw]."""
    from arr_coc.training.module import relevance_recall

    fine = mask & (positions[..., 2] == 0)
    return {
        "recall": relevance_recall(positions, mask, relevance, grid),
        "recall_fine": relevance_recall(positions, fine, relevance, grid),
        "tokens": mask.sum(1).float(),
    }


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def summarize(
    correct: torch.Tensor,
    recall: torch.Tensor,
    recall_fine: torch.Tensor,
    tokens: torch.Tensor,
    question_type: torch.Tensor,
    *,
    question_types: Sequence[str],
    full_acc: float | None,
) -> dict[str, float]:
    """Aggregate per-example results ([E] tensors; ``question_type`` indexes ``question_types``,
    -1 unknown) into one row: accuracy, retained_pct, recall, recall_fine, tokens,
    acc_<type>, tokens_<type> (tokens used on that type: where an adaptive budget spends),
    acc_<category> (NaN where a type has no example), n."""
    e = correct.shape[0]
    for name, t in (("recall", recall), ("recall_fine", recall_fine), ("tokens", tokens), ("question_type", question_type)):
        if t.shape != (e,):
            raise ValueError(f"{name}: expected shape [{e}] like correct, got {tuple(t.shape)}")
    if e == 0:
        raise ValueError("correct: expected at least one example")
    correct = correct.float()
    acc = float(correct.mean())
    row: dict[str, float] = {
        "accuracy": acc,
        "retained_pct": retained_percent(acc, full_acc) if full_acc is not None else float("nan"),
        "recall": _nanmean(recall.float()),
        "recall_fine": _nanmean(recall_fine.float()),
        "tokens": float(tokens.float().mean()),
        "n": float(e),
    }
    cats: dict[str, list[int]] = {}
    for i, name in enumerate(question_types):
        sel = question_type == i
        row[f"acc_{name}"] = float(correct[sel].mean()) if sel.any() else float("nan")
        row[f"tokens_{name}"] = float(tokens[sel].float().mean()) if sel.any() else float("nan")
        cats.setdefault(CATEGORIES.get(name, "other"), []).append(i)
    for cat, ids in cats.items():
        sel = torch.isin(question_type, torch.tensor(ids, dtype=question_type.dtype))
        row[f"acc_{cat}"] = float(correct[sel].mean()) if sel.any() else float("nan")
    return row


# ---------------------------------------------------------------------------- pipeline
@dataclass
class AllocationResult:
    """One batch through one allocation: ``logits`` [B, V], ``positions`` [B, K, 3],
    ``mask`` [B, K], ``seconds`` (the allocation alone), ``fits`` [B] (the oracle) or None,
    and the allocator's ``out`` (None for the oracle)."""

    logits: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    seconds: float
    fits: torch.Tensor | None = None
    out: AllocationOutput | None = None


@dataclass
class _Encoded:
    vision: torch.Tensor  # [B, P+N, Dv]
    projected: torch.Tensor  # [B, P+N, Dl]
    query: torch.Tensor  # [B, T, Dl]


def _grid(vlm: nn.Module) -> tuple[int, int]:
    g = vlm.grid
    return (int(g), int(g)) if isinstance(g, int) else (int(g[0]), int(g[1]))


@torch.no_grad()
def _encode(vlm: nn.Module, batch: Mapping[str, torch.Tensor]) -> _Encoded:
    vision = vlm.encode_image(batch["pixels"])
    return _Encoded(vision, vlm.project(vision), vlm.query_embeddings(batch["question_ids"]))


@torch.no_grad()
def run_allocation(
    vlm: nn.Module,
    allocator: nn.Module | str,
    batch: Mapping[str, torch.Tensor],
    budget: int,
    *,
    encoded: _Encoded | None = None,
    generator: torch.Generator | None = None,
) -> AllocationResult:
    """One batch through ``allocator`` (or :data:`ORACLE`) at ``budget`` and the frozen VLM.

    Allocators that read host signals (``reads_host``) get a
    :class:`arr_coc.training.base_host.BaseVLMHost` of the batch as ``host=``. In-LLM
    allocators (``in_llm``: FastV, SparseVLM) do not choose before the LLM: the host runs the
    LLM with them pruning between layers (``host.answer_in_llm``); the result then reports the
    visual tokens the last layers saw (positions, mask) for the recall metrics, and
    ``seconds`` covers that whole LLM forward, pruning included. For host-reading
    allocators ``seconds`` includes computing the signals they ask for the first time on a
    batch (the vision signals cost one more ViT forward with hooks); the host is kept on
    ``encoded`` so later allocators and budgets on the same batch reuse its signals. An
    allocator that asks for a signal the host cannot give (text signals on a base VLM without
    a text tower) runs with its host-free rule, with a warning.
    """
    from arr_coc.training.module import repool_in_vision_space

    enc = encoded if encoded is not None else _encode(vlm, batch)
    p, grid = int(vlm.num_prefix_tokens), _grid(vlm)
    q_ids, q_mask = batch["question_ids"], batch["question_mask"]
    if isinstance(allocator, str):
        if allocator != ORACLE:
            raise ValueError(f"allocator: expected an Allocator module or {ORACLE!r}, got {allocator!r}")
        if "relevance" not in batch:
            raise ValueError("batch: the oracle needs 'relevance' [B, gh, gw]")
        t0 = time.perf_counter()
        idx, pos, mask, fits = oracle_allocation(batch["relevance"], int(budget), generator=generator)
        seconds = time.perf_counter() - t0
        fine = enc.projected[:, p:]
        visual = fine.gather(1, idx.clamp(min=0)[..., None].expand(-1, -1, fine.shape[-1])) * mask[..., None]
        logits = vlm.answer_logits(visual, mask, pos, q_ids, q_mask)
        return AllocationResult(logits, pos, mask, seconds, fits=fits)
    in_llm = bool(getattr(allocator, "in_llm", False))
    host = None
    if in_llm or getattr(allocator, "reads_host", False):
        from arr_coc.training.base_host import BaseVLMHost

        # one host per encoded batch: its signals (vision attention, keys, text features) are
        # computed once and shared by every allocator and budget run on that batch
        host = getattr(enc, "_host", None)
        if host is None:
            host = BaseVLMHost(vlm, batch.get("pixels"), enc.vision, q_ids, q_mask)
            if encoded is not None:
                enc._host = host
    t0 = time.perf_counter()
    if in_llm:
        fine = enc.projected[:, p:]
        logits, trace = host.answer_in_llm(allocator, fine, None, None, q_ids, q_mask, int(budget), return_trace=True)
        seconds = time.perf_counter() - t0
        return AllocationResult(logits, host.kept_positions(trace), trace.mask, seconds)
    args = dict(query=enc.query, query_mask=q_mask, budget=int(budget), grid=grid, num_prefix_tokens=p)
    if host is None:
        out = allocator(enc.projected, **args)
    else:
        from arr_coc.allocators.host import SignalUnavailable

        try:
            out = allocator(enc.projected, **args, host=host)
        except SignalUnavailable as err:  # e.g. text signals on a base VLM without a text tower
            import warnings

            warnings.warn(
                f"allocator: {type(allocator).__name__} asked for a signal this host lacks ({err}); "
                "it runs with its host-free rule instead",
                stacklevel=2,
            )
            t0 = time.perf_counter()
            out = allocator(enc.projected, **args)
    seconds = time.perf_counter() - t0
    visual = repool_in_vision_space(
        out.tokens, out.positions, out.mask, enc.vision[:, p:], enc.projected[:, p:], grid, vlm.project
    )
    logits = vlm.answer_logits(visual, out.mask, out.positions, q_ids, q_mask)
    return AllocationResult(logits, out.positions, out.mask, seconds, out=out)


@torch.no_grad()
def full_correctness(vlm: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """[E] float 0/1: whether each example is answered right with all N fine tokens."""
    correct = [
        (vlm(b["pixels"], b["question_ids"], b["question_mask"]).argmax(-1) == b["answer"]).float() for b in batches
    ]
    return torch.cat(correct)


def full_accuracy(vlm: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Accuracy with all N fine tokens (the reference of ``retained_pct``)."""
    return float(full_correctness(vlm, batches).mean())


@torch.no_grad()
def evaluate_allocators(
    vlm: nn.Module,
    allocators: Mapping[str, nn.Module | str],
    batches: Sequence[Mapping[str, torch.Tensor]],
    budgets: Sequence[int],
    *,
    question_types: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    per_question: dict[tuple[str, int], torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Every allocator at every budget over ``batches``; one row dict per (allocator, budget).

    per_question: a dict to fill with (name, budget) -> [E] float 0/1 correctness per example,
    in the order of ``batches`` (and ("full", 0) for all fine tokens), for paired tests.

    allocators: name -> an Allocator (in eval mode) or :data:`ORACLE`. Each image is
    encoded once per batch and shared by all allocators. The oracle's random fill is seeded
    by ``seed``. Rows carry ``allocator``, ``budget`` and the metrics of :func:`summarize`,
    ``alloc_ms`` and, for the oracle, ``oracle_fit``.
    """
    from arr_coc.training.task import QUESTION_TYPES

    if not batches:
        raise ValueError("batches: expected at least one batch")
    if not budgets or any((not isinstance(k, int)) or isinstance(k, bool) or k < 0 for k in budgets):
        raise ValueError(f"budgets: expected a non-empty list of ints >= 0, got {list(budgets)!r}")
    qtypes = list(question_types or QUESTION_TYPES)
    grid = _grid(vlm)
    was_training = vlm.training
    vlm.eval()
    for a in allocators.values():
        if isinstance(a, nn.Module):
            a.eval()
    full_correct = full_correctness(vlm, batches)
    full_acc = float(full_correct.mean())
    if per_question is not None:
        per_question[("full", 0)] = full_correct
    acc: dict[tuple[str, int], dict[str, list]] = {
        (name, k): {"correct": [], "recall": [], "recall_fine": [], "tokens": [], "qt": [], "sec": 0.0, "fits": []}
        for name in allocators
        for k in budgets
    }
    gen = torch.Generator().manual_seed(int(seed))
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=f"evaluating {len(allocators)} allocators x {len(budgets)} budgets", leave=False)
    for batch in iterator:
        enc = _encode(vlm, batch)
        qt = batch.get("question_type", torch.full_like(batch["answer"], -1))
        for name, allocator in allocators.items():
            for k in budgets:
                res = run_allocation(vlm, allocator, batch, k, encoded=enc, generator=gen)
                m = allocation_metrics(res.positions, res.mask, batch["relevance"], grid)
                slot = acc[(name, k)]
                slot["correct"].append((res.logits.argmax(-1) == batch["answer"]).float())
                for key in ("recall", "recall_fine", "tokens"):
                    slot[key].append(m[key])
                slot["qt"].append(qt)
                slot["sec"] += res.seconds
                if res.fits is not None:
                    slot["fits"].append(res.fits.float())
    vlm.train(was_training)
    rows = []
    for (name, k), slot in acc.items():
        correct = torch.cat(slot["correct"])
        if per_question is not None:
            per_question[(name, int(k))] = correct
        row = {"allocator": name, "budget": int(k)}
        row.update(
            summarize(
                correct,
                torch.cat(slot["recall"]),
                torch.cat(slot["recall_fine"]),
                torch.cat(slot["tokens"]),
                torch.cat(slot["qt"]),
                question_types=qtypes,
                full_acc=full_acc if full_acc > 0 else None,
            )
        )
        row["alloc_ms"] = 1000.0 * slot["sec"] / correct.shape[0]
        row["oracle_fit"] = float(torch.cat(slot["fits"]).mean()) if slot["fits"] else float("nan")
        row["full_accuracy"] = full_acc
        rows.append(row)
    return rows
