"""The experience step: sample, score, shape rewards, compute advantages; one batch for the update.

The RL prompts come from a `PromptStream` (shuffled passes over D_exp, or all training prompts).

`ExperienceMaker.make(problems, step)` returns an `Experience` (TRL's generate-and-score `inputs`,
verl's DataProto): the rollouts (G per prompt, prompt-major), their advantages, the log-probs the
losses need besides the policy's own (the sampling policy's when the update is off-policy or an
estimator needs them, the reference's for a divergence on rollouts), DPH's rehearsal batch, and
the step's rollout metrics as (numerator, denominator) pairs (dph.accumulator).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dph import divergences
from dph.accumulator import Pair
from dph.rollout import SequenceBatch, logprobs_no_grad
from dph.scoring import finished_flags, score_responses
from dph.seeding import generator, stage_seed
from dph.tasks import STATUSES, Problem, Task


class PromptStream:
    """Endless shuffled passes over a list of problems; identical on every rank for one seed."""

    def __init__(self, problems: list[Problem], seed: int):
        self.problems, self.rng, self.order = problems, random.Random(seed), []

    def next(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = self.rng.sample(range(len(self.problems)), len(self.problems))
            out.append(self.problems[self.order.pop()])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


@dataclass
class Experience:
    """One step's rollouts, scored and shaped (see the module docstring). Tensors are [B] or [B, T]."""

    batch: SequenceBatch
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None  # the sampling policy's; None: on-policy, the ratio is 1
    ref_logprobs: torch.Tensor | None = None  # the initial policy's, for a divergence on rollouts
    rehearsal: SequenceBatch | None = None  # DPH: stored initial-policy responses of D_pef prompts
    rehearsal_logprobs: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None  # [B]: 0 drops a response from the loss (algorithm.mask_truncated)
    metrics: dict[str, Pair] = field(default_factory=dict)


@dataclass
class ExperienceMaker:
    """Makes a step's Experience. `sample(problems, n, seed)` draws rollouts with the policy's current
    weights; `policy` is the trained model (for the sampling policy's log-probs); `reference` a
    dph.reference.ReferencePolicy and `rehearsal` a dph.reference.Rehearsal, or None."""

    task: Task
    sample: Callable[[Sequence[Problem], int, int], SequenceBatch]
    policy: object
    advantage: Callable
    algorithm: object  # the `algorithm` config section
    temperature: float
    max_new_tokens: int
    micro_batch_size: int
    seed: int
    rank: int
    device: torch.device
    reference: object | None = None
    rehearsal: object | None = None
    rehearsal_batch_size: int = 0  # this rank's share
    kl_in_reward: float | None = None  # the reverse-KL weight when it is a reward penalty (loss_form=k1_reward)

    def make(self, problems: Sequence[Problem], step: int) -> Experience:
        a, G = self.algorithm, self.algorithm.group_size
        batch = self.sample(problems, G, stage_seed(self.seed, "rollout", step, self.rank))
        scores = score_responses(self.task, problems, batch)
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.device)
        mask = batch.response_mask.float()
        ref_logp = None
        if self.reference is not None:
            ref_logp = self.reference.logprobs(self.policy, batch, self.temperature, G, self.micro_batch_size)
        needs_old = a.epochs * a.minibatches > 1 or a.advantage == "unlikeliness" or self.kl_in_reward is not None
        old_logp = logprobs_no_grad(self.policy, batch, self.temperature, G, self.micro_batch_size)[0] if needs_old else None
        shaped = rewards
        if self.kl_in_reward is not None:  # KL in the reward: r - weight * sum_t log(pi / pi_ref)
            shaped = rewards - self.kl_in_reward * divergences.k1_reward_penalty(old_logp, ref_logp, mask)
        if self.algorithm.get("overlong_buffer", 0):
            shaped = shaped - self._overlong_penalty(batch)
        seq_logprob = None if old_logp is None else (old_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        advantages, _ = self.advantage(shaped, G, seq_logprob=seq_logprob, **a.advantage_params)
        exp = Experience(batch, advantages, old_logp, ref_logp, loss_mask=self._loss_mask(batch))
        if self.rehearsal is not None:
            exp.rehearsal, exp.rehearsal_logprobs = self.rehearsal.draw(
                self.rehearsal_batch_size, generator(self.seed, "rehearsal", step, self.rank), self.device)
        exp.metrics = rollout_metrics(scores, rewards, advantages, mask, batch, G)
        return exp

    def _loss_mask(self, batch: SequenceBatch) -> torch.Tensor | None:
        """algorithm.mask_truncated: responses cut at max_new_tokens leave the loss (TRL's
        mask_truncated_completions); None when every response counts."""
        if not self.algorithm.get("mask_truncated", False):
            return None
        return torch.tensor(finished_flags(batch), dtype=torch.float32, device=self.device)

    def _overlong_penalty(self, batch: SequenceBatch) -> torch.Tensor:
        """DAPO's soft overlong punishment: over the last `algorithm.overlong_buffer` tokens before
        generation.max_new_tokens the reward falls linearly, to -algorithm.overlong_penalty at the cap."""
        buffer = self.algorithm.overlong_buffer
        lengths = batch.response_mask.sum(-1).float()
        excess = (lengths - (self.max_new_tokens - buffer)).clamp(min=0) / buffer
        return self.algorithm.overlong_penalty * excess.clamp(max=1.0)


def rollout_metrics(scores, rewards: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    batch: SequenceBatch, group: int) -> dict[str, Pair]:
    """The rollouts' own metrics: reward, length, verdicts, truncation, advantages by correctness."""
    n = float(len(batch))
    correct = torch.tensor([s.status == "correct" for s in scores], device=rewards.device)
    n_correct = float(correct.sum())
    truncated = float(sum(not done for done in finished_flags(batch)))
    statuses = {f"train/status/{name}": (float(sum(s.status == name for s in scores)), n) for name in STATUSES}
    return {
        "train/reward_mean": (float(rewards.sum()), n),
        "train/response_length": (float(mask.sum()), n),
        "train/zero_std_frac": (float((advantages.view(-1, group) == 0).all(dim=1).sum()), n / group),
        "train/adv_mean_correct": (float(advantages[correct].sum()), n_correct),
        "train/adv_mean_wrong": (float(advantages[~correct].sum()), n - n_correct),
        **statuses,
        "train/truncated_frac": (truncated, n),
    }
