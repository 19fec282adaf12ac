"""A tiny randomly initialised BaseVLM (2 ViT blocks, 4 Llama layers, 4 x 4 grid) and a batch for it."""

from __future__ import annotations

import torch


def tiny_vlm(seed: int = 0, *, llm_layers: int = 4, text_tower: bool = False):
    """BaseVLM of width 32: ViT 2 blocks x 2 heads on 32 x 32 images (4 x 4 patches), Llama of
    ``llm_layers``; with ``text_tower`` also a paired CLIP text tower (joint space of width 8)."""
    from arr_coc.training.backbones import LLMConfig, VisionConfig
    from arr_coc.training.module import build_vlm

    extra = {}
    if text_tower:
        from arr_coc.training.task import VQATask
        from arr_coc.training.tokenizer import build_tokenizer

        tok = build_tokenizer(VQATask())
        extra = dict(
            text_tower=dict(vocab_size=len(tok), pad_token_id=int(tok.pad_token_id or 0), dim=16, depth=1, heads=2, max_len=16),
            clip_embed_dim=8,
        )
    torch.manual_seed(seed)
    vlm = build_vlm(
        vision=VisionConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
        llm=LLMConfig(hidden_size=32, num_layers=llm_layers, num_heads=2, intermediate_size=64),
        **extra,
    )
    return vlm.eval()


def tiny_batch(vlm, b: int = 3, t: int = 5, seed: int = 1):
    """pixels [B, 3, 32, 32], question_ids [B, T] (row 1 right-padded), question_mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(b, 3, 32, 32, generator=g)
    vocab = vlm.llm.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    if b > 1:
        mask[1, t - 2 :] = False
        ids[1, t - 2 :] = vlm.config.pad_token_id
    return pixels, ids, mask
