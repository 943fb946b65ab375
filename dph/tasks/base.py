"""The task interface: problems with prompts, a verifier, and demonstrations for the base model.

A task is a set of named splits of problems (deterministic given its config) and a verifier that
scores a model response with reward 1.0 or 0.0. Tasks never see torch or a config object: they are
built from plain keyword arguments (the keys of `conf/task/<name>.yaml`).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


STATUSES = ("correct", "wrong", "invalid", "timeout")  # every verdict a verifier may give (Score.status)


class VerifierError(RuntimeError):
    """The verifier itself failed (a bug or a broken environment), as opposed to a wrong answer."""


@dataclass(frozen=True)
class Problem:
    """One prompt of a task split.

    id: stable identifier, unique within the task ("<split>/<index>" or the data set's own id).
    prompt: the text the policy continues.
    data: task-specific payload the verifier needs (JSON-serialisable: numbers, gold answer, ...).
    """

    id: str
    prompt: str
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Score:
    """The verifier's verdict on one response.

    reward: 1.0 when correct, else 0.0.
    answer: the response's answer in normal form (e.g. whitespace removed), used to count distinct
        correct answers; None when nothing could be extracted.
    status: "correct", "wrong" (parsed but wrong), "invalid" (unparseable, rule broken, too long),
        or "timeout" (the verifier's time limit ran out). Counted, never silently dropped.
    """

    reward: float
    answer: str | None
    status: str


class Task(ABC):
    """A verifiable task. Subclasses set `name` and implement the abstract methods."""

    name: str = ""

    @property
    @abstractmethod
    def split_names(self) -> tuple[str, ...]:
        """Names of the splits this task has, e.g. ("train", "test", "ood")."""

    @abstractmethod
    def problems(self, split: str) -> list[Problem]:
        """The problems of one split, deterministic for a given config (cache them)."""

    @abstractmethod
    def score(self, problem: Problem, response: str) -> Score:
        """Verify one response. Wrong or hostile answers score 0; a verifier bug raises VerifierError."""

    @abstractmethod
    def warmup_problems(self, n: int, seed: int) -> list[Problem]:
        """`n` problems for the base model's supervised warm-up, disjoint from the eval splits."""

    @abstractmethod
    def demonstrations(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """Up to `n` correct responses to `problem`, drawn at random among all its solutions."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines the task's data (for cache keys): plain JSON-able values."""

    def check_split(self, split: str) -> None:
        if split not in self.split_names:
            raise KeyError(f"task {self.name!r} has no split {split!r}; it has {list(self.split_names)}")
