"""The reference side of the divergence term: the initial policy as a model, or as stored data.

- `ReferencePolicy` (divergence.source=rollouts): log-probs of the policy's own rollouts under the
  initial policy, from a frozen copy of it, or with LoRA from the policy's frozen base (adapters
  switched off for that forward: no second copy of the weights). With
  divergence.reference_reset_every, ProRL's reset: the reference becomes the current policy and the
  optimizer state starts over; the copy's weights then go into checkpoints.
- `Rehearsal` (divergence.source=reference, DPH): the pre-sampled D_pef responses of the initial
  policy with their stored log-probs (dph.presample's cache), the D_exp / D_pef split the RL
  prompts come from, and the random rehearsal batches drawn from it. No reference model.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from dph import presample
from dph.checkpoint import ModelState
from dph.config import RunError
from dph.rollout import SequenceBatch, logprobs_no_grad
from dph.tasks import Problem, Task

log = logging.getLogger(__name__)


class ReferencePolicy:
    """The initial policy's log-probs on rollouts (see the module docstring)."""

    def __init__(self, policy, *, lora: bool, reset_every: int = 0):
        self.model = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
        self.reset_every = reset_every if self.model is not None else 0

    def logprobs(self, policy, batch: SequenceBatch, temperature: float, group: int,
                 micro_batch_size: int) -> torch.Tensor:
        """[B, T] log-probs of the rollouts under the initial policy; `policy` is the trained model
        (its unwrapped PEFT model serves as the reference with its adapters off)."""
        if self.model is not None:
            return logprobs_no_grad(self.model, batch, temperature, group, micro_batch_size)[0]
        unwrapped = getattr(policy, "module", policy)
        with unwrapped.disable_adapter():
            return logprobs_no_grad(policy, batch, temperature, group, micro_batch_size)[0]

    def checkpoint_objects(self) -> list:
        """What checkpoints must hold for a resumed run to match: the reset copy's weights."""
        return [ModelState(self.model)] if self.reset_every else []

    def reset_due(self, step: int) -> bool:
        return bool(self.reset_every) and step % self.reset_every == 0

    def reset(self, policy) -> None:
        """ProRL's reset: the reference becomes `policy` (unwrapped)."""
        self.model.load_state_dict(policy.state_dict())


class Rehearsal:
    """DPH's pre-sampled rehearsal data and the split it defines (see the module docstring)."""

    def __init__(self, data: presample.ReferenceData, threshold: float, n: int):
        self.data, self.threshold, self.n = data, threshold, n

    @classmethod
    def load_or_build(cls, engine, policy, encode, task: Task, model_fp: dict, cfg) -> Rehearsal:
        """The pre-sampling cache for this run (dph.presample), built first when there is none."""
        data = presample.load_or_build(engine, policy, encode, task, model_fp, cfg, cfg.paths.cache_dir)
        return cls(data, cfg.presample.threshold, cfg.presample.n)

    def exploration_problems(self, task: Task) -> list[Problem]:
        """D_exp, with the split logged; an empty side of the split stops the run with the fix."""
        counts = self.data.manifest["counts"]
        if counts["reference_samples"] == 0:
            histogram = self.data.manifest["pass_rate_histogram"]  # "c/n" -> prompts with c of n correct
            best = max((int(k.split("/")[0]) / self.n for k, count in histogram.items() if count), default=0.0)
            raise RunError(
                f"presample: no training prompt reached presample.threshold={self.threshold} with presample.n="
                f"{self.n} (best pass rate {best:g}), so DPH has nothing to rehearse: lower presample.threshold "
                "(to at most the best pass rate, above 0), warm up the initial policy, or use divergence.source="
                "rollouts or divergence=none")
        problems = self.data.exploration_problems(task)
        if not problems:
            raise RunError("presample: every training prompt is in D_pef, so RL has no prompt left: "
                           "raise presample.threshold or use divergence.source=rollouts")
        log.info("DPH split: %d prompts in D_exp (RL), %d in D_pef (%d reference samples)",
                 counts["d_exp"], counts["d_pef"], counts["reference_samples"])
        return problems

    def draw(self, n: int, generator: torch.Generator, device) -> tuple[SequenceBatch, torch.Tensor]:
        """A random rehearsal batch of `n` stored responses and their initial-policy log-probs."""
        batch, logprobs = self.data.draw(n, generator)
        return batch.to(device), logprobs.to(device)

    def split_metrics(self) -> dict[str, Any]:
        """D_exp / D_pef sizes and the pass-rate histogram (presample/... metrics)."""
        return presample.split_metrics(self.data.manifest)
