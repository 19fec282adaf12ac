"""The embedded tasks by name, so that configs and checkpoints can say which one they use.

```python
task = build_task({"name": "clutter", "image_size": 128, "grid": 16}, seed=SPLIT_SEEDS["test"])
task.question_types          # the task's question types, in reporting order
```

- ``sort_of_clevr``: :class:`arr_coc.training.task.VQATask`, the v1 task (8 x 8 patches, 3-6 objects).
- ``clutter``: :class:`arr_coc.training.clutter_task.ClutterVQATask`, benchmark v2 (16 x 16 or
  24 x 24 patches, 6-12 objects, seven question types).
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["TASKS", "build_task", "task_spec"]

TASKS = ("sort_of_clevr", "clutter")


def build_task(spec: Mapping[str, Any] | None, seed: int):
    """A task from ``{"name": ..., **keyword arguments}`` (None: the v1 task's defaults)."""
    spec = dict(spec or {"name": "sort_of_clevr"})
    name = spec.pop("name", "sort_of_clevr")
    if name == "sort_of_clevr":
        from arr_coc.training.task import VQATask

        return VQATask(seed, **spec)
    if name == "clutter":
        from arr_coc.training.clutter_task import ClutterVQATask

        return ClutterVQATask(seed, **spec)
    raise ValueError(f"spec['name']: expected one of {TASKS}, got {name!r}")


def task_spec(task) -> dict[str, Any]:
    """The spec that rebuilds ``task`` with :func:`build_task` (any seed)."""
    from arr_coc.training.clutter_task import ClutterVQATask

    if isinstance(task, ClutterVQATask):
        return {"name": "clutter", "image_size": task.image_size, "grid": task.grid}
    return {"name": "sort_of_clevr", "image_size": task.image_size, "grid": task.grid, "object_cells": task.object_cells}
