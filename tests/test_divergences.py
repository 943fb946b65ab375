"""Divergence values and gradients against exact enumeration on a small categorical policy."""

import math

import pytest
import torch

from dph.divergences import (
    DIVERGENCES,
    REVERSE_KL_ESTIMATORS,
    REVERSE_KL_LOSS_FORMS,
    Divergence,
    get_divergence,
    k1_reward_penalty,
    register_divergence,
    reverse_kl_estimate,
    reverse_kl_loss,
    token_divergence,
)

K = 6
DTYPE = torch.float64
ALPHAS = [0.0, 1e-7, 0.3, 0.5, 0.9, 1.0 - 1e-7, 1.0, 2.0, -0.5]

# Every registered divergence, alpha at several values (the limits included).
CASES = [(name, {}) for name in DIVERGENCES if name != "alpha"] + [
    ("alpha", {"alpha": a}) for a in ALPHAS
]
CASE_IDS = [f"{n}{p.get('alpha', '')}" for n, p in CASES]


def policies(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=DTYPE).requires_grad_(True)
    ref_logp = torch.log_softmax(torch.randn(K, generator=g, dtype=DTYPE), -1)
    return theta, ref_logp


def exact_f_divergence(div, logp, ref_logp):
    """D_f = sum_y pi_ref(y) f(pi(y) / pi_ref(y)) with the textbook (non-log-space) generators."""
    u = torch.exp(logp - ref_logp)
    name = div.name
    if name == "alpha" and abs(div.alpha) < 1e-6:
        name = "forward_kl"
    if name == "alpha" and abs(div.alpha - 1) < 1e-6:
        name = "reverse_kl"
    if name == "forward_kl":
        f = -torch.log(u)
    elif name == "reverse_kl":
        f = u * torch.log(u)
    elif name == "js":
        f = u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2)
    else:
        a = div.alpha
        f = (u**a - 1 - a * (u - 1)) / (a * (a - 1))
    return (ref_logp.exp() * f).sum()


def exact_and_grad(div, theta, ref_logp):
    D = exact_f_divergence(div, torch.log_softmax(theta, -1), ref_logp)
    (g,) = torch.autograd.grad(D, theta)
    return D.detach(), g


def grad_of(x, theta):
    (g,) = torch.autograd.grad(x, theta, retain_graph=True)
    return g


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_generator_is_normalised_and_convex(name, params):
    div = get_divergence(name, **params)
    zero = torch.zeros((), dtype=DTYPE)
    assert div.f(zero).item() == pytest.approx(0.0, abs=1e-12)
    assert div.f_prime(zero).item() == pytest.approx(0.0, abs=1e-12)
    log_u = torch.linspace(-3, 3, 61, dtype=DTYPE)
    assert (div.f(log_u) >= -1e-12).all()  # normalised convex f: f >= f(1) = 0
    # f_prime is the derivative wrt u: df/dlog_u = f'(u) * u.
    log_u.requires_grad_(True)
    (dlog,) = torch.autograd.grad(div.f(log_u).sum(), log_u)
    torch.testing.assert_close(dlog, div.f_prime(log_u) * log_u.exp())


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_reference_source_value_and_gradient(name, params):
    div = get_divergence(name, **params)
    theta, ref_logp = policies()
    D, grad_D = exact_and_grad(div, theta, ref_logp)
    logp = torch.log_softmax(theta, -1)
    surrogate, value = token_divergence(div, logp, ref_logp, source="reference")
    ref_p = ref_logp.exp()
    torch.testing.assert_close((ref_p * value).sum(), D)
    torch.testing.assert_close(grad_of((ref_p * surrogate).sum(), theta), grad_D)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_rollouts_source_value_and_gradient(name, params):
    div = get_divergence(name, **params)
    theta, ref_logp = policies(1)
    D, grad_D = exact_and_grad(div, theta, ref_logp)
    logp = torch.log_softmax(theta, -1)
    surrogate, value = token_divergence(div, logp, ref_logp, source="rollouts")
    pi = logp.exp().detach()
    torch.testing.assert_close((pi * value).sum(), D)
    torch.testing.assert_close((pi * surrogate).sum(), D)  # the surrogate's value is the estimate
    torch.testing.assert_close(grad_of((pi * surrogate).sum(), theta), grad_D)


@pytest.mark.parametrize("estimator", REVERSE_KL_ESTIMATORS)
def test_reverse_kl_estimators_on_rollouts(estimator):
    div = get_divergence("reverse_kl")
    theta, ref_logp = policies(2)
    D, grad_D = exact_and_grad(div, theta, ref_logp)
    logp = torch.log_softmax(theta, -1)
    surrogate, value = token_divergence(div, logp, ref_logp, source="rollouts", estimator=estimator)
    pi = logp.exp().detach()
    if estimator == "k2":  # biased value (second order in log u), still >= 0
        assert (value >= 0).all()
        assert (pi * value).sum().item() != pytest.approx(D.item())
    else:
        torch.testing.assert_close((pi * value).sum(), D)
    # the gradient is the exact reverse-KL gradient whichever value estimate is reported
    torch.testing.assert_close(grad_of((pi * surrogate).sum(), theta), grad_D)


def test_k3_as_a_plain_loss_on_rollouts_has_the_forward_kl_gradient():
    theta, ref_logp = policies(3)
    forward_D, forward_grad = exact_and_grad(get_divergence("forward_kl"), theta, ref_logp)
    reverse_D, reverse_grad = exact_and_grad(get_divergence("reverse_kl"), theta, ref_logp)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    log_u = logp - ref_logp
    k3 = reverse_kl_estimate(log_u, "k3")
    torch.testing.assert_close((pi * k3).sum(), reverse_D)  # its VALUE estimates reverse KL ...
    pathwise = grad_of((pi * k3).sum(), theta)
    torch.testing.assert_close(pathwise, forward_grad)  # ... its pathwise gradient is forward KL's
    assert not torch.allclose(pathwise, reverse_grad)
    # while k2 differentiated pathwise gives the reverse-KL gradient
    k2 = reverse_kl_estimate(log_u, "k2")
    torch.testing.assert_close(grad_of((pi * k2).sum(), theta), reverse_grad)


def test_kl_values_match_torch_distributions():
    theta, ref_logp = policies(4)
    logp = torch.log_softmax(theta, -1).detach()
    pi = torch.distributions.Categorical(logits=logp)
    ref = torch.distributions.Categorical(logits=ref_logp)
    ref_p, p = ref_logp.exp(), logp.exp()
    fwd = (ref_p * get_divergence("forward_kl").f(logp - ref_logp)).sum()
    rev = (ref_p * get_divergence("reverse_kl").f(logp - ref_logp)).sum()
    torch.testing.assert_close(fwd, torch.distributions.kl_divergence(ref, pi))
    torch.testing.assert_close(rev, torch.distributions.kl_divergence(pi, ref))
    m = torch.distributions.Categorical(probs=(p + ref_p) / 2)
    js2 = torch.distributions.kl_divergence(pi, m) + torch.distributions.kl_divergence(ref, m)
    torch.testing.assert_close((ref_p * get_divergence("js").f(logp - ref_logp)).sum(), js2)
    hellinger_sq = 0.5 * ((p.sqrt() - ref_p.sqrt()) ** 2).sum()
    alpha_half = (ref_p * get_divergence("alpha", alpha=0.5).f(logp - ref_logp)).sum()
    torch.testing.assert_close(alpha_half, 4 * hellinger_sq)


@pytest.mark.parametrize("name", ["js", "forward_kl"])
def test_rollouts_gradient_monte_carlo(name):
    div = get_divergence(name)
    theta, ref_logp = policies(5)
    _, grad_D = exact_and_grad(div, theta, ref_logp)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    logp_all = torch.log_softmax(theta, -1)
    y = torch.multinomial(logp_all.exp().detach(), n, replacement=True, generator=g)
    surrogate, _ = token_divergence(div, logp_all[y], ref_logp[y], source="rollouts")
    mc_grad = grad_of(surrogate.mean(), theta)
    torch.testing.assert_close(mc_grad, grad_D, atol=0.02 * grad_D.abs().max().item(), rtol=0)


def test_alpha_limits_are_continuous():
    log_u = torch.linspace(-4, 4, 33, dtype=DTYPE)
    fwd, rev = get_divergence("forward_kl"), get_divergence("reverse_kl")
    for near, target in [(1e-5, fwd), (-1e-5, fwd), (1 - 1e-5, rev), (1 + 1e-5, rev)]:
        div = get_divergence("alpha", alpha=near)
        torch.testing.assert_close(div.f(log_u), target.f(log_u), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(div.f_prime(log_u), target.f_prime(log_u), rtol=1e-3, atol=1e-4)
    # float32 near the limits: no catastrophic cancellation
    log_u32 = log_u.float()
    near_one = get_divergence("alpha", alpha=1 + 1e-5).f(log_u32)
    torch.testing.assert_close(near_one, rev.f(log_u32), rtol=1e-3, atol=1e-4)


def test_extreme_log_ratios_are_finite():
    log_u = torch.tensor([-1e4, -50.0, 50.0, 1e4], dtype=torch.float32, requires_grad=True)
    for name, params in CASES:  # alpha = 2 at the clamp: u^2 = e^40 ~ 2e17, finite in float32
        div = get_divergence(name, **params)
        for source in ("reference", "rollouts"):
            surrogate, value = token_divergence(div, log_u, torch.zeros(4), source=source)
            (g,) = torch.autograd.grad(surrogate.sum(), log_u)
            assert torch.isfinite(value).all() and torch.isfinite(g).all(), (name, params, source)


def test_half_precision_inputs_are_upcast():
    logp = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    surrogate, value = token_divergence(
        get_divergence("js"), logp, torch.tensor([-1.5, -1.5]), source="rollouts"
    )
    assert value.dtype == torch.float32 and surrogate.dtype == torch.float32


def test_registry_errors():
    assert set(DIVERGENCES) >= {"forward_kl", "reverse_kl", "js", "alpha"}
    with pytest.raises(KeyError, match="forward_kl"):
        get_divergence("kl")
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("js")(type("Other", (Divergence,), {}))
    with pytest.raises(TypeError, match="alpha"):
        get_divergence("forward_kl", alpha=0.5)
    with pytest.raises(ValueError, match="finite"):
        get_divergence("alpha", alpha=math.inf)
    assert get_divergence("alpha", alpha=0.3).alpha == 0.3
    for cls in DIVERGENCES.values():  # one-line formula docstrings
        assert cls.__doc__ and "\n" not in cls.__doc__ and "f(u) =" in cls.__doc__


def test_estimator_and_source_validation():
    logp, ref = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="source"):
        token_divergence(get_divergence("js"), logp, ref, source="policy")
    with pytest.raises(ValueError, match="reverse_kl"):
        token_divergence(get_divergence("js"), logp, ref, source="rollouts", estimator="k3")
    with pytest.raises(ValueError, match="rollouts"):
        token_divergence(
            get_divergence("reverse_kl"), logp, ref, source="reference", estimator="k1"
        )
    with pytest.raises(KeyError, match="k3"):
        token_divergence(get_divergence("reverse_kl"), logp, ref, source="rollouts", estimator="k4")


@pytest.mark.parametrize("form", REVERSE_KL_LOSS_FORMS)
def test_reverse_kl_losses_on_rollouts_have_the_gradient_they_claim(form):
    theta, ref_logp = policies(6)
    forward_D, forward_grad = exact_and_grad(get_divergence("forward_kl"), theta, ref_logp)
    reverse_D, reverse_grad = exact_and_grad(get_divergence("reverse_kl"), theta, ref_logp)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()  # the sampling weight: y ~ pi, not differentiated
    loss, value = reverse_kl_loss(logp, ref_logp, form)
    expected_grad = forward_grad if form == "k3" else reverse_grad  # k2 and k3+: reverse KL
    other_grad = reverse_grad if form == "k3" else forward_grad
    pathwise = grad_of((pi * loss).sum(), theta)
    torch.testing.assert_close(pathwise, expected_grad)
    assert not torch.allclose(pathwise, other_grad)
    assert not value.requires_grad
    if form == "k2":  # biased value
        assert (pi * value).sum().item() != pytest.approx(reverse_D.item())
    else:  # k3 and k3+ report the unbiased k3 value, and k3+'s loss has that value
        torch.testing.assert_close((pi * value).sum(), reverse_D)
        torch.testing.assert_close(loss.detach(), value)


def test_k1_reward_penalty_gives_the_reverse_kl_gradient_through_the_score_function():
    theta, ref_logp = policies(7)
    _, reverse_grad = exact_and_grad(get_divergence("reverse_kl"), theta, ref_logp)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    # each y is a one-token sequence: penalty [K]
    penalty = k1_reward_penalty(logp[:, None], ref_logp[:, None])
    assert penalty.shape == (K,) and not penalty.requires_grad
    # policy gradient of the reward term -penalty: E_pi[-k1 grad log pi] = -grad KL(pi || pi_ref)
    score_function = grad_of((pi * -penalty * logp).sum(), theta)
    torch.testing.assert_close(score_function, -reverse_grad)


def test_k1_reward_penalty_sums_valid_tokens_and_loss_forms_are_checked():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, float("-inf")]], dtype=DTYPE)
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    penalty = k1_reward_penalty(logp, ref, mask)
    torch.testing.assert_close(penalty, torch.tensor([0.5 - 1.0 + 0.0, 1.0], dtype=DTYPE))
    with pytest.raises(KeyError, match="k3\\+"):
        reverse_kl_loss(logp, ref, "k1")
