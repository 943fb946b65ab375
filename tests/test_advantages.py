"""Advantage estimators against hand-computed groups and, for Pass@k, brute force over k-subsets."""

import inspect
import itertools
import math

import pytest
import torch

from dph.advantages import (
    ADVANTAGES,
    advantage_params,
    get_advantage,
    group_advantages,
    register_advantage,
)
from dph.metrics import METRICS

DTYPE = torch.float64


def test_registry_names_errors_and_params():
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "passk", "unlikeliness"}
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    assert torch.equal(get_advantage("grpo")(rewards, 4)[0], group_advantages(rewards, 4)[0])  # GRPO's estimator
    with pytest.raises(KeyError, match="dr_grpo"):
        get_advantage("rloo")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda *a, **k: None)
    assert advantage_params("grpo") == {} and advantage_params("dr_grpo") == {}
    assert advantage_params("passk") == {"k": inspect.Parameter.empty}  # required
    assert advantage_params("unlikeliness") == {"unlikeliness_beta": 0.25}
    with pytest.raises(TypeError, match="k"):
        get_advantage("passk")(torch.ones(4), 4)
    for name, fn in ADVANTAGES.items():  # formula and paper on the docstring's first line
        first = fn.__doc__.splitlines()[0]
        assert "A" in first and "arXiv" in first, name


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_metric_keys_are_documented_and_nan_free(name):
    rewards = torch.zeros(8)  # no correct response at all: adv_mean_correct must be 0, not NaN
    params = {"k": 2} if name == "passk" else {}
    adv, metrics = get_advantage(name)(rewards, 4, seq_logprob=-torch.arange(8.0), **params)
    assert (adv == 0).all()
    assert set(metrics) == {"reward_mean", "zero_std_frac", "adv_mean_correct", "adv_mean_wrong"}
    for key, value in metrics.items():
        assert f"train/{key}" in METRICS and value.dim() == 0 and torch.isfinite(value)
    assert metrics["zero_std_frac"].item() == 1.0 and metrics["adv_mean_correct"].item() == 0.0


def test_grpo_and_dr_grpo_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, m = get_advantage("grpo")(rewards, 4, eps=0.0)
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased std of [1, 0, 0, 0]
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / std
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(adv, group_advantages(rewards, 4, eps=0.0)[0])
    assert m["reward_mean"].item() == pytest.approx(5 / 8)
    assert m["zero_std_frac"].item() == pytest.approx(0.5)
    # correct: 0.75/std once and 0 four times; wrong: -0.25/std three times
    assert m["adv_mean_correct"].item() == pytest.approx(0.75 / std / 5)
    assert m["adv_mean_wrong"].item() == pytest.approx(-0.25 / std)

    adv, m = get_advantage("dr_grpo")(torch.tensor([0.1, 0.1, 0.1, 0.0, 0.5, 1.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([0, 0, 0, -0.5, 0.0, 0.5]))
    assert (adv[:3] == 0).all() and m["zero_std_frac"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------- passk


def brute_force_passk(rewards: list[float], k: int) -> list[float]:
    """Every k-subset's reward is the max of its rewards, normalised by the mean and (population)
    std over all k-subsets; a response's advantage is the mean over the subsets containing it."""
    n = len(rewards)
    subsets = list(itertools.combinations(range(n), k))
    subset_reward = [max(rewards[i] for i in s) for s in subsets]
    mean = sum(subset_reward) / len(subsets)
    std = math.sqrt(sum((r - mean) ** 2 for r in subset_reward) / len(subsets))
    if std == 0:
        return [0.0] * n
    adv = []
    for i in range(n):
        holding = [(r - mean) / std for s, r in zip(subsets, subset_reward) if i in s]
        adv.append(sum(holding) / len(holding))
    return adv


@pytest.mark.parametrize("n,k", [(1, 1), (4, 1), (4, 2), (5, 3), (6, 2), (6, 6), (8, 4), (8, 1)])
def test_passk_equals_brute_force_over_k_subsets(n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    groups = []
    for c in range(n + 1):  # every number of correct responses, in a random order
        group = [1.0] * c + [0.0] * (n - c)
        groups += [group[i] for i in torch.randperm(n, generator=g).tolist()]
    rewards = torch.tensor(groups, dtype=DTYPE)
    adv, m = get_advantage("passk")(rewards, n, k=k, eps=0.0)
    expected = [a for i in range(0, len(groups), n) for a in brute_force_passk(groups[i:i + n], k)]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=DTYPE), rtol=1e-12, atol=1e-12)
    # no signal: all wrong, or fewer than k wrong (every subset passes)
    no_signal = sum(1 for c in range(n + 1) if c == 0 or n - c < k)
    assert m["zero_std_frac"].item() == pytest.approx(no_signal / (n + 1))


def test_passk_by_hand():
    # N = 4, k = 2, one correct: R = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2,
    # A+ = (1 - 1/2) / (1/2) = 1, A- = (1 - 1/2 - C(2,1)/C(3,1)) / (1/2) = -1/3
    adv, _ = get_advantage("passk")(torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=DTYPE), 4, k=2, eps=0)
    torch.testing.assert_close(adv, torch.tensor([-1 / 3, 1.0, -1 / 3, -1 / 3], dtype=DTYPE))
    # three correct out of 4, k = 2: every pair holds a correct response -> no signal
    adv, _ = get_advantage("passk")(torch.tensor([1.0, 1.0, 0.0, 1.0]), 4, k=2)
    assert (adv == 0).all()


def test_passk_with_k_1_is_grpo_with_the_population_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=DTYPE)
    adv, _ = get_advantage("passk")(rewards, 5, k=1, eps=0.0)
    grouped = rewards.view(2, 5)
    population = (grouped - grouped.mean(1, keepdim=True)) / grouped.std(1, unbiased=False,
                                                                         keepdim=True)
    torch.testing.assert_close(adv, population.flatten())
    grpo, _ = get_advantage("grpo")(rewards, 5, eps=0.0)  # GRPO's unbiased std is larger
    torch.testing.assert_close(adv, grpo * math.sqrt(5 / 4))


def test_passk_validation():
    with pytest.raises(ValueError, match="binary"):
        get_advantage("passk")(torch.tensor([0.5, 1.0]), 2, k=1)
    with pytest.raises(ValueError, match="k=3"):
        get_advantage("passk")(torch.tensor([0.0, 1.0]), 2, k=3)
    adv, _ = get_advantage("passk")(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, k=2)
    assert adv.dtype == torch.float32  # follows the rewards' dtype


# ---------------------------------------------------------------------------- unlikeliness


def test_unlikeliness_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=DTYPE)
    seq_logprob = torch.tensor([-5.0, -1.0, -3.0, -10.0], dtype=DTYPE)
    adv, m = get_advantage("unlikeliness")(rewards, 4, seq_logprob=seq_logprob, eps=0.0)
    # ranks, least likely first: -10 -> 0, -5 -> 1, -3 -> 2, -1 -> 3; r (1 - 0.25 rank / 4)
    modified = [1 - 0.25 * 1 / 4, 1 - 0.25 * 3 / 4, 0.0, 1.0]  # 0.9375, 0.8125, 0, 1
    mean = sum(modified) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in modified) / 3)
    expected = torch.tensor([(x - mean) / std for x in modified], dtype=DTYPE)
    torch.testing.assert_close(adv, expected)
    # among correct responses the least likely (index 3) gets the most advantage
    assert adv[3] > adv[0] > adv[1] > adv[2]
    assert m["reward_mean"].item() == pytest.approx(0.75)
    assert m["adv_mean_correct"].item() == pytest.approx(expected[[0, 1, 3]].mean().item())
    assert m["adv_mean_wrong"].item() == pytest.approx(expected[2].item())


def test_unlikeliness_all_correct_group_still_has_signal_and_beta_0_is_grpo():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=DTYPE)
    seq_logprob = torch.tensor([-1.0, -3.0, -2.0, -4.0, -1.0, -2.0], dtype=DTYPE)
    adv, m = get_advantage("unlikeliness")(rewards, 3, seq_logprob=seq_logprob)
    assert adv[1] > adv[2] > adv[0]  # all correct: less likely -> larger advantage
    assert m["zero_std_frac"].item() == 0.0
    plain, _ = get_advantage("unlikeliness")(rewards, 3, seq_logprob=seq_logprob,
                                             unlikeliness_beta=0.0)
    torch.testing.assert_close(plain, get_advantage("grpo")(rewards, 3)[0])
    with pytest.raises(ValueError, match="seq_logprob"):
        get_advantage("unlikeliness")(rewards, 3)
