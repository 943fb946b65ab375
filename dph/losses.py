"""The losses of one micro-batch, each returning (loss, metrics) like verl's core_algos.

- `rollout_loss`: the policy loss on rollouts (algorithm.policy_loss, on the tokens it updates),
  the entropy bonus, and with a divergence on rollouts the divergence term;
- `rollout_divergence`: weight x D_f on the policy's own rollouts against the reference model, in
  the form divergence.loss_form gives;
- `rehearsal_loss`: DPH's weight x D_f on stored initial-policy responses (no reference model).

Token losses are aggregated by `algorithm.loss_agg` with a denominator shared by the whole
minibatch over all ranks (`Objective.denominator`), so the micro-batch losses add up to the
minibatch's loss exactly. Metrics are (numerator, denominator) pairs (dph.accumulator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dph import divergences, policy_losses
from dph.accumulator import Pair
from dph.aggregation import agg_denominator, agg_numerator
from dph.distributed import Ranks
from dph.rollout import SequenceBatch, token_logprobs


@dataclass
class Objective:
    """What the losses need besides the batch: the algorithm's choices and the ranks."""

    ranks: Ranks
    policy_loss: Any  # a dph.policy_losses function
    policy_loss_params: dict
    clip_low: float
    clip_high: float
    loss_agg: str
    horizon: int  # generation.max_new_tokens (seq-mean-token-sum-norm's constant)
    temperature: float
    group_size: int
    top_entropy_quantile: float | None = None
    tis_cap: float | None = None
    divergence: divergences.Divergence | None = None
    divergence_weight: float = 0.0
    divergence_form: str = "exact"  # divergence.loss_form (reverse KL on rollouts); else exact
    reverse_kl_estimator: str | None = None

    @classmethod
    def from_config(cls, cfg, ranks: Ranks) -> Objective:
        """The objective of a run's `algorithm`, `divergence`, `generation` and `rollout` config."""
        a, div = cfg.algorithm, cfg.divergence
        return cls(ranks, policy_losses.get_policy_loss(a.policy_loss), dict(a.policy_loss_params), a.clip_low,
                   a.clip_high, a.loss_agg, cfg.generation.max_new_tokens, cfg.generation.temperature, a.group_size,
                   a.top_entropy_quantile, cfg.rollout.tis_cap, divergences.from_config(div), div.weight,
                   div.get("loss_form", "exact"), div.get("estimator") if div.name == "reverse_kl" else None)

    def denominator(self, mask: torch.Tensor) -> float:
        """The aggregation's denominator over all ranks, divided by the world size because DDP
        averages gradients: then the sum of micro-batch losses equals the full-batch loss."""
        d = self.ranks.sum({"d": float(agg_denominator(mask, self.loss_agg))})["d"]
        return max(d, 1e-8) / self.ranks.count

    def aggregate(self, loss_mat: torch.Tensor, mask: torch.Tensor, denom: float) -> torch.Tensor:
        return agg_numerator(loss_mat * mask, mask, self.loss_agg, horizon=self.horizon) / denom


def rollout_loss(obj: Objective, policy, part: SequenceBatch, mask: torch.Tensor, advantages: torch.Tensor,
                 old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, denom: float, *,
                 entropy_coef: float, entropy_bonus: bool, generator: torch.Generator
                 ) -> tuple[torch.Tensor, dict[str, Pair]]:
    """The loss on a micro-batch of rollouts (`mask` [B, T]: the tokens the loss sees)."""
    logp, entropy = token_logprobs(policy, part, obj.temperature, obj.group_size, entropy_grad=entropy_bonus)
    old = logp.detach() if old_logp is None else old_logp
    updated = mask
    if obj.top_entropy_quantile is not None:  # train only the highest-entropy ("forking") tokens
        updated, _ = policy_losses.top_entropy_mask(entropy.detach(), mask, obj.top_entropy_quantile)
    pg_tok, stats = obj.policy_loss(logp, old, advantages, updated, clip_low=obj.clip_low, clip_high=obj.clip_high,
                                    generator=generator, **obj.policy_loss_params)
    n_tok, ent = float(mask.sum()), entropy.detach()
    metrics: dict[str, Pair] = {}
    if part.logprobs is not None:  # a rollout engine's own log-probs: how far they are from the trainer's
        diff = (old - part.logprobs).abs() * mask
        metrics["train/engine_logprob_diff"] = (float(diff.sum()), n_tok)
        metrics["train/engine_logprob_diff_max"] = (float(diff.max()), 0.0)
        if obj.tis_cap is not None:
            pg_tok = pg_tok * policy_losses.truncated_is_weights(old, part.logprobs, obj.tis_cap)
    loss = pg = obj.aggregate(pg_tok, mask, denom)
    if entropy_bonus:
        loss = loss + obj.aggregate(policy_losses.entropy_bonus(entropy, updated, entropy_coef)[0], mask, denom)
    if ref_logp is not None:
        div, div_metrics = rollout_divergence(obj, logp, ref_logp, mask, denom)
        loss = loss + div
        metrics.update(div_metrics)
    metrics.update({
        "train/pg_loss": (float(pg.detach()), 0.0),
        "train/entropy": (float((ent * mask).sum()), n_tok),
        "train/updated_token_frac": (float(updated.sum()), n_tok),
        "train/updated_token_entropy": (float((ent * updated).sum()), float(updated.sum())),
        "train/entropy_coef": (entropy_coef, 1.0),
        **{f"train/{stat}": (float(stats.get(stat, 0.0)) * n_tok, n_tok)
           for stat in ("clip_frac", "cov_clip_frac", "ratio_mean", "approx_kl")},
    })
    return loss, metrics


def rollout_divergence(obj: Objective, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                       denom: float) -> tuple[torch.Tensor, dict[str, Pair]]:
    """weight x the divergence on the policy's own rollouts against the reference model, in the form
    divergence.loss_form gives (reverse KL: its label says which gradient it really has)."""
    if obj.divergence_form == "exact":
        surrogate, value = divergences.token_divergence(obj.divergence, logp, ref_logp, source="rollouts",
                                                        estimator=obj.reverse_kl_estimator)
    elif obj.divergence_form == "k1_reward":  # in the advantages already; only its value here
        surrogate, value = None, divergences.reverse_kl_estimate(logp.detach() - ref_logp, "k1")
    else:
        surrogate, value = divergences.reverse_kl_loss(logp, ref_logp, obj.divergence_form)
    metrics = {"train/divergence": (float(obj.aggregate(value, mask, denom)), 0.0)}
    if surrogate is None:
        return torch.zeros((), device=logp.device), metrics
    div = obj.aggregate(surrogate, mask, denom)
    metrics["train/div_loss"] = (float(div.detach()), 0.0)
    return obj.divergence_weight * div, metrics


def rehearsal_loss(obj: Objective, policy, part: SequenceBatch, ref_logp: torch.Tensor, denom: float
                   ) -> tuple[torch.Tensor, dict[str, Pair]]:
    """DPH: weight x D_f on pre-sampled initial-policy responses (stored log-probs, no reference model)."""
    mask = part.response_mask.float()
    logp, _ = token_logprobs(policy, part, obj.temperature)
    surrogate, value = divergences.token_divergence(obj.divergence, logp, ref_logp, source="reference")
    div = obj.aggregate(surrogate, mask, denom)
    metrics = {
        "train/div_loss": (float(div.detach()), 0.0),
        "train/divergence": (float(obj.aggregate(value, mask, denom)), 0.0),
        "train/rehearsal_logprob": (float((logp.detach() * mask).sum()), float(mask.sum())),
    }
    return obj.divergence_weight * div, metrics
