"""Training: the embedded visual-question task, its tokenizer, the base VLM and its training.

Imports are lazy (transformers and timm load only when a name that needs them is used):

```python
from arr_coc.training import VQATask, build_tokenizer, BaseVLM, BaseVLMConfig
```
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VQATask": "arr_coc.training.task",
    "VQAExample": "arr_coc.training.task",
    "VQABatch": "arr_coc.training.task",
    "QUESTION_TYPES": "arr_coc.training.task",
    "build_tokenizer": "arr_coc.training.tokenizer",
    "load_tokenizer": "arr_coc.training.tokenizer",
    "BaseVLM": "arr_coc.training.base_vlm",
    "BaseVLMConfig": "arr_coc.training.base_vlm",
    "VisionConfig": "arr_coc.training.backbones",
    "LLMConfig": "arr_coc.training.backbones",
    "build_vision_encoder": "arr_coc.training.backbones",
    "build_causal_lm": "arr_coc.training.backbones",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'arr_coc.training' has no attribute {name!r}")
