"""Information-guided inference: KV-cache compression, request routing and retrieval by MI.

- :mod:`arr_coc.inference.kv_press`: :class:`CMIPress`, a kvpress press keeping the KV
  entries most informative (greedy conditional MI) about an observation window.
- :mod:`arr_coc.inference.routing`: per-request I(query; image) scores and a router that
  batches full-token and compressed requests separately.
- :mod:`arr_coc.inference.retrieval`: gallery ranking by a critic's pointwise MI, chunked.
"""

from arr_coc.inference.kv_press import CMIPress, cmi_keep_indices, compressed_answer_logits, kv_cache_entries

__all__ = ["CMIPress", "cmi_keep_indices", "compressed_answer_logits", "kv_cache_entries"]
