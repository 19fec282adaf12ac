"""``arr_coc_qwen_vl``: Qwen2-VL, Qwen2.5-VL or Qwen3-VL in lmms-eval, an allocator after the merger.

```bash
python -m lmms_eval --model arr_coc_qwen_vl \\
    --model_args pretrained=/models/Qwen2.5-VL-7B-Instruct,allocator=divprune,budget=0.25,dtype=bfloat16 \\
    --tasks pope,gqa --batch_size 8 --output_path results/
```

The host class follows the checkpoint's ``config.model_type`` (``qwen2_vl``,
``qwen2_5_vl``, ``qwen3_vl``); the prompt is the processor's chat template over a system
message (``You are a helpful assistant.`` unless ``system_prompt=`` says otherwise, as in
lmms-eval's ``qwen2_5_vl``), the images, then the task's text. Images go to the processor as
they are; ``min_pixels`` / ``max_pixels`` bound their area (lmms-eval's ``qwen2_5_vl``
defaults: 256 x 28 x 28 and 1605632), so the number of visual tokens varies per image. The
budget counts merged visual tokens per image: an int caps them, a fraction in (0, 1] keeps
that share of each image's tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from arr_coc.allocators import Allocator
from arr_coc.integrations import qwen_vl
from arr_coc.integrations.lmms_eval.base import AllocatedVLM, wrap_options

__all__ = ["ArrCocQwenVL", "MODEL_TYPES"]

#: config.model_type -> transformers class name
MODEL_TYPES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


class ArrCocQwenVL(AllocatedVLM):
    """lmms-eval model ``arr_coc_qwen_vl`` (see :class:`AllocatedVLM` for the model arguments).

    Extra model arguments: ``min_pixels`` (default 200704 = 256 x 28 x 28) and
    ``max_pixels`` (default 1605632), the image area bounds of the processor.
    """

    family_name = "qwen_vl"

    def __init__(
        self,
        pretrained: str,
        *args: Any,
        min_pixels: int | None = 256 * 28 * 28,
        max_pixels: int | None = 1605632,
        system_prompt: str | None = "You are a helpful assistant.",
        **kwargs: Any,
    ) -> None:
        if min_pixels is not None and max_pixels is not None and not 0 < min_pixels <= max_pixels:
            raise ValueError(f"min_pixels / max_pixels: expected 0 < min <= max, got {min_pixels} / {max_pixels}")
        self._pixels = (min_pixels, max_pixels)
        super().__init__(pretrained, *args, system_prompt=system_prompt, **kwargs)

    def _load(self, pretrained: str, *, dtype: Any, attn_implementation: str | None, trust_remote_code: bool):
        import transformers
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        model_type = getattr(config, "model_type", None)
        name = MODEL_TYPES.get(model_type)
        cls = getattr(transformers, name, None) if name else None
        if cls is None:
            raise ValueError(
                f"pretrained: arr_coc_qwen_vl takes a Qwen-VL checkpoint (config model_type in {sorted(MODEL_TYPES)} "
                f"that this transformers has), got {model_type!r}"
            )
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if self.device.type == "cuda":
            kwargs["device_map"] = str(self.device)
        model = cls.from_pretrained(pretrained, **kwargs).to(self.device)
        min_pixels, max_pixels = self._pixels
        proc_kwargs = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code, **proc_kwargs)
        return model, processor

    def _wrap(self, model: torch.nn.Module, allocator: Allocator, budget: int | float | None) -> qwen_vl.QwenVLAllocation:
        return qwen_vl.wrap(model, allocator, budget=budget, **wrap_options(qwen_vl.wrap, self.processor, self.query))
