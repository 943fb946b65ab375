"""Advantages, the PPO clipped loss and loss aggregation on small examples worked by hand."""

import math

import pytest
import torch

from dph.advantages import group_advantages
from dph.aggregation import LOSS_AGGREGATIONS, agg_denominator, agg_loss, agg_numerator, register_loss_agg
from dph.policy_losses import ppo_clip_loss
from dph.metrics import METRICS


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, metrics = group_advantages(rewards, 4, eps=0.0)
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased std of [1, 0, 0, 0]
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / torch.tensor(
        [std] * 4 + [1.0] * 4
    )
    torch.testing.assert_close(adv, expected)
    assert metrics["reward_mean"].item() == pytest.approx(5 / 8)
    assert metrics["zero_std_frac"].item() == pytest.approx(0.5)


def test_group_advantages_without_std_and_degenerate_groups():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 0.5, 1.0])
    adv, _ = group_advantages(rewards, 3, norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0, 0, 0, -0.5, 0.0, 0.5]))
    assert (adv[:3] == 0).all()  # all-equal group: exactly zero, not rounding noise / eps
    adv1, _ = group_advantages(torch.tensor([1.0, 0.0]), 1)  # G = 1: no signal, no NaN
    assert (adv1 == 0).all()
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 2)


def _ppo(ratio, adv, clip_low, clip_high, mask=None):
    logp = torch.log(torch.tensor(ratio, dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp) if mask is None else torch.tensor(mask)
    loss, metrics = ppo_clip_loss(
        logp, old, torch.tensor(adv, dtype=torch.float64), mask,
        clip_low=clip_low, clip_high=clip_high,
    )
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return loss.detach(), metrics, grad


def test_ppo_clip_higher_asymmetry():
    loss, m, grad = _ppo([[1.25]], [1.0], clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and m["clip_frac"].item() == 0
    assert grad.item() == pytest.approx(-1.25)  # d(-r A)/d log r = -r A
    loss, m, grad = _ppo([[1.25]], [1.0], clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2) and m["clip_frac"].item() == 1
    assert grad.item() == 0.0


def test_ppo_loss_by_hand_with_mask():
    ratio = [[0.5, 0.9, 1.5, 1.1], [0.5, 1.5, 1.0, 3.0]]
    adv = [2.0, -1.0]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    loss, m, grad = _ppo(ratio, adv, clip_low=0.2, clip_high=0.2, mask=mask)
    # A > 0: -min(r, clip(r)) A; A < 0: -min(-r, -clip(r)) = max(r, clip(r)) |A|
    expected = torch.tensor(
        [[-0.5 * 2, -0.9 * 2, -1.2 * 2, -1.1 * 2], [0.8, 1.5, 1.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(loss, expected)
    clipped = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)  # masked 3.0 ignored
    assert m["clip_frac"].item() == pytest.approx(2 / 7)
    assert (grad[clipped] == 0).all() and (grad[~clipped & torch.tensor(mask).bool()] != 0).all()
    assert grad[1, 3] == 0  # masked token
    ratios = torch.tensor(ratio)[torch.tensor(mask).bool()]
    assert m["ratio_mean"].item() == pytest.approx(ratios.mean().item())
    assert m["approx_kl"].item() == pytest.approx((ratios - 1 - ratios.log()).mean().item())


def test_ppo_masked_garbage_does_not_leak_nan():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, float("-inf")]])
    mask = torch.tensor([[1, 0]])
    loss, m = ppo_clip_loss(logp, old, torch.ones(1), mask, clip_low=0.2, clip_high=0.2)
    assert torch.isfinite(loss).all() and all(torch.isfinite(v) for v in m.values())


def test_metric_keys_are_documented_names():
    _, m1 = group_advantages(torch.ones(4), 2)
    _, m2 = ppo_clip_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2),
                          clip_low=0.2, clip_high=0.2)
    for key in {**m1, **m2}:
        assert f"train/{key}" in METRICS


LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", (1 + 2 + 3 + 4 + 10 + 20) / 6),
        ("seq-mean-token-mean", (2.5 + 15) / 2),  # the empty row does not count
        ("seq-mean-token-sum-norm", (10 / 4 + 30 / 4) / 2),
    ],
)
def test_agg_modes_exact(mode, expected):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expected)


def test_agg_horizon_and_empty_mask():
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", horizon=10).item() == pytest.approx(2.0)
    empty = torch.zeros_like(MASK)
    nan_loss = torch.full_like(LOSS, float("nan"), requires_grad=True)
    for mode in LOSS_AGGREGATIONS:
        out = agg_loss(nan_loss, empty, mode)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, nan_loss)
        assert (g == 0).all()


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
def test_micro_batches_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 1, 0, 3, 4, 2, 5])
    mask = (torch.arange(5)[None] < lengths[:, None]).long()
    full = agg_loss(loss, mask, mode)
    normalizer = agg_denominator(mask, mode)
    micro = sum(
        agg_loss(loss[i : i + 3], mask[i : i + 3], mode, horizon=5, normalizer=normalizer)
        for i in range(0, 7, 3)
    )
    torch.testing.assert_close(micro, full)
    # the same with the numerator / denominator pair, micro-batches cropped to their own length
    cropped = []
    for i in range(0, 7, 3):
        width = int(lengths[i : i + 3].max())
        part = loss[i : i + 3, :width]
        cropped.append(agg_numerator(part, mask[i : i + 3, :width], mode, horizon=5) / normalizer)
    torch.testing.assert_close(sum(cropped), full)
    torch.testing.assert_close(
        torch.autograd.grad(micro, loss)[0], torch.autograd.grad(full, loss)[0]
    )


def test_agg_registry_errors():
    modes = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
    assert set(LOSS_AGGREGATIONS) == modes
    with pytest.raises(KeyError, match="token-mean"):
        agg_loss(LOSS, MASK, "seq-sum")
    with pytest.raises(ValueError, match="already registered"):
        register_loss_agg("token-mean")(lambda loss, mask, horizon: (loss.sum(), mask.sum()))
