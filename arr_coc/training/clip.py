"""Stage 0 of benchmark v2: the vision tower as a CLIP (a ViT and a small text transformer).

```python
clip = ClipModel(ClipConfig(vision=VisionConfig(img_size=128, patch_size=8), vocab_size=len(tok)))
tokens = clip.encode_image(pixels)              # [B, P + N, Dv] (timm forward_features; CLS first)
img = clip.image_embedding(tokens)              # [B, Dj] L2-normalised: the CLS token, projected
patches = clip.patch_features(tokens)           # [B, N, Dj] L2-normalised: every patch, projected
txt = clip.text_embedding(ids, mask)            # [B, Dj] L2-normalised: the EOS state, projected
per_tok = clip.text_token_features(ids, mask)   # [B, T, Dj] L2-normalised per-token states
```

As in CLIP (Radford et al., 2021): the image embedding is the final-layer CLS token (after the
tower's last LayerNorm) through a linear ``visual_projection``; the text embedding is the
final state at an end-of-text token appended to the text, through ``text_projection``; both
are trained with :class:`arr_coc.losses.ClipLoss` on (scene, caption) pairs. ``patch_features``
sends the patch tokens through the same LayerNorm and projection, which is how text-conditioned
pruners (CDPruner's LLaVA code) compare patches with an instruction. The text tower reads the
task's word-level tokenizer (:mod:`arr_coc.training.tokenizer`); the tokenizer's ``[READ]``
token serves as its end-of-text token.

Auxiliary per-patch heads (each cell's colour and shape class from the scene's exact labels) are
trained beside the contrastive loss: vision-side supervision, so that every patch token says
what is in its cell before the tower is frozen for stage 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from arr_coc.training.backbones import VisionConfig, build_vision_encoder, encoder_grid

__all__ = ["ClipConfig", "ClipModel", "TextTower", "TextTowerConfig", "pooled_text_features", "projected_tokens", "token_text_features"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class TextTowerConfig:
    """A small bidirectional transformer over word ids.

    vocab_size / pad_token_id / eos_token_id: of the tokenizer (eos: the pooled position).
    dim / depth / heads / mlp_ratio: sizes. max_len: longest text (with its eos).
    """

    vocab_size: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 2
    dim: int = 96
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    max_len: int = 96


class TextTower(nn.Module):
    """ids [B, T] (+ mask [B, T]) -> states [B, T + 1, D] with an eos appended after the last real token."""

    def __init__(self, config: TextTowerConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError(f"config.vocab_size: expected >= 1, got {config.vocab_size}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Parameter(torch.randn(config.max_len, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, int(config.dim * config.mlp_ratio), dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (states [B, T + 1, D] after the final LayerNorm, mask [B, T + 1] bool, eos index [B])."""
        if ids.ndim != 2:
            raise ValueError(f"ids: expected [B, T], got {tuple(ids.shape)}")
        b, t = ids.shape
        if t + 1 > self.config.max_len:
            raise ValueError(f"ids: at most {self.config.max_len - 1} tokens, got {t}")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if mask.shape != ids.shape:
            raise ValueError(f"mask: expected {tuple(ids.shape)}, got {tuple(mask.shape)}")
        lengths = mask.long().sum(1)  # [B]; right padding: the eos goes at index length
        full_ids = torch.cat([ids.masked_fill(~mask, self.config.pad_token_id), ids.new_full((b, 1), self.config.pad_token_id)], 1)
        full_ids = full_ids.scatter(1, lengths[:, None], self.config.eos_token_id)
        full_mask = torch.arange(t + 1, device=ids.device)[None, :] <= lengths[:, None]
        x = self.embed(full_ids) + self.pos[: t + 1]
        x = self.blocks(x, src_key_padding_mask=~full_mask)
        return self.norm(x), full_mask, lengths


def projected_tokens(projection: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, K, Dv] -> [B, K, Dj]: through the visual projection, L2-normalised."""
    return F.normalize(projection(tokens), dim=-1)


def pooled_text_features(text: TextTower, projection: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ids [B, T] -> [B, Dj]: the text tower's eos state, projected and L2-normalised."""
    states, _, eos = text(ids, mask)
    pooled = states[torch.arange(states.shape[0], device=states.device), eos]
    return F.normalize(projection(pooled), dim=-1)


def token_text_features(text: TextTower, projection: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ids [B, T] -> [B, T, Dj]: every input token's final state projected, L2-normalised
    (padded positions are zeros)."""
    states, full_mask, _ = text(ids, mask)
    return projected_tokens(projection, states[:, :-1]) * full_mask[:, :-1, None]


@dataclass
class ClipConfig:
    """Everything that rebuilds a :class:`ClipModel` (JSON-serialisable)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 64  # the joint space
    colour_classes: int = 0  # auxiliary per-patch heads (0 disables)
    shape_classes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipConfig":
        d = dict(d)
        vision = dict(d.pop("vision", {}) or {})
        if "mean" in vision:
            vision["mean"], vision["std"] = tuple(vision["mean"]), tuple(vision["std"])
        return cls(vision=VisionConfig(**vision), text=TextTowerConfig(**(d.pop("text", {}) or {})), **d)


class ClipModel(nn.Module):
    """A ViT and a text tower in one joint space (see the module docstring)."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = build_vision_encoder(config.vision)
        self.text = TextTower(config.text)
        dv = int(self.vision.num_features)
        self.visual_projection = nn.Linear(dv, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.dim, config.embed_dim, bias=False)
        self.grid = encoder_grid(self.vision)
        self.num_prefix_tokens = int(getattr(self.vision, "num_prefix_tokens", 0))
        if self.num_prefix_tokens < 1:
            raise ValueError("config.vision: a CLIP image embedding needs a CLS token (num_prefix_tokens >= 1)")
        self.colour_head = nn.Linear(dv, config.colour_classes) if config.colour_classes else None
        self.shape_head = nn.Linear(dv, config.shape_classes) if config.shape_classes else None
        self.register_buffer("pixel_mean", torch.tensor(config.vision.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.vision.std).view(1, 3, 1, 1), persistent=False)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [0, 1] -> tokens [B, P + N, Dv] (after the tower's final norm)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels: expected [B, 3, H, W], got {tuple(pixels.shape)}")
        return self.vision.forward_features((pixels - self.pixel_mean) / self.pixel_std)

    def image_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, P + N, Dv] -> [B, Dj]: the CLS token projected, L2-normalised."""
        return projected_tokens(self.visual_projection, tokens[:, 0])

    def patch_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, P + N, Dv] -> [B, N, Dj]: every patch token projected, L2-normalised."""
        return projected_tokens(self.visual_projection, tokens[:, self.num_prefix_tokens :])

    def text_embedding(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> [B, Dj]: the eos state projected, L2-normalised."""
        return pooled_text_features(self.text, self.text_projection, ids, mask)

    def text_token_features(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> [B, T, Dj]: every input token's final state projected, L2-normalised
        (padded positions are zeros)."""
        return token_text_features(self.text, self.text_projection, ids, mask)

    def patch_logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Auxiliary heads: tokens [B, P + N, Dv] -> colour, shape logits [B, N, C] (or None)."""
        fine = tokens[:, self.num_prefix_tokens :]
        return (
            self.colour_head(fine) if self.colour_head is not None else None,
            self.shape_head(fine) if self.shape_head is not None else None,
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, map_location: str = "cpu") -> "ClipModel":
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(f"folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} in {folder}")
        cfg = ClipConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        cfg.vision.pretrained, cfg.vision.pretrained_file = False, None
        model = cls(cfg)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device=map_location))
        return model
