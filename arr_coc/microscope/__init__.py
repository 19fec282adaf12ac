"""The microscope: an interactive, offline web page showing what each allocator keeps and why.

``python -m arr_coc.microscope [--port 7860] [--host 127.0.0.1] [--checkpoint checkpoints/base_vlm]``

:mod:`arr_coc.microscope.core` holds the functions behind the page (no Gradio);
:mod:`arr_coc.microscope.app` the Gradio Blocks UI. Gradio is imported only by ``app``.
"""

from arr_coc.microscope.core import analyse, load_image, load_models

__all__ = ["analyse", "load_image", "load_models"]
