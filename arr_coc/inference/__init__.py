"""Information-guided inference: KV-cache compression, request routing and retrieval by MI.

- :mod:`arr_coc.inference.kv_press`: :class:`CMIPress`, a kvpress press keeping the KV
  entries most informative (greedy conditional MI) about an observation window, and the
  base VLM's answer read through a compressed cache.
- :mod:`arr_coc.inference.critic`: a small InfoNCE critic between questions and images and
  its pointwise MI (nats).
- :mod:`arr_coc.inference.routing`: a router that sends requests to a full-token or a
  compressed path by their score and batches each path separately.
- :mod:`arr_coc.inference.retrieval`: chunked top-k gallery ranking by pointwise MI or cosine.
"""

from arr_coc.inference.critic import InfoNCECritic, pointwise_mi, train_critic, vlm_features
from arr_coc.inference.kv_press import CMIPress, cmi_keep_indices, compressed_answer_logits, kv_cache_entries
from arr_coc.inference.retrieval import chunked_topk, cosine_topk, embed_gallery, mi_topk
from arr_coc.inference.routing import MIRouter, RoutedOutput, plan_batches, route

__all__ = [
    "CMIPress",
    "InfoNCECritic",
    "MIRouter",
    "RoutedOutput",
    "chunked_topk",
    "cmi_keep_indices",
    "compressed_answer_logits",
    "cosine_topk",
    "embed_gallery",
    "kv_cache_entries",
    "mi_topk",
    "plan_batches",
    "pointwise_mi",
    "route",
    "train_critic",
    "vlm_features",
]
