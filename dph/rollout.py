"""Sampling responses and scoring tokens: the only places the policy is run.

Layout of a batch of sequences (B sequences, prompt width P, response width T):
    input_ids      [B, P + T]  prompt left-padded to P, response right-padded to T
    attention_mask [B, P + T]  1 on real tokens (prompt and response up to and including eos)
    response_mask  [B, T]      1 on response tokens the loss sees
Log-probs are taken under the sampling distribution, i.e. softmax(logits / temperature), so that
rollouts are exactly on-policy for the objective (the ratio is 1 before the first update).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dph.metrics import entropy_from_logits


@dataclass
class SequenceBatch:
    """Prompts and responses as padded tensors, plus the decoded response texts; from a rollout engine
    also its log-probs of the sampled tokens [B, T] (zeros on padding) and why each response ended
    ("stop": eos, "length": max_new_tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    logprobs: torch.Tensor | None = None
    finish_reasons: list[str] | None = None

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> SequenceBatch:
        """The tensors on ``device`` (the pre-sampled rehearsal data stays on the CPU until drawn)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SequenceBatch(move(self.input_ids), move(self.attention_mask), move(self.response_mask), self.texts,
                             move(self.logprobs), self.finish_reasons)

    def select(self, index: slice | torch.Tensor) -> SequenceBatch:
        rows = range(len(self))[index] if isinstance(index, slice) else index.tolist()
        return SequenceBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.response_mask[index],
            [self.texts[i] for i in rows],
            None if self.logprobs is None else self.logprobs[index],
            None if self.finish_reasons is None else [self.finish_reasons[i] for i in rows],
        )


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], texts: list[str], pad_id: int,
            device: torch.device | str = "cpu", *, logprobs: Sequence[Sequence[float]] | None = None,
            finish_reasons: list[str] | None = None) -> SequenceBatch:
    """Pad token lists into a SequenceBatch (prompts on the left, responses on the right); per-token
    log-probs of the responses, when given, are padded like the responses."""
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    ids = torch.full((len(prompts), width_p + width_r), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros((len(prompts), width_r), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[row, width_p - len(p) : width_p] = torch.as_tensor(p, dtype=torch.long)
        ids[row, width_p : width_p + len(r)] = torch.as_tensor(r, dtype=torch.long)
        attn[row, width_p - len(p) : width_p + len(r)] = 1
        resp[row, : len(r)] = 1
    logp = None
    if logprobs is not None:
        logp = torch.zeros((len(prompts), width_r), dtype=torch.float32)
        for row, values in enumerate(logprobs):
            logp[row, : len(values)] = torch.as_tensor(values, dtype=torch.float32)
        logp = logp.to(device)
    return SequenceBatch(ids.to(device), attn.to(device), resp.to(device), texts, logp, finish_reasons)


def token_logprobs(model, batch: SequenceBatch, temperature: float, group: int = 1, *,
                   entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the response tokens and the policy's entropy there, both [B, T].

    Runs with or without grad depending on the caller's context (the entropy carries grad only with
    `entropy_grad`, for an entropy bonus); padding positions hold zeros. group > 1: every `group`
    consecutive rows share one prompt (as engines lay them out); the prompt then runs once per group
    and its key/value cache is shared by the group's responses: the same values and gradients,
    without recomputing the prompt `group` times.
    """
    logits = _response_logits(model, batch, group) / temperature  # logits[:, t] predicts response token t
    targets = batch.input_ids[:, batch.prompt_width :]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_from_logits(logits)
    mask = batch.response_mask.to(logp.dtype)
    return logp * mask, entropy * mask


def _response_logits(model, batch: SequenceBatch, group: int) -> torch.Tensor:
    """Float logits [B, T, V] at the positions that predict the T response tokens."""
    width_p, width_r = batch.prompt_width, batch.response_mask.shape[1]
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    inner = getattr(model, "module", model)
    # gradient checkpointing recomputes layers without a cache: the prompt cannot be shared then
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # transformers >= 5.2x; older: the other name
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    recomputed = checkpointing and inner.training  # transformers turns the cache off then, with or without grad
    if group <= 1 or recomputed or not shares_prompts(batch, group):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                    logits_to_keep=width_r + 1, use_cache=False)
        return out.logits[:, :-1].float()
    # The prompts once (the unwrapped model: a DDP wrapper expects one forward per backward), then
    # the responses on top of their cache, repeated for each row of the group.
    prompt = inner(
        input_ids=batch.input_ids[::group, :width_p], attention_mask=batch.attention_mask[::group, :width_p],
        position_ids=position_ids[::group, :width_p], logits_to_keep=1, use_cache=True,
    )
    cache_kwarg = "cache" if "cache" in prompt else "past_key_values"  # transformers >= 5.x / older
    cache = prompt[cache_kwarg]
    cache.batch_repeat_interleave(group)
    out = model(input_ids=batch.input_ids[:, width_p:], attention_mask=batch.attention_mask,
                position_ids=position_ids[:, width_p:], use_cache=True, logits_to_keep=width_r,
                **{cache_kwarg: cache})
    first = prompt.logits[:, -1:].repeat_interleave(group, dim=0)  # predicts response token 0
    return torch.cat([first, out.logits[:, :-1]], dim=1).float()


def shares_prompts(batch: SequenceBatch, group: int) -> bool:
    """Whether every `group` consecutive rows of the batch have the same (padded) prompt."""
    if len(batch) % group:
        return False
    prompts = batch.input_ids[:, : batch.prompt_width].view(-1, group, batch.prompt_width)
    return bool((prompts == prompts[:, :1]).all())


def micro_slices(n: int, size: int, group: int = 1) -> list[slice]:
    """Micro-batches of at most ``size`` rows, cut at whole groups of ``group`` rows when one fits
    (so that each group's prompt is computed once)."""
    size = size - size % group if group <= size else size
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def logprobs_no_grad(model, batch: SequenceBatch, temperature: float, group: int, micro_batch_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs of a prompt-major batch (``group`` responses per prompt), in micro-batches."""
    parts = [token_logprobs(model, batch.select(s), temperature, group)
             for s in micro_slices(len(batch), micro_batch_size, group)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

