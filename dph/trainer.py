"""The RL loop: GRPO with a PPO-clipped objective and a weighted f-divergence term.

What one step computes (differences from the GRPO paper are numbered):
  1. Draw `trainer.prompts_per_step` prompts (the same draw on every rank; each rank takes its
     share) and sample G = `algorithm.group_size` responses per prompt at the configured
     temperature / top_p; log-probs are taken under that same sampling distribution.
  2. Score each response with the task's verifier: reward 1 or 0.
  3. Advantages are group-relative: A = r - mean_group(r), divided by std_group(r) unless
     `algorithm.norm_adv_by_std=false` (Dr. GRPO). Every token of a response gets its advantage.
  4. Loss per token: -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A), with an
     asymmetric clip (DAPO's clip-higher), plus `divergence.weight` times a token-level
     f-divergence surrogate whose value estimates D_f and whose gradient is right in expectation
     (dph.divergences). Tokens are aggregated by `algorithm.loss_agg`.
  5. `algorithm.epochs` passes over the rollouts, each in `algorithm.minibatches` optimizer
     steps. With one pass and one minibatch the old log-probs are the current ones (ratio = 1,
     no extra forward pass); otherwise they come from a no-grad forward before the first update.
  6. With `divergence.source=rollouts` the divergence is estimated on the policy's own rollouts
     against a frozen copy of the initial policy (a second model, one extra forward per step).

Evaluation (step 0, every `eval.every` steps and at the end): `eval.n` samples per prompt, the
unbiased pass@k for k = 1, 2, 4, ..., n, mean reward, entropy and distinct correct answers.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dph import algos, divergences
from dph.metrics import ks_up_to, pass_at_k_mean
from dph.models import encode_prompts, load_policy, resolve_model_dir
from dph.rollout import SequenceBatch, sample, token_logprobs
from dph.tasks import Problem, Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation split: metrics are logged under `eval/<label>/...`."""

    label: str
    task: Task
    split: str


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
    def __init__(self, cfg: DictConfig, task: Task, eval_sets: list[EvalSet], run_dir: Path, logger, reporter=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.task, self.eval_sets, self.run_dir = cfg, task, eval_sets, run_dir
        self.logger, self.reporter = logger, reporter
        self.acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.precision)
        if self.acc.device.type == "cpu" and self.acc.num_processes > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.acc.num_processes))
        set_seed(cfg.seed + self.acc.process_index)

        tasks = _unique_tasks([task, *(e.task for e in eval_sets)])
        with self.acc.main_process_first():  # rank 0 builds the tiny base model once; others then load it
            self.model_dir = resolve_model_dir(cfg.model, tasks, cfg.seed, cfg.paths.cache_dir)
        policy, self.tokenizer = load_policy(self.model_dir, cfg.model, self.acc.device)

        div_cfg = cfg.divergence
        self.divergence = None if div_cfg.name == "none" else divergences.get_divergence(div_cfg.name, **_div_params(div_cfg))
        self.reference = None
        if self.divergence is not None and div_cfg.source == "rollouts":
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)

        a = cfg.algorithm
        total_updates = cfg.trainer.steps * a.epochs * a.minibatches
        optimizer, self.scheduler = build_optimizer(policy.parameters(), cfg.optimizer, total_updates)
        self.policy, self.optimizer = self.acc.prepare(policy, optimizer)
        self.prompts = PromptStream(task.problems("train"), cfg.seed)
        self.history: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def generator_model(self):
        return self.acc.unwrap_model(self.policy)

    def _shard(self, items: list) -> list:
        """This rank's contiguous share of a list that every rank holds in full."""
        n, r, k = len(items), self.acc.process_index, self.acc.num_processes
        return items[r * n // k : (r + 1) * n // k]

    def _sample(self, problems: list[Problem], n: int) -> SequenceBatch:
        g = self.cfg.generation
        prompt_ids = encode_prompts(self.tokenizer, [p.prompt for p in problems], self.cfg.model.chat_template)
        return sample(
            self.generator_model, self.tokenizer, prompt_ids, n=n, max_new_tokens=g.max_new_tokens,
            temperature=g.temperature, top_p=g.top_p, batch_size=g.batch_size,
        )

    def _sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum scalars over ranks (one all-reduce)."""
        if self.acc.num_processes == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.acc.device)
        t = self.acc.reduce(t, reduction="sum")
        return dict(zip(keys, t.tolist(), strict=True))

    @torch.no_grad()
    def _forward_no_grad(self, model, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [token_logprobs(model, batch.select(s), self.cfg.generation.temperature) for s in self._micro(len(batch))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _micro(self, n: int) -> list[slice]:
        size = self.cfg.trainer.micro_batch_size
        return [slice(i, min(n, i + size)) for i in range(0, n, size)]

    # ------------------------------------------------------------------ training
    def train_step(self, step: int) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.algorithm
        t0 = time.perf_counter()
        problems = self._shard(self.prompts.next(cfg.trainer.prompts_per_step))
        batch = self._sample(problems, a.group_size)
        scores = [self.task.score(p, text) for p, text in zip(_repeat(problems, a.group_size), batch.texts, strict=True)]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.acc.device)
        advantages, _ = algos.group_advantages(rewards, a.group_size, norm_by_std=a.norm_adv_by_std)
        ref_logp = self._forward_no_grad(self.reference, batch)[0] if self.reference is not None else None
        old_logp = self._forward_no_grad(self.policy, batch)[0] if a.epochs * a.minibatches > 1 else None
        t1 = time.perf_counter()

        sums: dict[str, float] = dict.fromkeys(
            ("loss", "pg_loss", "div_loss", "divergence", "entropy_sum", "tokens", "clipped"), 0.0
        )
        for _ in range(a.epochs):
            order = torch.randperm(len(batch), device=self.acc.device) if a.minibatches > 1 else torch.arange(len(batch))
            for rows in order.chunk(a.minibatches):
                self._update(batch, rows, advantages, old_logp, ref_logp, sums)
        t2 = time.perf_counter()

        mask = batch.response_mask.float()
        sums.update(
            reward_sum=float(rewards.sum()), n_responses=len(batch), response_tokens=float(mask.sum()),
            rollout_s=t1 - t0, update_s=t2 - t1,
        )
        s = self._sum(dict(sums))
        n_updates = a.epochs * a.minibatches
        world = self.acc.num_processes
        metrics = {
            "train/reward_mean": s["reward_sum"] / s["n_responses"],
            "train/response_length": s["response_tokens"] / s["n_responses"],
            "train/entropy": s["entropy_sum"] / max(1.0, s["tokens"]),
            "train/loss": s["loss"] / n_updates,
            "train/pg_loss": s["pg_loss"] / n_updates,
            "train/div_loss": s["div_loss"] / n_updates,
            "train/divergence": s["divergence"] / n_updates,
            "train/clip_frac": s["clipped"] / max(1.0, s["tokens"]),
            "train/lr": self.scheduler.get_last_lr()[0],
            "time/rollout_s": s["rollout_s"] / world,
            "time/update_s": s["update_s"] / world,
        }
        return metrics

    def _update(self, batch, rows, advantages, old_logp, ref_logp, sums) -> None:
        """One optimizer step on the rollout rows `rows` (micro-batched, exact aggregation)."""
        a, div_cfg = self.cfg.algorithm, self.cfg.divergence
        mb = batch.select(rows)
        mask = mb.response_mask.float()
        # The aggregation's denominator over the whole minibatch and all ranks, so that the sum of
        # micro-batch losses equals the full-batch loss (DDP then averages gradients over ranks).
        denom = self._sum({"d": algos.agg_denominator(mask, a.loss_agg)})["d"] / self.acc.num_processes
        micro = self._micro(len(mb))
        for i, s in enumerate(micro):
            part = mb.select(s)
            pmask = part.response_mask.float()
            idx = rows[s]
            with self.acc.no_sync(self.policy) if i < len(micro) - 1 else _nullcontext():
                logp, entropy = token_logprobs(self.policy, part, self.cfg.generation.temperature)
                old = logp.detach() if old_logp is None else old_logp[idx]
                pg_tok, pg_stats = algos.ppo_clip_loss(
                    logp, old, advantages[idx], pmask, clip_low=a.clip_low, clip_high=a.clip_high
                )
                pg = algos.agg_numerator(pg_tok, pmask, a.loss_agg, horizon=self.cfg.generation.max_new_tokens) / denom
                loss = pg
                if ref_logp is not None:
                    surrogate, value = divergences.token_divergence(
                        self.divergence, logp, ref_logp[idx], source="rollouts", estimator=div_cfg.get("estimator")
                    )
                    horizon = self.cfg.generation.max_new_tokens
                    div = algos.agg_numerator(surrogate * pmask, pmask, a.loss_agg, horizon=horizon) / denom
                    loss = loss + div_cfg.weight * div
                    sums["div_loss"] += float(div.detach())
                    sums["divergence"] += float(algos.agg_numerator(value * pmask, pmask, a.loss_agg, horizon=horizon) / denom)
                self.acc.backward(loss)
            n_tok = float(pmask.sum())
            sums["loss"] += float(loss.detach())
            sums["pg_loss"] += float(pg.detach())
            sums["entropy_sum"] += float((entropy * pmask).sum())
            sums["tokens"] += n_tok
            sums["clipped"] += float(pg_stats["clip_frac"]) * n_tok
        if self.cfg.optimizer.max_grad_norm is not None:
            self.acc.clip_grad_norm_(self.policy.parameters(), self.cfg.optimizer.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        n, ks = cfg.eval.n, ks_up_to(cfg.eval.n)
        metrics: dict[str, float] = {}
        for es in self.eval_sets:
            problems = es.task.problems(es.split)
            if cfg.eval.max_prompts is not None:
                problems = problems[: cfg.eval.max_prompts]
            mine = self._shard(problems)
            local: list[tuple[int, int]] = []  # per prompt: (correct count, distinct correct answers)
            sums = {"entropy_sum": 0.0, "tokens": 0.0, "reward_sum": 0.0, "responses": 0.0}
            if mine:
                batch = self._sample(mine, n)
                _, entropy = self._forward_no_grad(self.policy, batch)
                sums["entropy_sum"] = float(entropy.sum())
                sums["tokens"] = float(batch.response_mask.sum())
                for i, problem in enumerate(mine):
                    scores = [es.task.score(problem, t) for t in batch.texts[i * n : (i + 1) * n]]
                    correct = {s.answer for s in scores if s.reward > 0}
                    c = sum(s.reward > 0 for s in scores)
                    local.append((c, len(correct)))
                    sums["reward_sum"] += sum(s.reward for s in scores)
                    sums["responses"] += n
            counts = self._gather(local)
            s = self._sum(sums)
            prefix = f"eval/{es.label}"
            for k, v in pass_at_k_mean([c for c, _ in counts], n, ks).items():
                metrics[f"{prefix}/pass@{k}"] = v
            metrics[f"{prefix}/reward_mean"] = s["reward_sum"] / max(1.0, s["responses"])
            metrics[f"{prefix}/entropy"] = s["entropy_sum"] / max(1.0, s["tokens"])
            metrics[f"{prefix}/distinct_correct"] = sum(d for _, d in counts) / max(1, len(counts))
            if self.acc.is_main_process:
                self.logger.log_passk(es.label, ks, [metrics[f"{prefix}/pass@{k}"] for k in ks], self.step)
        return metrics

    def _gather(self, items: list) -> list:
        if self.acc.num_processes == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    # ------------------------------------------------------------------ loop
    def _log(self, metrics: dict[str, float], step: int) -> None:
        self.history.update(metrics)
        if self.acc.is_main_process:
            self.logger.log(metrics, step)

    def _eval_and_report(self, step: int) -> None:
        t = time.perf_counter()
        metrics = self.evaluate()
        metrics["time/eval_s"] = time.perf_counter() - t
        self._log(metrics, step)
        if self.reporter is not None:
            self.reporter.report(step, self.history)

    def fit(self) -> dict[str, float]:
        """Evaluate the initial policy, train `trainer.steps` steps with periodic evaluation, evaluate
        at the end; returns the last value of every metric."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.step = 0
        self._eval_and_report(0)
        every = cfg.eval.every
        bar = tqdm(range(1, cfg.trainer.steps + 1), desc="training", unit="step", disable=not self.acc.is_main_process)
        for step in bar:
            self.step = step
            metrics = self.train_step(step)
            self._log(metrics, step)
            bar.set_postfix(reward=f"{metrics['train/reward_mean']:.3f}", entropy=f"{metrics['train/entropy']:.3f}")
            if (every and step % every == 0) or step == cfg.trainer.steps:
                self._eval_and_report(step)
        return dict(self.history)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _repeat(items: list, n: int) -> list:
    return [x for x in items for _ in range(n)]


def _unique_tasks(tasks: list[Task]) -> list[Task]:
    seen: dict[str, Task] = {}
    for t in tasks:
        seen.setdefault(t.name, t)
    return list(seen.values())


def _div_params(div_cfg: DictConfig) -> dict[str, Any]:
    """Constructor parameters of a divergence: its config minus the keys the trainer itself uses."""
    params = OmegaConf.to_container(div_cfg, resolve=True)
    for key in ("name", "weight", "source", "estimator", "rehearsal_batch_size"):
        params.pop(key, None)
    return params
