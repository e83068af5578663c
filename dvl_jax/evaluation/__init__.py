"""Benchmarks for `dvl eval`: tasks (loader, prompt, scorer) scored as DiffusionVL's lmms-eval evaluation does."""

from dvl_jax.evaluation.registry import TASKS, get_task
from dvl_jax.evaluation.task import Judgement, Sample, Task

__all__ = ["TASKS", "Judgement", "Sample", "Task", "get_task"]
