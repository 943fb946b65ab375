"""The learner: owns the policy, its optimizer and schedule and the accelerate Accelerator, and
turns one step's Experience into optimizer steps.

`update` runs `algorithm.epochs` passes over the rollouts, each in `algorithm.minibatches`
optimizer steps (with several, minibatches are shuffled whole groups, so the update is off-policy
after the first and the PPO clip can bind); each minibatch in micro-batches of at most
`trainer.micro_batch_size` sequences cut at whole groups (gradient accumulation; gradients are
synchronised across ranks on the last backward only). DPH's rehearsal batch is split over the
minibatches the same way. The losses are dph.losses; the step's metrics come back in a
dph.accumulator.MetricAccumulator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch

from dph.accumulator import MetricAccumulator
from dph.experience import Experience
from dph.losses import Objective, rehearsal_loss, rollout_loss
from dph.rollout import micro_slices
from dph.seeding import generator
from dph.tasks import STATUSES

# The step's metrics in the order they are reported; every rank declares all of them.
STEP_METRICS = ("train/reward_mean", "train/response_length", "train/entropy", "train/loss", "train/pg_loss",
                "train/div_loss", "train/divergence", "train/clip_frac", "train/cov_clip_frac", "train/ratio_mean",
                "train/approx_kl", "train/zero_std_frac", "train/adv_mean_correct", "train/adv_mean_wrong",
                "train/updated_token_frac", "train/updated_token_entropy", "train/entropy_coef",
                *(f"train/status/{name}" for name in STATUSES), "train/truncated_frac")


def build_optimizer(params, opt_cfg: Mapping[str, Any], total_steps: int):
    """AdamW and a LambdaLR schedule: linear warm-up, then constant / linear / cosine decay."""
    optimizer = torch.optim.AdamW(
        params, lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]), eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"]
    )
    warmup, schedule, floor = opt_cfg["warmup_steps"], opt_cfg["schedule"], opt_cfg["min_lr_ratio"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        if schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Learner:
    """The trained policy and what updates it (see the module docstring)."""

    def __init__(self, accelerator, policy, optimizer_cfg, objective: Objective, *, total_updates: int,
                 epochs: int, minibatches: int, micro_batch_size: int, max_grad_norm: float | None, seed: int):
        optimizer, self.scheduler = build_optimizer(policy.parameters(), optimizer_cfg, total_updates)
        self.acc, self.objective = accelerator, objective
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
        self.epochs, self.minibatches, self.micro_batch_size = epochs, minibatches, micro_batch_size
        self.max_grad_norm, self.seed = max_grad_norm, seed

    @property
    def unwrapped_policy(self):
        """The policy without its distributed wrapper (what engines, checkpoints and saving see)."""
        return self.acc.unwrap_model(self.policy)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def update(self, exp: Experience, step: int, metrics: MetricAccumulator, *, entropy_coef: float,
               entropy_bonus: bool) -> None:
        """`epochs` x `minibatches` optimizer steps on `exp`; the losses' metrics go into `metrics`."""
        G, rank = self.objective.group_size, self.objective.ranks.index
        shuffle = generator(self.seed, "minibatch", step)
        loss_rng = generator(self.seed, "policy_loss", step, rank)
        n_rehearsal = 0 if exp.rehearsal is None else len(exp.rehearsal)
        for _ in range(self.epochs):
            order = torch.arange(len(exp.batch))
            if self.minibatches > 1:  # shuffle whole groups, so that a minibatch holds complete groups
                groups = torch.randperm(len(exp.batch) // G, generator=shuffle)
                order = (groups[:, None] * G + torch.arange(G)).flatten()
            # tensor_split always gives `minibatches` parts (chunk gives fewer when rows are few)
            rehearsal_parts = torch.tensor_split(torch.arange(n_rehearsal), self.minibatches)
            for rows, rehearsal_rows in zip(torch.tensor_split(order, self.minibatches), rehearsal_parts, strict=True):
                jobs = self._rollout_jobs(exp, rows, metrics, entropy_coef, entropy_bonus, loss_rng)
                if exp.rehearsal is not None:
                    jobs += self._rehearsal_jobs(exp, rehearsal_rows, metrics)
                self._step(jobs, metrics)

    def _rollout_jobs(self, exp: Experience, rows: torch.Tensor, metrics: MetricAccumulator, entropy_coef: float,
                      entropy_bonus: bool, loss_rng: torch.Generator) -> list:
        obj, part = self.objective, exp.batch.select(rows)
        mask = part.response_mask.float()
        if exp.loss_mask is not None:  # responses dropped from the loss (algorithm.mask_truncated)
            mask = mask * exp.loss_mask[rows, None]
        denom = obj.denominator(mask)
        if exp.ref_logprobs is not None:  # an update with a divergence term on rollouts
            metrics.add("train/div_loss", 0.0, 1.0)
            metrics.add("train/divergence", 0.0, 1.0)
        jobs = []
        for s in micro_slices(len(part), self.micro_batch_size, obj.group_size):
            idx = rows[s]
            old = None if exp.old_logprobs is None else exp.old_logprobs[idx]
            ref = None if exp.ref_logprobs is None else exp.ref_logprobs[idx]
            jobs.append(lambda s=s, idx=idx, old=old, ref=ref: rollout_loss(
                obj, self.policy, part.select(s), mask[s], exp.advantages[idx], old, ref, denom,
                entropy_coef=entropy_coef, entropy_bonus=entropy_bonus, generator=loss_rng))
        return jobs

    def _rehearsal_jobs(self, exp: Experience, rows: torch.Tensor, metrics: MetricAccumulator) -> list:
        obj, part, ref = self.objective, exp.rehearsal.select(rows), exp.rehearsal_logprobs[rows]
        denom = obj.denominator(part.response_mask.float())
        if denom > 1e-6:  # some rank drew rehearsal rows for this minibatch
            metrics.add("train/div_loss", 0.0, 1.0)
            metrics.add("train/divergence", 0.0, 1.0)
        return [lambda s=s: rehearsal_loss(obj, self.policy, part.select(s), ref[s], denom)
                for s in micro_slices(len(part), self.micro_batch_size)]

    def _step(self, jobs: list, metrics: MetricAccumulator) -> None:
        """Backward every job's loss (gradients synchronised on the last), then one optimizer step."""
        for i, job in enumerate(jobs):
            with self.acc.no_sync(self.policy) if i < len(jobs) - 1 else contextlib.nullcontext():
                loss, loss_metrics = job()
                self.acc.backward(loss)
            metrics.merge(loss_metrics)
            metrics.add("train/loss", float(loss.detach()))
        metrics.add("train/loss", 0.0, 1.0)  # a mean over optimizer steps (and ranks)
        metrics.add("train/pg_loss", 0.0, 1.0)
        if self.max_grad_norm is not None:
            self.acc.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def reset_optimizer_state(self) -> None:
        self.optimizer.optimizer.state.clear()
