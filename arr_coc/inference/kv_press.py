"""KV-cache compression by greedy conditional mutual information, as a kvpress press.

:class:`CMIPress` is a ``kvpress.BasePress``: used as ``with press(model): model(...)`` or
handed to kvpress's ``KVPressTextGenerationPipeline``. During prefill, in every attention
layer, it keeps ``n_kept = max(1, int(L * (1 - compression_ratio)))`` of the ``L`` cached
positions per KV head (kvpress's own count, ``kvpress.utils.compute_n_kept``):

- the observation window (the last ``window_size`` positions, as in SnapKV) is always kept;
  its queries (post-RoPE, every query head of the KV head's group) are the query ``Q``;
- the other ``n_kept - w`` entries are picked from the earlier positions by
  :func:`arr_coc.attending.greedy_conditional_mi` on the keys: each step takes the key
  ``k_j`` with the largest ``I(k_j ; Q | k_S)`` under the Gaussian model with a cosine
  kernel (``alpha`` < 1 mixes in coverage). Conditioning on the kept set ``S`` is what
  makes it differ from a per-position score: a key that duplicates a kept key carries no
  new information about the window and is skipped while a distinct relevant key remains.

Choosing alpha. The window's queries span at most ``w x group`` directions, so after a few
picks ``I(k ; Q | S)`` is near zero for every remaining key and, with ``alpha = 1``, the rest
of the budget is filled by largest residual variance (the tail of the greedy). At high
compression that tail matters: on the embedded task's base VLM (experiments/inference.py)
``alpha = 0.5``, which spends it on covering the keys that ``S`` does not yet explain, was
clearly better at ratios 0.75 / 0.9 than ``alpha = 1``.

``per_head=True`` runs one greedy per (batch row, KV head); ``False`` runs it once per row
on the head-averaged keys with all window queries, and keeps the same positions in every
head. Kept entries stay in their original order.

:func:`compressed_answer_logits` reads the embedded task's answer through a compressed
cache: prefill ``[visual][question]`` with the press, then feed ``[READ]`` as one decode
step (the base VLM's positions: visual at RoPE 0, question at 1..T, ``[READ]`` at T + 1).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from einops import rearrange
from kvpress.presses.base_press import BasePress
from kvpress.utils import compute_n_kept, get_prerope_query_states
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

from arr_coc.attending import greedy_conditional_mi
from arr_coc.inference._checks import check_vlm_question

__all__ = ["CMIPress", "cmi_keep_indices", "compressed_answer_logits", "kv_cache_entries"]

_KERNELS = ("cosine", "rbf")


def cmi_keep_indices(
    keys: torch.Tensor,
    queries: torch.Tensor,
    n_kept: int,
    *,
    window_size: int,
    alpha: float = 1.0,
    per_head: bool = True,
    kernel: str = "cosine",
) -> torch.Tensor:
    """Positions to keep per KV head: the window plus greedy conditional-MI picks.

    keys:    [B, Hkv, L, d] cached keys (post-RoPE).
    queries: [B, H, w, d] queries of the last ``w = window_size`` positions (post-RoPE),
             H a multiple of Hkv (grouped-query attention: head h reads KV head h // (H / Hkv)).
    n_kept:  entries to keep per head, 1 <= n_kept <= L.

    Returns [B, Hkv, n_kept] long, sorted ascending, every entry a valid position in [0, L)
    (NaN or inf keys / queries are a ValueError, never a -1 index). When ``n_kept <= w`` only
    the latest ``n_kept`` positions of the window are kept. The picks do not depend on the
    common scale of the keys and queries (cosine: per-vector scale-free; rbf: the bandwidth
    follows the data), so each (row, KV head) is divided by its peak magnitude first: keys
    near the float32 limits pick what their rescaled copies pick.
    """
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or min(keys.shape) < 1:
        raise ValueError(f"keys: expected a non-empty [B, Hkv, L, d] tensor, got {getattr(keys, 'shape', type(keys))}")
    if not keys.is_floating_point():
        raise ValueError(f"keys: expected a floating-point tensor, got {keys.dtype}")
    b, hkv, length, d = keys.shape
    if not isinstance(queries, torch.Tensor) or queries.dim() != 4 or queries.shape[0] != b or queries.shape[3] != d or min(queries.shape) < 1:
        raise ValueError(f"queries: expected a [B={b}, H, w, d={d}] tensor, got {getattr(queries, 'shape', type(queries))}")
    if not queries.is_floating_point():
        raise ValueError(f"queries: expected a floating-point tensor, got {queries.dtype}")
    if not torch.isfinite(keys).all():
        raise ValueError("keys: expected finite values, found NaN or inf")
    if not torch.isfinite(queries).all():
        raise ValueError("queries: expected finite values, found NaN or inf")
    if not isinstance(per_head, bool):
        raise ValueError(f"per_head: expected a bool, got {per_head!r}")
    if kernel not in _KERNELS:
        raise ValueError(f"kernel: expected one of {_KERNELS}, got {kernel!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected a float in [0, 1], got {alpha!r}")
    h, w = queries.shape[1], queries.shape[2]
    if h % hkv:
        raise ValueError(f"queries: the number of query heads ({h}) must be a multiple of the KV heads ({hkv})")
    if not isinstance(window_size, int) or window_size < 1 or w != window_size:
        raise ValueError(f"window_size: expected an int >= 1 equal to queries.shape[2]={w}, got {window_size!r}")
    if w >= length:
        raise ValueError(f"window_size: expected < the cache length {length}, got {w}")
    if not isinstance(n_kept, int) or not 1 <= n_kept <= length:
        raise ValueError(f"n_kept: expected an int in [1, {length}], got {n_kept!r}")
    device = keys.device
    if n_kept <= w:
        idx = torch.arange(length - n_kept, length, device=device)
        return idx.expand(b, hkv, n_kept).clone()
    m = length - w
    budget = n_kept - w
    cand = keys[:, :, :m].double()
    q = queries.double()
    if per_head:
        cand_emb = rearrange(cand, "b k m d -> (b k) m d")
        query_emb = rearrange(q, "b (k g) w d -> (b k) (g w) d", k=hkv)
    else:
        cand_emb = cand.mean(dim=1)
        query_emb = rearrange(q, "b h w d -> b (h w) d")
    # one positive scale per greedy problem: exact (see docstring), and no overflow below
    peak = torch.maximum(cand_emb.abs().amax(dim=(1, 2)), query_emb.abs().amax(dim=(1, 2)))
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))[:, None, None]
    cand_emb, query_emb = (cand_emb / peak).float(), (query_emb / peak).float()
    res = greedy_conditional_mi(cand_emb, query_emb, None, budget, alpha=alpha, kernel=kernel, check_finite=False)
    picks = res.indices  # price 0: the budget is always spent, no -1 entries
    if (picks < 0).any():  # a guard on the invariant above, never a silent -1 position
        raise ValueError("keys: the greedy stopped before spending its budget (degenerate keys)")
    if per_head:
        picks = rearrange(picks, "(b k) n -> b k n", k=hkv)
    else:
        picks = picks[:, None].expand(b, hkv, budget)
    window = torch.arange(m, length, device=device).expand(b, hkv, w)
    return torch.cat([picks.to(device), window], dim=-1).sort(dim=-1).values


@dataclass
class CMIPress(BasePress):
    """Keep the KV entries most informative about the observation window, given those kept.

    compression_ratio: fraction of the prefill's KV entries to remove, in [0, 1).
    window_size:       latest positions whose queries form Q (always kept); clipped to L - 1.
    alpha:             weight of I(k; Q | S) vs. coverage of the keys (1 = query only).
    per_head:          one greedy per KV head (True) or one on head-averaged keys (False).
    kernel:            "cosine" or "rbf" (see :mod:`arr_coc.attending`).
    """

    compression_ratio: float = 0.0
    window_size: int = 8
    alpha: float = 1.0
    per_head: bool = True
    kernel: str = "cosine"

    def __post_init__(self) -> None:
        r = self.compression_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 <= r < 1):
            raise ValueError(f"compression_ratio: expected a float in [0, 1), got {r!r}")
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"window_size: expected an int >= 1, got {self.window_size!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 <= a <= 1) or not math.isfinite(a):
            raise ValueError(f"alpha: expected a float in [0, 1], got {a!r}")
        if self.kernel not in _KERNELS:
            raise ValueError(f"kernel: expected one of {_KERNELS}, got {self.kernel!r}")

    @staticmethod
    def window_queries(module: nn.Module, hidden_states: torch.Tensor, window: int, position_embeddings) -> torch.Tensor:
        """Post-RoPE queries of the last ``window`` positions: [B, H, w, d] (as SnapKV builds them)."""
        q = get_prerope_query_states(module, hidden_states[:, -window:])
        cos, sin = position_embeddings
        cos, sin = cos[:, -window:].unsqueeze(1), sin[:, -window:].unsqueeze(1)
        return q * cos + rotate_half(q) * sin

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [B, Hkv, L, d] -> [B, Hkv, n_kept, d] (kvpress's hook calls this in prefill)."""
        if self.compression_ratio == 0:
            return keys, values
        length = keys.shape[2]
        n_kept = compute_n_kept(length, self.compression_ratio)
        if n_kept >= length:
            return keys, values
        w = min(self.window_size, length - 1, hidden_states.shape[1])
        queries = self.window_queries(module, hidden_states, w, kwargs["position_embeddings"])
        idx = cmi_keep_indices(
            keys, queries.to(keys.dtype), n_kept, window_size=w, alpha=self.alpha, per_head=self.per_head, kernel=self.kernel
        )
        gather = idx[..., None].expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, gather).contiguous(), values.gather(2, gather).contiguous()


def kv_cache_entries(cache: DynamicCache) -> int:
    """Total cached (position, head) entries over layers and KV heads of one batch row."""
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"cache: expected a transformers DynamicCache, got {type(cache).__name__}")
    return sum(int(layer.keys.shape[1] * layer.keys.shape[2]) for layer in cache.layers)


@torch.no_grad()
def compressed_answer_logits(
    vlm: nn.Module,
    visual: torch.Tensor,
    visual_positions: torch.Tensor | None,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor | None = None,
    *,
    press: BasePress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base-VLM answer logits read through a (compressed) KV cache.

    vlm:              an ``arr_coc.training.base_vlm.BaseVLM`` (its ``llm`` a transformers causal LM).
    visual:           [B, K, Dl] projected visual tokens (every one real).
    visual_positions: [B, K, 3] (row, col, level), or None for the N fine tokens.
    question_ids:     [B, T]; question_mask [B, T] (right-padded; None: all real).
    press:            a kvpress press applied during the prefill of ``[visual][question]``
                      (None: no compression).

    Rows are grouped by real question length so that every prefill is unpadded. Returns
    (logits [B, V], kv_entries [B] long: cached (position, KV head) entries summed over
    layers after compression).
    """
    if not isinstance(vlm, nn.Module) or not hasattr(vlm, "check_answer_inputs") or not hasattr(vlm, "llm"):
        raise ValueError(f"vlm: expected an arr_coc BaseVLM, got {type(vlm).__name__}")
    if not isinstance(visual, torch.Tensor) or visual.ndim != 3 or min(visual.shape) < 1:
        raise ValueError(f"visual: expected a non-empty [B, K, Dl] tensor, got {getattr(visual, 'shape', type(visual))}")
    if not visual.is_floating_point() or not torch.isfinite(visual).all():
        raise ValueError("visual: expected finite floating-point tokens")
    check_vlm_question(vlm, question_ids, question_mask, batch=visual.shape[0])
    if visual_positions is not None:
        if not isinstance(visual_positions, torch.Tensor) or visual_positions.is_floating_point() or visual_positions.is_complex():
            raise ValueError(f"visual_positions: expected an integer [B, K, 3] tensor, got {getattr(visual_positions, 'dtype', type(visual_positions))}")
        if visual_positions.shape == (*visual.shape[:2], 3) and bool((visual_positions < 0).any()):
            raise ValueError("visual_positions: expected non-negative (row, col, level)")
    visual = visual.to(vlm.llm.get_input_embeddings().weight.dtype)
    _, visual_positions, question_mask = vlm.check_answer_inputs(
        visual, None, visual_positions, question_ids, question_mask
    )
    b, k, _ = visual.shape
    lengths = question_mask.sum(1)
    if ((torch.cumsum(question_mask.long(), 1) * question_mask) != torch.arange(1, question_ids.shape[1] + 1, device=question_ids.device) * question_mask).any():
        raise ValueError("question_mask: expected right padding (real tokens first)")
    if press is not None and not isinstance(press, BasePress):
        raise ValueError(f"press: expected a kvpress BasePress or None, got {type(press).__name__}")
    device = visual.device
    embed = vlm.llm.get_input_embeddings()
    vis = visual + vlm.position(visual_positions).to(visual.dtype)
    logits = torch.empty(b, vlm.llm.lm_head.out_features, dtype=visual.dtype, device=device)
    entries = torch.empty(b, dtype=torch.long, device=device)
    for t in lengths.unique().tolist():
        rows = (lengths == t).nonzero().squeeze(1)
        q_ids = question_ids[rows, :t]
        q_emb = embed(q_ids)
        prefill = torch.cat([vis[rows], q_emb], dim=1)
        pos = torch.cat([torch.zeros(k, dtype=torch.long), torch.arange(1, t + 1)]).to(device)
        cache = DynamicCache()
        ctx = press(vlm.llm) if press is not None else contextlib.nullcontext()
        with ctx:
            vlm.llm.model(inputs_embeds=prefill, position_ids=pos.expand(len(rows), -1), past_key_values=cache, use_cache=True)
        read_ids = torch.full((len(rows), 1), vlm.config.readout_token_id, dtype=torch.long, device=device)
        readout = embed(read_ids) + q_emb.sum(1, keepdim=True)
        out = vlm.llm.model(
            inputs_embeds=readout,
            position_ids=torch.full((len(rows), 1), t + 1, dtype=torch.long, device=device),
            past_key_values=cache,
            use_cache=True,
        )
        logits[rows] = vlm.llm.lm_head(out.last_hidden_state[:, -1])
        entries[rows] = kv_cache_entries(cache) - len(cache.layers) * cache.layers[0].keys.shape[1]  # minus [READ]
    return logits, entries

