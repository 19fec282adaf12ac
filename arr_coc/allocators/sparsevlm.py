"""``sparsevlm``: text-guided pruning inside the LLM with token recycling (SparseVLM).

SparseVLM (Zhang et al., ICML 2025, "SparseVLM: visual token sparsification for efficient
vision-language model inference") prunes the image tokens progressively inside the LLM,
rating them by the attention of the *relevant* text tokens. The released code (github
Gumpest/SparseVLMs, ``llava/model/language_model/modelling_sparse_llama.py``
``LlamaDynamicvitModel.forward``, ``score.py`` ``attn_postprocess_topk``, ``utils.py``
``cluster_and_merge``; version 1.0, the default of the release), transcribed in the tests:

1. text raters, once, from the LLM's input embeddings: ``m = softmax_text(v @ t^T).mean(visual)``
   over the image tokens v and the text tokens after them t; the raters are the text tokens
   with ``m > mean(m)``;
2. at each pruning layer (``pruning_loc = [2, 6, 15]`` of 32), after the layer ran: its
   softmax attention averaged over heads, the raters' rows, the image columns, averaged over
   the raters, rates each image token; the top ``k`` are kept;
3. recycling: of the pruned image tokens, the ``int(0.3 p) + 1`` best rated (p pruned) are
   clustered by DPC-kNN (``cluster_and_merge``: density from the ``c`` nearest neighbours,
   the ``c`` tokens with the highest ``distance-to-denser x density`` are centres, every
   token joins its nearest centre, each cluster is averaged) into ``c = int((int(0.3 p) + 1)
   / 10) + 1`` tokens, appended after the kept image tokens; the others are dropped.

Here a host that runs the LLM layer by layer (:class:`arr_coc.allocators.host.InLLMHost`)
calls :meth:`SparseVLMAllocator.prune` after each pruning layer. Budget semantics: the
number of image tokens after the last pruning layer (kept + recycled) equals ``budget``.

What still departs from the paper:

- the schedule: the release hard-codes per-budget token counts for LLaVA's 576 tokens and
  32 layers (e.g. 66, 30, 17 kept at layers 2, 6, 15 for 64). Here the pruning layers are
  ``round(l * L / 32)`` for l in (2, 6, 15) (distinct, < L - 1; ``layers`` overrides) and
  the image tokens left after stage s of S (kept + recycled) are
  ``round(N (budget / N)^((s + 1) / S))``, ending at ``budget`` exactly; the kept count of a
  stage is the one whose recycled clusters complete that number;
- the kept and recycled tokens keep their position ids (the release's version 1.0
  renumbers them, its version 2.0 keeps them; the base VLM's image tokens all sit at
  position 0, so renumbering would mean nothing here);
- the density noise (``torch.rand * 1e-6``) comes from a generator seeded by ``seed``;
- batched: each row has its own raters, ranks its own real image tokens, recycles its own;
  the release handles batch size 1;
- called as a plain allocator (no LLM host) it ranks by ``fastv_like``'s proxy and reports
  ``extras["in_llm"] = False``;
- a recycled token is reported (positions, recall) at its cluster centre's patch.
"""

from __future__ import annotations

import math

import torch

from arr_coc.allocators.base import AllocationContext, Selection
from arr_coc.allocators.fastv_like import FastVLikeAllocator
from arr_coc.allocators.host import LLMLayerState, PruneDecision
from arr_coc.allocators.registry import register_allocator

__all__ = ["SparseVLMAllocator", "dpc_knn_merge", "recycled_count", "select_raters"]

RELEASED_LAYERS = (2, 6, 15)
RELEASED_DEPTH = 32


def recycled_count(pruned: int) -> int:
    """Recycled tokens for ``pruned`` pruned image tokens: ``int((int(0.3 p) + 1) / 10) + 1`` (0 if p = 0)."""
    if pruned <= 0:
        return 0
    return int((int(pruned * 0.3) + 1) / 10) + 1


def select_raters(visual: torch.Tensor, visual_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters: visual [B, K, D], text [B, T, D] (embeddings), masks -> [B, T] bool.

    ``m = softmax over the real text tokens of (v @ t^T)``, averaged over the real image
    tokens; a rater has ``m`` above the mean of m over the real text tokens.
    """
    logits = (visual.float() @ text.float().transpose(1, 2)).masked_fill(~text_mask[:, None, :], float("-inf"))
    m = torch.softmax(logits, dim=2)  # [B, K, T]
    vm = visual_mask.float()[..., None]
    m = (m * vm).sum(1) / vm.sum(1).clamp(min=1)  # [B, T]
    tm = text_mask.float()
    mean = (m * tm).sum(1, keepdim=True) / tm.sum(1, keepdim=True).clamp(min=1)
    return (m > mean) & text_mask


def dpc_knn_merge(x: torch.Tensor, cluster_num: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering and averaging (SparseVLM's ``cluster_and_merge``), one example.

    x [M, C] tokens, cluster_num c in [1, M], noise [M] (the density tie-breaker, ~1e-6)
    -> (merged [c, C] cluster means, centres [c] long indices of the cluster centres in x).
    """
    m, c_dim = x.shape
    if not 1 <= cluster_num <= m:
        raise ValueError(f"cluster_num: expected 1 <= c <= {m}, got {cluster_num}")
    xf = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    dist = (xf[:, None, :] - xf[None, :, :]).norm(dim=-1) / math.sqrt(c_dim)  # [M, M]
    dist_nearest = dist.topk(cluster_num, dim=-1, largest=False).values
    density = (-(dist_nearest**2).mean(dim=-1)).exp() + noise.to(dist.dtype)
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    dist_max = dist.max()
    parent_dist = torch.where(denser, dist, dist_max).min(dim=-1).values
    centres = (parent_dist * density).topk(cluster_num).indices  # [c]
    owner = dist[centres].argmin(dim=0)  # [M] nearest centre
    owner[centres] = torch.arange(cluster_num, device=x.device)
    merged = torch.zeros(cluster_num, c_dim, dtype=x.dtype, device=x.device).index_add_(0, owner, x)
    counts = torch.zeros(cluster_num, dtype=x.dtype, device=x.device).index_add_(0, owner, torch.ones_like(x[:, 0]))
    return merged / (counts[:, None] + 1e-6), centres


@register_allocator("sparsevlm")
class SparseVLMAllocator(FastVLikeAllocator):
    """SparseVLM: rater-text attention inside the LLM, progressive, with token recycling.

    Args:
        layers: the LLM layers after which tokens are pruned (None: the released 2, 6, 15 of
            32 scaled to the LLM's depth).
        recycle: recycle pruned tokens (the release's default); False only drops them.
        seed: of the density tie-break noise.
        num_heads / query_proj: of the plain-allocator fallback (``fastv_like``'s).
    """

    in_llm = True
    fixed_budget = True

    def __init__(self, *, layers: tuple[int, ...] | list[int] | None = None, recycle: bool = True, seed: int = 0,
                 num_heads: int = 1, query_proj=None):
        super().__init__(num_heads=num_heads, query_proj=query_proj)
        if layers is not None:
            layers = tuple(int(x) for x in layers)
            if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
                raise ValueError(f"layers: expected increasing non-negative layer indices, got {layers!r}")
        self.layers = layers
        self.recycle = recycle
        self.seed = seed

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            if self.layers[-1] >= num_layers:
                raise ValueError(f"layers: {self.layers} do not fit an LLM of {num_layers} layers")
            return self.layers
        scaled = sorted({round(l * num_layers / RELEASED_DEPTH) for l in RELEASED_LAYERS})
        scaled = tuple(l for l in scaled if l < num_layers - 1) or (0,)
        return scaled

    @staticmethod
    def stage_total(n: int, budget: int, stage: int, stages: int) -> int:
        """Image tokens left after stage ``stage`` of ``stages`` (kept + recycled), N = n at the start."""
        if budget >= n:
            return n
        if stage == stages - 1 or budget == 0:
            return budget
        return max(budget, min(n, round(n * (budget / n) ** ((stage + 1) / stages))))

    def plan(self, visual_now: int, total: int) -> tuple[int, int]:
        """(kept, recycled) with kept + recycled == total (recycled of the pruned count)."""
        if total >= visual_now:
            return visual_now, 0
        if not self.recycle:
            return total, 0
        for kept in range(total, -1, -1):
            c = recycled_count(visual_now - kept)
            if kept + c == total:
                return kept, c
        return total, 0

    def prune(self, state: LLMLayerState) -> PruneDecision:
        b, kc = state.visual_mask.shape
        device = state.hidden.device
        if state.stage == 0:
            emb = state.inputs_embeds
            state.memory["raters"] = select_raters(emb[:, :kc], state.visual_mask, emb[:, kc:], state.text_mask)
            state.memory["n0"] = state.visual_mask.sum(1)
            state.memory["stages"] = len(self.prune_layers(state.num_layers))
            state.memory["generator"] = torch.Generator().manual_seed(self.seed)
        raters = state.memory["raters"]  # [B, Tt]
        att = state.attention.mean(dim=1)[:, state.text_slice, state.visual_slice]  # [B, Tt, Kc]
        rw = raters.float()[..., None]
        relation = (att * rw).sum(1) / rw.sum(1).clamp(min=1)  # [B, Kc]
        relation = relation.masked_fill(~state.visual_mask, float("-inf"))
        keeps, news, origins, counts = [], [], [], []
        for row in range(b):
            v_now = int(state.visual_mask[row].sum())
            total = self.stage_total(int(state.memory["n0"][row]), int(state.budget[row]), state.stage, state.memory["stages"])
            kept, c = self.plan(v_now, min(total, v_now))
            order = relation[row].topk(v_now).indices if v_now else relation.new_zeros(0, dtype=torch.long)
            keeps.append(order[:kept])
            pruned = order[kept:]
            if c > 0 and pruned.numel():
                # the best rated 30 % (+1) of the pruned tokens, clustered into c tokens
                m = int(pruned.numel() * 0.3) + 1
                cand = pruned[relation[row, pruned].topk(m).indices]
                noise = torch.rand(m, generator=state.memory["generator"]).to(device) * 1e-6
                merged, centres = dpc_knn_merge(state.hidden[row, cand], c, noise)
                news.append(merged)
                origins.append(state.origin[row, cand[centres]])
            else:
                news.append(state.hidden.new_zeros(0, state.hidden.shape[-1]))
                origins.append(torch.zeros(0, dtype=torch.long, device=device))
            counts.append(kept + news[-1].shape[0])
        width_k = max((k.numel() for k in keeps), default=0)
        keep = torch.full((b, width_k), -1, dtype=torch.long, device=device)
        for row, k in enumerate(keeps):
            keep[row, : k.numel()] = k
        width_c = max(n.shape[0] for n in news)
        new_tokens = state.hidden.new_zeros(b, width_c, state.hidden.shape[-1])
        new_mask = torch.zeros(b, width_c, dtype=torch.bool, device=device)
        new_origin = torch.full((b, width_c), -1, dtype=torch.long, device=device)
        for row, (n, o) in enumerate(zip(news, origins)):
            new_tokens[row, : n.shape[0]] = n
            new_mask[row, : n.shape[0]] = True
            new_origin[row, : n.shape[0]] = o
        return PruneDecision(
            keep=keep,
            new_tokens=new_tokens if width_c else None,
            new_mask=new_mask if width_c else None,
            new_origin=new_origin if width_c else None,
            extras={"relation": relation, "raters": raters, "counts": torch.tensor(counts)},
        )

    def select(self, ctx: AllocationContext) -> Selection:
        sel = super().select(ctx)
        sel.extras["in_llm"] = False
        return sel

