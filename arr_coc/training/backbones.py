"""Building the two backbones of a VLM: a timm vision encoder and a transformers causal LM.

Both come from a config (tiny, trained from scratch: the offline default) or from pretrained
weights on the local disk, through the libraries' own pretrained paths (never a download
here: ``HF_HUB_OFFLINE`` is honoured by both libraries):

```python
vit = build_vision_encoder(VisionConfig(name="vit_small_patch16_224", img_size=64, patch_size=8,
                                        embed_dim=96, depth=4, num_heads=4))          # from a config
vit = build_vision_encoder(VisionConfig(name="vit_small_patch16_224", pretrained=True,
                                        pretrained_file="/path/weights.safetensors"))  # timm file overlay
lm = build_causal_lm(LLMConfig(hidden_size=128, num_layers=3), vocab_size=44)         # LlamaForCausalLM
lm = build_causal_lm(LLMConfig(name_or_path="/path/folder"))                           # from_pretrained
lm = build_causal_lm(LLMConfig(name_or_path="/path/folder", gguf_file="model.gguf"))  # GGUF (needs gguf)
```

The encoder returns ``forward_features``: ``[B, P + N, Dv]`` with P prefix tokens (CLS,
registers: ``encoder.num_prefix_tokens``) and N = H x W patch tokens in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

__all__ = ["LLMConfig", "VisionConfig", "build_causal_lm", "build_vision_encoder", "encoder_grid"]


@dataclass
class VisionConfig:
    """A timm vision transformer.

    name: a timm model name; its architecture is the base that the overrides below change.
    pretrained: load weights; with ``pretrained_file`` they come from that local file
        (timm's ``pretrained_cfg_overlay=dict(file=...)``), else from timm's own cache/hub.
    img_size / patch_size / embed_dim / depth / num_heads / mlp_ratio: architecture overrides
        (None keeps the named model's value). ``mean`` / ``std``: pixel normalisation.
    """

    name: str = "vit_small_patch16_224"
    pretrained: bool = False
    pretrained_file: str | None = None
    img_size: int | None = 64
    patch_size: int | None = 8
    embed_dim: int | None = 96
    depth: int | None = 4
    num_heads: int | None = 4
    mlp_ratio: float | None = 2.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LLMConfig:
    """A transformers causal LM.

    name_or_path: None builds a ``LlamaForCausalLM`` from the sizes below (from scratch);
        a local folder (or a hub id, offline only if cached) goes through
        ``AutoModelForCausalLM.from_pretrained``; with ``gguf_file`` the folder holds a GGUF.
    initializer_range: Llama's init std (0.1 trains the tiny from-scratch LM far faster
        than the default 0.02 on the embedded task; see experiments/results/base_vlm.md).
    """

    name_or_path: str | None = None
    gguf_file: str | None = None
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    initializer_range: float = 0.1
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    attn_implementation: str = "eager"
    extra: dict[str, Any] = field(default_factory=dict)


def build_vision_encoder(cfg: VisionConfig) -> nn.Module:
    """A timm ViT without a classifier head (``num_classes=0``); see the module docstring."""
    kwargs: dict[str, Any] = {"num_classes": 0}
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    kwargs.update(cfg.extra)
    if cfg.pretrained_file is not None:
        path = Path(cfg.pretrained_file)
        if not path.is_file():
            raise ValueError(f"pretrained_file: expected an existing file, got {path}")
        if not cfg.pretrained:
            raise ValueError("pretrained_file: given, but pretrained=False (set pretrained=True)")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path), "num_classes": 0}
    try:
        return timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except RuntimeError as err:  # unknown names and shape mismatches
        raise ValueError(f"name: could not build timm model {cfg.name!r} with {kwargs}: {err}") from err


def encoder_grid(encoder: nn.Module) -> tuple[int, int]:
    """The patch grid (H, W) of a timm ViT."""
    grid = getattr(getattr(encoder, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise ValueError("encoder: expected a timm ViT with patch_embed.grid_size")
    return int(grid[0]), int(grid[1])


def build_causal_lm(cfg: LLMConfig, vocab_size: int | None = None, pad_token_id: int = 0) -> nn.Module:
    """A causal LM (see the module docstring). ``vocab_size`` is required from scratch."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.name_or_path is not None:
        kwargs: dict[str, Any] = {"attn_implementation": cfg.attn_implementation}
        if cfg.gguf_file is not None:
            kwargs["gguf_file"] = cfg.gguf_file
        kwargs.update(cfg.extra)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
        if vocab_size is not None and model.get_input_embeddings().num_embeddings != vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    if vocab_size is None or vocab_size < 1:
        raise ValueError(f"vocab_size: expected a positive int for an LM built from a config, got {vocab_size}")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"num_heads: expected a divisor of hidden_size={cfg.hidden_size}, got {cfg.num_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        rope_theta=cfg.rope_theta,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        **cfg.extra,
    )
    config._attn_implementation = cfg.attn_implementation
    torch_model = LlamaForCausalLM(config)
    return torch_model
