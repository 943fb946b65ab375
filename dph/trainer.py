"""The RL loop: GRPO with a PPO-clipped objective and a weighted f-divergence term.

What one step computes (differences from the GRPO paper are numbered):
  1. Draw `trainer.prompts_per_step` prompts (the same draw on every rank; each rank takes its
     share) and sample G = `algorithm.group_size` responses per prompt at the configured
     temperature / top_p; log-probs are taken under that same sampling distribution.
  2. Score each response with the task's verifier: reward 1 or 0.
  3. Advantages are group-relative, by the estimator `algorithm.advantage` (dph.advantages; GRPO's
     default: A = (r - mean_group(r)) / std_group(r)). Every token of a response gets its advantage.
  4. Loss per token: the policy loss `algorithm.policy_loss` (dph.policy_losses; default PPO's
     -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A), with DAPO's asymmetric clip-higher),
     on every token or only the top `algorithm.top_entropy_quantile` by entropy, minus an optional
     entropy bonus, plus `divergence.weight` times a token-level f-divergence surrogate whose value
     estimates D_f and whose gradient is right in expectation (dph.divergences). Tokens are
     aggregated by `algorithm.loss_agg`.
  5. `algorithm.epochs` passes over the rollouts, each in `algorithm.minibatches` optimizer
     steps. With one pass and one minibatch the old log-probs are the current ones (ratio = 1,
     no extra forward pass); otherwise they come from a no-grad forward before the first update.
  6. With `divergence.source=rollouts` the divergence is estimated on the policy's own rollouts
     against a frozen copy of the initial policy (a second model, one extra forward per step).
  7. Forward passes over rollouts run each prompt once per group and share its key/value cache
     with the group's G responses (dph.rollout.token_logprobs): the same values and gradients,
     about (G - 1) / G of the prompt's compute saved. Micro-batches (and, with several, minibatches)
     are cut at whole groups.

Rollouts, evaluation samples and the pre-sampling go through a rollout engine (dph.engines: HF
`generate` or vLLM); the loss never uses the engine's log-probs, only the training model's. Every
random draw is seeded by its stage and step (dph.seeding), and a checkpoint (dph.checkpoint) holds
the rest of the state, so a resumed run ends exactly as an uninterrupted one.

Evaluation (dph.evaluation; step 0, every `eval.every` steps and at the end): `eval.n` samples per
prompt, the unbiased pass@k for k = 1, 2, 4, ..., n, mean reward, entropy, distinct correct answers
and forgetting against step 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dph import algos, checkpoint, divergences, policy_losses, presample
from dph.config import ConfigError
from dph.advantages import get_advantage
from dph.distributed import Ranks
from dph.engines import build_engine
from dph.evaluation import EvalSet, Evaluator, PromptResult
from dph.models import (encode_prompts, load_policy, model_fingerprint, prepare_for_training, resolve_model_dir,
                        uses_lora)
from dph.rollout import SequenceBatch, logprobs_no_grad, micro_slices, token_logprobs
from dph.seeding import generator, stage_seed
from dph.tasks import STATUSES, Problem, Task

log = logging.getLogger(__name__)

__all__ = ["EvalSet", "PromptStream", "Trainer", "build_optimizer"]


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


class Trainer:
    def __init__(self, cfg: DictConfig, task: Task, eval_sets: list[EvalSet], run_dir: Path, logger,
                 reporter=None, resume_from: Path | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.task, self.eval_sets, self.run_dir = cfg, task, eval_sets, run_dir
        self.logger, self.reporter = logger, reporter
        self.acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.precision)
        self.ranks = Ranks(self.acc)
        log.info("Training on %s with %d process(es)", self.acc.device, self.acc.num_processes)

        tasks = _unique_tasks([task, *(e.task for e in eval_sets)])
        with self.acc.main_process_first():  # rank 0 builds the tiny base model once; others then load it
            self.model_dir = resolve_model_dir(cfg.model, tasks, cfg.paths.cache_dir)
        policy, self.tokenizer = load_policy(self.model_dir, cfg.model, self.acc.device)
        policy = prepare_for_training(policy, cfg.model)
        g = cfg.generation
        self.engine = build_engine(cfg.rollout, policy, self.tokenizer, model_dir=self.model_dir,
                                   batch_size=g.batch_size, max_model_len=_max_model_len(policy),
                                   sharded=self._check_sharding())

        # The divergence term: on rollouts against a frozen initial policy (a second model), or on
        # pre-sampled initial-policy data (DPH: RL on D_exp only, no reference model at all).
        div_cfg = cfg.divergence
        self.divergence = None if div_cfg.name == "none" else divergences.get_divergence(div_cfg.name, **_div_params(div_cfg))
        self.reference = None  # a frozen copy of the initial policy (with LoRA: the base, adapters disabled)
        self.reference_data = None
        self.uses_reference = self.divergence is not None and div_cfg.source == "rollouts"
        train_problems = task.problems("train")
        if self.uses_reference:
            if not uses_lora(cfg.model):
                self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        elif self.divergence is not None:
            with self.acc.main_process_first():
                self.reference_data = presample.load_or_build(
                    self.engine, policy, self.tokenizer, task, model_fingerprint(self.model_dir), cfg, cfg.paths.cache_dir
                )
            train_problems = self._exploration_problems()

        a = cfg.algorithm
        total_updates = cfg.trainer.steps * a.epochs * a.minibatches
        optimizer, self.scheduler = build_optimizer(policy.parameters(), cfg.optimizer, total_updates)
        self.policy, self.optimizer = self.acc.prepare(policy, optimizer)
        self.prompts = PromptStream(train_problems, cfg.seed)
        self.evaluator = Evaluator(
            eval_sets, self.tokenizer, self.ranks, n=cfg.eval.n, max_prompts=cfg.eval.max_prompts,
            sample_rows=cfg.eval.sample_rows, temperature=g.temperature, top_p=g.top_p,
            max_new_tokens=g.max_new_tokens, chat_template=cfg.model.chat_template,
            micro_batch_size=cfg.trainer.micro_batch_size, seed=cfg.seed,
        )
        self.advantage, self.policy_loss = get_advantage(a.advantage), policy_losses.get_policy_loss(a.policy_loss)
        self.kl_form = div_cfg.get("loss_form", "exact")
        self.state = checkpoint.TrainState()
        self.state.extra["entropy_coef"] = float(a.entropy_coef)
        resettable = [checkpoint.ModelState(self.reference)] if div_cfg.get("reference_reset_every") else []
        self.checkpoints = checkpoint.Checkpointer(
            self.acc, run_dir, cfg.trainer.keep_checkpoints, checkpoint.run_config(cfg),
            [self.scheduler, self.prompts, self.state, *resettable], trainable_only=uses_lora(cfg.model),
        )
        set_seed(cfg.seed + self.acc.process_index)  # after every build: the global generators start alike
        self._engine_stale = False
        if resume_from is not None:
            self.checkpoints.load(resume_from)
            self._engine_stale = True

    def _check_sharding(self) -> bool:
        """Whether the policy is sharded over the ranks (FSDP, DeepSpeed): then every rank must run
        the same number of forward passes, so the per-step counts must split evenly."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return False
        k, cfg = self.acc.num_processes, self.cfg
        counts = {"trainer.prompts_per_step": cfg.trainer.prompts_per_step, "eval.max_prompts": cfg.eval.max_prompts}
        if cfg.divergence.get("source") == "reference":
            counts["divergence.rehearsal_batch_size"] = cfg.divergence.rehearsal_batch_size
        for key, value in counts.items():
            if value is None or value % k:
                raise ConfigError(f"{key}={value} does not split evenly over {k} ranks of a sharded model "
                                  f"({self.acc.distributed_type.value}): use a multiple of {k}")
        return True

    def _exploration_problems(self) -> list[Problem]:
        """D_exp, with the split logged; an empty side of the split is an error with the fix."""
        cfg, counts = self.cfg, self.reference_data.manifest["counts"]
        if counts["reference_samples"] == 0:
            raise RuntimeError(
                f"presample: no training prompt reached presample.threshold={cfg.presample.threshold} "
                f"with presample.n={cfg.presample.n}, so there is nothing to rehearse: lower the threshold"
            )
        problems = self.reference_data.exploration_problems(self.task)
        if not problems:
            raise RuntimeError("presample: every training prompt is in D_pef, so RL has no prompt left: "
                               "raise presample.threshold or use divergence.source=rollouts")
        log.info("DPH split: %d prompts in D_exp (RL), %d in D_pef (%d reference samples)",
                 counts["d_exp"], counts["d_pef"], counts["reference_samples"])
        return problems

    def split_summary(self) -> dict[str, Any]:
        """D_exp / D_pef sizes and the pass-rate histogram, for the run summary (DPH only)."""
        return presample.split_metrics(self.reference_data.manifest) if self.reference_data is not None else {}

    # ------------------------------------------------------------------ helpers
    @property
    def generator_model(self):
        return self.acc.unwrap_model(self.policy)

    def _synced_engine(self):
        """The rollout engine, with the policy's current weights."""
        if self._engine_stale:
            self.engine.update_weights(self.generator_model)
            self._engine_stale = False
        return self.engine

    def _sample(self, problems: list[Problem], n: int, seed: int) -> SequenceBatch:
        g = self.cfg.generation
        prompt_ids = encode_prompts(self.tokenizer, [p.prompt for p in problems], self.cfg.model.chat_template)
        return self._synced_engine().generate(prompt_ids, n=n, max_new_tokens=g.max_new_tokens,
                                              temperature=g.temperature, top_p=g.top_p, seed=seed)

    def _forward_no_grad(self, model, batch: SequenceBatch, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropy of a prompt-major batch with `group` responses per prompt."""
        return logprobs_no_grad(model, batch, self.cfg.generation.temperature, group, self.cfg.trainer.micro_batch_size)

    def _reference_logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """Log-probs of the rollouts under the initial policy: the frozen copy, or with LoRA the
        frozen base itself (the adapters switched off for this forward)."""
        G = self.cfg.algorithm.group_size
        if self.reference is not None:
            return self._forward_no_grad(self.reference, batch, G)[0]
        with self.generator_model.disable_adapter():
            return self._forward_no_grad(self.policy, batch, G)[0]

    def _micro(self, n: int, group: int = 1) -> list[slice]:
        return micro_slices(n, self.cfg.trainer.micro_batch_size, group)

    def _denominator(self, mask: torch.Tensor) -> float:
        """The loss aggregation's denominator over all ranks, divided by the world size because DDP
        averages gradients: then the sum of micro-batch losses equals the full-batch loss."""
        d = self.ranks.sum({"d": float(algos.agg_denominator(mask, self.cfg.algorithm.loss_agg))})["d"]
        return max(d, 1e-8) / self.acc.num_processes

    def _agg(self, loss_mat: torch.Tensor, mask: torch.Tensor, denom: float) -> torch.Tensor:
        horizon = self.cfg.generation.max_new_tokens
        return algos.agg_numerator(loss_mat * mask, mask, self.cfg.algorithm.loss_agg, horizon=horizon) / denom

    # ------------------------------------------------------------------ training
    def train_step(self, step: int) -> dict[str, float]:
        cfg, a, rank, G = self.cfg, self.cfg.algorithm, self.ranks.index, self.cfg.algorithm.group_size
        t0 = time.perf_counter()
        problems = self.ranks.shard(self.prompts.next(cfg.trainer.prompts_per_step))
        batch = self._sample(problems, G, stage_seed(cfg.seed, "rollout", step, rank))
        scores = [self.task.score(p, text) for p, text in zip(_repeat(problems, G), batch.texts, strict=True)]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.acc.device)
        mask = batch.response_mask.float()
        ref_logp = self._reference_logprobs(batch) if self.uses_reference else None
        needs_old = a.epochs * a.minibatches > 1 or a.advantage == "unlikeliness" or self.kl_form == "k1_reward"
        old_logp = self._forward_no_grad(self.policy, batch, G)[0] if needs_old else None
        if self.kl_form == "k1_reward":  # KL in the reward: r - weight * sum_t log(pi / pi_ref)
            shaped = rewards - cfg.divergence.weight * divergences.k1_reward_penalty(old_logp, ref_logp, mask)
        else:
            shaped = rewards
        seq_logprob = None if old_logp is None else (old_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        advantages, _ = self.advantage(shaped, G, seq_logprob=seq_logprob, **a.advantage_params)
        rehearsal = None
        if self.reference_data is not None:
            size = self.ranks.share(self.cfg.divergence.rehearsal_batch_size)
            rb, rlp = self.reference_data.draw(size, generator(cfg.seed, "rehearsal", step, rank))
            rehearsal = (rb.to(self.acc.device), rlp.to(self.acc.device))
        t1 = time.perf_counter()

        sums: dict[str, float] = dict.fromkeys(STEP_SUMS, 0.0)
        shuffle = generator(cfg.seed, "minibatch", step)
        self.loss_rng = generator(cfg.seed, "policy_loss", step, rank)
        self.engine.release_memory()
        for _ in range(a.epochs):
            order = torch.arange(len(batch))
            if a.minibatches > 1:  # shuffle whole groups, so that a minibatch holds complete groups
                groups = torch.randperm(len(batch) // G, generator=shuffle)
                order = (groups[:, None] * G + torch.arange(G)).flatten()
            rehearsal_order = torch.arange(len(rehearsal[0])) if rehearsal is not None else None
            # tensor_split always gives `minibatches` parts (chunk gives fewer when rows are few)
            for j, rows in enumerate(torch.tensor_split(order, a.minibatches)):
                rehearsal_rows = torch.tensor_split(rehearsal_order, a.minibatches)[j] if rehearsal is not None else None
                self._update(batch, rows, advantages, old_logp, ref_logp, rehearsal, rehearsal_rows, sums)
        self._engine_stale = True
        t2 = time.perf_counter()

        for score in scores:
            sums[f"status_{score.status}"] += 1.0
        correct = rewards > 0
        sums.update(
            reward_sum=float(rewards.sum()), n_responses=len(batch), response_tokens=float(mask.sum()),
            zero_std_groups=float((advantages.view(-1, G) == 0).all(dim=1).sum()), groups=len(problems),
            adv_correct_sum=float(advantages[correct].sum()), n_correct=float(correct.sum()),
            adv_wrong_sum=float(advantages[~correct].sum()), rollout_s=t1 - t0, update_s=t2 - t1,
        )
        totals = {**self.ranks.sum(sums), **self.ranks.max({"engine_diff_max": sums["engine_diff_max"]})}
        metrics = self._step_metrics(totals, with_rehearsal=rehearsal is not None,
                                     with_engine_logprobs=batch.logprobs is not None)
        if self.acc.device.type == "cuda":  # this rank's peak during the step (rollouts and update)
            metrics["time/gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.acc.device)
        self._after_update(step, metrics)
        return metrics

    def _step_metrics(self, s: dict[str, float], *, with_rehearsal: bool, with_engine_logprobs: bool) -> dict[str, float]:
        """The step's metrics (dph.metrics.METRICS) from its sums over micro-batches and ranks."""
        a, world = self.cfg.algorithm, self.acc.num_processes
        n_updates, tokens = a.epochs * a.minibatches, max(1.0, s["tokens"])
        metrics = {
            "train/reward_mean": s["reward_sum"] / s["n_responses"],
            "train/response_length": s["response_tokens"] / s["n_responses"],
            "train/entropy": s["entropy_sum"] / tokens,
            "train/loss": s["loss"] / n_updates / world,
            "train/pg_loss": s["pg_loss"] / n_updates / world,
            # means over the updates that had a divergence term (a minibatch may draw no rehearsal row)
            "train/div_loss": s["div_loss"] / max(1.0, s["div_updates"]),
            "train/divergence": s["divergence"] / max(1.0, s["div_updates"]),
            "train/clip_frac": s["clipped"] / tokens,
            "train/cov_clip_frac": s["cov_clipped"] / tokens,
            "train/ratio_mean": s["ratio_sum"] / tokens,
            "train/approx_kl": s["approx_kl_sum"] / tokens,
            "train/zero_std_frac": s["zero_std_groups"] / max(1.0, s["groups"]),
            "train/adv_mean_correct": s["adv_correct_sum"] / max(1.0, s["n_correct"]),
            "train/adv_mean_wrong": s["adv_wrong_sum"] / max(1.0, s["n_responses"] - s["n_correct"]),
            "train/updated_token_frac": s["updated_tokens"] / tokens,
            "train/updated_token_entropy": s["updated_entropy_sum"] / max(1.0, s["updated_tokens"]),
            "train/entropy_coef": s["entropy_coef_sum"] / max(1.0, s["micro_batches"]),
            "train/lr": self.scheduler.get_last_lr()[0],
            **{f"train/status/{name}": s[f"status_{name}"] / s["n_responses"] for name in STATUSES},
            "time/rollout_s": s["rollout_s"] / world,
            "time/update_s": s["update_s"] / world,
        }
        if with_rehearsal:
            metrics["train/div_value"] = metrics["train/divergence"]
            metrics["train/rehearsal_logprob"] = s["rehearsal_logprob_sum"] / max(1.0, s["rehearsal_tokens"])
        if with_engine_logprobs:
            metrics["train/engine_logprob_diff"] = s["engine_diff_sum"] / tokens
            metrics["train/engine_logprob_diff_max"] = s["engine_diff_max"]
        return metrics

    def _after_update(self, step: int, metrics: dict[str, float]) -> None:
        """Per-step state of optional algorithm parts: the adaptive entropy coefficient, and ProRL's
        reference reset (the reference becomes the current policy; the optimizer state starts over)."""
        a, div = self.cfg.algorithm, self.cfg.divergence
        if a.entropy_target is not None:
            self.state.extra["entropy_coef"] = policy_losses.adaptive_entropy_coef(
                self.state.extra["entropy_coef"], metrics["train/entropy"], a.entropy_target, a.entropy_coef_lr,
                a.entropy_coef_max)
        reset = div.get("reference_reset_every", 0) if self.reference is not None else 0
        if reset and step % reset == 0:
            self.reference.load_state_dict(self.generator_model.state_dict())
            self.optimizer.optimizer.state.clear()
            self.state.extra["reference_reset_step"] = step
            log.info("Step %d: the reference is now the current policy; optimizer state reset", step)

    def _update(self, batch, rows, advantages, old_logp, ref_logp, rehearsal, rehearsal_rows, sums) -> None:
        """One optimizer step: the policy-gradient loss on rollout rows `rows` plus the weighted
        divergence (on the same rollouts, or on the rehearsal rows), micro-batched with exact
        aggregation; gradients are synchronised across ranks on the last backward only."""
        jobs = []
        mb = batch.select(rows)
        denom = self._denominator(mb.response_mask.float())
        for s in self._micro(len(mb), self.cfg.algorithm.group_size):
            jobs.append((self._rollout_loss, (mb.select(s), rows[s], advantages, old_logp, ref_logp, denom)))
        if ref_logp is not None:
            sums["div_updates"] += 1
        if rehearsal is not None:
            rb = rehearsal[0].select(rehearsal_rows)
            rlp = rehearsal[1][rehearsal_rows]
            rdenom = self._denominator(rb.response_mask.float())
            if rdenom > 1e-6:  # some rank drew rehearsal rows for this minibatch
                sums["div_updates"] += 1
            for s in self._micro(len(rb)):
                jobs.append((self._rehearsal_loss, (rb.select(s), rlp[s], rdenom)))
        for i, (fn, args) in enumerate(jobs):
            with self.acc.no_sync(self.policy) if i < len(jobs) - 1 else contextlib.nullcontext():
                loss = fn(*args, sums)
                self.acc.backward(loss)
            sums["loss"] += float(loss.detach())
        if self.cfg.optimizer.max_grad_norm is not None:
            self.acc.clip_grad_norm_(self.policy.parameters(), self.cfg.optimizer.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _rollout_loss(self, part: SequenceBatch, idx, advantages, old_logp, ref_logp, denom, sums) -> torch.Tensor:
        """The policy loss on rollouts (algorithm.policy_loss, on the tokens it updates), the entropy
        bonus, and the on-policy divergence term when the divergence uses rollouts."""
        a, coef = self.cfg.algorithm, self.state.extra["entropy_coef"]
        mask = part.response_mask.float()
        bonus = coef > 0 or a.entropy_target is not None
        logp, entropy = token_logprobs(self.policy, part, self.cfg.generation.temperature, a.group_size,
                                       entropy_grad=bonus)
        old = logp.detach() if old_logp is None else old_logp[idx]
        updated = mask
        if a.top_entropy_quantile is not None:  # train only the highest-entropy ("forking") tokens
            updated, _ = policy_losses.top_entropy_mask(entropy.detach(), mask, a.top_entropy_quantile)
        pg_tok, pg_stats = self.policy_loss(logp, old, advantages[idx], updated, clip_low=a.clip_low,
                                            clip_high=a.clip_high, generator=self.loss_rng, **a.policy_loss_params)
        if part.logprobs is not None:  # a rollout engine's own log-probs: how far they are from the trainer's
            diff = (old - part.logprobs).abs() * mask
            sums["engine_diff_sum"] += float(diff.sum())
            sums["engine_diff_max"] = max(sums["engine_diff_max"], float(diff.max()))
            if self.cfg.rollout.tis_cap is not None:
                pg_tok = pg_tok * policy_losses.truncated_is_weights(old, part.logprobs, self.cfg.rollout.tis_cap)
        loss = pg = self._agg(pg_tok, mask, denom)
        if bonus:
            loss = loss + self._agg(policy_losses.entropy_bonus(entropy, updated, coef)[0], mask, denom)
        if ref_logp is not None:
            loss = loss + self._rollout_divergence(logp, ref_logp[idx], mask, denom, sums)
        n_tok, entropy = float(mask.sum()), entropy.detach()
        sums["pg_loss"] += float(pg.detach())
        sums["entropy_sum"] += float((entropy * mask).sum())
        sums["tokens"] += n_tok
        sums["updated_tokens"] += float(updated.sum())
        sums["updated_entropy_sum"] += float((entropy * updated).sum())
        sums["entropy_coef_sum"] += coef
        sums["micro_batches"] += 1
        for key, stat in (("clipped", "clip_frac"), ("cov_clipped", "cov_clip_frac"), ("ratio_sum", "ratio_mean"),
                          ("approx_kl_sum", "approx_kl")):
            sums[key] += float(pg_stats.get(stat, 0.0)) * n_tok
        return loss

    def _rollout_divergence(self, logp, ref_logp, mask, denom, sums) -> torch.Tensor:
        """weight * the divergence on the policy's own rollouts against the reference model, in the
        form divergence.loss_form gives (reverse KL: its label says which gradient it really has)."""
        div_cfg = self.cfg.divergence
        if self.kl_form == "exact":
            surrogate, value = divergences.token_divergence(
                self.divergence, logp, ref_logp, source="rollouts",
                estimator=div_cfg.get("estimator") if div_cfg.name == "reverse_kl" else None)
        elif self.kl_form == "k1_reward":  # in the advantages already; only its value here
            surrogate, value = None, divergences.reverse_kl_estimate(logp.detach() - ref_logp, "k1")
        else:
            surrogate, value = divergences.reverse_kl_loss(logp, ref_logp, self.kl_form)
        sums["divergence"] += float(self._agg(value, mask, denom))
        if surrogate is None:
            return torch.zeros((), device=logp.device)
        div = self._agg(surrogate, mask, denom)
        sums["div_loss"] += float(div.detach())
        return div_cfg.weight * div

    def _rehearsal_loss(self, part: SequenceBatch, ref_logp, denom, sums) -> torch.Tensor:
        """DPH: weight * D_f on pre-sampled initial-policy responses (stored log-probs, no reference model)."""
        mask = part.response_mask.float()
        logp, _ = token_logprobs(self.policy, part, self.cfg.generation.temperature)
        surrogate, value = divergences.token_divergence(self.divergence, logp, ref_logp, source="reference")
        div = self._agg(surrogate, mask, denom)
        sums["div_loss"] += float(div.detach())
        sums["divergence"] += float(self._agg(value, mask, denom))
        sums["rehearsal_logprob_sum"] += float((logp.detach() * mask).sum())
        sums["rehearsal_tokens"] += float(mask.sum())
        return self.cfg.divergence.weight * div

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate the current policy (dph.evaluation) and log it; step 0's per-prompt results are
        kept (in the checkpoints too) as the baseline of the forgetting metrics."""
        t = time.perf_counter()
        initial = {label: [PromptResult(i, c, tuple(a)) for i, c, a in rows]
                   for label, rows in self.state.initial_results.items()} or None
        result = self.evaluator.run(self._synced_engine(), self.policy, step, initial)
        if initial is None:
            self.state.initial_results = {label: [[r.id, r.correct, list(r.answers)] for r in rows]
                                          for label, rows in result.results.items()}
            self.state.initial_metrics = dict(result.metrics)
        metrics = {**result.metrics, "time/eval_s": time.perf_counter() - t}
        self._log(metrics, step)
        if self.acc.is_main_process:
            for es in self.eval_sets:
                ks = self.evaluator.ks
                self.logger.log_passk(es.label, ks, [metrics[f"eval/{es.label}/pass@{k}"] for k in ks], step)
                self.logger.log_prompt_results(es.label, result.results[es.label], self.cfg.eval.n, step)
            self.logger.log_samples(result.samples, step)
        if self.reporter is not None:
            self.reporter.report(step, self.state.history)
        return metrics

    # ------------------------------------------------------------------ loop
    def _log(self, metrics: dict[str, float], step: int) -> None:
        self.state.history.update(metrics)
        if self.acc.is_main_process:
            self.logger.log(metrics, step)

    def fit(self) -> dict[str, float]:
        """Evaluate the initial policy, train `trainer.steps` steps with periodic evaluation, evaluate
        at the end, checkpointing every `trainer.checkpoint_every` steps and at the end; a resumed
        run continues after its checkpoint's step. Returns the last value of every metric."""
        from tqdm.auto import tqdm

        cfg, t = self.cfg, self.cfg.trainer
        if self.state.step == 0:
            split = {k: v for k, v in self.split_summary().items() if not isinstance(v, dict)}
            if split:
                self._log(split, 0)
            self.evaluate(0)
        every = cfg.eval.every
        steps = range(self.state.step + 1, t.steps + 1)
        bar = tqdm(steps, desc="training", unit="step", disable=not self.acc.is_main_process)
        for step in bar:
            metrics = self.train_step(step)
            self._log(metrics, step)
            bar.set_postfix(reward=f"{metrics['train/reward_mean']:.3f}", entropy=f"{metrics['train/entropy']:.3f}")
            if (every and step % every == 0) or step == t.steps:
                self.evaluate(step)
            self.state.step = step
            if t.checkpoint_every and (step % t.checkpoint_every == 0 or step == t.steps):
                self.save_checkpoint(step)
        return dict(self.state.history)

    def save_checkpoint(self, step: int) -> None:
        t = time.perf_counter()
        path = self.checkpoints.save(step)
        if self.acc.is_main_process:
            self.logger.flush()  # rows up to this checkpoint are final: a resume never repeats them
            log.info("Checkpoint %s (%.2f s)", path, time.perf_counter() - t)

    def save_policy(self) -> Path:
        """The trained policy as `<run_dir>/model/` (save_pretrained: weights and tokenizer)."""
        return checkpoint.save_policy(self.acc, self.policy, self.tokenizer, self.run_dir / checkpoint.MODEL_DIR)

    def close(self) -> None:
        self.engine.close()


# Sums a step accumulates over its micro-batches (then over ranks) to form its metrics.
STEP_SUMS = ("loss", "pg_loss", "div_loss", "divergence", "entropy_sum", "tokens", "clipped", "cov_clipped",
             "ratio_sum", "approx_kl_sum", "rehearsal_logprob_sum", "rehearsal_tokens", "div_updates",
             "updated_tokens", "updated_entropy_sum", "entropy_coef_sum", "micro_batches", "engine_diff_sum",
             "engine_diff_max", *(f"status_{name}" for name in STATUSES))


def _repeat(items: list, n: int) -> list:
    return [x for x in items for _ in range(n)]


def _unique_tasks(tasks: list[Task]) -> list[Task]:
    """The distinct tasks (by name and data: e.g. sql on BIRD and sql on Spider are two), in order."""
    seen: dict[str, Task] = {}
    for t in tasks:
        seen.setdefault(json.dumps([t.name, t.fingerprint()], sort_keys=True, default=str), t)
    return list(seen.values())


def _max_model_len(model) -> int:
    """The context length of a causal LM config (what a rollout engine must allocate for)."""
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))


def _div_params(div_cfg: DictConfig) -> dict[str, Any]:
    """Constructor parameters of a divergence: its config minus the keys the trainer itself uses."""
    from dph.config import DIVERGENCE_RUN_KEYS, REVERSE_KL_KEYS

    params = OmegaConf.to_container(div_cfg, resolve=True)
    for key in (*DIVERGENCE_RUN_KEYS, *REVERSE_KL_KEYS):
        params.pop(key, None)
    return params
