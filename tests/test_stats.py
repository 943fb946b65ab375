"""dph.stats: t-intervals against textbook values; the two-level bootstrap on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dph.stats import (bootstrap_difference, bootstrap_means, excludes_zero, per_prompt_value, t_interval,
                       t_quantile_975)


def test_t_interval_by_hand():
    mean, low, high = t_interval([1, 2, 3, 4, 5])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((3, 3 - half, 3 + half))
    assert t_interval([0.4])[0] == 0.4 and math.isnan(t_interval([0.4])[1])
    assert math.isnan(t_interval([])[0])
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert 2.0 < t_quantile_975(40) < 2.03 and t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)


def test_per_prompt_value_is_a_mean_or_a_ratio():
    num = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert per_prompt_value(num, np.ones_like(num)) == pytest.approx(4 / 6)
    den = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # e.g. forgotten: lost / initially solved
    assert per_prompt_value(num * den, den) == pytest.approx(3 / 4)


def test_a_constant_metric_has_a_zero_width_interval_and_identical_groups_no_difference():
    num = np.full((4, 10), 0.3)
    (value, low, high), = bootstrap_means([(num, np.ones_like(num))], draws=200)
    assert value == low == high == pytest.approx(0.3)
    rng = np.random.default_rng(0)
    runs = rng.random((5, 30))
    value, low, high = bootstrap_difference((runs, np.ones_like(runs)), (runs, np.ones_like(runs)), draws=300)
    assert value == 0 and low <= 0 <= high and not excludes_zero(low, high)


def test_bootstrap_intervals_cover_the_truth_about_95_percent_of_the_time():
    """Runs = a seed effect (normal, sd 0.05) + prompt difficulties (uniform) + per-sample noise: the
    interval for the mean over seeds and prompts covers the true mean in about 95% of repetitions."""
    rng = np.random.default_rng(1)
    covered, trials = 0, 120
    for t in range(trials):
        seeds, prompts = 6, 40
        difficulty = rng.random(prompts)  # prompts are drawn too: the truth is the population mean 0.5
        runs = np.clip(difficulty[None, :] + rng.normal(0, 0.05, (seeds, 1)) + rng.normal(0, 0.1, (seeds, prompts)),
                       0, 1)
        (_, low, high), = bootstrap_means([(runs, np.ones_like(runs))], draws=400, seed=t)
        covered += low <= 0.5 <= high
    assert 0.85 <= covered / trials <= 1.0


def test_a_real_difference_is_found_and_marked():
    rng = np.random.default_rng(2)
    base = rng.random((5, 50))
    better = np.clip(base + 0.15, 0, 1)
    value, low, high = bootstrap_difference((better, np.ones_like(better)), (base, np.ones_like(base)), draws=500)
    assert low > 0 and excludes_zero(low, high) and value == pytest.approx(float((better - base).mean()))
    with pytest.raises(ValueError, match="prompt count"):
        bootstrap_means([(base, np.ones_like(base)), (base[:, :10], np.ones((5, 10)))])


def test_the_comparison_figure_gives_each_method_its_own_colour():
    from dph.compare import _colours

    for n in (1, 5, 10, 12, 20):  # tab10's cycle repeats after 10: the 12-method baselines grid needs more
        assert len(set(_colours(n))) == n
