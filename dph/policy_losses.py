"""Policy losses (a registry) and token-level helpers: entropy bonus, high-entropy token selection.

Shapes: B sequences, T response positions; logp / old_logp / mask are [B, T], `mask` is 1 (or True)
on valid response tokens; advantages are [B] (one per sequence) or [B, T].

Every registered loss has the signature

    fn(logp, old_logp, advantages, mask, *, clip_low, clip_high, generator=None, **params)
        -> (loss_mat [B, T], metrics)

loss_mat is the per-token loss to minimise, 0 where mask is 0; the caller aggregates it with
dph.aggregation.agg_loss (a loss_agg mode). `params` are the loss's own keyword parameters (see
policy_loss_params); `generator` seeds the losses that draw random numbers (clip_cov). Metrics are
detached 0-dim tensors whose keys, prefixed with "train/", are documented in dph.metrics.METRICS.
Every loss reports clip_frac, ratio_mean and approx_kl over the valid tokens, as ppo_clip does.

    name      per-token loss, r = pi / pi_old                       paper (arXiv)
    ppo_clip  -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)     PPO; DAPO's clip-higher
    gspo      the same with r -> s_i, the sequence's ratio          GSPO, 2507.18071
    clip_cov  ppo_clip, a few high-covariance tokens detached       Clip-Cov, 2505.22617
    kl_cov    -r A, + coef |log r| on the top-covariance tokens     KL-Cov, 2505.22617
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # |log pi/pi_old| is clamped to this before exp (as in verl)
COMMON_PARAMS = ("clip_low", "clip_high", "generator")  # keywords every policy loss takes

PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}  # name -> loss function (the registry)


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Function decorator adding a policy loss to POLICY_LOSSES under `name` (no overwrite)."""

    def decorator(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES:
            owner = POLICY_LOSSES[name].__qualname__
            raise ValueError(f"policy loss {name!r} is already registered (by {owner})")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as `name`; KeyError listing the known names otherwise."""
    if name not in POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; known: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def policy_loss_params(name: str) -> dict[str, Any]:
    """{parameter: default} of the loss's own keyword parameters (beyond COMMON_PARAMS).

    For validating a config up front: any other keyword makes the loss raise TypeError.
    """
    signature = inspect.signature(get_policy_loss(name))
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in COMMON_PARAMS
    }


# ---------------------------------------------------------------------------- shared pieces


def _token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """advantages [B] or [B, T] -> [B, 1] or [B, T] in like's dtype (broadcasts against [B, T])."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.to(like.dtype)


def _ratio_metrics(log_ratio: Tensor, valid: Tensor, clipped: Tensor) -> dict[str, Tensor]:
    """clip_frac, ratio_mean, approx_kl (k3 of KL(pi_old || pi): r - 1 - log r), valid tokens."""
    with torch.no_grad():
        n = valid.sum().clamp(min=1)
        zero = torch.zeros_like(log_ratio)
        return {
            "clip_frac": (clipped & valid).sum() / n,
            "ratio_mean": torch.where(valid, torch.exp(log_ratio), zero).sum() / n,
            "approx_kl": torch.where(valid, torch.expm1(log_ratio) - log_ratio, zero).sum() / n,
        }


def _masked_fraction(selected: Tensor, valid: Tensor) -> Tensor:
    return ((selected & valid).sum() / valid.sum().clamp(min=1)).detach()


def _centred_covariance(advantages: Tensor, logp: Tensor, valid: Tensor) -> Tensor:
    """Per-token (A - mean A) (logp - mean logp), means over the batch's valid tokens; [B, T].

    Detached (it only selects tokens); 0 on invalid tokens. advantages: [B, 1] or [B, T].
    """
    with torch.no_grad():
        adv = torch.where(valid, advantages.expand_as(logp), torch.zeros_like(logp))
        lp = torch.where(valid, logp, torch.zeros_like(logp))
        n = valid.sum().clamp(min=1)
        cov = (adv - adv.sum() / n) * (lp - lp.sum() / n)
        return torch.where(valid, cov, torch.zeros_like(cov))


def _count(fraction: float, n_valid: int) -> int:
    """max(1, floor(fraction * n_valid)) tokens (0 when there is no valid token), as in verl."""
    return max(int(fraction * n_valid), 1) if n_valid > 0 else 0


def _random_subset(candidates: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """A bool mask holding min(n, #candidates) of candidates' True entries, drawn uniformly."""
    flat_idx = candidates.flatten().nonzero().squeeze(-1)  # [C]
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(flat_idx.numel(), generator=generator, device=device)
    chosen = flat_idx[order[:n].to(flat_idx.device)]
    selected = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    selected[chosen] = True
    return selected.view_as(candidates)


def _ppo_clip(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, valid: Tensor, clip_low: float,
    clip_high: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss [B, T] zero off valid, detached log r, clipped: where the clipped branch is taken)."""
    advantages = _token_advantages(advantages, logp)
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, log_ratio.detach(), (clipped > unclipped).detach()


# ---------------------------------------------------------------------------- registered losses


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped loss -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = pi/pi_old.

    logp, old_logp, mask: [B, T]; advantages: [B] (one per sequence) or [B, T].
    Returns the [B, T] loss, 0 on invalid tokens (aggregate it with agg_loss). clip_high > clip_low
    is DAPO's clip-higher. The gradient is zero where the clipped branch is taken.
    metrics over valid tokens: clip_frac (fraction where the clipped branch is taken), ratio_mean,
    approx_kl (k3 estimate of KL(pi_old || pi): r - 1 - log r). generator: unused.
    """
    valid = mask.bool()
    loss, log_ratio, clipped = _ppo_clip(logp, old_logp, advantages, valid, clip_low, clip_high)
    return loss, _ratio_metrics(log_ratio, valid, clipped)


@register_policy_loss("gspo")
def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    generator: torch.Generator | None = None,
    gspo_clip_low: float = 3e-4,
    gspo_clip_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token loss -min(s A, clip(s, 1 - lo, 1 + hi) A), s_it = sg(s_i) pi_t/sg(pi_t) (arXiv 2507.18071).

    s_i = exp(mean over sequence i's valid tokens of (logp - old_logp)), the length-normalised
    sequence ratio, clipped per sequence. The token form s_{i,t} = sg(s_i) exp(logp_t - sg(logp_t))
    has the value s_i and the gradient s_i grad logp_t, so this [B, T] loss aggregated with
    "seq-mean-token-mean" has exactly GSPO's value and gradient, -(1/B) sum_i min(s_i A_i,
    clip(s_i) A_i) (with [B, T] advantages it is the paper's GSPO-token variant). Use that mode.
    The clip range is gspo_clip_low / gspo_clip_high, defaults 3e-4 / 4e-4 from the paper, much
    narrower than PPO's since s_i is a per-token geometric mean; clip_low / clip_high are unused.
    metrics: clip_frac (fraction of valid tokens in clipped sequences), ratio_mean and approx_kl of
    the per-token ratio, as ppo_clip. generator: unused.
    """
    advantages = _token_advantages(advantages, logp)
    valid = mask.bool()
    token_log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    token_log_ratio = token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()
    lengths = valid.sum(dim=-1).clamp(min=1)
    seq_log_ratio = (token_log_ratio.sum(dim=-1) / lengths).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(seq_log_ratio[:, None] + (logp - logp.detach()))  # value s_i, grad s_i dlogp
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - gspo_clip_low, 1.0 + gspo_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, _ratio_metrics(token_log_ratio, valid, clipped > unclipped)


@register_policy_loss("clip_cov")
def clip_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    generator: torch.Generator | None = None,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov: ppo_clip, sg(loss) on a few random tokens with lb < (A - mean A)(logp - mean logp) < ub (arXiv 2505.22617).

    cov = (A - mean A) (logp - mean logp), means over the valid tokens of the batch passed (so it
    depends on how the caller splits micro-batches). Candidates: valid tokens not already clipped
    by PPO with clip_cov_lb < cov < clip_cov_ub; max(1, floor(clip_cov_ratio x valid tokens)) of
    them, drawn uniformly at random with `generator` (reproducible when seeded), keep their loss
    value but lose its gradient (detached). verl multiplies their loss by 0 instead: the same
    gradient, a different reported value. Defaults (ratio 2e-4, bounds 1 and 5) are the authors'.
    metrics: clip_frac, ratio_mean, approx_kl as ppo_clip; cov_clip_frac, the fraction of valid
    tokens whose gradient was removed.
    """
    valid = mask.bool()
    loss, log_ratio, clipped_by_ppo = _ppo_clip(
        logp, old_logp, advantages, valid, clip_low, clip_high
    )
    cov = _centred_covariance(_token_advantages(advantages, logp), logp, valid)
    candidates = valid & ~clipped_by_ppo & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    n_pick = _count(clip_cov_ratio, int(valid.sum()))
    selected = _random_subset(candidates, n_pick, generator)
    loss = torch.where(selected, loss.detach(), loss)
    metrics = _ratio_metrics(log_ratio, valid, clipped_by_ppo)
    metrics["cov_clip_frac"] = _masked_fraction(selected, valid)
    return loss, metrics


@register_policy_loss("kl_cov")
def kl_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    generator: torch.Generator | None = None,
    kl_cov_ratio: float = 2e-3,
    kl_cov_coef: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov: -r A + kl_cov_coef |log r| on the top kl_cov_ratio tokens by cov, -r A elsewhere (arXiv 2505.22617).

    r = pi/pi_old, unclipped: as in the paper and the authors' code, the |log r| penalty on the
    highest-covariance tokens takes the place of PPO's clip, so clip_low / clip_high are unused and
    clip_frac is 0. cov = (A - mean A) (logp - mean logp), means over the valid tokens of the batch
    passed; max(1, floor(kl_cov_ratio x valid tokens)) tokens get the penalty. Defaults: ratio 2e-3
    (the authors' 7B setting; 2e-4 for 32B, verl's default) and coef 1.
    Note: |x| has zero gradient at 0, so with one update per rollout batch (logp == old_logp) the
    penalty does nothing; it acts from the second minibatch / epoch on.
    metrics: clip_frac (0), ratio_mean, approx_kl as ppo_clip; cov_clip_frac, the fraction of valid
    tokens penalised. generator: unused (the top tokens are chosen deterministically).
    """
    adv = _token_advantages(advantages, logp)
    valid = mask.bool()
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    with torch.no_grad():
        cov = _centred_covariance(adv, logp, valid).flatten()
        cov = torch.where(valid.flatten(), cov, torch.full_like(cov, -math.inf))
        top = cov.topk(_count(kl_cov_ratio, int(valid.sum()))).indices
        selected = torch.zeros_like(valid.flatten())
        selected[top] = True
        selected = selected.view_as(valid) & valid
    loss = -torch.exp(log_ratio) * adv
    loss = loss + torch.where(selected, kl_cov_coef * log_ratio.abs(), torch.zeros_like(loss))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    metrics = _ratio_metrics(log_ratio.detach(), valid, torch.zeros_like(valid))
    metrics["cov_clip_frac"] = _masked_fraction(selected, valid)
    return loss, metrics


# ---------------------------------------------------------------------------- entropy helpers


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Entropy bonus as a loss: -coef x H per token, [B, T], 0 on invalid tokens.

    entropy: [B, T] per-token policy entropy, carrying grad. Aggregate like the policy loss and add.
    metrics: entropy_coef.
    """
    valid = mask.bool()
    loss = torch.where(valid, -coef * entropy, torch.zeros_like(entropy))
    return loss, {"entropy_coef": torch.tensor(float(coef), device=entropy.device)}


def adaptive_entropy_coef(
    coef: float, entropy_mean: float | Tensor, target: float, lr: float, max_coef: float
) -> float:
    """The next entropy coefficient: clip(coef + lr (target - entropy_mean), 0, max_coef).

    The coefficient rises while the mean token entropy is under target and falls above it; the
    caller keeps it as state between steps.
    """
    if lr < 0 or max_coef < 0:
        raise ValueError(f"lr and max_coef must be >= 0, got lr={lr}, max_coef={max_coef}")
    new_coef = coef + lr * (target - float(entropy_mean))
    return min(max(new_coef, 0.0), max_coef)


def top_entropy_mask(
    entropy: Tensor, mask: Tensor, quantile: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """mask restricted to the top `quantile` fraction of valid tokens by entropy (arXiv 2506.01939).

    Keeps the valid tokens whose entropy is >= the n-th largest valid entropy,
    n = ceil(quantile x valid tokens) (ties at the threshold are all kept); quantile = 0.2 trains
    on the 20% highest-entropy ("forking") tokens, as in the paper. The threshold is over the batch
    passed. Returns (new mask [B, T] in mask's dtype, metrics): updated_token_entropy, the mean
    entropy of the kept tokens; updated_token_frac, kept / valid tokens (0 when there is none).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    valid = mask.bool()
    with torch.no_grad():
        values = entropy.detach()[valid]
        n_keep = math.ceil(round(quantile * values.numel(), 9))
        if n_keep == 0:
            kept = torch.zeros_like(valid)
        else:
            threshold = values.topk(n_keep).values[-1]
            kept = valid & (entropy.detach() >= threshold)
        n_kept = kept.sum()
        metrics = {
            "updated_token_entropy": torch.where(kept, entropy.detach(), 0.0).sum()
            / n_kept.clamp(min=1),
            "updated_token_frac": _masked_fraction(kept, valid),
        }
    return kept.to(mask.dtype), metrics


def truncated_is_weights(trainer_logp: Tensor, engine_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance weights for a rollout engine's mismatch: min(pi_trainer / pi_engine, cap) per token.

    The rollouts were sampled by the engine (its numerics: other kernels, precision), the loss is
    computed with the training model: w = min(exp(trainer_logp - engine_logp), cap), detached,
    multiplies the per-token policy loss so that its gradient estimates the trainer's on-policy
    gradient (the "TIS" correction of TRL and verl: Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"). [B, T] -> [B, T].
    """
    with torch.no_grad():
        return torch.exp(trainer_logp - engine_logp).clamp(max=cap)
