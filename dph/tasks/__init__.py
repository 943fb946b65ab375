"""Tasks: the registry of task names to classes, and `build_task` from a config mapping."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from dph.tasks.base import STATUSES, Problem, Score, Task, VerifierError

# name -> "module:Class"; imported lazily so that a task's heavy dependencies load only when used.
TASKS: dict[str, str] = {
    "countdown": "dph.tasks.countdown:Countdown",
    "sql": "dph.tasks.sql:SQLTask",
    "math": "dph.tasks.math:MathTask",
}


# Keys of conf/task/<name>.yaml that configure the run around the task, not the task itself.
RUN_KEYS = ("name", "response_tokens")


def build_task(cfg: Mapping[str, Any]) -> Task:
    """Build a task from its config mapping: `name` selects the class, the keys other than
    RUN_KEYS are the constructor's keyword arguments."""
    params = {k: v for k, v in cfg.items() if k not in RUN_KEYS}
    name = cfg.get("name")
    if name not in TASKS:
        raise KeyError(f"task.name={name!r} is not a known task; choose one of {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**params)


__all__ = ["RUN_KEYS", "STATUSES", "TASKS", "Problem", "Score", "Task", "VerifierError", "build_task"]
