"""Group advantage estimators (a registry): one advantage per response from its group's rewards.

rewards: [B * G], the G = group_size responses of each prompt consecutive. Every registered
estimator has the signature

    fn(rewards, group_size, *, seq_logprob=None, eps=1e-6, **params)
        -> (advantages [B * G], metrics)

seq_logprob [B * G]: each response's log-likelihood under the sampling policy (only `unlikeliness`
uses it). `params` are the estimator's own keyword parameters (see advantage_params). Groups without
signal get exactly 0. Metrics are detached 0-dim tensors whose keys, prefixed with "train/", are
documented in dph.metrics.METRICS: reward_mean, zero_std_frac (fraction of groups whose advantages
are all 0), adv_mean_correct / adv_mean_wrong (mean advantage of the responses with reward > 0 /
reward <= 0; 0 when there is none).

    name          advantage                                        paper (arXiv)
    grpo          (r - mean) / (std + eps), unbiased std           DeepSeekMath, 2402.03300
    dr_grpo       r - mean                                         Dr. GRPO, 2503.20783
    passk         exact advantage of the group's Pass@k reward     Pass@k Training, 2508.10751
    unlikeliness  grpo of r (1 - beta rank / G), 0 = least likely  Rewarding the Unlikely, 2506.02355
"""

from __future__ import annotations

import inspect
import math
from fractions import Fraction
from typing import Any, Callable

import torch
from torch import Tensor

COMMON_PARAMS = ("seq_logprob", "eps")  # keywords every advantage estimator takes

AdvantageEstimator = Callable[..., tuple[Tensor, dict[str, Tensor]]]
ADVANTAGES: dict[str, AdvantageEstimator] = {}  # name -> estimator (the registry)


def register_advantage(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Function decorator adding an estimator to ADVANTAGES under `name` (no overwrite)."""

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGES:
            raise ValueError(
                f"advantage {name!r} is already registered (by {ADVANTAGES[name].__qualname__})"
            )
        ADVANTAGES[name] = fn
        return fn

    return decorator


def get_advantage(name: str) -> AdvantageEstimator:
    """The advantage estimator registered as `name`; KeyError listing the known names otherwise."""
    if name not in ADVANTAGES:
        raise KeyError(f"unknown advantage {name!r}; known: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name]


def advantage_params(name: str) -> dict[str, Any]:
    """{parameter: default} of the estimator's own keyword parameters (beyond COMMON_PARAMS).

    A required parameter has the default inspect.Parameter.empty. For validating a config up front.
    """
    signature = inspect.signature(get_advantage(name))
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in COMMON_PARAMS
    }


# ---------------------------------------------------------------------------- shared pieces


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """rewards [B * G] -> [B, G] floating point, after checking the shapes."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B * G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)


def _normalise(grouped: Tensor, *, norm_by_std: bool, eps: float) -> tuple[Tensor, Tensor]:
    """((r - group mean) [/ (unbiased std + eps)], 0 in all-equal groups: [B, G]; no_signal [B])."""
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    no_signal = grouped.amax(dim=1) == grouped.amin(dim=1)  # [B]
    if norm_by_std and grouped.shape[1] > 1:
        centred = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    return torch.where(no_signal[:, None], torch.zeros_like(centred), centred), no_signal


def _metrics(rewards: Tensor, adv: Tensor, no_signal: Tensor) -> dict[str, Tensor]:
    """reward_mean, zero_std_frac, adv_mean_correct / adv_mean_wrong (reward > 0 / <= 0)."""
    with torch.no_grad():
        correct, wrong = rewards > 0, rewards <= 0
        zero = torch.zeros_like(adv)
        return {
            "reward_mean": rewards.float().mean(),
            "zero_std_frac": no_signal.float().mean(),
            "adv_mean_correct": torch.where(correct, adv, zero).sum() / correct.sum().clamp(min=1),
            "adv_mean_wrong": torch.where(wrong, adv, zero).sum() / wrong.sum().clamp(min=1),
        }


def group_advantages(
    rewards: Tensor, group_size: int, *, norm_by_std: bool = True, eps: float = 1e-6
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO advantages: A = (r - group mean) / (group std + eps), one value per sequence.

    rewards: [B * G], the G responses of each prompt consecutive. The std is the unbiased sample
    std (as in verl and TRL); norm_by_std=False gives the Dr. GRPO advantage r - group mean.
    Groups whose rewards are all equal (including G = 1) get exactly 0: they carry no signal.
    metrics: reward_mean; zero_std_frac, the fraction of groups without signal.
    """
    grouped = _grouped(rewards, group_size)
    adv, no_signal = _normalise(grouped, norm_by_std=norm_by_std, eps=eps)
    metrics = {
        "reward_mean": grouped.mean().detach(),
        "zero_std_frac": no_signal.float().mean().detach(),
    }
    return adv.view(-1), metrics


# ---------------------------------------------------------------------------- registered estimators


@register_advantage("grpo")
def grpo_advantages(
    rewards: Tensor, group_size: int, *, seq_logprob: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO: A = (r - group mean) / (unbiased group std + eps) (DeepSeekMath, arXiv 2402.03300)."""
    grouped = _grouped(rewards, group_size)
    adv, no_signal = _normalise(grouped, norm_by_std=True, eps=eps)
    return adv.view(-1), _metrics(grouped.view(-1), adv.view(-1), no_signal)


@register_advantage("dr_grpo")
def dr_grpo_advantages(
    rewards: Tensor, group_size: int, *, seq_logprob: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr. GRPO: A = r - group mean, no std normalisation (Liu et al. 2025, arXiv 2503.20783)."""
    grouped = _grouped(rewards, group_size)
    adv, no_signal = _normalise(grouped, norm_by_std=False, eps=eps)
    return adv.view(-1), _metrics(grouped.view(-1), adv.view(-1), no_signal)


def _passk_tables(n: int, k: int) -> tuple[list[Fraction], list[Fraction]]:
    """Exact (R, q) for n_neg = 0..n wrong responses out of n, indexed by n_neg.

    R = 1 - C(n_neg, k) / C(n, k), the group's mean Pass@k reward over its k-subsets;
    q = C(n_neg - 1, k - 1) / C(n - 1, k - 1), the chance that a k-subset holding a given wrong
    response has no correct one (0 when n_neg = 0, where it is unused).
    """
    rewards = [1 - Fraction(math.comb(n_neg, k), math.comb(n, k)) for n_neg in range(n + 1)]
    all_wrong = [Fraction(0)] + [
        Fraction(math.comb(n_neg - 1, k - 1), math.comb(n - 1, k - 1)) for n_neg in range(1, n + 1)
    ]
    return rewards, all_wrong


@register_advantage("passk")
def passk_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    seq_logprob: Tensor | None = None,
    eps: float = 1e-6,
    k: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pass@k: A+ = (1-R)/sigma, A- = (1-R-C(N_neg-1,k-1)/C(N-1,k-1))/sigma, R = 1-C(N_neg,k)/C(N,k) (arXiv 2508.10751).

    Chen et al.'s analytic advantage of the Pass@k reward, for binary rewards (0 / 1). In a group
    of N responses, N_neg of them wrong:
        R = 1 - C(N_neg, k) / C(N, k)               mean Pass@k reward over the k-subsets
        sigma = sqrt(R (1 - R))                     std of the subset rewards
        A_pos = (1 - R) / (sigma + eps)             every correct response
        A_neg = (1 - R - C(N_neg - 1, k - 1) / C(N - 1, k - 1)) / (sigma + eps)   every wrong one
    It equals, with eps = 0, the mean over the k-subsets holding a response of the subset's
    normalised reward (max of its rewards - R) / sigma. sigma = 0 (all wrong, or N_neg < k so every
    subset passes) gives exactly 0. k = 1 gives (r - mean) / population std: GRPO with the biased
    std. As in the authors' code. zero_std_frac counts the groups with sigma = 0.
    """
    grouped = _grouped(rewards, group_size)
    if not 1 <= k <= group_size:
        raise ValueError(f"passk needs 1 <= k <= group_size={group_size}, got k={k}")
    if not ((grouped == 0) | (grouped == 1)).all():
        raise ValueError("passk needs binary rewards (0 or 1); got other values")
    mean_reward, all_wrong = _passk_tables(group_size, k)
    sigma = [math.sqrt(r * (1 - r)) for r in mean_reward]
    table = torch.tensor(
        [[float(r) for r in mean_reward], [float(q) for q in all_wrong], sigma],
        dtype=torch.float64, device=grouped.device,
    )  # [3, N + 1], columns indexed by n_neg
    n_neg = (grouped == 0).sum(dim=1)  # [B]
    r_mean, q, std = table[:, n_neg]  # each [B]
    no_signal = torch.tensor([r in (0, 1) for r in mean_reward], device=grouped.device)[n_neg]
    denominator = torch.where(no_signal, torch.ones_like(std), std + eps)[:, None]
    a_pos = (1 - r_mean)[:, None] / denominator
    a_neg = (1 - r_mean - q)[:, None] / denominator
    adv = torch.where(grouped == 1, a_pos, a_neg)
    adv = torch.where(no_signal[:, None], torch.zeros_like(adv), adv).to(grouped.dtype)
    return adv.view(-1), _metrics(grouped.view(-1), adv.view(-1), no_signal)


@register_advantage("unlikeliness")
def unlikeliness_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    seq_logprob: Tensor | None = None,
    eps: float = 1e-6,
    unlikeliness_beta: float = 0.25,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Unlikeliness: A = grpo(r (1 - beta rank / G)), rank 0 = least likely in the group (arXiv 2506.02355).

    He et al.'s unlikeliness reward, as in their released code: the G responses of a group are
    ranked by seq_logprob (ascending, ties by position), so the least likely response keeps its
    reward and the most likely one's is scaled by 1 - beta (G - 1) / G; wrong responses (r = 0)
    stay 0. The modified rewards are then GRPO-normalised (unbiased std + eps), so among correct
    responses the least likely get the largest advantage, even in an all-correct group.
    seq_logprob: [B * G], required; the authors rank by the mean per-token log-prob under the
    sampling policy (a sum ranks long responses as less likely). unlikeliness_beta: their 0.25.
    metrics: reward_mean and adv_mean_correct / wrong on the original rewards; zero_std_frac on the
    modified ones.
    """
    grouped = _grouped(rewards, group_size)
    if seq_logprob is None or seq_logprob.shape != rewards.shape:
        got = None if seq_logprob is None else tuple(seq_logprob.shape)
        raise ValueError(
            f"unlikeliness needs seq_logprob shaped like rewards {tuple(rewards.shape)}, got {got}"
        )
    likelihood = seq_logprob.detach().view(-1, group_size)
    order = likelihood.argsort(dim=1, stable=True)  # least likely first
    rank = order.argsort(dim=1, stable=True).to(grouped.dtype)  # [B, G], 0 = least likely
    modified = grouped * (1 - unlikeliness_beta * rank / group_size)
    adv, no_signal = _normalise(modified, norm_by_std=True, eps=eps)
    return adv.view(-1), _metrics(grouped.view(-1), adv.view(-1), no_signal)
