"""f-divergences between the policy and the initial (reference) policy, with per-token estimators.

Convention (one place, used everywhere):

    u = pi_theta(y) / pi_ref(y),   log_u = logp - ref_logp           (per token)
    D_f(pi_ref, pi) = E_{y ~ pi_ref}[ f(u) ],   f convex, f(1) = 0

Every generator is written in its "normalised" form with f'(1) = 0: adding c * (u - 1) to f changes
no divergence value (E_{pi_ref}[u - 1] = 0) but removes a zero-mean term from the estimators, which
lowers their variance. Generators take `log_u` (clamped to [-LOG_U_CLAMP, LOG_U_CLAMP]; the
gradient is zero outside the clamp) and are evaluated in log space where it matters.

    name        D_f                              f(u)
    forward_kl  KL(pi_ref || pi)  mass-covering  u - 1 - log u
    reverse_kl  KL(pi || pi_ref)  mode-seeking   u log u - u + 1
    js          2 JS(pi, pi_ref)  symmetric      u log u - (1 + u) log((1 + u) / 2)
    alpha       Amari alpha       interpolates   (u^a - 1 - a (u - 1)) / (a (a - 1))

Estimators (`token_divergence`) depend on where the tokens come from:

- source="reference": y ~ pi_ref, a fixed distribution (pre-sampled data). D_f = E_ref[f(u)] and the
  sampling distribution does not depend on theta, so value = surrogate = f(u): the plain pathwise
  gradient of f(u) is unbiased. (If the pre-sampled data is filtered, e.g. to prompts the initial
  policy solves, the expectation is over that filtered distribution, token by token.)
- source="rollouts": y ~ pi_theta (on-policy samples). D_f = E_pi[f(u) / u] and
  grad D_f = E_pi[f'(u) grad log pi]. Differentiating f(u)/u at the samples would drop the
  score-function term of the sampling distribution, so the surrogate is
      sg(f(u)/u) + sg(f'(u) - f'(1)) * (logp - sg(logp)),
  whose value is the estimate and whose gradient is the score-function form (f'(1) is a constant
  baseline, zero for these normalised generators).

On sequences these are token-level estimates: each position is treated as its own categorical
distribution given the prefix, and the dependence of the prefix on theta is not differentiated. They
are exact (in expectation) for a single categorical, which is what the tests check by enumeration.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, TypeVar

import torch
from torch import Tensor

LOG_U_CLAMP = 20.0  # |log u| is clamped to this before any generator is evaluated
SOURCES = ("rollouts", "reference")  # where the tokens come from (see token_divergence)
REVERSE_KL_ESTIMATORS = ("k1", "k2", "k3")  # value estimates of reverse KL on rollouts
REVERSE_KL_LOSS_FORMS = ("k2", "k3", "k3+")  # reverse-KL penalties used directly as losses
# How a reverse-KL penalty on rollouts enters the loss (divergence.loss_form): "exact" is
# token_divergence's surrogate, "k1_reward" is k1_reward_penalty, the rest reverse_kl_loss.
REVERSE_KL_PENALTIES = ("exact", "k1_reward", *REVERSE_KL_LOSS_FORMS)

_ALPHA_LIMIT_TOL = 1e-6  # |alpha| or |alpha - 1| below this uses the exact KL limit


class Divergence:
    """An f-divergence generator: f and its derivative f' (wrt u), both as functions of log u."""

    name: str = ""

    def f(self, log_u: Tensor) -> Tensor:
        raise NotImplementedError

    def f_prime(self, log_u: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


DIVERGENCES: dict[str, type[Divergence]] = {}  # name -> generator class (the registry)

_D = TypeVar("_D", bound=type[Divergence])


def register_divergence(name: str) -> Callable[[_D], _D]:
    """Class decorator adding a Divergence subclass to DIVERGENCES under `name` (no overwrite)."""

    def decorator(cls: _D) -> _D:
        if name in DIVERGENCES:
            raise ValueError(
                f"divergence {name!r} is already registered (by {DIVERGENCES[name].__qualname__})"
            )
        cls.name = name
        DIVERGENCES[name] = cls
        return cls

    return decorator


def get_divergence(name: str, **params: float) -> Divergence:
    """The divergence registered as `name`, built with its parameters (e.g. alpha=0.5)."""
    if name not in DIVERGENCES:
        raise KeyError(f"unknown divergence {name!r}; known: {sorted(DIVERGENCES)}")
    cls = DIVERGENCES[name]
    accepted = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"divergence {name!r} takes parameters {accepted}, got unknown {unknown}"
        )
    return cls(**params)


def _clamp(log_u: Tensor) -> Tensor:
    return log_u.clamp(-LOG_U_CLAMP, LOG_U_CLAMP)


@register_divergence("forward_kl")
class ForwardKL(Divergence):
    """Forward KL, KL(pi_ref || pi): f(u) = u - 1 - log u, u = pi/pi_ref."""

    def f(self, log_u: Tensor) -> Tensor:
        log_u = _clamp(log_u)
        return torch.expm1(log_u) - log_u

    def f_prime(self, log_u: Tensor) -> Tensor:
        return -torch.expm1(-_clamp(log_u))  # 1 - 1/u


@register_divergence("reverse_kl")
class ReverseKL(Divergence):
    """Reverse KL, KL(pi || pi_ref): f(u) = u log u - u + 1, u = pi/pi_ref."""

    def f(self, log_u: Tensor) -> Tensor:
        log_u = _clamp(log_u)
        return torch.exp(log_u) * log_u - torch.expm1(log_u)

    def f_prime(self, log_u: Tensor) -> Tensor:
        return _clamp(log_u)  # log u


@register_divergence("js")
class JensenShannon(Divergence):
    """Jensen-Shannon x 2, 2 JS(pi, pi_ref): f(u) = u log u - (1+u) log((1+u)/2), u = pi/pi_ref."""

    # 2 JS = KL(pi || m) + KL(pi_ref || m), m = (pi + pi_ref) / 2, bounded by 2 log 2. Already
    # normalised: f'(u) = log(2u / (1 + u)), f'(1) = 0. log((1 + u) / 2) = softplus(log u) - log 2.

    def f(self, log_u: Tensor) -> Tensor:
        log_u = _clamp(log_u)
        log_mid = torch.nn.functional.softplus(log_u) - math.log(2.0)
        return torch.exp(log_u) * log_u - (1.0 + torch.exp(log_u)) * log_mid

    def f_prime(self, log_u: Tensor) -> Tensor:
        log_u = _clamp(log_u)
        return log_u - torch.nn.functional.softplus(log_u) + math.log(2.0)  # log(2u / (1 + u))


@register_divergence("alpha")
class Alpha(Divergence):
    """Amari alpha-divergence: f(u) = (u^a - 1 - a (u-1)) / (a (a-1)), a = alpha, u = pi/pi_ref."""

    # Valid for every real alpha (f'' = u^(alpha - 2) > 0): alpha -> 0 is forward KL, alpha -> 1 is
    # reverse KL (used exactly within 1e-6), alpha in (0, 1) interpolates; alpha = 0.5 gives
    # 2 (sqrt u - 1)^2, i.e. 4 x squared Hellinger. f'(u) = (u^(a-1) - 1) / (a - 1), f'(1) = 0.
    # Large |alpha| can overflow for extreme log u (u^alpha with |log u| up to LOG_U_CLAMP).

    def __init__(self, alpha: float = 0.5):
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite real number, got {alpha}")
        self.alpha = alpha

    def f(self, log_u: Tensor) -> Tensor:
        a = self.alpha
        if abs(a) < _ALPHA_LIMIT_TOL:
            return ForwardKL().f(log_u)
        if abs(a - 1.0) < _ALPHA_LIMIT_TOL:
            return ReverseKL().f(log_u)
        log_u = _clamp(log_u)
        u_minus_1 = torch.expm1(log_u)
        # Two algebraically equal forms; divide by whichever of alpha, alpha - 1 is not small:
        #   [ (u^a - 1)/a - (u - 1) ] / (a - 1)          (near a = 0: (u^a - 1)/a -> log u)
        #   [ u (u^(a-1) - 1)/(a - 1) - (u - 1) ] / a     (near a = 1: (u^(a-1) - 1)/(a-1) -> log u)
        if abs(a) < abs(a - 1.0):
            return (torch.expm1(a * log_u) / a - u_minus_1) / (a - 1.0)
        b = a - 1.0
        return (torch.exp(log_u) * (torch.expm1(b * log_u) / b) - u_minus_1) / a

    def f_prime(self, log_u: Tensor) -> Tensor:
        a = self.alpha
        if abs(a) < _ALPHA_LIMIT_TOL:
            return ForwardKL().f_prime(log_u)
        if abs(a - 1.0) < _ALPHA_LIMIT_TOL:
            return ReverseKL().f_prime(log_u)
        b = a - 1.0
        return torch.expm1(b * _clamp(log_u)) / b  # (u^(alpha-1) - 1) / (alpha - 1)


def reverse_kl_estimate(log_u: Tensor, estimator: str) -> Tensor:
    """Value estimates of KL(pi || pi_ref) at y ~ pi (per token), named as in Schulman's note.

    k1 = log u (unbiased, can be negative), k2 = 0.5 log^2 u (biased, >= 0),
    k3 = 1/u - 1 + log u (unbiased, >= 0; equals f(u)/u for the reverse-KL generator).
    Values only: used directly as losses their pathwise gradients differ (see token_divergence).
    """
    log_u = _clamp(log_u)
    if estimator == "k1":
        return log_u
    if estimator == "k2":
        return 0.5 * log_u.square()
    if estimator == "k3":
        return torch.expm1(-log_u) + log_u
    known = list(REVERSE_KL_ESTIMATORS)
    raise KeyError(f"unknown reverse-KL estimator {estimator!r}; known: {known}")


def token_divergence(
    div: Divergence,
    logp: Tensor,
    ref_logp: Tensor,
    *,
    source: str,
    estimator: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token surrogate loss and value estimate of D_f(pi_ref, pi); both shaped like logp.

    logp: log pi_theta(y_t | prefix) with grad; ref_logp: log pi_ref(y_t | prefix), no grad needed.
    The caller masks and aggregates over tokens (dph.aggregation.agg_loss) and multiplies by the weight.

    source="reference" (y ~ pi_ref, fixed): value = surrogate = f(u); pathwise gradient is exact.
    source="rollouts" (y ~ pi_theta): value = f(u)/u, surrogate = sg(value) + sg(f'(u) - f'(1)) *
        (logp - sg(logp)): its value is the estimate, its expected gradient
        E_pi[f'(u) grad log pi] = grad D_f.
    estimator (reverse_kl with source="rollouts" only; default "k3"): picks the VALUE estimate,
        "k1" log u, "k2" 0.5 log^2 u (biased), "k3" 1/u - 1 + log u (= f(u)/u); the gradient is the
        exact reverse-KL gradient for all three.

    The trap this avoids: k3 used directly as a loss on on-policy samples (GRPO's KL penalty) has,
    in expectation, the gradient of FORWARD KL(pi_ref || pi); k2 used directly has the gradient of
    reverse KL but a biased value.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {list(SOURCES)}")
    if estimator is not None and not (source == "rollouts" and isinstance(div, ReverseKL)):
        raise ValueError(
            f"estimator={estimator!r} applies only to reverse_kl with source='rollouts' "
            f"(got {div.name!r}, source={source!r}); set it to null"
        )
    if logp.dtype in (torch.float16, torch.bfloat16):
        logp = logp.float()
    log_u = logp - ref_logp.to(logp.dtype)

    if source == "reference":
        value = div.f(log_u)
        return value, value.detach()

    with torch.no_grad():
        if estimator is not None:
            value = reverse_kl_estimate(log_u, estimator)
        else:
            value = div.f(log_u) * torch.exp(-_clamp(log_u))  # f(u) / u
        score_weight = div.f_prime(log_u) - div.f_prime(log_u.new_zeros(()))
    surrogate = value + score_weight * (logp - logp.detach())
    return surrogate, value


def reverse_kl_loss(logp: Tensor, ref_logp: Tensor, form: str) -> tuple[Tensor, Tensor]:
    """The reverse-KL penalties used as per-token losses on ON-POLICY samples (y ~ pi_theta).

    Returns (loss, value), both shaped like logp; value is the detached per-token estimate of
    KL(pi || pi_ref), loss is what to differentiate (the caller masks, aggregates and weights).
    log u = logp - ref_logp. The expected gradient, E_pi[pathwise gradient of the loss], is:
      k2:  0.5 log^2 u              grad of REVERSE KL(pi || pi_ref); the value is biased
      k3:  1/u - 1 + log u          grad of FORWARD KL(pi_ref || pi), though its value is an
                                    unbiased reverse-KL estimate (GRPO's KL penalty)
      k3+: value of k3, grad of k2  grad of REVERSE KL (verl's straight-through "+" form:
                                    k2 + sg(k3 - k2))
    For the exact reverse-KL gradient with any value estimate use token_divergence(reverse_kl,
    source="rollouts"); for KL in the reward use k1_reward_penalty.
    """
    if form not in REVERSE_KL_LOSS_FORMS:
        known = list(REVERSE_KL_LOSS_FORMS)
        raise KeyError(f"unknown reverse-KL loss form {form!r}; known: {known}")
    if logp.dtype in (torch.float16, torch.bfloat16):
        logp = logp.float()
    log_u = logp - ref_logp.to(logp.dtype)
    k2 = reverse_kl_estimate(log_u, "k2")
    k3 = reverse_kl_estimate(log_u, "k3")
    if form == "k2":
        return k2, k2.detach()
    if form == "k3":
        return k3, k3.detach()
    return k2 + (k3 - k2).detach(), k3.detach()


def k1_reward_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence k1 = sum_t log(pi / pi_ref), to subtract (x weight) from the reward: [B, T] -> [B].

    "KL in the reward" (REINFORCE / PPO-RLHF style): r' = r - weight x k1 before the advantages.
    Through the policy-gradient (score-function) term, E_pi[-k1 grad log pi] =
    -grad KL(pi || pi_ref): the REVERSE-KL gradient. Detached (a reward carries no gradient).
    mask: [B, T], 1 on valid tokens (default: all valid); log-ratios are clamped to +-LOG_U_CLAMP.
    """
    with torch.no_grad():
        dtype = torch.promote_types(logp.dtype, torch.float32)
        log_u = _clamp(logp.to(dtype) - ref_logp.to(dtype))
        if mask is not None:
            log_u = torch.where(mask.bool(), log_u, torch.zeros_like(log_u))
        return log_u.sum(dim=-1)


def from_config(div_cfg) -> Divergence | None:
    """The divergence a `divergence` config names, with its generator's own parameters (None for
    divergence=none); the keys the trainer reads (weight, source, ...) are not the generator's."""
    from omegaconf import OmegaConf

    from dph.config import DIVERGENCE_RUN_KEYS, REVERSE_KL_KEYS

    if div_cfg.name == "none":
        return None
    params = OmegaConf.to_container(div_cfg, resolve=True)
    for key in (*DIVERGENCE_RUN_KEYS, *REVERSE_KL_KEYS):
        params.pop(key, None)
    return get_divergence(div_cfg.name, **params)
