"""The task interface: problems with prompts, a verifier, and demonstrations for the base model.

A task is a set of named splits of problems (deterministic given its config) and a verifier that
scores a model response: reward 1.0 when correct, `format_reward` (0.0 by default) when the answer is
in the asked-for format but wrong, else 0.0. Tasks never see torch or a config object: they are
built from plain keyword arguments (the keys of `conf/task/<name>.yaml`).

Shared by every task:
  - a final answer is read from `final_section(response)`: the text after the last `</think>`, so
    that drafts inside the reasoning never count;
  - `score(problem, response, finished=False)` is a response cut at max_new_tokens (finish reason
    "length"): only an explicit, complete final-answer marker counts then (each task says which),
    except in a task's embedded default (its embedded data with the `plain` prompt, which the tiny
    model answers on one line), whose verdicts do not depend on `finished`;
  - prompt templates are `str.format` templates checked by `check_template` at construction.
"""

from __future__ import annotations

import random
import string
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


STATUSES = ("correct", "wrong", "invalid", "timeout")  # every verdict a verifier may give (Score.status)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # reasoning tags (DeepSeek-R1, Qwen3, TinyZero)


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

    reward: 1.0 when correct; the task's `format_reward` when wrong but marked as the prompt asks
        (an <answer> tag, a ```sql fence, a \\boxed{} or ####); else 0.0. Only status "correct"
        counts as solved (Pass@k, pre-sampling), never a format reward.
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
    def score(self, problem: Problem, response: str, *, finished: bool = True) -> Score:
        """Verify one response. Wrong or hostile answers score 0; a verifier bug raises VerifierError.
        `finished=False`: the response was cut at max_new_tokens (see the module docstring)."""

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


def final_section(response: str) -> str:
    """The part of a response its final answer is read from: the text after its last `</think>` (all
    of it when there is none), cut before a `<think>` that is never closed (what follows it is
    unfinished reasoning, not an answer)."""
    end = response.rfind(THINK_CLOSE)
    tail = response[end + len(THINK_CLOSE):] if end >= 0 else response
    opened = tail.find(THINK_OPEN)
    return tail[:opened] if opened >= 0 else tail


def template_fields(template: str) -> set[str]:
    """The field names a (valid) `str.format` template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(task: str, template: object, sample: Mapping[str, object]) -> str:
    """`template` when it is a `str.format` template over the fields of `sample` (which it must
    format); else a one-line ValueError naming the key and the fix."""
    key = f"task.prompt_template (or prompt.templates.{task})"
    known = ", ".join(f"{{{name}}}" for name in sample)
    fix = f"the fields of {task} are {known}; write a literal brace doubled, e.g. \\boxed{{{{}}}}"
    if not isinstance(template, str):
        raise ValueError(f"{key}={template!r} must be a string ({fix})")
    try:
        names = template_fields(template)
    except ValueError as e:  # Formatter's own words, e.g. "Single '}' encountered in format string"
        raise ValueError(f"{key}: a stray brace in the template ({e}); {fix}") from None
    for name in names:
        if name not in sample:
            raise ValueError(f"{key}: {f'unknown field {{{name}}}' if name else 'an empty field {}'} in the "
                             f"template; {fix}")
    try:
        template.format(**sample)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise ValueError(f"{key}: the template does not format ({type(e).__name__}: {e}); {fix}") from None
    return template


def check_format_reward(value: object) -> float:
    """`task.format_reward` as a float in [0, 1); else a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"task.format_reward={value!r} must be a number in [0, 1) (0: off; TinyZero uses 0.1)")
    return float(value)


def verdict_reward(status: str, marked: bool, format_reward: float) -> float:
    """1.0 for a correct answer, `format_reward` for a wrong one marked as asked, else 0.0."""
    if status == "correct":
        return 1.0
    return format_reward if status == "wrong" and marked else 0.0
