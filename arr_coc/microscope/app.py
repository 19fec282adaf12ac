"""The microscope page: a Gradio Blocks UI over :mod:`arr_coc.microscope.core`.

```python
from arr_coc.microscope.app import build_app, launch
demo = build_app(core.load_models())      # gr.Blocks
launch(demo, host="127.0.0.1", port=7860)  # offline: no analytics, local fonts, no SSR
```

Offline by construction: analytics are off (``GRADIO_ANALYTICS_ENABLED=False`` before
Gradio is imported, and ``analytics_enabled=False``), the theme uses system font stacks
(nothing from Google Fonts), SSR (a Node server) is off and nothing is shared.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from arr_coc.microscope import core  # noqa: E402

__all__ = ["DEFAULT_ALLOCATORS", "build_app", "launch", "offline_theme"]

DEFAULT_ALLOCATORS = ("arr_coc", "random", "visionzip", "divprune", "full")
NUM_EXAMPLES = 24
SUMMARY_COLUMNS = ["allocator", "weights", "kept", "levels", "answer", "p(answer)", "top-3", "time (ms)", "I(S; Q) (nats)"]
GREEDY_COLUMNS = ["step", "row", "col", "level", "gain (nats)", "I(c_j; Q | S) (nats)", "coverage (nats)", "cumulative I (nats)"]
SYSTEM_SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Helvetica", "Arial", "sans-serif"]
SYSTEM_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
LEGEND = " · ".join(
    f"<span style='display:inline-block;width:0.9em;height:0.9em;border:2px solid rgb{c};background:#222'></span> {n}"
    for n, c in zip(core.LEVEL_NAMES[:3], core.LEVEL_COLOURS[:3])
)


def offline_theme() -> gr.themes.Base:
    """The default theme with system fonts only (no web fonts fetched)."""
    return gr.themes.Default(font=SYSTEM_SANS, font_mono=SYSTEM_MONO)


def _example_label(models: core.Models, i: int) -> str:
    return f"#{i}: {models.task.example(i).question}"


def _summary_rows(a: core.Analysis) -> list[list[Any]]:
    rows = []
    for name, r in a.runs.items():
        levels = ", ".join(f"{v} {k}" for k, v in r.level_counts.items())
        rows.append(
            [
                name,
                "trained" if r.trained else "untrained default",
                r.kept,
                levels,
                r.answer,
                round(r.top[0][1], 3),
                ", ".join(f"{w} {p:.2f}" for w, p in r.top),
                round(r.seconds * 1000, 1),
                None if r.gain is None else round(r.gain, 4),
            ]
        )
    return rows


def _balancer_md(a: core.Analysis) -> str:
    if a.alpha is None:
        return "*No allocator with a balancer was run (choose `arr_coc`).*"
    return (
        f"**alpha** (query focus vs. coverage) = `{a.alpha:.3f}` &nbsp;&nbsp; "
        f"**price** = `{a.price:.4f}` nats per token (greedy stops when the best gain falls below it)"
    )


def _greedy_md(a: core.Analysis) -> str:
    if a.greedy_total is None:
        return "*Greedy gains are reported by `arr_coc`; choose it to see them.*"
    return (
        f"{len(a.greedy)} picks. Chain-rule total **I(c_S ; Q) = Σ I(c_j ; Q | c_S<j) = {a.greedy_total:.4f} nats** "
        f"(the allocator reports {a.greedy_gain:.4f} nats)."
    )


def _timing_md(a: core.Analysis) -> str:
    enc = "cached" if a.encode_cached else f"{a.encode_seconds * 1000:.0f} ms"
    alloc = sum(r.seconds for r in a.runs.values())
    return (
        f"Image encoding: {enc}. Allocators + answers: {alloc * 1000:.0f} ms. "
        f"Whole update (with relevance maps): {a.total_seconds * 1000:.0f} ms."
    )


def build_app(models: core.Models, *, title: str = "ARR-COC microscope") -> gr.Blocks:
    """The page (see the module docstring); ``models`` from :func:`core.load_models`."""
    names = sorted(models.allocators)
    default_sel = [n for n in DEFAULT_ALLOCATORS if n in names] or names[:1]
    examples = [_example_label(models, i) for i in range(NUM_EXAMPLES)]
    notes = "\n".join(f"- ⚠️ {n}" for n in models.notes)
    ckpt = f"`{models.checkpoint}`" if models.checkpoint is not None else "**untrained**"

    def _load_example(label: str):
        if not label:
            return gr.update(), gr.update(), None, "", ""
        i = int(label.split(":")[0].lstrip("#"))
        ex = models.task.example(i)
        img = ex.image.permute(1, 2, 0).numpy().astype(np.float32)
        return core._upscale(img), ex.question, img, f"Ground truth: **{ex.answer}** ({ex.qtype} question)", ""

    def _upload(path: str | None):
        if not path:
            return gr.update(), None, "", ""
        try:
            img = core.load_image(path, image_size=models.image_size)
        except ValueError as err:
            gr.Warning(str(err))
            return None, None, "", str(err)
        return core._upscale(img), img, "Uploaded image (centre-cropped and resized to the model's resolution).", ""

    def _analyse(image, question, allocs, budget, source):
        empty = (None, [], None, "", None, [], "", "")
        try:
            a = core.analyse(models, image, question, allocs or [], int(budget), source=source)
        except ValueError as err:
            gr.Warning(str(err))
            return (*empty, str(err))
        gallery = [
            (r.overlay, f"{name}: {r.answer} ({r.top[0][1]:.2f}) · {r.kept} tokens · {r.seconds * 1000:.0f} ms")
            for name, r in a.runs.items()
        ]
        maps = [
            (a.map_images[k], f"{core.MAP_TITLES[source][k]} [{a.maps[k].min():.3g}, {a.maps[k].max():.3g}]")
            for k in ("participatory", "propositional", "perspectival")
        ]
        msg = "; ".join(a.notes)
        return (
            gallery,
            _summary_rows(a),
            maps,
            _balancer_md(a),
            core.render_gains(a.greedy) if a.greedy else None,
            [[row[c] for c in GREEDY_COLUMNS] for row in a.greedy],
            _greedy_md(a),
            _timing_md(a),
            msg,
        )

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nWhat each allocator keeps, and why. Base VLM: {ckpt}.\n" + (notes and "\n" + notes)
        )
        image_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                preview = gr.Image(label="image", interactive=False, type="pil", elem_id="preview", height=320)
                example = gr.Dropdown(examples, label="example from the task generator", value=None, elem_id="example")
                upload = gr.File(label="or upload an image", file_count="single", type="filepath", elem_id="upload")
                truth = gr.Markdown("", elem_id="truth")
                question = gr.Textbox(label="question", placeholder="what shape is the red object ?", elem_id="question")
                allocs = gr.CheckboxGroup(names, value=default_sel, label="allocators", elem_id="allocators")
                budget = gr.Slider(1, models.num_fine, value=min(16, models.num_fine), step=1, label="token budget", elem_id="budget")
                source = gr.Radio(["pixels", "tokens"], value="pixels", label="query-agnostic scorers read", elem_id="source")
                run = gr.Button("Run", variant="primary", elem_id="run")
                message = gr.Textbox(label="messages", interactive=False, elem_id="message")
            with gr.Column(scale=3):
                gr.Markdown(f"**Kept tokens** (uncovered patches dimmed; outline = level of detail): {LEGEND}")
                overlays = gr.Gallery(label="kept tokens per allocator", columns=3, height="auto", elem_id="overlays", object_fit="contain")
                summary = gr.Dataframe(headers=SUMMARY_COLUMNS, label="per allocator", elem_id="summary", interactive=False, wrap=True)
                timing = gr.Markdown("", elem_id="timing")
                gr.Markdown("**Relevance maps** of the three scorers (brighter = higher; the range in each caption)")
                maps = gr.Gallery(
                    label="scorers", show_label=False, columns=3, rows=1, height=300, elem_id="maps", object_fit="contain"
                )
                balancer = gr.Markdown("", elem_id="balancer")
                gr.Markdown("**Greedy gains of `arr_coc`** in pick order")
                with gr.Row():
                    gains_img = gr.Image(
                        label="gains", show_label=False, interactive=False, type="pil", elem_id="gains_plot", height=220
                    )
                    gains = gr.Dataframe(headers=GREEDY_COLUMNS, label="picks", elem_id="gains", interactive=False)
                greedy_total = gr.Markdown("", elem_id="greedy_total")

        outputs = [overlays, summary, maps, balancer, gains_img, gains, greedy_total, timing, message]
        inputs = [image_state, question, allocs, budget, source]
        example.change(_load_example, [example], [preview, question, image_state, truth, message]).then(
            _analyse, inputs, outputs
        )
        upload.upload(_upload, [upload], [preview, image_state, truth, message])
        run.click(_analyse, inputs, outputs)
        question.submit(_analyse, inputs, outputs)
        budget.release(_analyse, inputs, outputs, trigger_mode="always_last")
        allocs.input(_analyse, inputs, outputs, trigger_mode="always_last")
        source.input(_analyse, inputs, outputs, trigger_mode="always_last")
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, **kwargs) -> Any:
    """Start the server offline (no share link, no SSR, system fonts, a 25 MB upload cap)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        theme=offline_theme(),
        max_file_size="25mb",
        footer_links=[],
        pwa=False,
        mcp_server=False,
        **kwargs,
    )
