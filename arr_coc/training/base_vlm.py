"""The base VLM: timm ViT -> LLaVA-style MLP projector -> transformers causal LM.

This is the frozen model every allocator is evaluated on. Stable interface:

```python
task = VQATask(seed=0, image_size=64, grid=8)      # arr_coc.training.task
tok = build_tokenizer(task)                        # arr_coc.training.tokenizer (PreTrainedTokenizerFast)
vlm = BaseVLM(BaseVLMConfig.for_task(task, tok))    # or BaseVLM.from_pretrained("checkpoints/base_vlm")

tokens = vlm.encode_image(pixels)          # pixels [B, 3, H, W] in [0, 1] -> [B, P + N, Dv]
vlm.num_prefix_tokens, vlm.grid            # P (1: CLS), (gh, gw); N = gh * gw, raster order
# an allocator picks K of the candidates (fine tokens + pooled 2x2 / 4x4, arr_coc.pyramid)
visual = vlm.project(selected)             # [B, K, Dv] -> [B, K, Dl]
query = vlm.query_embeddings(question_ids) # [B, T] -> [B, T, Dl] (the LLM's input embeddings)
logits = vlm.answer_logits(visual, visual_mask, visual_positions, question_ids, question_mask)
                                           # -> [B, V] logits of the one-word answer
vlm.save_pretrained(folder); BaseVLM.from_pretrained(folder)   # model.safetensors + config.json
```

Shapes: ``visual_mask`` [B, K] bool (True = real token), ``visual_positions`` [B, K, 3] long
(row, col, level) as in ``arr_coc.pyramid`` (-1 rows where padded), or None for exactly the
N fine tokens in raster order. ``question_ids`` / ``question_mask`` [B, T] (right-padded; the
mask is 1/True on real tokens). The prefix (CLS) token is never given to the LLM: the LLM
reads exactly what an allocator returns, and "full tokens" means the N fine tokens.

How the LLM reads the tokens (decided here, documented for allocator authors):

- Sequence: ``[K visual tokens] [T question tokens] [READ]``; the answer is the LM head at
  ``[READ]``. The readout token's input embedding is the LLM's embedding of ``[READ]`` plus
  the sum of the question's word embeddings, so the query is present at the readout.
- RoPE positions: every visual token sits at position 0 and the question at 1..T, [READ]
  at T + 1. Matching question words to visual tokens is then by content only, and the LLM
  is invariant to the order and the number of visual tokens it is given.
- Where a token is: a learned embedding of its region's *centre* (Fourier features of the
  normalised (y, x) centre, 4 octaves) plus a learned embedding of its level (0 fine, 1 =
  2x2, 2 = 4x4, ...) is added to the projected token. Pooled tokens thus carry where their
  region is and how coarse it is; the ViT's own positional embedding also survives inside
  each token (pooling averages it).
- Training (``arr_coc.training.train_base``) feeds random allocations that mix fine and
  pooled tokens (keep 5-100 %) half of the time, so any allocator's output is in
  distribution.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from arr_coc.pyramid import pyramid_positions
from arr_coc.training.backbones import LLMConfig, VisionConfig, build_causal_lm, build_vision_encoder, encoder_grid

__all__ = ["BaseVLM", "BaseVLMConfig", "VisualPositionEmbedding"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class BaseVLMConfig:
    """Everything that rebuilds a :class:`BaseVLM` (JSON-serialisable).

    vocab_size / pad_token_id / readout_token_id: of the tokenizer the LLM reads.
    projector_hidden: width of the 2-layer GELU MLP projector (None: the LLM's width).
    num_levels: pyramid levels the position embedding knows (0 = fine ... num_levels - 1).
    colour_classes / shape_classes: per-patch auxiliary heads on the ViT tokens (0 disables).
    llm_config: the transformers config dict, filled in when saved (rebuilds a pretrained LM
        without its original folder).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    vocab_size: int = 0
    pad_token_id: int = 0
    readout_token_id: int = 2
    projector_hidden: int | None = None
    num_levels: int = 4
    fourier_octaves: int = 4
    # also feed the centre (y, x) in [-1, 1] and y^2 + x^2 to the position embedding: attention
    # logits can then be -|p_j - p_a|^2 up to a constant, a linear function of these features,
    # which is what "the object nearest to the anchor" needs (False on the v1 base VLM)
    position_quadratic: bool = False
    colour_classes: int = 0
    shape_classes: int = 0
    answer_words: list[str] = field(default_factory=list)
    llm_config: dict[str, Any] | None = None
    # benchmark v2: the vision tower's paired CLIP text tower (frozen, for text-conditioned
    # baselines) and the joint space's width; None / 0 on the v1 base VLM
    text_tower: dict[str, Any] | None = None
    clip_embed_dim: int = 0
    # how to rebuild the task the model was trained on (arr_coc.training.tasks.build_task)
    task_spec: dict[str, Any] | None = None

    @classmethod
    def for_task(cls, task, tokenizer, **overrides) -> "BaseVLMConfig":
        """The default config for a task and its tokenizer (aux heads sized for its labels)."""
        from arr_coc.training.clutter_task import COLOURS_V2, SHAPES_V2, ClutterVQATask
        from arr_coc.training.task import COLOURS, SHAPES
        from arr_coc.training.tokenizer import readout_id

        colours, shapes = (COLOURS_V2, SHAPES_V2) if isinstance(task, ClutterVQATask) else (COLOURS, SHAPES)

        vision = overrides.pop("vision", None) or VisionConfig(
            img_size=task.image_size, patch_size=task.image_size // task.grid
        )
        return cls(
            vision=vision,
            llm=overrides.pop("llm", None) or LLMConfig(),
            vocab_size=len(tokenizer),
            pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id),
            readout_token_id=readout_id(tokenizer),
            colour_classes=2 + len(colours),
            shape_classes=2 + len(shapes),
            answer_words=list(task.answer_words()),
            **overrides,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BaseVLMConfig":
        d = dict(d)
        vision = d.pop("vision", {}) or {}
        if "mean" in vision:
            vision["mean"], vision["std"] = tuple(vision["mean"]), tuple(vision["std"])
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        return cls(vision=VisionConfig(**vision), llm=LLMConfig(**(d.pop("llm", {}) or {})), **d)


class VisualPositionEmbedding(nn.Module):
    """(row, col, level) -> [.., D]: Fourier features of the region centre + a level embedding.

    positions: [B, K, 3] long; the region of (r, c, l) covers rows r .. r + 2^l - 1 (clipped
    to the grid), so its centre is min(r + (2^l - 1) / 2, (r + gh - 1) / 2 ...) normalised by
    the grid. Padded rows (-1) give zeros. With ``quadratic`` the features also hold the centre
    (y, x) mapped to [-1, 1] and y^2 + x^2, so a bilinear attention score can be minus the squared
    distance between two tokens' centres up to a constant.
    """

    def __init__(
        self, dim: int, grid: tuple[int, int], num_levels: int = 4, octaves: int = 4, quadratic: bool = False
    ) -> None:
        super().__init__()
        self.grid = grid
        self.num_levels = num_levels
        self.quadratic = quadratic
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(octaves).float(), persistent=False)
        self.coord = nn.Linear(4 * octaves + (3 if quadratic else 0), dim)
        self.level = nn.Embedding(num_levels, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        row, col, lvl = positions.unbind(-1)
        pad = lvl < 0
        if (lvl >= self.num_levels).any():
            raise ValueError(f"visual_positions: level must be < {self.num_levels}")
        size = (2 ** lvl.clamp(min=0)).float()
        r_end = torch.minimum(row.float() + size, torch.tensor(float(gh)))
        c_end = torch.minimum(col.float() + size, torch.tensor(float(gw)))
        y = (row.float() + r_end) / (2.0 * gh)  # centre in [0, 1]
        x = (col.float() + c_end) / (2.0 * gw)
        ang = torch.cat([y[..., None] * self.freqs, x[..., None] * self.freqs], dim=-1)
        feats = torch.cat([ang.sin(), ang.cos()], dim=-1)
        if self.quadratic:
            yc, xc = 2.0 * y - 1.0, 2.0 * x - 1.0
            feats = torch.cat([feats, yc[..., None], xc[..., None], (yc * yc + xc * xc)[..., None]], dim=-1)
        out = self.coord(feats) + self.level(lvl.clamp(min=0))
        return out.masked_fill(pad[..., None], 0.0)


class BaseVLM(nn.Module):
    """ViT -> projector -> causal LM answering one-word questions (see the module docstring)."""

    def __init__(self, config: BaseVLMConfig, *, _llm: nn.Module | None = None) -> None:
        super().__init__()
        if config.vocab_size < 1 and _llm is None and config.llm.name_or_path is None and config.llm_config is None:
            raise ValueError(f"config.vocab_size: expected >= 1, got {config.vocab_size}")
        self.config = config
        self.vision = build_vision_encoder(config.vision)
        if _llm is not None:
            self.llm = _llm
        elif config.llm_config is not None:
            from transformers import AutoConfig, AutoModelForCausalLM

            cfg = dict(config.llm_config)
            lm_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            lm_cfg._attn_implementation = config.llm.attn_implementation
            self.llm = AutoModelForCausalLM.from_config(lm_cfg)
        else:
            self.llm = build_causal_lm(config.llm, vocab_size=config.vocab_size, pad_token_id=config.pad_token_id)
        dv = self.vision.num_features
        dl = self.llm.get_input_embeddings().embedding_dim
        hidden = config.projector_hidden or dl
        self.projector = nn.Sequential(nn.Linear(dv, hidden), nn.GELU(), nn.Linear(hidden, dl))
        self.grid = encoder_grid(self.vision)
        self.num_prefix_tokens = int(getattr(self.vision, "num_prefix_tokens", 0))
        self.position = VisualPositionEmbedding(
            dl, self.grid, config.num_levels, config.fourier_octaves, quadratic=config.position_quadratic
        )
        self.text_tower = self.visual_projection = self.text_projection = None
        if config.text_tower is not None:
            from arr_coc.training.clip import TextTower, TextTowerConfig

            if config.clip_embed_dim < 1:
                raise ValueError(f"config.clip_embed_dim: expected >= 1 with a text tower, got {config.clip_embed_dim}")
            self.text_tower = TextTower(TextTowerConfig(**config.text_tower))
            self.visual_projection = nn.Linear(dv, config.clip_embed_dim, bias=False)
            self.text_projection = nn.Linear(self.text_tower.config.dim, config.clip_embed_dim, bias=False)
        self.colour_head = nn.Linear(dv, config.colour_classes) if config.colour_classes else None
        self.shape_head = nn.Linear(dv, config.shape_classes) if config.shape_classes else None
        self.register_buffer("pixel_mean", torch.tensor(config.vision.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.vision.std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ sizes
    @property
    def vision_dim(self) -> int:
        return int(self.vision.num_features)

    @property
    def llm_dim(self) -> int:
        return int(self.llm.get_input_embeddings().embedding_dim)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def image_size(self) -> int:
        """The square input size in pixels the vision tower runs at."""
        return int(self.vision.patch_embed.img_size[0])

    def set_image_size(self, image_size: int) -> None:
        """Run the vision tower at ``image_size`` px, same patch size (e.g. 128 -> 192 px: 16 x 16 ->
        24 x 24 = 576 patches, LLaVA-1.5's count). timm resamples the ViT's position embeddings
        (``set_input_size``); the visual position features are normalised by the grid, so the LLM
        reads the same scene coordinates. The model was trained at its own size: measure it there.
        """
        patch = int(self.vision.patch_embed.patch_size[0])
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < patch or image_size % patch:
            raise ValueError(f"image_size: expected a positive multiple of the patch size {patch}, got {image_size!r}")
        if image_size == self.image_size:
            return
        self.vision.set_input_size(img_size=(image_size, image_size))
        self.grid = encoder_grid(self.vision)
        self.position.grid = self.grid

    # ------------------------------------------------------------------ vision side
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [0, 1] -> tokens [B, P + N, Dv] (prefix first, then raster)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels: expected [B, 3, H, W], got {tuple(pixels.shape)}")
        x = (pixels - self.pixel_mean) / self.pixel_std
        return self.vision.forward_features(x)

    def patch_logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Auxiliary per-patch heads: tokens [B, P + N, Dv] -> colour, shape logits [B, N, C]."""
        fine = tokens[:, self.num_prefix_tokens :]
        colour = self.colour_head(fine) if self.colour_head is not None else None
        shape = self.shape_head(fine) if self.shape_head is not None else None
        return colour, shape

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, K, Dv] -> [B, K, Dl] (the LLaVA-style MLP projector)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.vision_dim:
            raise ValueError(f"tokens: expected [B, K, {self.vision_dim}], got {tuple(tokens.shape)}")
        return self.projector(tokens)

    # ------------------------------------------------------------------ the CLIP text tower (v2)
    @property
    def has_text_tower(self) -> bool:
        """Whether the vision tower came with a paired CLIP text tower (benchmark v2)."""
        return self.text_tower is not None

    def _need_text_tower(self) -> None:
        if self.text_tower is None:
            raise ValueError("vlm: this base VLM has no CLIP text tower (a v1 checkpoint); text signals need a v2 one")

    def instruction_features(self, question_ids: torch.Tensor, question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """question_ids [B, T] -> [B, T, Dj]: the text tower's per-token features of the
        instruction in the CLIP joint space, L2-normalised (zeros at padding)."""
        from arr_coc.training.clip import token_text_features

        self._need_text_tower()
        return token_text_features(self.text_tower, self.text_projection, question_ids, question_mask)

    def instruction_embedding(self, question_ids: torch.Tensor, question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """question_ids [B, T] -> [B, Dj]: the CLIP text embedding of the instruction (eos pooled)."""
        from arr_coc.training.clip import pooled_text_features

        self._need_text_tower()
        return pooled_text_features(self.text_tower, self.text_projection, question_ids, question_mask)

    def patch_features(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """vision_tokens [B, P + N, Dv] (from :meth:`encode_image`) -> [B, N, Dj]: the patch
        tokens in the CLIP joint space, L2-normalised."""
        from arr_coc.training.clip import projected_tokens

        self._need_text_tower()
        return projected_tokens(self.visual_projection, vision_tokens[:, self.num_prefix_tokens :])

    def load_clip(self, clip) -> None:
        """Copy a trained :class:`~arr_coc.training.clip.ClipModel`'s vision tower, text tower
        and projections into this model (stage 1 of benchmark v2 starts from them)."""
        self._need_text_tower()
        self.vision.load_state_dict(clip.vision.state_dict())
        self.text_tower.load_state_dict(clip.text.state_dict())
        self.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        self.text_projection.load_state_dict(clip.text_projection.state_dict())

    # ------------------------------------------------------------------ language side
    def query_embeddings(self, question_ids: torch.Tensor) -> torch.Tensor:
        """question_ids [B, T] -> [B, T, Dl]: the LLM's own input embeddings (an allocator's query)."""
        if question_ids.ndim != 2:
            raise ValueError(f"question_ids: expected [B, T], got {tuple(question_ids.shape)}")
        return self.llm.get_input_embeddings()(question_ids)

    def fine_positions(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """[B, N, 3] positions of the N fine tokens in raster order."""
        pos, _ = pyramid_positions(self.grid, (), device=device)
        return pos[None].expand(batch, -1, -1)

    def check_answer_inputs(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        visual_positions: torch.Tensor | None,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate :meth:`answer_logits`' inputs and fill the defaults.

        Returns (visual_mask [B, K] bool, visual_positions [B, K, 3], question_mask [B, T] bool).
        """
        if visual.ndim != 3 or visual.shape[-1] != self.llm_dim:
            raise ValueError(f"visual: expected [B, K, {self.llm_dim}], got {tuple(visual.shape)}")
        b, k, _ = visual.shape
        device = visual.device
        if question_ids.ndim != 2 or question_ids.shape[0] != b:
            raise ValueError(f"question_ids: expected [{b}, T], got {tuple(question_ids.shape)}")
        if visual_mask is None:
            visual_mask = torch.ones(b, k, dtype=torch.bool, device=device)
        if visual_mask.shape != (b, k):
            raise ValueError(f"visual_mask: expected [{b}, {k}], got {tuple(visual_mask.shape)}")
        visual_mask = visual_mask.bool()
        if visual_positions is None:
            if k != self.num_patches:
                raise ValueError(
                    f"visual_positions: None means the {self.num_patches} fine tokens, got K={k}; pass positions"
                )
            visual_positions = self.fine_positions(b, device)
        if visual_positions.shape != (b, k, 3):
            raise ValueError(f"visual_positions: expected [{b}, {k}, 3], got {tuple(visual_positions.shape)}")
        if question_mask is None:
            question_mask = torch.ones_like(question_ids, dtype=torch.bool)
        if question_mask.shape != question_ids.shape:
            raise ValueError(f"question_mask: expected {tuple(question_ids.shape)}, got {tuple(question_mask.shape)}")
        question_mask = question_mask.bool()
        return visual_mask, visual_positions, question_mask

    def llm_inputs(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        visual_positions: torch.Tensor | None,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LLM's input sequence ``[K visual] [T question] [READ]`` (see the module docstring).

        Returns (inputs_embeds [B, K + T + 1, Dl], attention_mask [B, K + T + 1] long,
        position_ids [B, K + T + 1] long). Visual tokens occupy positions 0 .. K - 1 of the
        sequence; the readout (whose hidden state gives the answer) is the last one. Hosts that
        run the LLM's layers themselves (in-LLM pruning) start from these.
        """
        visual_mask, visual_positions, question_mask = self.check_answer_inputs(
            visual, visual_mask, visual_positions, question_ids, question_mask
        )
        b, k, _ = visual.shape
        device = visual.device

        embed = self.llm.get_input_embeddings()
        vis = visual + self.position(visual_positions.masked_fill(~visual_mask[..., None], -1)).to(visual.dtype)
        vis = vis * visual_mask[..., None]
        q_emb = embed(question_ids)
        read_ids = torch.full((b, 1), self.config.readout_token_id, dtype=torch.long, device=device)
        readout = embed(read_ids) + (q_emb * question_mask[..., None]).sum(1, keepdim=True)
        inputs = torch.cat([vis, q_emb, readout], dim=1)
        attn = torch.cat(
            [visual_mask, question_mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1
        ).long()
        n_q = question_mask.long().sum(1, keepdim=True)
        q_pos = torch.cumsum(question_mask.long(), dim=1) * question_mask.long()
        pos_ids = torch.cat([torch.zeros(b, k, dtype=torch.long, device=device), q_pos, n_q + 1], dim=1)
        return inputs, attn, pos_ids

    def answer_logits(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        visual_positions: torch.Tensor | None,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor | None = None,
        *,
        return_attention: bool = False,
    ):
        """Logits [B, V] of the answer word (see the module docstring for the inputs).

        With ``return_attention=True`` also returns the readout token's attention over the
        visual tokens in every layer: a list of [B, heads, K] (needs eager attention).
        """
        inputs, attn, pos_ids = self.llm_inputs(visual, visual_mask, visual_positions, question_ids, question_mask)
        k = visual.shape[1]
        out = self.llm.model(
            inputs_embeds=inputs,
            attention_mask=attn,
            position_ids=pos_ids,
            output_attentions=return_attention,
            use_cache=False,
        )
        h = out.last_hidden_state[:, -1]
        logits = self.llm.lm_head(h)
        if not return_attention:
            return logits
        if out.attentions is None:
            raise ValueError("return_attention: the LLM returned no attentions (use attn_implementation='eager')")
        att = [a[:, :, -1, :k] for a in out.attentions]
        return logits, att

    def answer_logits_shared(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        visual_positions: torch.Tensor | None,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor | None,
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [M, V] of M questions about I images, each image's visual tokens read once.

        visual [I, K, Dl], visual_mask [I, K], visual_positions [I, K, 3] (as in
        :meth:`answer_logits`), question_ids / question_mask [M, T], image_index [M] long in
        [0, I). The visual prefix runs through the LLM once per image and every question of that
        image continues from its key/value cache (gathered with ``image_index``; gradients flow
        through it). Visual tokens attend only to earlier visual tokens, so this equals
        ``answer_logits(visual[image_index], ...)`` up to float rounding, at about 1/Q of the
        prefix cost for Q questions per image: the training speed-up of stage 1.
        """
        if image_index.ndim != 1 or image_index.shape[0] != question_ids.shape[0]:
            raise ValueError(
                f"image_index: expected [{question_ids.shape[0]}] (one per question), got {tuple(image_index.shape)}"
            )
        if visual.ndim != 3:
            raise ValueError(f"visual: expected [I, K, {self.llm_dim}], got {tuple(visual.shape)}")
        n_img = visual.shape[0]
        if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= n_img):
            raise ValueError(f"image_index: expected values in [0, {n_img}), got {image_index.tolist()}")
        from transformers import DynamicCache

        vm = visual_mask[image_index] if visual_mask is not None else None
        vp = visual_positions[image_index] if visual_positions is not None else None
        inputs, attn, pos_ids = self.llm_inputs(visual[image_index], vm, vp, question_ids, question_mask)
        k = visual.shape[1]
        # the first question of each image carries that image's prefix (identical for all of them)
        first = torch.full((n_img,), -1, dtype=torch.long, device=visual.device)
        order = torch.arange(image_index.shape[0], device=visual.device)
        first.scatter_reduce_(0, image_index, order, reduce="amin", include_self=False)
        used = first >= 0
        rows = first[used]
        cache = DynamicCache()
        self.llm.model(
            inputs_embeds=inputs[rows, :k], attention_mask=attn[rows, :k], position_ids=pos_ids[rows, :k],
            past_key_values=cache, use_cache=True,
        )
        slot = torch.cumsum(used.long(), 0) - 1  # image -> row of the prefix batch
        cache.batch_select_indices(slot[image_index])
        out = self.llm.model(
            inputs_embeds=inputs[:, k:], attention_mask=attn, position_ids=pos_ids[:, k:],
            past_key_values=cache, use_cache=True,
        )
        return self.llm.lm_head(out.last_hidden_state[:, -1])

    def forward(self, pixels: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor | None = None):
        """Full tokens: pixels [B, 3, H, W], question [B, T] -> answer logits [B, V]."""
        tokens = self.encode_image(pixels)
        visual = self.project(tokens[:, self.num_prefix_tokens :])
        return self.answer_logits(visual, None, None, question_ids, question_mask)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        lm_cfg = self.llm.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
            lm_cfg.pop(key, None)
        cfg["llm_config"] = lm_cfg
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, map_location: str = "cpu") -> "BaseVLM":
        """Rebuild from a folder written by :meth:`save_pretrained` (offline)."""
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(f"folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} in {folder}")
        cfg = BaseVLMConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        cfg.vision.pretrained, cfg.vision.pretrained_file = False, None
        model = cls(cfg)
        state = load_file(str(folder / WEIGHTS_NAME), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"folder: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model


def candidate_regions(grid: tuple[int, int], positions: torch.Tensor) -> torch.Tensor:
    """[..., 3] (row, col, level) -> [..., gh * gw] bool: the fine patches each region covers."""
    gh, gw = grid
    row, col, lvl = positions.unbind(-1)
    size = 2 ** lvl.clamp(min=0)
    rr = torch.arange(gh, device=positions.device)
    cc = torch.arange(gw, device=positions.device)
    in_r = (rr >= row[..., None]) & (rr < (row + size)[..., None])  # [..., gh]
    in_c = (cc >= col[..., None]) & (cc < (col + size)[..., None])  # [..., gw]
    cover = in_r[..., :, None] & in_c[..., None, :]
    cover = cover & (lvl >= 0)[..., None, None]
    return rearrange(cover, "... h w -> ... (h w)")
