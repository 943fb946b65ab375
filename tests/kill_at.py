"""Run `dph-train` (its Hydra main, with the command line given) and SIGKILL the process at a chosen
point, for the tests of resuming a killed run.

    python tests/kill_at.py <point> <count> [dph-train overrides ...]

The process kills itself with SIGKILL (no cleanup, as a preempted job or an out-of-memory kill)
the `count`-th time it reaches `point`:

    train_step       the start of an RL step (before its rollouts)
    update           an optimizer step (inside a train step, after the rollouts)
    evaluate         the second split of an evaluation (the first split is done)
    checkpoint       a checkpoint write, after the state files and before the manifest that completes it
"""

from __future__ import annotations

import os
import signal
import sys


def _kill_on(owner, name: str, count: int) -> None:
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def main() -> None:
    point, count = sys.argv[1], int(sys.argv[2])
    sys.argv = ["dph-train", *sys.argv[3:]]
    from dph import checkpoint, evaluation, learner, train, trainer

    owner, name = {
        "train_step": (trainer.Trainer, "train_step"),
        "update": (learner.Learner, "_step"),
        "evaluate": (evaluation.Evaluator, "_split"),
        "checkpoint": (checkpoint, "checksums"),
    }[point]
    _kill_on(owner, name, count)
    train.main()


if __name__ == "__main__":
    main()
