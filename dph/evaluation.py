"""Evaluation of a policy on held-out splits: Pass@k, entropy, distinct answers and forgetting.

For each split, `eval.n` samples per prompt (the first `eval.max_prompts` prompts) are drawn by the
rollout engine and scored by the split's verifier. Logged under `eval/<split>/`:

- `pass@k` for k = 1, 2, 4, ..., n: the unbiased estimator 1 - C(n - c, k) / C(n, k) per prompt,
  averaged over prompts; `reward_mean` (= pass@1), `entropy` (mean per-token entropy of the policy
  on its samples), `distinct_correct` (distinct correct answers per prompt), `truncated_frac`
  (samples cut at generation.max_new_tokens, scored as unfinished: dph.scoring);
- against the step-0 evaluation of the initial policy (dph.metrics.forgetting): `forgotten`,
  `newly_solved` and `solution_coverage`.

Each evaluation also gives the per-prompt results (correct count and distinct correct answers,
written to `eval_prompts.jsonl` for statistics over prompts) and a bounded table of sampled
completions (`eval.sample_rows` per split: prompt, response, reward, verifier status, answer, finished).

The samples of a split are seeded by (seed, split, rank) only, the same at every evaluation, so
that evaluations differ by the policy alone and are reproducible after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dph.distributed import Ranks
from dph.metrics import forgetting, ks_up_to, pass_at_k_mean
from dph.rollout import logprobs_no_grad
from dph.scoring import finished_flags, score_responses
from dph.seeding import stage_seed
from dph.tasks import Task


@dataclass(frozen=True)
class EvalSet:
    """One evaluation split: metrics are logged under `eval/<label>/...`."""

    label: str
    task: Task
    split: str


@dataclass(frozen=True)
class PromptResult:
    """One prompt's evaluation: correct samples out of n, and its distinct correct answers (sorted)."""

    id: str
    correct: int
    answers: tuple[str, ...]


@dataclass
class Evaluation:
    """What one evaluation produced (on every rank)."""

    step: int
    metrics: dict[str, float]
    results: dict[str, list[PromptResult]]  # split label -> per-prompt results
    samples: list[dict[str, Any]] = field(default_factory=list)  # rows of the samples table


@dataclass
class Evaluator:
    """Evaluates a policy through a rollout engine on `eval_sets` (see the module docstring)."""

    eval_sets: Sequence[EvalSet]
    encode: Callable[[Sequence[str]], list[list[int]]]  # prompts -> token ids (dph.builders.PromptEncoder)
    ranks: Ranks
    n: int
    max_prompts: int | None
    sample_rows: int
    temperature: float
    top_p: float
    max_new_tokens: int
    micro_batch_size: int
    seed: int

    @property
    def ks(self) -> list[int]:
        return ks_up_to(self.n)

    @torch.no_grad()
    def run(self, engine, policy, step: int,
            initial: Mapping[str, Sequence[PromptResult]] | None = None) -> Evaluation:
        """Evaluate `policy` (sampled through `engine`, scored with `policy` for the entropy) at `step`;
        `initial`: the step-0 results, for the forgetting metrics (None: this is step 0)."""
        out = Evaluation(step, {}, {})
        for es in self.eval_sets:
            metrics, results, samples = self._split(es, engine, policy)
            base = results if initial is None else initial[es.label]
            metrics |= forgetting(_by_id(base), _by_id(results))
            out.metrics |= {f"eval/{es.label}/{k}": v for k, v in metrics.items()}
            out.results[es.label] = results
            out.samples += [{"split": es.label, **row} for row in samples]
        return out

    def _split(self, es: EvalSet, engine, policy) -> tuple[dict[str, float], list[PromptResult], list[dict]]:
        n = self.n
        problems = es.task.problems(es.split)[: self.max_prompts]
        mine = self.ranks.shard(problems)
        local: list[PromptResult] = []
        rows: list[dict[str, Any]] = []
        sums = {"entropy_sum": 0.0, "tokens": 0.0, "truncated": 0.0}
        if mine:
            batch = engine.generate(self.encode([p.prompt for p in mine]), n=n, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                    top_p=self.top_p, seed=stage_seed(self.seed, "eval", es.label, self.ranks.index))
            _, entropy = logprobs_no_grad(policy, batch, self.temperature, n, self.micro_batch_size)
            all_scores = score_responses(es.task, mine, batch)
            finished = finished_flags(batch)
            sums = {"entropy_sum": float(entropy.sum()), "tokens": float(batch.response_mask.sum()),
                    "truncated": float(sum(not done for done in finished))}
            for i, problem in enumerate(mine):
                texts, scores = batch.texts[i * n : (i + 1) * n], all_scores[i * n : (i + 1) * n]
                solved = [s.status == "correct" for s in scores]
                answers = sorted({s.answer for s, ok in zip(scores, solved) if ok and s.answer is not None})
                local.append(PromptResult(problem.id, sum(solved), tuple(answers)))
                if len(rows) < self.sample_rows:
                    s = scores[0]
                    rows.append({"prompt_id": problem.id, "prompt": problem.prompt, "response": texts[0],
                                 "reward": s.reward, "status": s.status, "answer": s.answer,
                                 "finished": finished[i * n]})
        results = self.ranks.gather(local)
        samples = self.ranks.gather(rows)[: self.sample_rows]
        s = self.ranks.sum(sums)
        counts = [r.correct for r in results]
        metrics = {f"pass@{k}": v for k, v in pass_at_k_mean(counts, n, self.ks).items()}
        metrics["reward_mean"] = sum(counts) / (n * len(counts))
        metrics["entropy"] = s["entropy_sum"] / max(1.0, s["tokens"])
        metrics["distinct_correct"] = sum(len(r.answers) for r in results) / len(results)
        metrics["truncated_frac"] = s["truncated"] / (n * len(counts))
        return metrics, results, samples


def _by_id(results: Sequence[PromptResult]) -> dict[str, tuple[int, tuple[str, ...]]]:
    return {r.id: (r.correct, r.answers) for r in results}
