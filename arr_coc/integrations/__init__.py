"""Plug-ins that put any registered allocator inside a real VLM, without patching it.

- :mod:`arr_coc.integrations.llava`: transformers ``LlavaForConditionalGeneration`` (``wrap``)
  and haotian-liu-style forks (``hook_projector``);
- :mod:`arr_coc.integrations.qwen_vl`: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (``wrap``);
- :mod:`arr_coc.integrations.query`: the question-only query, found from the chat template;
- :mod:`arr_coc.integrations.signals`: relevance sources (input embeddings, a CLIP / SigLIP
  text tower, the LLM's hidden states at a layer) and host signals, with their costs;
- :mod:`arr_coc.integrations._llm`: in-LLM pruning (FastV, SparseVLM) between decoder layers;
- :mod:`arr_coc.integrations._common`: budget, query and sequence-compaction helpers.
"""
