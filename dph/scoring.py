"""Scoring a batch of sampled responses with a task's verifier (rollouts, evaluation, pre-sampling).

A response that ran into generation.max_new_tokens (finish reason "length") is scored as
unfinished: the verifier then reads only a complete final answer (dph.tasks: `score(...,
finished=False)`). `truncated` counts such responses.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from dph.rollout import SequenceBatch
from dph.tasks import Problem, Score, Task


def score_responses(task: Task, problems: Sequence[Problem], batch: SequenceBatch) -> list[Score]:
    """The verdict on every row of a prompt-major batch (len(batch) // len(problems) rows per prompt)."""
    n = len(batch) // max(1, len(problems))
    finished = finished_flags(batch)
    takes_finished = "finished" in inspect.signature(task.score).parameters
    return [task.score(problems[i // n], text, finished=done) if takes_finished else task.score(problems[i // n], text)
            for i, (text, done) in enumerate(zip(batch.texts, finished, strict=True))]


def finished_flags(batch: SequenceBatch) -> list[bool]:
    """Per row: whether the response ended by itself (an EOS or a stop string), not at the length cap."""
    reasons = batch.finish_reasons or ["stop"] * len(batch)
    return [reason != "length" for reason in reasons]
