"""Tasks by name for the trainer and the CLI: the synthetic tasks of :mod:`kvshift_lens.data`, and
``text`` (a language-modelling task over a corpus).

Importing this module loads no torch (the command line lists the names for ``--help``); building a
task does.
"""

from __future__ import annotations

from typing import Any

TASK_NAMES = ("associative_recall", "induction", "multi_hop", "ngram", "repeated_tokens", "text")
"""Every task name (``kvshift_lens.data.tasks.TASKS`` and ``text``; a test keeps them equal)."""


def task_names() -> list[str]:
    return list(TASK_NAMES)


def build_task(spec: dict[str, Any]):
    """Build a task from ``{"name": ..., **kwargs}``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"task spec {spec} has no 'name'; one of {task_names()}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] == "text":
        from kvshift_lens.data.text import TextTask

        return TextTask.from_corpus(**kwargs)
    from kvshift_lens.data.tasks import TASKS, make_task

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


def build_tasks(spec: dict[str, Any]) -> tuple[Any, Any]:
    """``(training task, evaluation task)`` (see :func:`build_eval_task`), built once: a text
    corpus is read, and a BPE tokenizer trained, a single time for both splits."""
    if isinstance(spec, dict) and spec.get("name") == "text" and spec.get("split", "train") == "train":
        from kvshift_lens.data.text import TextTask

        kwargs = {k: v for k, v in spec.items() if k not in ("name", "split")}
        return TextTask.splits(**kwargs)
    task = build_task(spec)
    return task, build_eval_task(spec, task)
