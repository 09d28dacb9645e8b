"""The capability item sets a sweep or tune can measure: MMLU (the default) or the word analogies (the
second measure, for models at chance on MMLU; docs/results.md, "Capability measure")."""

from __future__ import annotations

from steerable.errors import SteerableError
from steerable.evaluate.capability import MCItem, load_mmlu, stratified
from steerable.evaluate.capability_analogy import load_analogies

TASKS = ("mmlu", "analogies")
DEFAULT_TASK = "mmlu"


def task_items(task: str, n_per_subject: int, seed: int = 0) -> list[MCItem]:
    """`n_per_subject` fixed items of each subject (MMLU: 57 subjects; analogies: 14 sections) of `task`."""
    if task == "mmlu":
        return stratified(load_mmlu(), n_per_subject, seed)
    if task == "analogies":
        return stratified(load_analogies(), n_per_subject, seed)
    raise SteerableError(f"unknown capability task {task!r}: one of {', '.join(TASKS)}")
