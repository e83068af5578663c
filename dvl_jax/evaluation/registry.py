"""Tasks by name: what `dvl eval --task NAME` and the library's evaluator look up."""

from __future__ import annotations

from dvl_jax.evaluation import ai2d, chartqa, easy_vqa, mme, mmmu, mmstar, realworldqa, synthetic
from dvl_jax.evaluation.task import Task

TASKS: dict[str, Task] = {t.name: t for t in (mmmu.TASK, mme.TASK, ai2d.TASK, mmstar.TASK, chartqa.TASK,
                                              realworldqa.TASK, synthetic.TASK, easy_vqa.TASK)}


def get_task(name: str) -> Task:
  try:
    return TASKS[name]
  except KeyError:
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
