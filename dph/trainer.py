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

Who does what: dph.experience (steps 1-3: sample, score, shape, advantages), dph.learner and
dph.losses (steps 4-5 and 7), dph.reference (step 6 and DPH's rehearsal data), dph.controllers
(the adaptive entropy coefficient), dph.evaluation, dph.checkpoint. This module only runs them.

Evaluation (dph.evaluation; step 0, every `eval.every` steps and at the end): `eval.n` samples per
prompt, the unbiased pass@k for k = 1, 2, 4, ..., n, mean reward, entropy, distinct correct answers
and forgetting against step 0.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dph import builders, checkpoint, eval_cache
from dph.accumulator import MetricAccumulator
from dph.advantages import get_advantage
from dph.controllers import EntropyCoefController
from dph.distributed import Ranks
from dph.evaluation import EvalSet, PromptResult
from dph.experience import ExperienceMaker, PromptStream
from dph.learner import STEP_METRICS, Learner
from dph.losses import Objective
from dph.models import model_fingerprint, prepare_for_training, uses_lora
from dph.reference import ReferencePolicy, Rehearsal
from dph.rollout import SequenceBatch

log = logging.getLogger(__name__)

__all__ = ["EvalSet", "Trainer"]


class Trainer:
    """Builds the run's parts once, then `fit` trains and evaluates (see the module docstring)."""

    def __init__(self, cfg: DictConfig, task, eval_sets: list[EvalSet], run_dir: Path, logger,
                 reporter=None, resume_from: Path | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.task, self.eval_sets, self.run_dir = cfg, task, eval_sets, run_dir
        self.logger, self.reporter = logger, reporter
        self.acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.precision)
        self.ranks = Ranks(self.acc)
        log.info("Training on %s with %d process(es)", self.acc.device, self.acc.num_processes)
        policy = self._build_policy_and_engine()
        try:
            self.reference, self.rehearsal, train_problems = self._build_reference_side(policy)
        except BaseException:
            self.engine.close()  # a run stopped here (e.g. nothing to rehearse) leaves no engine behind
            raise
        a = cfg.algorithm
        self.learner = Learner(self.acc, policy, cfg.optimizer, Objective.from_config(cfg, self.ranks), seed=cfg.seed,
                               total_updates=cfg.trainer.steps * a.epochs * a.minibatches, epochs=a.epochs,
                               minibatches=a.minibatches, micro_batch_size=cfg.trainer.micro_batch_size,
                               max_grad_norm=cfg.optimizer.max_grad_norm)
        self.prompts = PromptStream(train_problems, cfg.seed)
        self.experience = self._experience_maker()
        self.evaluator = builders.build_evaluator(cfg, eval_sets, self.tokenizer, self.ranks)
        self.entropy_coef = EntropyCoefController(a.entropy_coef, a.entropy_target, a.entropy_coef_lr,
                                                  a.entropy_coef_max)
        self.state = checkpoint.TrainState()
        self.checkpoints = checkpoint.Checkpointer(
            self.acc, run_dir, cfg.trainer.keep_checkpoints, checkpoint.run_config(cfg),
            [self.learner.scheduler, self.prompts, self.state, self.entropy_coef,
             *(self.reference.checkpoint_objects() if self.reference else [])],
            trainable_only=uses_lora(cfg.model))
        set_seed(cfg.seed + self.acc.process_index)  # after every build: the global generators start alike
        self._engine_stale = False
        if resume_from is not None:
            self.checkpoints.load(resume_from)
            self._engine_stale = True

    # ------------------------------------------------------------------ building
    def _build_policy_and_engine(self):
        cfg = self.cfg
        tasks = builders.run_tasks(self.task, self.eval_sets)
        with self.acc.main_process_first():  # rank 0 builds the tiny base model once; others then load it
            self.model_dir, policy, self.tokenizer = builders.load_initial_policy(cfg, tasks, self.acc.device)
        self.encode = builders.PromptEncoder(cfg, self.tokenizer)
        self.encode.check(self.task.problems("train")[0].prompt)
        policy = prepare_for_training(policy, cfg.model)
        self.engine = builders.build_rollout_engine(cfg, policy, self.tokenizer, self.model_dir, tasks,
                                                    sharded=builders.check_sharding(self.acc, cfg))
        return policy

    def _build_reference_side(self, policy):
        """The divergence's reference: a model for a divergence on rollouts, DPH's pre-sampled
        rehearsal data (and D_exp as the RL prompts) for one on the initial policy's samples."""
        div, train_problems = self.cfg.divergence, self.task.problems("train")
        if div.name == "none":
            return None, None, train_problems
        if div.source == "rollouts":
            return ReferencePolicy(policy, lora=uses_lora(self.cfg.model),
                                   reset_every=div.get("reference_reset_every", 0)), None, train_problems
        with self.acc.main_process_first():
            rehearsal = Rehearsal.load_or_build(self.engine, policy, self.encode, self.task,
                                                model_fingerprint(self.model_dir), self.cfg)
        return None, rehearsal, rehearsal.exploration_problems(self.task)

    def _experience_maker(self) -> ExperienceMaker:
        cfg, div = self.cfg, self.cfg.divergence
        return ExperienceMaker(
            self.task, self.sample, self.learner.policy, get_advantage(cfg.algorithm.advantage), cfg.algorithm,
            cfg.generation.temperature, cfg.generation.max_new_tokens, cfg.trainer.micro_batch_size, cfg.seed,
            self.ranks.index, self.acc.device, self.reference, self.rehearsal,
            self.ranks.share(div.rehearsal_batch_size) if self.rehearsal is not None else 0,
            div.weight if div.get("loss_form") == "k1_reward" else None)

    # ------------------------------------------------------------------ the algorithm
    def synced_engine(self):
        """The rollout engine, with the policy's current weights."""
        if self._engine_stale:
            self.engine.update_weights(self.learner.unwrapped_policy)
            self._engine_stale = False
        return self.engine

    def sample(self, problems, n: int, seed: int) -> SequenceBatch:
        """`n` responses per problem from the policy's current weights."""
        g = self.cfg.generation
        return self.synced_engine().generate(self.encode([p.prompt for p in problems]), n=n, max_new_tokens=g.max_new_tokens,
                                    temperature=g.temperature, top_p=g.top_p, seed=seed)

    def train_step(self, step: int) -> dict[str, float]:
        """One RL step: experience (sample, score, advantages), update, the step's metrics, controllers."""
        t0 = time.perf_counter()
        exp = self.experience.make(self.ranks.shard(self.prompts.next(self.cfg.trainer.prompts_per_step)), step)
        t1 = time.perf_counter()
        metrics = self._metric_accumulator(exp)
        metrics.merge(exp.metrics)
        self.engine.release_memory()
        self.learner.update(exp, step, metrics, entropy_coef=self.entropy_coef.value,
                            entropy_bonus=self.entropy_coef.active)
        self._engine_stale = True
        metrics.merge({"time/rollout_s": (t1 - t0, 1.0), "time/update_s": (time.perf_counter() - t1, 1.0)})
        out = self._step_metrics(metrics.reduce(self.ranks), exp)
        self.entropy_coef.update(out["train/entropy"])
        self._reset_reference(step)
        return out

    def _reset_reference(self, step: int) -> None:
        """ProRL: every divergence.reference_reset_every steps the reference becomes the current policy
        and the optimizer state starts over."""
        if self.reference is not None and self.reference.reset_due(step):
            self.reference.reset(self.learner.unwrapped_policy)
            self.learner.reset_optimizer_state()
            self.state.extra["reference_reset_step"] = step
            log.info("Step %d: the reference is now the current policy; optimizer state reset", step)

    def _metric_accumulator(self, exp) -> MetricAccumulator:
        """The step's metrics, the same names on every rank: those of every step, DPH's rehearsal
        ones, and an engine's log-prob gap when it reports log-probs."""
        names = [*STEP_METRICS, "time/rollout_s", "time/update_s"]
        if self.rehearsal is not None:
            names.append("train/rehearsal_logprob")
        with_engine = exp.batch.logprobs is not None
        if with_engine:
            names.append("train/engine_logprob_diff")
        return MetricAccumulator(names, maxima=["train/engine_logprob_diff_max"] if with_engine else [])

    def _step_metrics(self, metrics: dict[str, float], exp) -> dict[str, float]:
        metrics["train/lr"] = self.learner.lr
        if self.rehearsal is not None:
            metrics["train/div_value"] = metrics["train/divergence"]
        if self.acc.device.type == "cuda":  # this rank's peak during the step (rollouts and update)
            metrics["time/gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.acc.device)
        return metrics

    # ------------------------------------------------------------------ evaluation and the loop
    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate the current policy (dph.evaluation) and log it; step 0's per-prompt results are
        kept (in the checkpoints too) as the baseline of the forgetting metrics."""
        t = time.perf_counter()
        initial = {label: [PromptResult(i, c, tuple(a)) for i, c, a in rows]
                   for label, rows in self.state.initial_results.items()} or None
        run = lambda: self.evaluator.run(self.synced_engine(), self.learner.policy, step, initial)  # noqa: E731
        if initial is None and self.cfg.eval.cache_initial and self.ranks.count == 1:  # the initial policy's
            spec = eval_cache.eval_spec(self.cfg, model_fingerprint(self.model_dir), self.encode.spec(), self.eval_sets, 1)
            result = eval_cache.load_or_run(spec, self.cfg.paths.cache_dir, run)
        else:
            result = run()
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

    def _log(self, metrics: dict[str, float], step: int) -> None:
        self.state.history.update(metrics)
        if self.acc.is_main_process:
            self.logger.log(metrics, step)

    def fit(self) -> dict[str, float]:
        """Evaluate the initial policy, train `trainer.steps` steps with periodic evaluation, evaluate
        at the end, checkpointing every `trainer.checkpoint_every` steps and at the end; a resumed
        run continues after its checkpoint's step. Returns the last value of every metric."""
        from tqdm.auto import tqdm

        t, every = self.cfg.trainer, self.cfg.eval.every
        if self.state.step == 0:
            split = {k: v for k, v in self.split_metrics().items() if not isinstance(v, dict)}
            if split:
                self._log(split, 0)
            self.evaluate(0)
        bar = tqdm(range(self.state.step + 1, t.steps + 1), desc="training", unit="step",
                   disable=not self.acc.is_main_process)
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

    def split_metrics(self) -> dict[str, Any]:
        """DPH's D_exp / D_pef sizes and pass-rate histogram (empty without a rehearsal)."""
        return self.rehearsal.split_metrics() if self.rehearsal is not None else {}

    def save_checkpoint(self, step: int) -> None:
        t = time.perf_counter()
        path = self.checkpoints.save(step)
        if self.acc.is_main_process:
            self.logger.flush()  # rows up to this checkpoint are final: a resume never repeats them
            log.info("Checkpoint %s (%.2f s)", path, time.perf_counter() - t)

    def save_policy(self) -> Path:
        """The trained policy as `<run_dir>/model/` (save_pretrained: weights and tokenizer)."""
        return checkpoint.save_policy(self.acc, self.learner.policy, self.tokenizer,
                                      self.run_dir / checkpoint.MODEL_DIR)

    def close(self) -> None:
        self.engine.close()
