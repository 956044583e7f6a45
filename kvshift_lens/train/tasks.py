"""Tasks by name for the trainer and the CLI: the synthetic tasks of :mod:`kvshift_lens.data`, and
``text`` (a language-modelling task over a corpus)."""

from __future__ import annotations

from typing import Any

from kvshift_lens.data.tasks import TASKS, make_task


def task_names() -> list[str]:
    return sorted([*TASKS, "text"])


def build_task(spec: dict[str, Any]):
    """Build a task from ``{"name": ..., **kwargs}``."""
    if "name" not in spec:
        raise ValueError(f"task spec {spec} has no 'name'; one of {task_names()}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] == "text":
        from kvshift_lens.data.text import TextTask

        return TextTask.from_corpus(**kwargs)
    if spec["name"] not in TASKS:
        raise ValueError(f"unknown task {spec['name']!r}; choose one of {task_names()}")
    return make_task(spec["name"], **kwargs)


def build_eval_task(spec: dict[str, Any], train_task):
    """The task evaluations run on: for ``text``, the validation split of the same corpus and
    tokenizer (never the training stream); for synthetic tasks, the task itself (evaluation draws
    come from their own fixed generator)."""
    if spec.get("name") != "text" or spec.get("split", "train") == "val":
        return train_task
    from kvshift_lens.data.text import TextTask

    kwargs = {k: v for k, v in spec.items() if k not in ("name", "split")}
    return TextTask.from_corpus(**kwargs, split="val")
