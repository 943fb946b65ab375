"""Confidence intervals for comparing methods over seeds and prompts (pure math, numpy only).

Two intervals, both at 95% by default:

- `t_interval(values)`: mean over seeds +- t_{0.975, n-1} s / sqrt(n), for metrics known only per run
  (entropy, train curves);
- `bootstrap_means` / `bootstrap_difference`: a two-level bootstrap for metrics that are averages
  over evaluation prompts (Pass@k, distinct correct answers, forgetting). Each replicate resamples the
  seeds of each method (with replacement) and, once for all methods, the prompts (every run is scored
  on the same prompts, so a prompt resample is shared: the comparison is paired over prompts); the
  percentile interval of the replicates is reported. It reflects both sources of noise: which seeds
  were run and which prompts happen to be in the evaluation set.

A per-prompt metric is given as two arrays per run, `num[run, prompt]` and `den[run, prompt]`, and its
value is sum(num * w) / sum(den * w) over prompts with bootstrap weights w (den = 1: a mean over
prompts, e.g. pass@k; den = an indicator: a ratio, e.g. forgotten = lost / initially solved).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# t_{0.975, df} for df = 1..30 (two-sided 95%); larger df use the normal quantile 1.96 with a small correction
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (table; Cornish-Fisher above 30)."""
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean over seeds (NaN bounds with one value)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) == 1:
        return mean, math.nan, math.nan
    half = t_quantile_975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def _replicates(groups: Sequence[tuple[np.ndarray, np.ndarray]], draws: int, seed: int) -> np.ndarray:
    """[draws, len(groups)] bootstrap replicates of each group's value: per draw, one prompt resample
    (multiplicities w [prompts]) shared by all groups, and a seed resample within each group."""
    rng = np.random.default_rng(seed)
    prompts = groups[0][0].shape[1]
    weights = rng.multinomial(prompts, np.full(prompts, 1 / prompts), size=draws)[:, None, :]  # [draws, 1, P]
    out = np.empty((draws, len(groups)))
    for g, (num, den) in enumerate(groups):
        runs = rng.integers(0, num.shape[0], (draws, num.shape[0]))  # [draws, R]
        n, d = (num[runs] * weights).sum(axis=(1, 2)), (den[runs] * weights).sum(axis=(1, 2))
        out[:, g] = np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)
    return out


def per_prompt_value(num: np.ndarray, den: np.ndarray) -> float:
    """The metric on all runs and prompts as observed (no resampling): sum(num) / sum(den)."""
    total = float(np.sum(den))
    return float(np.sum(num)) / total if total > 0 else math.nan


def bootstrap_means(groups: Sequence[tuple[np.ndarray, np.ndarray]], draws: int = 2000, seed: int = 0,
                    level: float = 0.95) -> list[tuple[float, float, float]]:
    """(value, low, high) per group: the observed value and its percentile bootstrap interval.

    groups[g] = (num [runs_g, prompts], den [runs_g, prompts]); every group has the same prompts.
    """
    groups = [(np.asarray(n, float), np.asarray(d, float)) for n, d in groups]
    _check(groups)
    reps = _replicates(groups, draws, seed)
    alpha = (1 - level) / 2
    return [(per_prompt_value(n, d), *_percentiles(reps[:, g], alpha)) for g, (n, d) in enumerate(groups)]


def bootstrap_difference(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], draws: int = 2000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(value, low, high) of metric(a) - metric(b): seeds resampled within each, prompts shared."""
    groups = [(np.asarray(n, float), np.asarray(d, float)) for n, d in (a, b)]
    _check(groups)
    reps = _replicates(groups, draws, seed)
    diff = reps[:, 0] - reps[:, 1]
    value = per_prompt_value(*groups[0]) - per_prompt_value(*groups[1])
    return (value, *_percentiles(diff, (1 - level) / 2))


def _percentiles(values: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return math.nan, math.nan
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return float(low), float(high)


def _check(groups: list[tuple[np.ndarray, np.ndarray]]) -> None:
    prompts = {n.shape[1] for n, _ in groups} | {d.shape[1] for _, d in groups}
    if len(prompts) != 1 or any(n.shape != d.shape or n.shape[0] == 0 for n, d in groups):
        raise ValueError("every group needs [runs, prompts] arrays of one prompt count, num and den alike, "
                         "and at least one run")


def excludes_zero(low: float, high: float) -> bool:
    """Whether an interval lies entirely on one side of 0."""
    return math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0)
