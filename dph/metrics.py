"""Evaluation metrics (pass@k, entropy, distinct correct answers) and the one list of metric names.

Every metric a run logs is named in METRICS (train and timing names literally, eval names as
templates over the split and k); `describe_metric` fails loudly on a name that is not there.
"""

from __future__ import annotations

import math
import re
from typing import Collection, Hashable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from dph.tasks.base import STATUSES

METRICS: dict[str, str] = {
    # one RL step (means over the step's valid tokens / sequences unless said otherwise)
    "train/step": "the RL step the record belongs to (the x axis of every curve)",
    "train/reward_mean": "mean verifier reward of the step's rollouts",
    "train/entropy": "mean per-token entropy of the policy on the rollouts' response tokens",
    "train/divergence": "the configured D_f(pi_ref, pi): estimator value aggregated by loss_agg",
    "train/loss": "total loss of the step: pg_loss + divergence.weight x div_loss (minimised)",
    "train/pg_loss": "PPO clipped policy-gradient loss, aggregated by algorithm.loss_agg",
    "train/div_loss": "the divergence term's surrogate aggregated by loss_agg, before the weight",
    "train/div_value": "estimate of D_f on the rehearsal batch (DPH, divergence.source=reference)",
    "train/rehearsal_logprob": "mean per-token log-prob of the pre-sampled responses under pi",
    "train/clip_frac": "fraction of valid tokens where the PPO clipped branch is taken",
    "train/ratio_mean": "mean importance ratio pi / pi_old over valid tokens",
    "train/approx_kl": "KL(pi_old || pi) per token (k3): how far the update moved the policy",
    "train/zero_std_frac": "fraction of prompt groups whose rewards are all equal (zero advantage)",
    # policy-loss, advantage and entropy variants (dph.policy_losses, dph.advantages)
    "train/cov_clip_frac": "fraction of valid tokens whose gradient Clip-Cov removed, or that KL-Cov "
                           "penalised with |log pi/pi_old| (their highest advantage-logp covariance)",
    "train/adv_mean_correct": "mean advantage of the step's correct rollouts (reward > 0; 0 if none)",
    "train/adv_mean_wrong": "mean advantage of the step's wrong rollouts (reward <= 0; 0 if none)",
    "train/updated_token_entropy": "mean entropy of the tokens kept by the high-entropy token selection",
    "train/updated_token_frac": "fraction of valid tokens kept by the high-entropy token selection",
    "train/entropy_coef": "coefficient of the entropy bonus (fixed, or the adaptive one's current value)",
    "train/response_length": "mean response length in tokens",
    "train/truncated_frac": "fraction of the step's rollouts cut at generation.max_new_tokens (finish reason length)",
    "train/lr": "learning rate of the step",
    "train/engine_logprob_diff": "mean |engine - trainer| log-prob of the rollouts' tokens (an engine that reports "
                                 "its own log-probs, e.g. vllm): how far the engine's numerics are from the trainer's",
    "train/engine_logprob_diff_max": "max |engine - trainer| log-prob over the step's rollout tokens",
    "train/status/<status>": "fraction of the step's rollouts the verifier judged <status>: correct, wrong, "
                             "invalid (unparseable, rule broken, too long) or timeout (verifier time limit)",
    "presample/d_pef": "training prompts in D_pef (pass rate >= presample.threshold; rehearsed)",
    "presample/d_exp": "training prompts in D_exp (the rest; trained on with RL)",
    "presample/d_pef_fraction": "fraction of the training prompts in D_pef",
    "presample/reference_samples": "pre-sampled correct D_pef responses stored for the rehearsal",
    "time/rollout_s": "seconds spent sampling the step's rollouts",
    "time/update_s": "seconds spent on the step's forward/backward passes and optimizer steps",
    "time/eval_s": "seconds spent on one evaluation of all splits",
    "time/gpu_peak_memory_gib": "peak GPU memory allocated by torch during the step (rank 0; CUDA runs only)",
    # evaluation on a split ("<split>" of the task or "<task>/<split>"), eval.n samples per prompt
    "eval/<split>/pass@<k>": "unbiased pass@k averaged over prompts, k in ks_up_to(eval.n)",
    "eval/<split>/entropy": "mean per-token entropy of the policy on the sampled responses",
    "eval/<split>/reward_mean": "mean reward over all samples (equals pass@1)",
    "eval/<split>/distinct_correct": "distinct correct answers per prompt, averaged over prompts",
    "eval/<split>/truncated_frac": "fraction of the samples cut at generation.max_new_tokens (finish reason length)",
    # forgetting, against the initial policy's evaluation at step 0 (same prompts, same eval.n; see forgetting())
    "eval/<split>/forgotten": "fraction of the prompts the initial policy solved (at least one correct sample "
                              "at step 0) that the current policy solves in none of its eval.n samples",
    "eval/<split>/newly_solved": "fraction of the prompts the initial policy did not solve that the current "
                                 "policy solves (at least one correct sample)",
    "eval/<split>/solution_coverage": "per prompt, the fraction of the initial policy's distinct correct answers "
                                      "that the current policy still produces, averaged over prompts that had one",
}

_TEMPLATE_FIELDS = {"<split>": r"(?P<split>[^@]+)", "<k>": r"(?P<k>[1-9][0-9]*)",
                    "<status>": f"(?P<status>{'|'.join(STATUSES)})"}


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for field, group in _TEMPLATE_FIELDS.items():
        pattern = pattern.replace(re.escape(field), group)
    return re.compile(pattern + r"\Z")


_TEMPLATES = {name: _template_regex(name) for name in METRICS if "<" in name}


def describe_metric(name: str) -> str:
    """The description of a metric name (literal or matching a template); KeyError if unknown."""
    if name in METRICS:
        return METRICS[name]
    for template, regex in _TEMPLATES.items():
        if regex.match(name):
            return METRICS[template]
    raise KeyError(f"unknown metric {name!r}; known: {sorted(METRICS)}")


def ks_up_to(n: int) -> list[int]:
    """[1, 2, 4, ..., largest power of two <= n], plus n itself when n is not a power of two."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = [1 << i for i in range(n.bit_length())]
    return ks if ks[-1] == n else ks + [n]


EVAL_SCALARS = ("entropy", "reward_mean", "distinct_correct", "truncated_frac", "forgotten", "newly_solved",
                "solution_coverage")


def eval_metric_names(split: str, n: int) -> list[str]:
    """The exact eval metric names logged for `split` with eval.n = n samples per prompt."""
    names = [f"eval/{split}/pass@{k}" for k in ks_up_to(n)]
    return names + [f"eval/{split}/{m}" for m in EVAL_SCALARS]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k).

    Product form 1 - prod_{i = n-c+1}^{n} (1 - k / i) (Chen et al., 2021): no large binomials.
    """
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_mean(counts: Iterable[int], n: int, ks: Iterable[int]) -> dict[int, float]:
    """{k: pass@k averaged over prompts}, counts[i] = correct samples of prompt i out of n."""
    counts = list(counts)
    if not counts:
        raise ValueError("pass_at_k_mean needs at least one prompt")
    return {k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}


def entropy_from_logits(logits: Tensor, *, chunk_rows: int = 1024) -> Tensor:
    """Per-position entropy of softmax(logits) over the last dim: logits [..., V] -> [...].

    H = -sum p log p with log p = log_softmax(z), computed in float32 (at least) over chunks of
    chunk_rows positions so a big vocabulary needs only a chunk's worth of temporaries.
    Differentiable; -inf logits are allowed (zero probability).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = [entropy_from_log_probs(torch.log_softmax(chunk.to(dtype), dim=-1)) for chunk in flat.split(chunk_rows)]
    if not out:
        return torch.zeros(logits.shape[:-1], dtype=dtype, device=logits.device)
    return torch.cat(out).view(logits.shape[:-1])


def entropy_from_log_probs(log_p: Tensor) -> Tensor:
    """Entropy H = -sum p log p from log-probs over the last dim (a log_softmax): log_p [..., V] -> [...].

    -inf entries (zero probability) add 0, not NaN: log p is clamped to the dtype's lowest finite value.
    """
    return -(log_p.exp() * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(dim=-1)


def token_entropy(logits: Tensor, mask: Tensor, *, chunk_rows: int = 1024) -> Tensor:
    """Mean per-token entropy over valid tokens: logits [B, T, V], mask [B, T] -> 0-dim tensor.

    The temperature is the caller's (divide the logits first). An empty mask gives 0.
    """
    entropy = entropy_from_logits(logits, chunk_rows=chunk_rows)
    valid = mask.bool()
    total = torch.where(valid, entropy, torch.zeros_like(entropy)).sum()
    return total / valid.sum().clamp(min=1)


def distinct_correct(answers: Sequence[Hashable | None], rewards: Sequence[float]) -> int:
    """Number of distinct answers among the correct responses (reward > 0; None answers skipped)."""
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    return len({a for a, r in zip(answers, rewards) if r > 0 and a is not None})


def forgetting(initial: Mapping[str, tuple[int, Collection[Hashable]]],
               current: Mapping[str, tuple[int, Collection[Hashable]]]) -> dict[str, float]:
    """Forgetting against the initial policy, from per-prompt (correct samples, distinct correct answers).

    Over the prompts present in both:
      forgotten         = #{initial solved, current not} / #{initial solved}
      newly_solved      = #{initial not solved, current solved} / #{initial not solved}
      solution_coverage = mean over prompts with initial answers of |A_0 & A| / |A_0|
    "Solved" means at least one correct sample; an empty denominator gives 0 (coverage: 1).
    """
    ids = [i for i in initial if i in current]
    solved0 = [i for i in ids if initial[i][0] > 0]
    unsolved0 = [i for i in ids if initial[i][0] == 0]
    covered = [len(set(initial[i][1]) & set(current[i][1])) / len(set(initial[i][1]))
               for i in ids if initial[i][1]]
    return {
        "forgotten": sum(current[i][0] == 0 for i in solved0) / len(solved0) if solved0 else 0.0,
        "newly_solved": sum(current[i][0] > 0 for i in unsolved0) / len(unsolved0) if unsolved0 else 0.0,
        "solution_coverage": sum(covered) / len(covered) if covered else 1.0,
    }

