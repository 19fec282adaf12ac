"""``arr_coc_host_trained``: the host-signal greedy of ``arr_coc_host`` plus a learned relevance.

Issue 16 goal 2 asks for a *trained* ``arr_coc`` that is the best row. The stage-2 ``arr_coc``
learns its own relevance space from the answer loss alone and trails the training-free host
rows on benchmark v2 (experiments/results/main.md). This allocator starts from the strong
training-free rule instead and learns a correction on top of it:

    gain_j(S) = alpha * I(c_j ; Q | c_S) + (1 - alpha) * R_j(S)
                + prior_weight * max(0, log(N p_j))          (the host prior, as arr_coc_host)
                + learned_weight * max(0, pmi_j)             (the learned relevance)

with the greedy, the token space and the host prior exactly those of
:class:`~arr_coc.allocators.arr_coc_host.ArrCocHostAllocator`, and ``pmi_j`` the pointwise
mutual information of candidate j with the question under the
:class:`~arr_coc.knowing.ParticipatoryScorer` (a cross-attention of the question's word
embeddings over the candidates, in a learned relevance space; ``pmi_j = log(M p(j | q))``, so
``max(0, pmi_j)`` is, like the prior's term, the pointwise information of "the question reads
j" against a uniform reading). The scorer is the only trained part. It can learn from three
signals, each a loss term of :class:`arr_coc.training.module.ARRCOCModule` (weights in
``loss_weights``):

- ``ce``: the answer cross-entropy, through a straight-through factor on each kept token
  (value 1, gradient of ``sigmoid(pmi_j / st_temperature)``), as ``arr_coc`` trains;
- ``relevance``: the listwise cross-entropy of the scorer's distribution over the fine tokens
  against the training split's ground-truth relevance mask,
  ``-(1/|R|) sum_{j in R} log softmax(pmi)_j`` (:func:`relevance_listwise_loss`; a row with no
  relevant cell contributes nothing). This is supervision the published pruners do not use:
  the rows trained with it say so in their label;
- ``distill`` (``distill=True``): ``KL(p || softmax(pmi))`` with p the host LLM's layer
  ``llm_layer`` attention of the question over the fine tokens (the prior's signal), so the
  scorer learns to read the question like the LLM's first layer does *without* running it:
  with ``prior=None`` at inference the allocator then reads no LLM layer at all.

Without a host (or in the dry run that materialises the scorer) the prior and the distillation
are off and the selection is the greedy with the learned term alone.

``relational=True`` adds a second, anchor-conditioned term for questions about a relation to a
named object ("the object nearest to the red circle"): a query-to-token scorer cannot know which
object is nearest, but it can once it knows where the anchor is. The anchor is the fine token the
first scorer rates highest (``a = argmax_j pmi_j``, no gradient); a small MLP maps the question's
mean word embedding and the anchor's token ``[q_bar ; c_a]`` to one query vector, and a second
:class:`~arr_coc.knowing.ParticipatoryScorer` reads the candidates with it (``pmi2``). The gain
then carries ``learned_weight * (max(0, pmi_j) + max(0, pmi2_j))``, and ``relevance_logits`` is
[B, 2, N] (both scorers trained on the relevance masks).

``relation_geometry=True`` gives the second scorer the one thing a relation to the anchor is about
and a token's vector carries only weakly: where the token is. Its distribution becomes a product of
the content reading and a distance kernel around the anchor,

    p2(j) ~ p2_content(j) * exp(-g(q) * d(j, a)),    pmi2_j = log(M p2(j)),

with d(j, a) the Euclidean distance in fine cells between the centres of candidate j and the
anchor, and g(q) = softplus(w . q_bar + b + g0) >= 0 nats per cell a learned, question-dependent
rate (a linear read of the question's mean word embedding; g0 = -2 at init, so g starts near 0.13).
The read and g0 enter scaled by ``RATE_SCALE`` = 10 (the parameters hold a tenth of the
pre-activation): Adam moves each parameter by about its learning rate per step, and the rate has to
move by nats per cell within a few hundred steps (unscaled, after 600 steps at lr 1e-3 it was still
0.13-0.21 on the validation nearest questions; experiments/results/arr_coc_host_diag/geometry_anchor.md).
"nearest" questions can learn a steep kernel, questions about one object or about a count a flat
one. The rate is reported in ``extras["relation_rate"]`` [B].

``anchor_query=True`` changes where the anchor comes from. The first scorer reads the question as
a mixture over its words, a disjunction: "the red circle" rates every red object and every circle
about as high, and its best token is one of the two relevant cells (the named object, the nearest)
on only 72% of the validation "nearest" questions (experiments/results/arr_coc_host_diag/geometry_anchor.md). With ``anchor_query`` a third reading, by the second
scorer with one query vector ``MLP_a(q_bar)`` (a function of all the words at once, which can place
the conjunction), gives ``pmi_a``, trained on the same relevance masks, and the anchor is its best
fine token. ``relevance_logits`` is then [B, 3, N] (first scorer, relation, anchor reading) and
``extras["pmi_anchor"]`` [B, M]; the gain is unchanged (the relation's kernel rates the anchor
itself highest).

``relation_others=True`` trains the relation on the relevant cells other than its anchor (the
``relevance_exclude`` extra [B, S, N], read by the ``relevance`` loss): what the anchor leads to
(the nearest object, the other object of a comparison, the other counted objects), so a question
about one object gives it no supervision and a count question, whose objects lie anywhere, pulls
the kernel's rate down instead of sharing the steep kernel that single-object questions (mask =
the anchor) teach it. It leaves the relation unsupervised on one-object questions, where its term
then swamps the gain (v2_trained_others_val.md); ``relation_others="or_anchor"`` trains it on the
anchor where the anchor is the only relevant cell.

``rate_hidden=H`` reads the kernel's rate with a two-layer MLP of q_bar (width H, its last layer
zero at init, so g starts at g0's 0.13 for every question) instead of the linear read: the rate
then need not be one linear function of the words for every question type (with the linear read
the validation rate was steeper on the non-"nearest" questions, 0.45 nats per cell, than on the
"nearest" ones, 0.31, and count questions, whose objects lie anywhere, share it).

``relation_mixture=True`` puts one distribution in the gain instead of the sum of two terms: the
mixture ``p_mix = (1 - lam(q)) p1 + lam(q) p2`` of the two ``gain_readings`` (by default the first
scorer's and the relation's; ``[anchor, relation]`` mixes the anchor reading's and the relation's)
distributions over the M candidates, with ``lam(q) = sigmoid(MLP(q_bar))`` (0.5 at init) a
question-dependent weight, and the learned term ``learned_weight * max(0, pmi_mix_j)``,
``pmi_mix_j = log(M p_mix(j))``. With the sum, a token the relation's kernel rates high (an object
next to the anchor) is added to whatever the first scorer rates, and at 4 tokens it can displace
a counted object far from the anchor; the mixture is trained on the relevance masks as a fourth
reading (``relevance_logits`` [B, S + 1, N]), so its weight moves to whichever reading covers a
question type's relevant cells. The straight-through factor reads ``pmi_mix``; ``extras`` gains
``relation_mix`` [B] (lam).

``relation_content="gate"`` changes what the relation's content reading may decide. With the
default ``"logit"`` the content pmi and the distance enter the kernel product on one scale, so a
farther object that the content rates higher beats the nearest one: on the validation "nearest"
questions the relation's best cell other than the anchor was always an object, but the nearest one
on only 0.72 of them, a farther object on the rest (experiments/results/arr_coc_host_diag/nearest.md).
With ``"gate"`` the content enters as ``log sigmoid(pmi2_content_j)``: a gate that says whether j
is something the relation can lead to (an object, not background), about 0 for every token the
content rates well above its uniform share and bounded there, so among the gated tokens the
distance to the anchor decides. The question's named objects are found by the anchor reading (which
should then be in the gain); the relation becomes "the objects nearest the anchor", at the rate the
question asks for.

``gain_readings`` chooses which of the readings enter the gain (by default the first scorer's and
the relation's): the anchor reading, a conjunction of the question's words, can stand in for the
first scorer's disjunction ("how many red objects" rates every object through the word "objects").

``gain_combine="max"`` adds the largest of the chosen readings' positive pmi instead of their sum:
each reading nominates its own tokens. With the sum, a token that two readings rate moderately (an
object sharing a word with the named one, near the anchor) can outrank the one token a single
reading rates highest (the relation's nearest object): at 4 tokens the relation's best cell was
kept on fewer "nearest" questions than it was ranked first on (experiments/results/arr_coc_host_diag/nearest.md).

``fill="background"`` changes what the budget left after the question's evidence is spent on. The
greedy's coverage term fills it with the tokens that tell most about the rest of the image, i.e.
the other objects, and the base VLM confuses an object next to the anchor with the answer (at 8
tokens every pre-LLM design answers "nearest" below full tokens although both relevant cells are
kept; keeping the relevant cells and filling 16 tokens with the least salient cells scores 1.000,
with the most salient 0.982: experiments/results/arr_coc_host.md). With it, the greedy's picks
whose learned term exceeds ``evidence_threshold`` nats are kept (in pick order) and the rest of
the budget goes to the fine tokens they do not cover with the smallest salience
``||x_j - mean_i x_i||`` (the background): what the kept set tells beyond the evidence is then as
little as the budget allows (:func:`background_fill`). The fill tokens are not the greedy's, so
``gain`` is not reported (None); ``extras["evidence"]`` [B] counts the evidence tokens kept.

``relation_evidence="top"`` (with ``relation_mixture`` and ``fill="background"``) reads the evidence
from the mixture's two parts instead of the whole: a pick is evidence when the other reading's part,
``learned_weight * log(M (1 - lam) p1(j))`` (the anchor reading's, with ``[anchor, relation]``),
exceeds the threshold, or when it is the relation's best candidate other than the anchor and the
relation's part ``learned_weight * log(M lam p2(j))`` does. The relation spreads some mass over
every object near the anchor; read as one distribution they all pass a threshold low enough for a
count question's several objects, and at 4 tokens the base VLM takes one of them for the nearest.
On validation (4,096 questions, three seeds; experiments/results/v2_trained_mixture_top_val.md) the
parts' evidence scores +0.005 at 4 tokens (p 0.012) and 0.003 less at 64 / 28 / 16 (n.s.): with a
budget to spare, the other objects near the anchor keep the nearest one when the relation's best
cell is wrong. ``top_budget_fraction`` applies the parts' evidence to the rows whose budget is at
most that fraction of the fine tokens and reads the mixture's above it (1.0, the default: every
budget).

``arr_coc_host_llm_trained`` is the same idea inside the LLM, at the place of
``arr_coc_host_llm`` (after layer ``llm_layer``; ``llm_layer=1`` is FastV's K = 2): the scorer
reads that layer's hidden states (candidates: the visual slots; query: the text tokens), its
``max(0, pmi_j)`` is added to the in-LLM gain, and it trains on the ``relevance`` term only (the
kept set is discrete inside the LLM, so the answer loss has no path to the scorer);
:class:`arr_coc.training.module.ARRCOCModule` runs the host's LLM with it pruning, as evaluation
does.

``extras``: those of ``arr_coc_host`` plus ``pmi`` [B, M], ``relevance_logits`` [B, N] (the
scorer's log-probabilities over the fine tokens, read by the ``relevance`` loss; [B, 2, N] with
``relational``, then also ``pmi_relation`` [B, M] and ``anchor`` [B]) and, in
training with ``distill``, ``losses["distill"]`` [B].
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from arr_coc.allocators.arr_coc_host import ArrCocHostAllocator, ArrCocHostLLMAllocator, background_fill
from arr_coc.allocators.base import AllocationContext, Selection
from arr_coc.allocators.registry import register_allocator
from arr_coc.knowing import ParticipatoryScorer, masked_mean

__all__ = [
    "ArrCocHostLLMTrainedAllocator", "ArrCocHostTrainedAllocator", "background_fill", "candidate_centres", "relevance_listwise_loss",
]


def relevance_listwise_loss(
    logits: torch.Tensor, relevance: torch.Tensor, exclude: torch.Tensor | None = None, *, exclude_fallback: bool = False
) -> torch.Tensor:
    """Listwise cross-entropy of a distribution over the fine tokens against a relevance mask.

    logits [B, N] (log-probabilities up to a constant per row), relevance [B, N] or [B, gh, gw]
    bool -> [B] nats: ``-(1/|R_b|) sum_{j in R_b} log softmax(logits_b)_j``, 0 for a row with no
    relevant token (it carries no supervision). Its minimum over the logits is ``log |R_b|``
    (all mass spread evenly on the relevant tokens). logits [B, S, N] (S scorers against the same
    mask): the mean over the S of each one's loss. exclude (bool, [B, N] or [B, S, N] like the
    logits): cells taken out of R (per scorer), e.g. the anchor for a scorer of what it relates to;
    with ``exclude_fallback`` a row that would be left with no relevant cell keeps its whole R.
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected [B, N] or [B, S, N], got {tuple(logits.shape)}")
    rel = relevance.reshape(relevance.shape[0], -1) if relevance.dim() == 3 else relevance
    if logits.dim() == 3:
        if rel.shape != (logits.shape[0], logits.shape[2]):
            raise ValueError(f"logits: expected [B, S, N] with [B, N] = {tuple(rel.shape)} (the mask's), got {tuple(logits.shape)}")
        rel = rel[:, None, :]  # the same mask for each of the S scorers
    elif rel.shape != logits.shape:
        raise ValueError(f"relevance: expected [B, N] = {tuple(logits.shape)} (or [B, gh, gw]), got {tuple(relevance.shape)}")
    if exclude is not None:
        if exclude.shape != logits.shape:
            raise ValueError(f"exclude: expected {tuple(logits.shape)} (the logits' shape), got {tuple(exclude.shape)}")
        kept = rel & ~exclude.bool()
        rel = torch.where(kept.any(-1, keepdim=True), kept, rel) if exclude_fallback else kept
    r = rel.to(logits.dtype)
    count = r.sum(-1)
    nll = -(logits.log_softmax(-1) * r).sum(-1) / count.clamp_min(1)
    nll = torch.where(count > 0, nll, torch.zeros_like(nll))
    return nll.mean(1) if logits.dim() == 3 else nll


RATE_SCALE = 10.0  # the distance kernel's rate: pre-activation / parameters (see the module docstring)


def candidate_centres(positions: torch.Tensor) -> torch.Tensor:
    """Candidate positions [M, 3] (row, col, level) -> centres [M, 2] (row, col) in fine cells.

    A level-l candidate pools the 2^l x 2^l block whose top-left cell is (row, col); its centre is
    (row, col) + (2^l - 1) / 2 (a fine cell's is the cell itself).
    """
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions: expected [M, 3] (row, col, level), got {tuple(positions.shape)}")
    half = ((2.0 ** positions[:, 2].double()) - 1) / 2
    return (positions[:, :2].double() + half[:, None]).float()


def _learned_relevance(
    learned_weight: float, relevance_dim: int | None, num_heads: int, rank: int, temperature: float
) -> tuple[float, ParticipatoryScorer]:
    """The checked weight of the learned term and the scorer that computes its pmi."""
    if not (isinstance(learned_weight, (int, float)) and math.isfinite(learned_weight) and learned_weight >= 0):
        raise ValueError(f"learned_weight: expected a finite float >= 0, got {learned_weight!r}")
    scorer = ParticipatoryScorer(relevance_dim=relevance_dim, num_heads=num_heads, rank=rank, temperature=temperature)
    return float(learned_weight), scorer


def _positive_pmi(pmi: torch.Tensor, weight: float) -> torch.Tensor | None:
    """The learned term of the gain, ``weight * max(0, pmi)`` in nats (no gradient), or None at weight 0."""
    return weight * pmi.detach().clamp_min(0) if weight > 0 else None


def _zero_last_mlp(hidden: int) -> nn.Sequential:
    """A lazy two-layer MLP to one output, [B, D] -> [B, 1], whose output is 0 at init (last layer zeroed)."""
    mlp = nn.Sequential(nn.LazyLinear(hidden), nn.GELU(), nn.Linear(hidden, 1))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def _mixture_pmi(pmi1: torch.Tensor, pmi2: torch.Tensor, gate_logit: torch.Tensor) -> torch.Tensor:
    """pmi_mix [B, M] = log(M p_mix) with p_mix = (1 - lam) softmax(pmi1) + lam softmax(pmi2), lam = sigmoid(gate_logit [B])."""
    log_p1 = pmi1.float().log_softmax(-1) + F.logsigmoid(-gate_logit.float())[:, None]
    log_p2 = pmi2.float().log_softmax(-1) + F.logsigmoid(gate_logit.float())[:, None]
    return (torch.logaddexp(log_p1, log_p2) + math.log(pmi1.shape[-1])).to(pmi1.dtype)


def _mixture_part_evidence(
    pmi1: torch.Tensor, pmi2: torch.Tensor, gate_logit: torch.Tensor, anchor: torch.Tensor, *, relation_second: bool = True
) -> torch.Tensor:
    """Evidence [B, M] (nats, no gradient) read from the two parts of :func:`_mixture_pmi`'s mixture.

    The other reading's part ``log(M (1 - lam) p_other(j))`` at every candidate; the relation's
    part ``log(M lam p_rel(j))`` only at its best candidate other than ``anchor`` [B] (the relation
    names one neighbour), -inf elsewhere; the larger of the two. ``relation_second``: pmi2 is the
    relation (weight lam), else pmi1 is (then the relation's weight is 1 - lam).
    """
    m = pmi1.shape[-1]
    log_lam, log_rest = F.logsigmoid(gate_logit.float()), F.logsigmoid(-gate_logit.float())  # [B]
    if relation_second:
        other, rel, log_other_w, log_rel_w = pmi1, pmi2, log_rest, log_lam
    else:
        other, rel, log_other_w, log_rel_w = pmi2, pmi1, log_lam, log_rest
    other_part = other.detach().float().log_softmax(-1) + log_other_w[:, None] + math.log(m)  # [B, M]
    rel_part = rel.detach().float().log_softmax(-1) + log_rel_w[:, None] + math.log(m)
    rows = torch.arange(rel_part.shape[0], device=rel_part.device)
    rel_part[rows, anchor] = -math.inf  # the relation's best candidate other than the anchor
    top = rel_part.argmax(-1)  # [B]
    only_top = torch.full_like(rel_part, -math.inf)
    only_top[rows, top] = rel_part[rows, top]
    return torch.maximum(other_part, only_top).to(pmi1.dtype)  # from detached inputs


@register_allocator("arr_coc_host_trained")
class ArrCocHostTrainedAllocator(ArrCocHostAllocator):
    """``arr_coc_host`` (token space, LLM layer-0 prior) plus a trained relevance term.

    Args:
        alpha, price, and the keyword arguments of :class:`ArrCocHostAllocator` (space, prior,
            prior_weight, llm_layer, llm_reader, levels, ...).
        learned_weight: weight of the learned term ``max(0, pmi_j)`` in the gain (nats per nat, >= 0).
        distill: in training, add ``KL(LLM layer-``llm_layer`` attention || softmax(pmi))`` as
            ``losses["distill"]`` (needs a host that gives the attention).
        relevance_dim, num_heads, rank, temperature: the :class:`ParticipatoryScorer`
            (relevance_dim None: lazy, the identity map plus a rank-``rank`` correction,
            materialised by the first training forward).
        st_temperature: temperature of the straight-through keep factor ``sigmoid(pmi / t)``.
        relational: add the anchor-conditioned second scorer (see the module docstring).
        relation_hidden: width of the MLP that maps ``[q_bar ; c_anchor]`` to its query.
        relation_geometry: multiply the second scorer's distribution by a learned distance kernel
            around the anchor (needs ``relational``; see the module docstring).
        anchor_query: take the anchor from a reading with one query vector per question
            (needs ``relational``; see the module docstring).
        relation_others: train the relation on the relevant cells other than its anchor (True), or
            on them where there are any and on the anchor where it is the only one ("or_anchor");
            see the module docstring; needs ``relational``.
        rate_hidden: width of an MLP that reads the kernel's rate (None: a linear read); needs
            ``relation_geometry``.
        relation_mixture: the learned term is the pmi of a question-weighted mixture of the two
            scorers' distributions instead of the sum of their pmi (see the module docstring);
            needs ``relational``.
        relation_content: "logit" (the relation's content pmi and its distance kernel on one scale)
            or "gate" (the content as a bounded gate, log sigmoid; see the module docstring); "gate"
            needs ``relation_geometry``.
        gain_readings: which readings' positive pmi the gain adds: "first" (the question's
            scorer), "relation" (needs ``relational``), "anchor" (the one-query-vector reading,
            needs ``anchor_query``); None: ("first", "relation") with ``relational``, else ("first",).
        gain_combine: "sum" or "max" of the chosen readings' positive pmi (see the module docstring).
        fill: "greedy" (the greedy spends the whole budget) or "background" (the greedy's evidence
            picks, then the least salient fine tokens; see the module docstring).
        evidence_threshold: with ``fill="background"``, a pick is evidence when its learned term
            exceeds this many nats (>= 0).
        relation_evidence: with ``fill="background"`` and ``relation_mixture``, "mixture" (the
            evidence is the mixture's learned term above the threshold) or "top" (the other
            reading's part above it, plus the relation's best candidate other than the anchor when
            its part is above it; see the module docstring).
        top_budget_fraction: with ``relation_evidence="top"``, the rows whose budget is at most
            this fraction of the fine tokens read the parts' evidence, the others the mixture's
            (in (0, 1]; 1.0: every row).
    """

    def __init__(
        self,
        alpha: float = 0.9,
        price: float = 0.0,
        *,
        learned_weight: float = 1.0,
        distill: bool = False,
        relevance_dim: int | None = None,
        num_heads: int = 8,
        rank: int = 16,
        temperature: float = 10.0,
        st_temperature: float = 1.0,
        relational: bool = False,
        relation_hidden: int = 256,
        relation_geometry: bool = False,
        anchor_query: bool = False,
        relation_others: bool | str = False,
        rate_hidden: int | None = None,
        relation_mixture: bool = False,
        relation_content: str = "logit",
        gain_combine: str = "sum",
        gain_readings: tuple[str, ...] | list[str] | None = None,
        relation_evidence: str = "mixture",
        top_budget_fraction: float = 1.0,
        **kwargs,
    ):
        # the weight first: the base __init__ checks fill="background" against it (_has_evidence)
        self.learned_weight, scorer = _learned_relevance(learned_weight, relevance_dim, num_heads, rank, temperature)
        super().__init__(alpha, price, **kwargs)
        self.scorer = scorer
        if not isinstance(distill, bool):
            raise ValueError(f"distill: expected a bool, got {distill!r}")
        if not st_temperature > 0:
            raise ValueError(f"st_temperature: expected > 0, got {st_temperature!r}")
        self.distill, self.st_temperature = distill, float(st_temperature)
        if not isinstance(relational, bool):
            raise ValueError(f"relational: expected a bool, got {relational!r}")
        if not (isinstance(relation_hidden, int) and relation_hidden >= 1):
            raise ValueError(f"relation_hidden: expected a positive int, got {relation_hidden!r}")
        self.relational = relational
        if relational:  # [q_bar ; c_anchor] -> one query vector (lazy: the widths come with the first call)
            self.relation = nn.Sequential(nn.LazyLinear(relation_hidden), nn.GELU(), nn.Linear(relation_hidden, relation_hidden))
            _, self.relation_scorer = _learned_relevance(learned_weight, relevance_dim, num_heads, rank, temperature)
        if not isinstance(relation_geometry, bool):
            raise ValueError(f"relation_geometry: expected a bool, got {relation_geometry!r}")
        if relation_geometry and not relational:
            raise ValueError("relation_geometry: needs relational=True (it shapes the anchor-conditioned scorer)")
        self.relation_geometry = relation_geometry
        if rate_hidden is not None and not (isinstance(rate_hidden, int) and not isinstance(rate_hidden, bool) and rate_hidden >= 1):
            raise ValueError(f"rate_hidden: expected None or a positive int, got {rate_hidden!r}")
        if rate_hidden is not None and not relation_geometry:
            raise ValueError("rate_hidden: needs relation_geometry=True (it reads the distance kernel's rate)")
        if relation_geometry:  # q_bar -> the kernel's rate, softplus(read(q_bar) + g0) nats per cell
            self.relation_rate = nn.LazyLinear(1) if rate_hidden is None else _zero_last_mlp(rate_hidden)
            self.relation_rate_offset = nn.Parameter(torch.tensor(-2.0 / RATE_SCALE))
        if relation_content not in ("logit", "gate"):
            raise ValueError(f"relation_content: expected 'logit' or 'gate', got {relation_content!r}")
        if relation_content == "gate" and not relation_geometry:
            raise ValueError("relation_content: 'gate' needs relation_geometry=True (the distance ranks what the gate lets through)")
        self.relation_content = relation_content
        if not isinstance(relation_mixture, bool):
            raise ValueError(f"relation_mixture: expected a bool, got {relation_mixture!r}")
        if relation_mixture and not relational:
            raise ValueError("relation_mixture: needs relational=True (it mixes the relation's distribution in)")
        self.relation_mixture = relation_mixture
        if relation_mixture:  # q_bar -> the mixture weight's logit (0 at init: lam = 1/2)
            self.mixture_gate = _zero_last_mlp(relation_hidden)
        default = ("first", "relation") if relational else ("first",)
        readings = default if gain_readings is None else tuple(gain_readings)
        allowed = {"first"} | ({"relation"} if relational else set()) | ({"anchor"} if anchor_query else set())
        if not readings or len(set(readings)) != len(readings) or not set(readings) <= allowed:
            raise ValueError(f"gain_readings: expected distinct names among {sorted(allowed)}, got {gain_readings!r}")
        if relation_mixture and (len(readings) != 2 or "relation" not in readings):
            raise ValueError("gain_readings: relation_mixture mixes two readings, the relation and one other")
        self.gain_readings = readings
        if gain_combine not in ("sum", "max"):
            raise ValueError(f"gain_combine: expected 'sum' or 'max', got {gain_combine!r}")
        if gain_combine == "max" and relation_mixture:
            raise ValueError("gain_combine: relation_mixture puts one mixture in the gain, there is nothing to combine")
        self.gain_combine = gain_combine
        if not isinstance(anchor_query, bool):
            raise ValueError(f"anchor_query: expected a bool, got {anchor_query!r}")
        if anchor_query and not relational:
            raise ValueError("anchor_query: needs relational=True (it picks the relation's anchor)")
        self.anchor_query = anchor_query
        if not (isinstance(relation_others, bool) or relation_others == "or_anchor"):
            raise ValueError(f"relation_others: expected a bool or 'or_anchor', got {relation_others!r}")
        if relation_others and not relational:
            raise ValueError("relation_others: needs relational=True (it is the relation's training target)")
        self.relation_others = relation_others
        if anchor_query:  # q_bar -> the anchor reading's one query vector
            self.anchor_map = nn.Sequential(nn.LazyLinear(relation_hidden), nn.GELU(), nn.Linear(relation_hidden, relation_hidden))
        if relation_evidence not in ("mixture", "top"):
            raise ValueError(f"relation_evidence: expected 'mixture' or 'top', got {relation_evidence!r}")
        if relation_evidence == "top" and not (relation_mixture and self.fill == "background"):
            raise ValueError("relation_evidence: 'top' reads the evidence of fill='background' from the parts of relation_mixture; "
                             f"got relation_mixture={relation_mixture!r}, fill={self.fill!r}")
        self.relation_evidence = relation_evidence
        if not (isinstance(top_budget_fraction, (int, float)) and not isinstance(top_budget_fraction, bool)
                and 0 < top_budget_fraction <= 1):
            raise ValueError(f"top_budget_fraction: expected a float in (0, 1], got {top_budget_fraction!r}")
        if top_budget_fraction != 1 and relation_evidence != "top":
            raise ValueError("top_budget_fraction: applies to relation_evidence='top', "
                             f"got relation_evidence={relation_evidence!r}")
        self.top_budget_fraction = float(top_budget_fraction)

    def _has_evidence(self) -> bool:
        """``fill="background"`` reads evidence from the learned term: it needs one."""
        return self.learned_weight > 0

    @staticmethod
    def _question_mean(ctx: AllocationContext) -> torch.Tensor:
        """q_bar [B, Dq]: the mean of the real question tokens ([B, 0] without a query)."""
        if ctx.query is None:
            return ctx.candidates.new_zeros(ctx.batch_size, 0)
        return masked_mean(ctx.query, ctx.query_mask)

    def _anchor_pmi(self, ctx: AllocationContext, q_bar: torch.Tensor | None = None) -> torch.Tensor:
        """pmi_a [B, M]: the relation scorer read with one query vector ``MLP_a(q_bar)``."""
        q_bar = self._question_mean(ctx) if q_bar is None else q_bar
        z = self.anchor_map(q_bar.float())  # [B, H]
        return self.relation_scorer(ctx.candidates, rearrange(z, "b h -> b 1 h"), None).pmi

    def _relation_pmi(
        self, ctx: AllocationContext, pmi: torch.Tensor, q_bar: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pmi2 [B, M], anchor [B], rate [B] or None): the anchor-conditioned scorer's pmi, the
        anchor's index and, with ``relation_geometry``, the distance kernel's rate (nats per cell).
        q_bar: the question's mean word embedding, when the caller has it already."""
        c = ctx.candidates
        anchor = pmi[:, : ctx.num_fine].detach().argmax(1)  # [B]
        c_anchor = c[torch.arange(c.shape[0], device=c.device), anchor]  # [B, D]
        q_bar = self._question_mean(ctx) if q_bar is None else q_bar
        z = self.relation(torch.cat([q_bar.float(), c_anchor.float()], -1))  # [B, H] (the MLP is float32)
        out = self.relation_scorer(c, rearrange(z, "b h -> b 1 h"), None)
        if not self.relation_geometry:
            return out.pmi, anchor, None
        rate = F.softplus(RATE_SCALE * (self.relation_rate(q_bar.float())[:, 0] + self.relation_rate_offset))  # [B]
        centres = candidate_centres(ctx.pyramid.positions).to(c.device)  # [M, 2] in fine cells
        dist = torch.cdist(centres, centres[anchor])  # [M, B]
        content = out.pmi.float()
        if self.relation_content == "gate":  # whether j can be what the anchor leads to, bounded at 0
            content = F.logsigmoid(content)
        logits = content - rate[:, None] * rearrange(dist, "m b -> b m")
        pmi2 = logits.log_softmax(-1) + math.log(c.shape[1])  # log(M p2(j))
        pmi2 = torch.where(out.has_query[:, None], pmi2, torch.zeros_like(pmi2)).to(out.pmi.dtype)
        return pmi2, anchor, rate

    def _relational_readings(
        self, ctx: AllocationContext, pmi: torch.Tensor, has_query: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(pmi_a [B, M] or None, pmi2 [B, M], anchor [B], rate [B] or None, mixture logit [B] or None).

        A question with no real token relates nothing: its readings are uniform (pmi 0, like the
        first scorer's), its anchor the first fine token, its rate and mixture logit 0.
        """
        if ctx.query is None:
            zeros = torch.zeros_like(pmi)
            anchor = torch.zeros(pmi.shape[0], dtype=torch.long, device=pmi.device)
            return (zeros if self.anchor_query else None, zeros, anchor, zeros[:, 0] if self.relation_geometry else None,
                    zeros[:, 0] if self.relation_mixture else None)
        q_bar = self._question_mean(ctx)
        pmi_a = self._anchor_pmi(ctx, q_bar) if self.anchor_query else None
        if pmi_a is not None:
            pmi_a = torch.where(has_query[:, None], pmi_a, torch.zeros_like(pmi_a))
        pmi2, anchor, rate = self._relation_pmi(ctx, pmi if pmi_a is None else pmi_a, q_bar)
        pmi2 = torch.where(has_query[:, None], pmi2, torch.zeros_like(pmi2))
        gate = self.mixture_gate(q_bar.float())[:, 0] if self.relation_mixture else None  # logit of lam
        return pmi_a, pmi2, anchor, rate, gate

    def select(self, ctx: AllocationContext) -> Selection:
        out = self.scorer(ctx.candidates, ctx.query, ctx.query_mask)  # pmi [B, M]
        pmi = out.pmi
        n = ctx.num_fine
        fine_logits = pmi[:, :n]  # log p(j | q) + const over the fine tokens
        extra, st_logits, rel_logits = _positive_pmi(pmi, self.learned_weight), pmi, fine_logits
        evidence = None  # the evidence fill="background" reads, when it is not the learned term
        if self.relational:
            pmi_a, pmi2, anchor, rate, gate = self._relational_readings(ctx, pmi, out.has_query)
            readings = [fine_logits, pmi2[:, :n]] + ([] if pmi_a is None else [pmi_a[:, :n]])
            chosen = [{"first": pmi, "relation": pmi2, "anchor": pmi_a}[r] for r in self.gain_readings]
            if self.relation_mixture:  # one distribution: the question weighs the two readings
                mix, pmi_mix = torch.sigmoid(gate), _mixture_pmi(*chosen, gate)
                extra, st_logits = _positive_pmi(pmi_mix, self.learned_weight), pmi_mix
                readings.append(pmi_mix[:, :n])
                tight = ctx.budget <= self.top_budget_fraction * n  # [B] rows that read the parts
                if self.relation_evidence == "top" and bool(tight.any()):
                    parts = self.learned_weight * _mixture_part_evidence(
                        *chosen, gate, anchor, relation_second=self.gain_readings[1] == "relation")
                    evidence = torch.where(tight[:, None], parts, extra)
            else:  # the sum (or the largest) of the chosen readings' positive pmi
                if self.gain_combine == "max":  # each reading nominates its own tokens
                    st_logits = torch.stack(chosen).amax(0)
                    extra = _positive_pmi(st_logits, self.learned_weight)  # max of the positive parts
                else:
                    st_logits = sum(chosen[1:], chosen[0])
                    if extra is not None:
                        extra = sum((_positive_pmi(t, self.learned_weight) for t in chosen[1:]), _positive_pmi(chosen[0], self.learned_weight))
            rel_logits = torch.stack(readings, 1)
            if self.relation_others:  # the relation learns what the anchor leads to, not the anchor
                exclude = torch.zeros(rel_logits.shape, dtype=torch.bool, device=rel_logits.device)
                exclude[torch.arange(rel_logits.shape[0], device=exclude.device), 1, anchor] = True
        sel = self._background(ctx, self._greedy(ctx, extra_unary=extra), extra if evidence is None else evidence)
        sel.extras.update(pmi=pmi, relevance_logits=rel_logits)
        if self.relational:
            sel.extras.update(pmi_relation=pmi2, anchor=anchor)
            if rate is not None:
                sel.extras["relation_rate"] = rate
            if pmi_a is not None:
                sel.extras["pmi_anchor"] = pmi_a
            if self.relation_mixture:
                sel.extras["relation_mix"] = mix
            if self.relation_others:
                sel.extras["relevance_exclude"] = exclude
                sel.extras["relevance_exclude_fallback"] = self.relation_others == "or_anchor"
        if self._training():
            keep_prob = torch.sigmoid(st_logits / self.st_temperature)
            st = keep_prob - keep_prob.detach() + 1.0  # value 1, gradient of keep_prob
            sel.tokens = self._gather_tokens(ctx, sel.indices, st)
            if self.distill and ctx.host is not None:
                p = self._llm_attention(ctx, fine_logits.dtype)
                if p is not None:
                    p = p.detach().clamp_min(0)
                    p = p / p.sum(1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
                    logq = fine_logits.log_softmax(1)
                    kl = (torch.special.xlogy(p, p) - p * logq).sum(1)  # [B] nats
                    sel.extras["losses"] = {"distill": kl}
        return sel


@register_allocator("arr_coc_host_llm_trained")
class ArrCocHostLLMTrainedAllocator(ArrCocHostLLMAllocator):
    """``arr_coc_host_llm`` plus a trained relevance term read from the layer's hidden states.

    After layer ``llm_layer`` the gain of visual slot j is that of :class:`ArrCocHostLLMAllocator`
    plus ``learned_weight * max(0, pmi_j)``, pmi from a :class:`ParticipatoryScorer` over the
    layer's hidden states (candidates h_j of the visual slots, query the text tokens' states).
    In training the prune call reports ``relevance_logits`` [B, Kc] (the scorer's pmi over the
    slots, which are the input tokens at the first prune), for the ``relevance`` loss. Called as
    a plain allocator (no in-LLM host) it is ``arr_coc_host`` with the LLM prior and no learned
    term (the scorer reads hidden states, which only exist inside the LLM).

    Args: those of :class:`ArrCocHostLLMAllocator`, plus learned_weight, relevance_dim,
    num_heads, rank, temperature (the scorer; see :class:`ArrCocHostTrainedAllocator`).
    """

    def __init__(
        self,
        alpha: float = 0.0,
        price: float = 0.0,
        *,
        learned_weight: float = 1.0,
        relevance_dim: int | None = None,
        num_heads: int = 8,
        rank: int = 16,
        temperature: float = 10.0,
        **kwargs,
    ):
        super().__init__(alpha, price, **kwargs)
        self.learned_weight, self.scorer = _learned_relevance(learned_weight, relevance_dim, num_heads, rank, temperature)

    def prune(self, state):
        kc = state.num_visual_slots
        h = state.hidden[:, :kc].float()
        q = state.hidden[:, state.text_slice].float()
        out = self.scorer(h, q, state.text_mask.bool())
        pmi = out.pmi.masked_fill(~state.visual_mask, -1e4)  # padded slots: never relevant
        decision = self._prune(state, extra_unary=_positive_pmi(pmi, self.learned_weight))
        decision.extras.update(pmi=pmi, relevance_logits=pmi)
        return decision
