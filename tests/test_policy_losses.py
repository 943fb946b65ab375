"""Policy losses, entropy bonus and high-entropy token selection on small cases worked by hand."""

import math

import pytest
import torch

from dph.aggregation import agg_loss
from dph.metrics import METRICS
from dph.policy_losses import (
    POLICY_LOSSES,
    adaptive_entropy_coef,
    entropy_bonus,
    get_policy_loss,
    policy_loss_params,
    ppo_clip_loss,
    register_policy_loss,
    top_entropy_mask,
)

DTYPE = torch.float64
CLIP = {"clip_low": 0.2, "clip_high": 0.2}


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
    return g


# ---------------------------------------------------------------------------- registry


def test_registry_names_errors_and_params():
    assert set(POLICY_LOSSES) == {"ppo_clip", "gspo", "clip_cov", "kl_cov"}
    assert get_policy_loss("ppo_clip") is ppo_clip_loss  # the registered function itself
    with pytest.raises(KeyError, match="ppo_clip.*"):
        get_policy_loss("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("gspo")(lambda *a, **k: None)
    assert policy_loss_params("ppo_clip") == {}
    assert policy_loss_params("gspo") == {"gspo_clip_low": 3e-4, "gspo_clip_high": 4e-4}
    assert policy_loss_params("clip_cov") == {
        "clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0,
    }
    assert policy_loss_params("kl_cov") == {"kl_cov_ratio": 2e-3, "kl_cov_coef": 1.0}
    with pytest.raises(TypeError, match="kl_cov_coef"):  # a misspelt parameter fails loudly
        get_policy_loss("ppo_clip")(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1),
                                    torch.ones(1, 1), kl_cov_coef=1.0, **CLIP)
    for name, fn in POLICY_LOSSES.items():  # formula (and paper) on the docstring's first line
        first = fn.__doc__.splitlines()[0]
        assert " A" in first, name
        assert name == "ppo_clip" or "arXiv" in first, name


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_is_zero_off_mask_finite_and_documented(name):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 5, generator=g, dtype=DTYPE)).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(3, 5, generator=g, dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    loss, metrics = get_policy_loss(name)(
        logp, old, torch.tensor([1.0, -2.0, 3.0]), mask, generator=g, **CLIP
    )
    assert loss.shape == (3, 5) and (loss[mask == 0] == 0).all()
    grad = _grad(loss, logp)
    assert torch.isfinite(grad).all() and (grad[mask == 0] == 0).all()
    assert {"clip_frac", "ratio_mean", "approx_kl"} <= set(metrics)
    for key, value in metrics.items():
        assert f"train/{key}" in METRICS and value.dim() == 0 and not value.requires_grad


# ---------------------------------------------------------------------------- gspo


def _gspo_case():
    # three sequences of lengths 4, 2, 3; per-sequence mean log-ratios 0.01, 0.2, -0.3
    logp = torch.tensor(
        [[-0.5, -1.0, -2.0, -0.1], [-1.5, -0.2, -9.0, -9.0], [-0.3, -0.7, -1.1, -9.0]],
        dtype=DTYPE, requires_grad=True,
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    delta = torch.tensor(
        [[0.03, -0.01, 0.02, 0.0], [0.1, 0.3, 5.0, 5.0], [-0.5, -0.1, -0.3, 7.0]], dtype=DTYPE
    )  # logp - old_logp; the padded entries must not count
    return logp, logp.detach() - delta, mask


def test_gspo_matches_the_sequence_level_objective():
    logp, old, mask = _gspo_case()
    adv = torch.tensor([1.0, 2.0, -1.5], dtype=DTYPE)
    params = {"gspo_clip_low": 0.1, "gspo_clip_high": 0.1}
    loss, m = get_policy_loss("gspo")(logp, old, adv, mask, **CLIP, **params)
    # GSPO written per sequence: s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|)
    lengths = mask.sum(-1)
    s = torch.exp(((logp - old) * mask).sum(-1) / lengths)
    torch.testing.assert_close(s.detach(), torch.exp(torch.tensor([0.01, 0.2, -0.3], dtype=DTYPE)))
    objective = -torch.minimum(s * adv, s.clamp(0.9, 1.1) * adv).mean()
    aggregated = agg_loss(loss, mask, "seq-mean-token-mean")
    torch.testing.assert_close(aggregated, objective)
    torch.testing.assert_close(_grad(aggregated, logp), _grad(objective, logp))
    # sequence 0 (s = e^0.01) is inside the range; 1 (A > 0, s > 1.1) and 2 (A < 0, s < 0.9) clipped
    grad = _grad(loss, logp)
    assert (grad[0] != 0).all() and (grad[1:] == 0).all()
    assert m["clip_frac"].item() == pytest.approx(5 / 9)
    # every token of a sequence carries the same value s_i: the loss is -s_i A_i per token
    torch.testing.assert_close(loss[0], -s[0].detach() * adv[0].expand(4))


def test_gspo_default_clip_range_is_the_papers():
    logp = torch.zeros(2, 3, dtype=DTYPE, requires_grad=True)
    old = torch.tensor([[-1e-4] * 3, [-1e-3] * 3], dtype=DTYPE)  # s = e^1e-4 (in), e^1e-3 (out)
    loss, m = get_policy_loss("gspo")(logp, old, torch.ones(2), torch.ones(2, 3), **CLIP)
    torch.testing.assert_close(loss[1], torch.full((3,), -(1 + 4e-4), dtype=DTYPE))
    assert m["clip_frac"].item() == pytest.approx(0.5)
    grad = _grad(loss, logp)
    assert (grad[0] != 0).all() and (grad[1] == 0).all()


def test_gspo_on_one_token_sequences_is_ppo_clip():
    logp = torch.tensor([[-0.5], [-1.0], [-2.0]], dtype=DTYPE, requires_grad=True)
    old = logp.detach() - torch.tensor([[0.05], [0.5], [-0.5]], dtype=DTYPE)
    adv, mask = torch.tensor([1.0, 1.0, -1.0], dtype=DTYPE), torch.ones(3, 1)
    gspo, _ = get_policy_loss("gspo")(logp, old, adv, mask, **CLIP,
                                      gspo_clip_low=0.2, gspo_clip_high=0.2)
    ppo, _ = get_policy_loss("ppo_clip")(logp, old, adv, mask, **CLIP)
    torch.testing.assert_close(gspo, ppo)
    torch.testing.assert_close(_grad(gspo, logp), _grad(ppo, logp))


# ---------------------------------------------------------------------------- clip_cov / kl_cov

# log-probs centred on their mean -3: [2, 0, -2] in both rows; advantages [2, -2] (mean 0), so the
# centred covariance (A - mean A)(logp - mean logp) is [[4, 0, -4], [-4, 0, 4]].
COV_LOGP = [[-1.0, -3.0, -5.0], [-1.0, -3.0, -5.0]]
COV_ADV = [2.0, -2.0]


def _clip_cov(old_shift, seed, **params):
    logp = torch.tensor(COV_LOGP, dtype=DTYPE, requires_grad=True)
    old = logp.detach() - torch.tensor(old_shift, dtype=DTYPE)
    adv = torch.tensor(COV_ADV, dtype=DTYPE)
    g = torch.Generator().manual_seed(seed)
    loss, m = get_policy_loss("clip_cov")(logp, old, adv, torch.ones(2, 3), generator=g,
                                          **CLIP, **params)
    ppo, _ = get_policy_loss("ppo_clip")(logp, old, adv, torch.ones(2, 3), **CLIP)
    return loss, m, _grad(loss, logp), ppo, _grad(ppo, logp)


def test_clip_cov_removes_the_gradient_of_one_random_candidate():
    no_shift = [[0.0] * 3] * 2
    chosen = set()
    for seed in range(8):
        # ratio 0.2: floor(0.2 x 6) = 1 of the candidates (0, 0) and (1, 2), cov 4 in (1, 5)
        loss, m, grad, ppo, ppo_grad = _clip_cov(no_shift, seed, clip_cov_ratio=0.2)
        torch.testing.assert_close(loss, ppo)  # values unchanged: only the gradient is removed
        removed = {(i, j) for i in range(2) for j in range(3) if grad[i, j] == 0}
        assert len(removed) == 1 and removed <= {(0, 0), (1, 2)}
        for i, j in {(i, j) for i in range(2) for j in range(3)} - removed:
            assert grad[i, j] == ppo_grad[i, j]
        assert m["cov_clip_frac"].item() == pytest.approx(1 / 6)
        assert m["clip_frac"].item() == 0
        chosen |= removed
        again = _clip_cov(no_shift, seed, clip_cov_ratio=0.2)[2]
        torch.testing.assert_close(again, grad)  # the same seed picks the same token
    assert chosen == {(0, 0), (1, 2)}  # and the choice is random across seeds


def test_clip_cov_count_bounds_and_ppo_clipped_tokens():
    no_shift = [[0.0] * 3] * 2
    # floor(1e-4 x 6) = 0 -> at least one token
    m = _clip_cov(no_shift, 0, clip_cov_ratio=1e-4)[1]
    assert m["cov_clip_frac"].item() == pytest.approx(1 / 6)
    # ratio 0.5 asks for 3 tokens; only the 2 candidates exist
    grad = _clip_cov(no_shift, 0, clip_cov_ratio=0.5)[2]
    assert grad[0, 0] == 0 and grad[1, 2] == 0 and (grad.flatten()[[1, 2, 3, 4]] != 0).all()
    # bounds exclude cov = 4: nothing is removed
    _, m, grad, _, ppo_grad = _clip_cov(no_shift, 0, clip_cov_ratio=0.5, clip_cov_ub=4.0)
    assert m["cov_clip_frac"].item() == 0 and torch.equal(grad, ppo_grad)
    # token (0, 0) already clipped by PPO (ratio 1.5, A > 0): (1, 2) is the only candidate
    shift = [[math.log(1.5), 0.0, 0.0], [0.0, 0.0, 0.0]]
    for seed in range(4):
        _, m, grad, _, ppo_grad = _clip_cov(shift, seed, clip_cov_ratio=0.2)
        assert grad[1, 2] == 0 and ppo_grad[1, 2] != 0
        assert m["clip_frac"].item() == pytest.approx(1 / 6)


def test_kl_cov_penalises_the_top_covariance_tokens_by_hand():
    # covariances [[4, 0, -4], [-2, 0, 2]] (row 2 log-probs [-2, -3, -4]):
    # the top one is (0, 0), the top two add (1, 2)
    logp = torch.tensor([[-1.0, -3.0, -5.0], [-2.0, -3.0, -4.0]], dtype=DTYPE, requires_grad=True)
    log_r = torch.tensor([[0.3, -0.2, 0.1], [0.05, 0.4, -0.25]], dtype=DTYPE)
    adv = torch.tensor(COV_ADV, dtype=DTYPE)
    fn = get_policy_loss("kl_cov")
    r = log_r.exp()
    plain = -r * adv[:, None]  # -r A, no clip
    for ratio, top in [(0.2, [(0, 0)]), (0.4, [(0, 0), (1, 2)])]:
        loss, m = fn(logp, logp.detach() - log_r, adv, torch.ones(2, 3), kl_cov_ratio=ratio,
                     kl_cov_coef=0.5, **CLIP)
        expected, expected_grad = plain.clone(), plain.clone()  # d(-rA)/dlogp = -rA
        for i, j in top:
            expected[i, j] += 0.5 * abs(log_r[i, j])
            expected_grad[i, j] += 0.5 * math.copysign(1.0, log_r[i, j])
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(_grad(loss, logp), expected_grad)
        assert m["cov_clip_frac"].item() == pytest.approx(len(top) / 6)
        assert m["clip_frac"].item() == 0
        assert m["ratio_mean"].item() == pytest.approx(r.mean().item())


def test_kl_cov_penalty_has_no_gradient_on_the_first_update():
    logp = torch.tensor(COV_LOGP, dtype=DTYPE, requires_grad=True)
    adv = torch.tensor(COV_ADV, dtype=DTYPE)
    loss, m = get_policy_loss("kl_cov")(logp, logp.detach(), adv, torch.ones(2, 3),
                                        kl_cov_ratio=0.5, kl_cov_coef=10.0, **CLIP)
    assert m["cov_clip_frac"].item() == pytest.approx(3 / 6)
    torch.testing.assert_close(_grad(loss, logp), -adv[:, None].expand(2, 3))  # plain PG gradient


# ---------------------------------------------------------------------------- entropy helpers


def test_entropy_bonus_value_and_gradient():
    entropy = torch.tensor([[0.5, 1.0], [2.0, 3.0]], dtype=DTYPE, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = entropy_bonus(entropy, mask, 0.01)
    torch.testing.assert_close(loss, torch.tensor([[-0.005, -0.01], [-0.02, 0.0]], dtype=DTYPE))
    torch.testing.assert_close(_grad(loss, entropy), -0.01 * mask.to(DTYPE))
    assert m["entropy_coef"].item() == pytest.approx(0.01) and "train/entropy_coef" in METRICS


def test_adaptive_entropy_coef_by_hand():
    assert adaptive_entropy_coef(0.01, 0.5, target=0.6, lr=0.1, max_coef=1.0) == pytest.approx(0.02)
    assert adaptive_entropy_coef(0.01, 0.7, target=0.6, lr=0.1, max_coef=1.0) == pytest.approx(0.0)
    assert adaptive_entropy_coef(0.01, torch.tensor(0.1), target=0.6, lr=1.0, max_coef=0.05) == 0.05
    assert adaptive_entropy_coef(0.01, 2.0, target=0.6, lr=1.0, max_coef=0.05) == 0.0  # floor at 0
    with pytest.raises(ValueError, match="lr"):
        adaptive_entropy_coef(0.01, 0.5, target=0.6, lr=-0.1, max_coef=1.0)


def test_top_entropy_mask_by_hand():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.8, 5.0, 0.2]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]])  # the masked 5.0 never counts
    new_mask, m = top_entropy_mask(entropy, mask, 0.3)  # ceil(0.3 x 7) = 3: 0.9, 0.8, 0.7
    assert torch.equal(new_mask, torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0]]))
    assert new_mask.dtype == mask.dtype
    assert m["updated_token_entropy"].item() == pytest.approx(0.8)
    assert m["updated_token_frac"].item() == pytest.approx(3 / 7)
    assert torch.equal(top_entropy_mask(entropy, mask, 1.0)[0], mask)
    assert top_entropy_mask(entropy, mask, 0.01)[0].sum() == 1  # at least one token: the 0.9
    for key in m:
        assert f"train/{key}" in METRICS


def test_top_entropy_mask_ties_and_edge_cases():
    flat = torch.ones(2, 3)
    new_mask, m = top_entropy_mask(flat, torch.ones(2, 3, dtype=torch.bool), 0.2)
    assert new_mask.all() and m["updated_token_frac"].item() == 1.0  # ties at the threshold kept
    empty, m = top_entropy_mask(flat, torch.zeros(2, 3), 0.2)
    assert empty.sum() == 0 and m["updated_token_frac"].item() == 0
    assert m["updated_token_entropy"].item() == 0
    with pytest.raises(ValueError, match="quantile"):
        top_entropy_mask(flat, torch.ones(2, 3), 0.0)
