"""``arr_coc_llava``: a transformers LLaVA-1.5 model in lmms-eval, an allocator after its projector.

```bash
python -m lmms_eval --model arr_coc_llava \\
    --model_args pretrained=/models/llava-1.5-7b-hf,allocator=cdpruner,budget=64,dtype=bfloat16 \\
    --tasks pope,gqa,textvqa_val,mme --batch_size 8 --output_path results/
```

The host is ``LlavaForConditionalGeneration`` (config ``model_type == "llava"``) with its
``AutoProcessor`` (the processor's chat template builds the prompt: the image, then the
task's text, as lmms-eval's own ``llava_hf`` does). The budget counts image tokens per
image; a fraction is a share of the ``(image_size / patch_size)^2`` patch tokens (576 for
LLaVA-1.5 at 336 px), rounded, at least one. LLaVA-NeXT (``llava_next``, any-resolution
tiles of varying size) is refused: :func:`arr_coc.integrations.llava.wrap` takes one fixed
grid per image.
"""

from __future__ import annotations

from typing import Any

import torch

from arr_coc.allocators import Allocator
from arr_coc.integrations import llava
from arr_coc.integrations.lmms_eval.base import AllocatedVLM, wrap_options

__all__ = ["ArrCocLlava", "VICUNA_CHAT_TEMPLATE"]

# lmms-eval's llava_hf fallback for checkpoints without a chat template (LLaVA-1.5's Vicuna format)
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class ArrCocLlava(AllocatedVLM):
    """lmms-eval model ``arr_coc_llava`` (see :class:`AllocatedVLM` for the model arguments).

    Extra model arguments: ``chat_template`` (a Jinja string or a file; default: the
    processor's own, else the Vicuna format of LLaVA-1.5).
    """

    family_name = "llava"

    def __init__(self, pretrained: str, *args: Any, chat_template: str | None = None, **kwargs: Any) -> None:
        self._chat_template = chat_template
        super().__init__(pretrained, *args, **kwargs)

    def _load(self, pretrained: str, *, dtype: Any, attn_implementation: str | None, trust_remote_code: bool):
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        model_type = getattr(config, "model_type", None)
        if model_type != "llava":
            raise ValueError(
                f"pretrained: arr_coc_llava takes a LLaVA-1.5 checkpoint (config model_type 'llava'), got "
                f"{model_type!r}" + ("; LLaVA-NeXT's any-resolution tiles are not supported" if model_type == "llava_next" else "")
            )
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if self.device.type == "cuda":
            kwargs["device_map"] = str(self.device)
        model = LlavaForConditionalGeneration.from_pretrained(pretrained, **kwargs).to(self.device)
        processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        template = self._resolve_system_prompt(self._chat_template) if self._chat_template else None
        if template:
            processor.chat_template = template
        elif not getattr(processor, "chat_template", None):
            processor.chat_template = VICUNA_CHAT_TEMPLATE
        return model, processor

    def num_image_tokens(self) -> int:
        """Patch tokens per image: ``(image_size // patch_size) ** 2`` of the vision tower."""
        vcfg = self.model.config.vision_config
        side = int(vcfg.image_size) // int(vcfg.patch_size)
        return side * side

    def _wrap(self, model: torch.nn.Module, allocator: Allocator, budget: int | float | None) -> llava.LlavaAllocation:
        n = self.num_image_tokens()
        if budget is None:
            tokens = n
        elif isinstance(budget, float):
            tokens = max(1, round(budget * n))
        else:
            tokens = budget
        self.budget_tokens = tokens
        options = wrap_options(llava.LlavaAllocation.__init__, self.processor, self.query)
        return llava.wrap(model, allocator, budget=tokens, **options)
