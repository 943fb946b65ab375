"""Loss aggregation: how per-token losses [B, T] become one scalar (`algorithm.loss_agg`).

Each mode is registered in LOSS_AGGREGATIONS and gives (numerator, denominator), so that
micro-batches can share the full batch's denominator (exact gradient accumulation).

Shapes: B sequences, T response positions; `mask` [B, T] is 1 (or True) on valid response tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


# Loss aggregation: each mode gives (numerator, denominator) so that micro-batches can share the
# full batch's denominator. Denominators count valid tokens or non-empty sequences (rows with no
# valid token, e.g. padding rows, never count).
LossAggregation = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]
LOSS_AGGREGATIONS: dict[str, LossAggregation] = {}


def register_loss_agg(name: str) -> Callable[[LossAggregation], LossAggregation]:
    """Function decorator adding a loss aggregation to LOSS_AGGREGATIONS (no overwrite)."""

    def decorator(fn: LossAggregation) -> LossAggregation:
        if name in LOSS_AGGREGATIONS:
            raise ValueError(f"loss aggregation {name!r} is already registered")
        LOSS_AGGREGATIONS[name] = fn
        return fn

    return decorator


def _masked(loss_mat: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    valid = mask.bool()
    return torch.where(valid, loss_mat, torch.zeros_like(loss_mat)), valid


@register_loss_agg("token-mean")
def _token_mean(loss_mat: Tensor, mask: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """sum over all valid tokens / number of valid tokens (DAPO)."""
    loss_mat, valid = _masked(loss_mat, mask)
    return loss_mat.sum(), valid.sum()


@register_loss_agg("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """mean over sequences of each sequence's token mean (original GRPO)."""
    loss_mat, valid = _masked(loss_mat, mask)
    lengths = valid.sum(dim=-1)
    return (loss_mat.sum(dim=-1) / lengths.clamp(min=1)).sum(), (lengths > 0).sum()


@register_loss_agg("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """mean over sequences of token sum / horizon, a constant (Dr. GRPO)."""
    loss_mat, valid = _masked(loss_mat, mask)
    return loss_mat.sum() / horizon, (valid.sum(dim=-1) > 0).sum()


def _aggregation(mode: str) -> LossAggregation:
    if mode not in LOSS_AGGREGATIONS:
        raise KeyError(f"unknown loss aggregation {mode!r}; known: {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[mode]


def agg_numerator(
    loss_mat: Tensor, mask: Tensor, mode: str, horizon: int | None = None
) -> Tensor:
    """The numerator of `mode` on this (micro-)batch: a sum over its rows, differentiable.

    horizon: the max response length for "seq-mean-token-sum-norm" (default mask.shape[-1]); pass
        it explicitly when micro-batches are padded to different lengths.
    """
    horizon = mask.shape[-1] if horizon is None else horizon
    numerator, _ = _aggregation(mode)(loss_mat, mask, horizon)
    return numerator


def agg_denominator(mask: Tensor, mode: str) -> Tensor:
    """The denominator of `mode` on a mask: the count of valid tokens or of non-empty sequences.

    For gradient accumulation compute it once on the whole batch and divide every micro-batch's
    agg_numerator by it (or pass it as agg_loss's normalizer): the micro-batch losses then sum
    exactly to the full-batch loss. With DDP, which averages gradients over R ranks, use the count
    summed over ranks / R.
    """
    _, denominator = _aggregation(mode)(torch.zeros_like(mask, dtype=torch.float32), mask, 1)
    return denominator


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    horizon: int | None = None,
    *,
    normalizer: Tensor | float | None = None,
) -> Tensor:
    """Aggregate a [B, T] per-token loss to a scalar: agg_numerator / agg_denominator.

    mode: a key of LOSS_AGGREGATIONS. horizon: see agg_numerator.
    normalizer: the denominator to use instead of this batch's own (see agg_denominator).
    An empty mask (or a zero normalizer) gives 0, not NaN.
    """
    numerator = agg_numerator(loss_mat, mask, mode, horizon)
    denominator = agg_denominator(mask, mode) if normalizer is None else normalizer
    if isinstance(denominator, Tensor):
        denominator = denominator.to(numerator.dtype)
        denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    elif denominator <= 0:
        denominator = 1.0
    return numerator / denominator
