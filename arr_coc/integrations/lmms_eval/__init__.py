"""lmms-eval models that run a host VLM with an allocator between projector and LLM.

Two models, found by lmms-eval through the ``lmms_eval.models`` entry-point group that
``pyproject.toml`` declares (no fork of lmms-eval, nothing patched):

- ``arr_coc_llava``: ``transformers`` ``LlavaForConditionalGeneration`` (LLaVA-1.5), through
  :func:`arr_coc.integrations.llava.wrap`;
- ``arr_coc_qwen_vl``: Qwen2-VL, Qwen2.5-VL and Qwen3-VL, through
  :func:`arr_coc.integrations.qwen_vl.wrap`.

```bash
python -m lmms_eval --model arr_coc_llava \\
    --model_args pretrained=/models/llava-1.5-7b-hf,allocator=arr_coc,budget=64 \\
    --tasks pope,gqa --batch_size 8 --output_path results/
```

``--model_args`` takes ``pretrained`` (a local folder or a hub name), ``allocator`` (a
registered name, ``full`` by default), ``budget`` (visual tokens per image: an int, or a
fraction in (0, 1] of the image's tokens), the model options of
:class:`~arr_coc.integrations.lmms_eval.base.AllocatedVLM`, and every other key is a
keyword of the allocator (``alpha=0.5``, ``levels=[1,2]``). This module imports nothing
heavy: lmms-eval loads it when it lists its models.
"""

from __future__ import annotations

from typing import Any

__all__ = ["llava_manifest", "qwen_vl_manifest", "MODEL_CLASSES"]

#: model id -> "module.Class" of the lmms-eval model
MODEL_CLASSES = {
    "arr_coc_llava": "arr_coc.integrations.lmms_eval.llava.ArrCocLlava",
    "arr_coc_qwen_vl": "arr_coc.integrations.lmms_eval.qwen_vl.ArrCocQwenVL",
}


def _manifest(model_id: str) -> Any:
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=model_id, simple_class_path=MODEL_CLASSES[model_id])


def llava_manifest() -> Any:
    """Entry point ``arr_coc_llava``: the lmms-eval ``ModelManifest`` of :class:`ArrCocLlava`."""
    return _manifest("arr_coc_llava")


def qwen_vl_manifest() -> Any:
    """Entry point ``arr_coc_qwen_vl``: the lmms-eval ``ModelManifest`` of :class:`ArrCocQwenVL`."""
    return _manifest("arr_coc_qwen_vl")
