"""arr_coc: query-aware visual token allocation grounded in information theory.

The core library depends on torch and einops only; Lightning and Hydra live in
``arr_coc.training`` and ``experiments/``.
"""

__version__ = "0.1.0"
