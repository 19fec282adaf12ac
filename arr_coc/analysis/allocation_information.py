"""Does an allocator's reported information track what its kept tokens tell the VLM?

``arr_coc`` reports ``out.gain``: I(c_S ; Q), the chain-rule sum of the greedy's query gains,
a mutual information under a Gaussian model of the candidates and the query in its relevance
space (``arr_coc_adapter`` reports the same quantity for its own picks: the chain rule along its
pick order under the greedy's floors, ``gaussian_set_mi`` with ``var_floor``).
Nothing in that number looks at the answer. This module sets it beside an independent estimate
of what the kept tokens tell the frozen VLM about the answer, the VLM's own Barber-Agakov
bound, and measures how well the two agree, by rank:

- per question, ``b = log |A| + log q(a | kept tokens, question)``, with q the VLM's softmax
  over the answer set A (:func:`barber_agakov_bound`). Its mean over questions is
  ``log |A| - CE``; the Barber-Agakov bound proper is ``H(A) - CE <= I(kept, question; A)``,
  which differs by the constant ``log |A| - H(A) >= 0`` (zero for uniform answers), so every
  rank correlation below is the same for either;
- :func:`record_allocation_information`: per allocator x budget and per question, the reported
  gain, the bound, correctness and question type (allocators that report no gain are listed,
  not recorded);
- :func:`information_check`: Spearman and Kendall (tau-b) rank correlations of gain vs bound

  * per allocator x budget, across questions (with a within-question-type Spearman, the
    count-weighted mean of per-type correlations, since the question type moves both),
  * per question, across the budgets of one allocator and across every allocator x budget,
    averaged over the questions where both vary,
  * pooled over every (allocator, budget, question),

  with percentile bootstrap intervals over questions (the pooled one resamples questions as
  clusters, keeping all of a question's rows together; the per-question means use
  :func:`arr_coc.stats.bootstrap_interval`), and the rank AUROC of the gain for correctness.

```python
rec = record_allocation_information(vlm, {"arr_coc": create_allocator("arr_coc")}, batches,
                                    [64, 28, 16], answer_ids=answer_token_ids(task, tok))
check = information_check(rec.cells, num_bootstrap=1000)
check.per_cell[0].correlation.spearman       # gain vs bound across questions
```

Correlations of a constant sample are undefined: they come back NaN (and are left out of the
per-question means, whose count says how many questions were used).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "AllocationInformation",
    "CellCheck",
    "InformationCheck",
    "InformationRecords",
    "PerQuestionCheck",
    "RankCorrelation",
    "TypeSummary",
    "answer_token_ids",
    "auroc",
    "gain_saturation",
    "barber_agakov_bound",
    "information_check",
    "kendall_tau",
    "rank_correlation",
    "record_allocation_information",
    "spearman_rho",
    "type_breakdown",
]


# ---------------------------------------------------------------------------- validation
def _check_vector(name: str, x: object, n: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [n], got {getattr(x, 'shape', type(x).__name__)!r}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name}: expected {n} values (as the first argument), got {x.shape[0]}")
    return x


def _check_pair(x: object, y: object, min_n: int = 2) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """x, y: [n] or [n, F] real tensors of the same shape -> float64 [n, F] each, and whether 1-D."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2):
            raise ValueError(f"{name}: expected a tensor [n] or [n, F], got {getattr(t, 'shape', type(t).__name__)!r}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name}: expected real values, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if x.shape[0] < min_n:
        raise ValueError(f"x: expected at least {min_n} samples, got {x.shape[0]}")
    xd, yd = x.double(), y.double()
    for name, t in (("x", xd), ("y", yd)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: expected finite values")
    scalar = x.ndim == 1
    return (xd[:, None], yd[:, None], scalar) if scalar else (xd, yd, scalar)


def _check_weights(w: object, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
        raise ValueError(f"weights: expected a tensor of shape {shape}, got {getattr(w, 'shape', type(w).__name__)!r}")
    w = w.double()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights: expected finite values >= 0")
    return w


# ---------------------------------------------------------------------------- the bound
def barber_agakov_bound(
    logits: torch.Tensor, answer: torch.Tensor, *, candidates: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Per-question Barber-Agakov term ``log |A| + log q(answer)`` in nats: [Q] float64.

    logits: [Q, V] the VLM's answer logits; answer: [Q] long token ids; candidates: the answer
    set A as token ids (q is the softmax over those logits alone: a decoder over A), or None
    for the whole vocabulary (A = all V tokens). Its mean is ``log |A| - CE(answer | inputs)``.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a float tensor [Q, V], got {getattr(logits, 'shape', type(logits).__name__)!r}")
    q, v = logits.shape
    if q < 1 or v < 1:
        raise ValueError(f"logits: expected Q >= 1 questions and V >= 1 tokens, got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits: expected finite values")
    answer = _check_vector("answer", answer, q)
    if answer.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"answer: expected integer token ids, got {answer.dtype}")
    answer = answer.long().to(logits.device)
    if q and (int(answer.min()) < 0 or int(answer.max()) >= v):
        raise ValueError(f"answer: expected token ids in [0, {v}), got {answer.tolist()}")
    if candidates is None:
        cand = torch.arange(v, device=logits.device)
    else:
        cand = torch.as_tensor(candidates, device=logits.device)
        if cand.ndim != 1 or cand.numel() < 1 or cand.is_floating_point():
            raise ValueError(f"candidates: expected a non-empty 1-D list of token ids, got {candidates!r}")
        cand = cand.long()
        if int(cand.min()) < 0 or int(cand.max()) >= v:
            raise ValueError(f"candidates: expected token ids in [0, {v}), got {cand.tolist()}")
        if torch.unique(cand).numel() != cand.numel():
            raise ValueError(f"candidates: expected distinct token ids, got {cand.tolist()}")
    slot = torch.full((v,), -1, dtype=torch.long, device=logits.device)
    slot[cand] = torch.arange(cand.numel(), device=logits.device)
    where = slot[answer]
    if (where < 0).any():
        missing = answer[where < 0].unique().tolist()
        raise ValueError(f"candidates: every answer must be a candidate; missing token ids {missing}")
    logp = torch.log_softmax(logits.double()[:, cand], dim=-1)
    return math.log(cand.numel()) + logp.gather(1, where[:, None])[:, 0]


def answer_token_ids(task: Any, tokenizer: Any) -> list[int]:
    """The token ids of ``task.answer_words()`` (the answer set A of an embedded task)."""
    words = list(task.answer_words())
    ids = tokenizer.convert_tokens_to_ids(words)
    unk = getattr(tokenizer, "unk_token_id", None)
    bad = [w for w, i in zip(words, ids) if i is None or (unk is not None and i == unk)]
    if bad:
        raise ValueError(f"tokenizer: no single token for the answers {bad}")
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------- rank statistics
def _weighted_ranks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties averaged) of each column of x [n, F] in the sample where row
    i appears w[i, f] times (w >= 0, integer counts for an exact resample). Returns [n, F]: the
    rank every copy of row i gets (meaningless where w = 0)."""
    n = x.shape[0]
    s, order = torch.sort(x, dim=0, stable=True)
    ws = w.gather(0, order)
    cum = torch.cumsum(ws, dim=0)  # weight up to and including each sorted row
    pos = torch.arange(n, device=x.device)[:, None].expand_as(s)
    new = torch.ones_like(s, dtype=torch.bool)
    new[1:] = s[1:] != s[:-1]
    first = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=0).values
    last_flag = torch.ones_like(new)
    last_flag[:-1] = s[1:] != s[:-1]
    last = torch.flip(torch.cummin(torch.flip(torch.where(last_flag, pos, torch.full_like(pos, n)), [0]), dim=0).values, [0])
    below = torch.where(first > 0, cum.gather(0, (first - 1).clamp_min(0)), torch.zeros_like(cum))
    tied = cum.gather(0, last) - below
    ranks = below + (tied + 1.0) / 2.0
    return torch.empty_like(ranks).scatter_(0, order, ranks)


def _weighted_pearson(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the columns of a, b [n, F] under weights w [n, F]; NaN where a
    column has no spread (a constant sample)."""
    tot = w.sum(0)
    ma = (w * a).sum(0) / tot
    mb = (w * b).sum(0) / tot
    ac, bc = a - ma, b - mb
    va, vb = (w * ac * ac).sum(0), (w * bc * bc).sum(0)
    cov = (w * ac * bc).sum(0)
    scale = torch.maximum(tot, torch.ones_like(tot)) ** 2
    ok = (va > 1e-12 * scale) & (vb > 1e-12 * scale)
    r = cov / torch.sqrt(torch.where(ok, va * vb, torch.ones_like(va)))
    return torch.where(ok, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))


def _spearman_weighted(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spearman of each column of x, y [n, F] in the sample with row i repeated w[i, f] times."""
    return _weighted_pearson(_weighted_ranks(x, w), _weighted_ranks(y, w), w)


def spearman_rho(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation (ties get average ranks, as scipy), x, y: [n] -> [] or
    [n, F] -> [F] (column by column). NaN where x or y is constant (undefined)."""
    xs, ys, scalar = _check_pair(x, y)
    r = _spearman_weighted(xs, ys, torch.ones_like(xs))
    return r[0] if scalar else r


def _sign(a: torch.Tensor) -> torch.Tensor:
    return torch.sign(a)


def kendall_tau(x: torch.Tensor, y: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
    """Kendall's tau-b (ties in either variable corrected, as scipy's default), x, y: [n] ->
    [] or [n, F] -> [F]. NaN where x or y is constant. O(n^2) pairs, ``chunk`` rows at a time."""
    xs, ys, scalar = _check_pair(x, y)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    n, f = xs.shape
    num = torch.zeros(f, dtype=torch.float64, device=xs.device)
    nx = torch.zeros_like(num)
    ny = torch.zeros_like(num)
    for i in range(0, n, chunk):
        dx = _sign(xs[i : i + chunk, None, :] - xs[None])  # [c, n, F]
        dy = _sign(ys[i : i + chunk, None, :] - ys[None])
        num += (dx * dy).sum((0, 1))
        nx += dx.abs().sum((0, 1))
        ny += dy.abs().sum((0, 1))
    ok = (nx > 0) & (ny > 0)
    tau = num / torch.sqrt(torch.where(ok, nx * ny, torch.ones_like(nx)))
    tau = torch.where(ok, tau.clamp(-1.0, 1.0), torch.full_like(tau, float("nan")))
    return tau[0] if scalar else tau


def _kendall_resampled(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """tau-b of x, y [n] in each resample w [n, R] (row i repeated w[i, r] times): [R].

    Copies of one row are tied in both variables, so with S_ij = sign(x_i - x_j) sign(y_i - y_j)
    and T^x_ij = |sign(x_i - x_j)|: concordant - discordant = w^T S w / 2 and the pairs untied
    in x = w^T T^x w / 2 (the halves cancel in tau-b). Computed as matrix products, row chunks.
    """
    n, r = w.shape
    num = torch.zeros(r, dtype=torch.float64, device=x.device)
    nx = torch.zeros_like(num)
    ny = torch.zeros_like(num)
    # integer counts whose row sums stay below 2^24 multiply exactly in float32 (twice as fast)
    exact32 = bool((w == w.round()).all()) and float(w.sum(0).max()) < 2**24
    mdt = torch.float32 if exact32 else torch.float64
    wm = w.to(mdt)
    for i in range(0, n, chunk):
        dx = _sign(x[i : i + chunk, None] - x[None])  # [c, n]
        dy = _sign(y[i : i + chunk, None] - y[None])
        wi = w[i : i + chunk]
        num += ((dx * dy).to(mdt) @ wm).double().mul_(wi).sum(0)
        nx += (dx.abs().to(mdt) @ wm).double().mul_(wi).sum(0)
        ny += (dy.abs().to(mdt) @ wm).double().mul_(wi).sum(0)
    ok = (nx > 0) & (ny > 0)
    tau = num / torch.sqrt(torch.where(ok, nx * ny, torch.ones_like(nx)))
    return torch.where(ok, tau.clamp(-1.0, 1.0), torch.full_like(tau, float("nan")))


def auroc(score: torch.Tensor, label: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(tie) (Mann-Whitney), score [n]
    real, label [n] bool. NaN when one class is empty (undefined)."""
    score = _check_vector("score", score)
    label = _check_vector("label", label, score.shape[0])
    if label.dtype != torch.bool:
        raise ValueError(f"label: expected a bool tensor, got {label.dtype}")
    if not torch.isfinite(score.double()).all():
        raise ValueError("score: expected finite values")
    return float(_auroc_weighted(score.double()[:, None], label[:, None], torch.ones(score.shape[0], 1, dtype=torch.float64))[0])


def _auroc_weighted(s: torch.Tensor, lab: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """s [n, F], lab [n, F] bool, w [n, F] -> [F] AUROC of the resampled columns."""
    ranks = _weighted_ranks(s, w.expand_as(s))
    pos_w = (w * lab).sum(0)
    neg_w = (w * ~lab).sum(0)
    u = (w * lab * ranks).sum(0) - pos_w * (pos_w + 1) / 2
    ok = (pos_w > 0) & (neg_w > 0)
    return torch.where(ok, u / torch.where(ok, pos_w * neg_w, torch.ones_like(u)), torch.full_like(u, float("nan")))


# ---------------------------------------------------------------------------- bootstrap
@dataclass
class RankCorrelation:
    """Spearman and Kendall tau-b of (x, y) over ``n`` rows, with percentile bootstrap intervals
    (``level``) from ``num_bootstrap`` resamples of the clusters (questions)."""

    n: int
    spearman: float
    spearman_ci: tuple[float, float]
    kendall: float
    kendall_ci: tuple[float, float]
    level: float
    num_bootstrap: int


def _cluster_counts(clusters: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """Row weights [n, num]: how often each row's cluster is drawn in each of ``num`` resamples
    of the clusters with replacement."""
    ids, inv = torch.unique(clusters, return_inverse=True)
    c = ids.numel()
    draws = torch.randint(0, c, (num, c), generator=generator)
    counts = torch.zeros(num, c, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return counts[:, inv].T.contiguous()  # [n, num]


def _percentile(v: torch.Tensor, level: float) -> tuple[float, float]:
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    return float(v.quantile(a)), float(v.quantile(1 - a))


def _check_bootstrap(num_bootstrap: object, level: object) -> tuple[int, float]:
    if not isinstance(num_bootstrap, int) or isinstance(num_bootstrap, bool) or num_bootstrap < 0:
        raise ValueError(f"num_bootstrap: expected an int >= 0, got {num_bootstrap!r}")
    if not isinstance(level, (int, float)) or not 0 < float(level) < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    return num_bootstrap, float(level)


def rank_correlation(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clusters: torch.Tensor | None = None,
    num_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> RankCorrelation:
    """Spearman and Kendall tau-b of x, y [n] with bootstrap intervals.

    clusters: [n] integer ids of the resampling unit (the question a row belongs to; rows of
    one cluster are drawn together), None for one row per cluster. ``num_bootstrap = 0``
    gives NaN intervals. Each resample is exact: rows repeated as drawn, ties averaged.
    """
    num_bootstrap, level = _check_bootstrap(num_bootstrap, level)
    xs, ys, _ = _check_pair(x, y)
    n = xs.shape[0]
    if clusters is None:
        clusters = torch.arange(n)
    clusters = _check_vector("clusters", clusters, n)
    if clusters.is_floating_point() or clusters.dtype == torch.bool:
        raise ValueError(f"clusters: expected integer ids, got {clusters.dtype}")
    ones = torch.ones_like(xs)
    rho = float(_spearman_weighted(xs, ys, ones)[0])
    tau = float(kendall_tau(xs[:, 0], ys[:, 0]))
    if num_bootstrap == 0:
        nan = (float("nan"), float("nan"))
        return RankCorrelation(n, rho, nan, tau, nan, level, 0)
    g = torch.Generator().manual_seed(int(seed))
    w = _cluster_counts(clusters.cpu(), num_bootstrap, g).to(xs.device)  # [n, R]
    rho_b = _spearman_weighted(xs.expand(-1, num_bootstrap), ys.expand(-1, num_bootstrap), w)
    tau_b = _kendall_resampled(xs[:, 0], ys[:, 0], w)
    return RankCorrelation(n, rho, _percentile(rho_b, level), tau, _percentile(tau_b, level), level, num_bootstrap)


# ---------------------------------------------------------------------------- recording
@dataclass
class AllocationInformation:
    """One allocator at one budget over the evaluation set, per question ([Q] tensors):
    ``gain`` the allocator's reported I(c_S ; Q) (nats), ``bound`` the Barber-Agakov term
    log |A| + log q(answer | kept tokens) (nats), ``correct`` (bool), ``tokens`` kept,
    ``question_type`` (index into the task's question types) and ``query_tokens`` (the number
    of question tokens the allocator's query had; None where not recorded)."""

    allocator: str
    budget: int
    gain: torch.Tensor
    bound: torch.Tensor
    correct: torch.Tensor
    tokens: torch.Tensor
    question_type: torch.Tensor
    query_tokens: torch.Tensor | None = None


@dataclass
class InformationRecords:
    """What :func:`record_allocation_information` measured: ``cells`` (allocators that report a
    gain), ``without_gain`` (labels whose allocator reports none: no rows), and the all-token
    reference per question (``full_bound`` [Q], ``full_correct`` [Q]), ``num_answers`` = |A|."""

    cells: list[AllocationInformation]
    without_gain: list[str]
    full_bound: torch.Tensor
    full_correct: torch.Tensor
    num_answers: int


@torch.no_grad()
def record_allocation_information(
    vlm: nn.Module,
    allocators: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, torch.Tensor]],
    budgets: Sequence[int],
    *,
    answer_ids: Sequence[int] | None = None,
) -> InformationRecords:
    """Run every allocator at every budget on ``batches`` through the frozen base VLM (the
    pipeline of :func:`arr_coc.evaluation.run_allocation`) and record, per question, the
    reported gain (``out.gain``), the Barber-Agakov term with the answer set ``answer_ids``
    (None: the whole vocabulary), correctness and question type.

    vlm: a :class:`arr_coc.training.base_vlm.BaseVLM`; allocators: label -> Allocator module;
    batches: dicts with ``pixels``, ``question_ids``, ``question_mask``, ``answer`` (and
    ``question_type``), as :func:`arr_coc.evaluation.build_eval_batches` makes; budgets: ints >= 1.
    """
    from arr_coc.evaluation import _encode, run_allocation

    if not isinstance(allocators, Mapping) or not allocators:
        raise ValueError("allocators: expected a non-empty mapping label -> Allocator module")
    for label, a in allocators.items():
        if not isinstance(a, nn.Module):
            raise ValueError(f"allocators[{label!r}]: expected an Allocator module, got {type(a).__name__}")
    if not batches:
        raise ValueError("batches: expected at least one batch")
    budgets = list(budgets)
    if not budgets or any((not isinstance(k, int)) or isinstance(k, bool) or k < 1 for k in budgets):
        raise ValueError(f"budgets: expected a non-empty list of ints >= 1, got {budgets!r}")
    was_training = vlm.training
    vlm.eval()
    for a in allocators.values():
        a.eval()
    slots: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = {}
    without: list[str] = []
    full_bound, full_correct = [], []
    try:
        for batch in batches:
            ans = batch["answer"]
            qt = batch.get("question_type", torch.full_like(ans, -1))
            full_logits = vlm(batch["pixels"], batch["question_ids"], batch["question_mask"])
            full_bound.append(barber_agakov_bound(full_logits, ans, candidates=answer_ids))
            full_correct.append(full_logits.argmax(-1) == ans)
            enc = _encode(vlm, batch)
            for label, allocator in allocators.items():
                if label in without:
                    continue
                for k in budgets:
                    res = run_allocation(vlm, allocator, batch, k, encoded=enc)
                    gain = None if res.out is None else res.out.gain
                    if gain is None:
                        without.append(label)
                        break
                    s = slots.setdefault((label, k), {"gain": [], "bound": [], "correct": [], "tokens": [], "qt": [], "qlen": []})
                    s["gain"].append(gain.detach().double().reshape(-1).cpu())
                    s["bound"].append(barber_agakov_bound(res.logits, ans, candidates=answer_ids).cpu())
                    s["correct"].append((res.logits.argmax(-1) == ans).cpu())
                    s["tokens"].append(res.mask.sum(1).double().cpu())
                    s["qt"].append(qt.cpu())
                    s["qlen"].append(batch["question_mask"].sum(1).double().cpu())
    finally:
        vlm.train(was_training)
    cells = [
        AllocationInformation(
            label, k, torch.cat(s["gain"]), torch.cat(s["bound"]), torch.cat(s["correct"]),
            torch.cat(s["tokens"]), torch.cat(s["qt"]), torch.cat(s["qlen"]),
        )
        for (label, k), s in slots.items()
        if label not in without
    ]
    v = int(full_logits.shape[-1])
    return InformationRecords(
        cells, without, torch.cat(full_bound).cpu(), torch.cat(full_correct).cpu(),
        len(answer_ids) if answer_ids is not None else v,
    )


# ---------------------------------------------------------------------------- the check
@dataclass
class CellCheck:
    """One allocator x budget across its questions: ``correlation`` of gain vs bound,
    ``within_type_spearman`` (count-weighted mean of per-question-type Spearman, types with
    >= 3 questions and a defined correlation), means of gain and bound on right / wrong
    answers, ``gain_auroc`` (rank AUROC of the gain for correctness, bootstrap interval), and
    what the gain follows instead: ``gain_type_share`` (the share of the gain's variance between
    question types, eta^2) and ``gain_query_tokens_spearman`` (Spearman of the gain with the
    question's token count; NaN where not recorded or constant)."""

    allocator: str
    budget: int
    accuracy: float
    tokens: float
    correlation: RankCorrelation
    within_type_spearman: float
    gain_right: float
    gain_wrong: float
    bound_right: float
    bound_wrong: float
    gain_auroc: float
    gain_auroc_ci: tuple[float, float]
    gain_type_share: float = float("nan")
    gain_query_tokens_spearman: float = float("nan")


@dataclass
class PerQuestionCheck:
    """Per question, Spearman and Kendall of gain vs bound across ``cells`` (allocator x budget
    labels); means over the ``questions`` where both vary, with bootstrap intervals."""

    scope: str
    cells: list[str]
    questions: int
    total_questions: int
    spearman: float
    spearman_ci: tuple[float, float]
    kendall: float
    kendall_ci: tuple[float, float]


@dataclass
class InformationCheck:
    per_cell: list[CellCheck]
    per_question: list[PerQuestionCheck]
    pooled: RankCorrelation
    pooled_cells: list[str] = field(default_factory=list)


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def _between_share(v: torch.Tensor, groups: torch.Tensor) -> float:
    """eta^2: the share of v's variance that lies between the groups (NaN for a constant v)."""
    tot = float(((v - v.mean()) ** 2).sum())
    if tot <= 0:
        return float("nan")
    within = sum(float(((v[groups == t] - v[groups == t].mean()) ** 2).sum()) for t in torch.unique(groups).tolist())
    return 1.0 - within / tot


def gain_saturation(cells: Sequence[AllocationInformation], *, rtol: float = 1e-9) -> dict[str, float]:
    """Per allocator, the fraction of questions whose reported gain at its largest budget equals
    (within ``rtol``) its gain at the next largest: the greedy's query chain ran out of
    information before the budget did. Allocators with one budget are left out."""
    by: dict[str, dict[int, torch.Tensor]] = {}
    for c in cells:
        if not isinstance(c, AllocationInformation):
            raise ValueError(f"cells: expected AllocationInformation records, got {type(c).__name__}")
        by.setdefault(c.allocator, {})[int(c.budget)] = c.gain.double()
    out = {}
    for label, gains in by.items():
        if len(gains) < 2:
            continue
        top, second = sorted(gains)[-1], sorted(gains)[-2]
        a, b = gains[top], gains[second]
        if a.shape != b.shape:
            raise ValueError(f"cells: {label} has different question counts at budgets {second} and {top}")
        out[label] = float(((a - b).abs() <= rtol * a.abs().clamp_min(1e-12)).double().mean())
    return out


def _within_type_spearman(gain: torch.Tensor, bound: torch.Tensor, qt: torch.Tensor) -> float:
    num, den = 0.0, 0
    for t in torch.unique(qt).tolist():
        sel = qt == t
        if int(sel.sum()) < 3:
            continue
        r = float(spearman_rho(gain[sel], bound[sel]))
        if math.isfinite(r):
            num += r * int(sel.sum())
            den += int(sel.sum())
    return num / den if den else float("nan")


@dataclass
class TypeSummary:
    """One question type within one allocator x budget: ``n`` questions, ``accuracy``, mean
    ``gain`` and ``bound`` (nats), and ``spearman`` of gain vs bound within the type (NaN with
    fewer than 3 questions or a constant)."""

    question_type: int
    n: int
    accuracy: float
    gain: float
    bound: float
    spearman: float


def type_breakdown(cell: AllocationInformation) -> list[TypeSummary]:
    """Per question type of ``cell`` (ascending type index): what moves the gain and the bound."""
    if not isinstance(cell, AllocationInformation):
        raise ValueError(f"cell: expected an AllocationInformation record, got {type(cell).__name__}")
    out = []
    for t in torch.unique(cell.question_type).tolist():
        sel = cell.question_type == t
        n = int(sel.sum())
        rho = float(spearman_rho(cell.gain[sel], cell.bound[sel])) if n >= 3 else float("nan")
        out.append(TypeSummary(int(t), n, _mean(cell.correct[sel].double()), _mean(cell.gain[sel]), _mean(cell.bound[sel]), rho))
    return out


def _per_question(scope: str, cells: Sequence[AllocationInformation], num_bootstrap: int, level: float, seed: int) -> PerQuestionCheck:
    from arr_coc.stats import bootstrap_interval

    labels = [f"{c.allocator}@{c.budget}" for c in cells]
    g = torch.stack([c.gain for c in cells])  # [C, Q]
    b = torch.stack([c.bound for c in cells])
    q = g.shape[1]
    if len(cells) < 2:
        nan = (float("nan"), float("nan"))
        return PerQuestionCheck(scope, labels, 0, q, float("nan"), nan, float("nan"), nan)
    rho, tau = spearman_rho(g, b), kendall_tau(g, b)
    out = []
    for v in (rho, tau):
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            out.append((float("nan"), (float("nan"), float("nan"))))
        elif num_bootstrap == 0:
            out.append((_mean(v), (float("nan"), float("nan"))))
        else:
            out.append((_mean(v), bootstrap_interval(v, num=num_bootstrap, level=level, seed=seed)))
    used = int((torch.isfinite(rho) & torch.isfinite(tau)).sum())
    return PerQuestionCheck(scope, labels, used, q, out[0][0], out[0][1], out[1][0], out[1][1])


def information_check(
    cells: Sequence[AllocationInformation], *, num_bootstrap: int = 1000, level: float = 0.95, seed: int = 0
) -> InformationCheck:
    """Rank agreement of the reported gain with the Barber-Agakov bound (see the module
    docstring). cells: records over the same questions in the same order (at least one)."""
    num_bootstrap, level = _check_bootstrap(num_bootstrap, level)
    if not cells:
        raise ValueError("cells: expected at least one AllocationInformation record")
    q = cells[0].gain.shape[0]
    for c in cells:
        if not isinstance(c, AllocationInformation):
            raise ValueError(f"cells: expected AllocationInformation records, got {type(c).__name__}")
        for name in ("gain", "bound", "correct", "tokens", "question_type"):
            t = getattr(c, name)
            if not isinstance(t, torch.Tensor) or t.shape != (q,):
                raise ValueError(f"cells: {c.allocator}@{c.budget}.{name} expected shape [{q}] like the first record's gain")
        if q < 2:
            raise ValueError(f"cells: expected at least 2 questions, got {q}")
    per_cell = []
    g = torch.Generator().manual_seed(int(seed))
    for c in cells:
        corr = rank_correlation(c.gain, c.bound, num_bootstrap=num_bootstrap, level=level, seed=seed)
        right = c.correct.bool()
        au = auroc(c.gain.double(), right)
        if num_bootstrap:
            w = _cluster_counts(torch.arange(q), num_bootstrap, g)
            au_b = _auroc_weighted(c.gain.double()[:, None].expand(-1, num_bootstrap), right[:, None].expand(-1, num_bootstrap), w)
            au_ci = _percentile(au_b, level)
        else:
            au_ci = (float("nan"), float("nan"))
        per_cell.append(
            CellCheck(
                c.allocator, c.budget, _mean(right.double()), _mean(c.tokens), corr,
                _within_type_spearman(c.gain.double(), c.bound.double(), c.question_type),
                _mean(c.gain[right]), _mean(c.gain[~right]), _mean(c.bound[right]), _mean(c.bound[~right]),
                au, au_ci, _between_share(c.gain.double(), c.question_type),
                float(spearman_rho(c.gain, c.query_tokens)) if c.query_tokens is not None else float("nan"),
            )
        )
    per_question = []
    by_alloc: dict[str, list[AllocationInformation]] = {}
    for c in cells:
        by_alloc.setdefault(c.allocator, []).append(c)
    for label, cs in by_alloc.items():
        per_question.append(_per_question(f"{label}: across its budgets", cs, num_bootstrap, level, seed))
    if len(by_alloc) > 1:
        per_question.append(_per_question("every allocator x budget", list(cells), num_bootstrap, level, seed))
    gx = torch.cat([c.gain.double() for c in cells])
    by = torch.cat([c.bound.double() for c in cells])
    clusters = torch.arange(q).repeat(len(cells))
    pooled = rank_correlation(gx, by, clusters=clusters, num_bootstrap=num_bootstrap, level=level, seed=seed)
    return InformationCheck(per_cell, per_question, pooled, [f"{c.allocator}@{c.budget}" for c in cells])
