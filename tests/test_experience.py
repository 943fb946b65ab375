"""dph.experience and dph.accumulator: truncated responses (counted, masked out of the loss, DAPO's
overlong penalty) and metrics that are exact however a step is cut into micro-batches."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_OVERRIDES, compose_config, with_overrides
from dph.accumulator import MetricAccumulator
from dph.builders import setup
from dph.experience import ExperienceMaker
from dph.loggers import NullLogger
from dph.rollout import collate


def test_accumulator_means_are_exact_over_any_cut():
    """A mean over tokens from (sum, count) pairs equals the mean over all tokens, however cut."""
    values = torch.tensor([0.5, 1.5, 2.0, 4.0, 8.0, 0.25])
    whole = float(values.sum()) / len(values)
    for cut in ([6], [1, 5], [2, 2, 2], [3, 1, 1, 1]):
        acc = MetricAccumulator(["m"])
        for part in torch.split(values, cut):
            acc.add("m", float(part.sum()), len(part))
        assert acc.reduce(_OneRank()) == {"m": pytest.approx(whole, rel=1e-12)}
    acc = MetricAccumulator(["empty"], maxima=["top"])
    acc.merge({"top": (3.0, 0.0)})
    acc.merge({"top": (2.0, 0.0)})
    assert acc.reduce(_OneRank()) == {"empty": 0.0, "top": 3.0}  # no count: 0, not a division by zero


class _OneRank:
    count, index = 1, 0

    def sum(self, values):
        return values

    def max(self, values):
        return values


def _batch(lengths: list[int], width: int, finish: list[str]):
    prompts = [[1, 2]] * len(lengths)
    responses = [[3] * n for n in lengths]
    return collate(prompts, responses, ["x"] * len(lengths), 0, finish_reasons=finish)


def test_overlong_penalty_is_dapos_soft_punishment():
    """DAPO: 0 up to max_new_tokens - buffer, then linear down to -penalty at the cap."""
    algorithm = OmegaConf.create({"overlong_buffer": 4, "overlong_penalty": 1.0})
    maker = ExperienceMaker.__new__(ExperienceMaker)
    maker.algorithm, maker.max_new_tokens = algorithm, 16
    batch = _batch([1, 12, 13, 14, 16], 16, ["stop", "stop", "stop", "stop", "length"])
    penalty = maker._overlong_penalty(batch)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0]))


def test_loss_mask_follows_the_finish_reasons():
    maker = ExperienceMaker.__new__(ExperienceMaker)
    maker.device = torch.device("cpu")
    batch = _batch([3, 16, 2], 16, ["stop", "length", "stop"])
    maker.algorithm = OmegaConf.create({"mask_truncated": False})
    assert maker._loss_mask(batch) is None
    maker.algorithm = OmegaConf.create({"mask_truncated": True})
    torch.testing.assert_close(maker._loss_mask(batch), torch.tensor([1.0, 0.0, 1.0]))


def test_the_learner_leaves_masked_responses_out_of_the_loss(tiny_model, cache_dir, tmp_path):
    """An Experience whose loss mask drops every response: the update leaves the weights as they were
    (and its token metrics count no token); the same Experience unmasked moves them."""
    from dph.learner import STEP_METRICS
    from dph.trainer import Trainer

    cfg = compose_config(with_overrides(TINY_OVERRIDES, f"paths.cache_dir={cache_dir}", "device=cpu", "logger=none",
                                        "divergence=none", "optimized_metric=eval/test/pass@1"))
    task, eval_sets = setup(cfg)
    trainer = Trainer(cfg, task, eval_sets, tmp_path / "run", NullLogger())
    exp = trainer.experience.make(trainer.task.problems("train")[:4], step=1)
    exp.advantages = torch.randn(len(exp.batch), generator=torch.Generator().manual_seed(0))  # a signal in every group
    policy = trainer.learner.unwrapped_policy

    def update(loss_mask):
        exp.loss_mask = loss_mask
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        metrics = MetricAccumulator(STEP_METRICS)
        trainer.learner.update(exp, 1, metrics, entropy_coef=0.0, entropy_bonus=False)
        moved = any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())
        return metrics.reduce(trainer.ranks), moved

    metrics, moved = update(torch.zeros(len(exp.batch)))
    assert not moved and metrics["train/entropy"] == 0.0 and metrics["train/pg_loss"] == 0.0
    metrics, moved = update(None)
    assert moved and metrics["train/entropy"] > 0
    trainer.close()
