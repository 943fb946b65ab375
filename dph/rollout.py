"""Sampling responses and scoring tokens: the only places the policy is run.

Layout of a batch of sequences (B sequences, prompt width P, response width T):
    input_ids      [B, P + T]  prompt left-padded to P, response right-padded to T
    attention_mask [B, P + T]  1 on real tokens (prompt and response up to and including eos)
    response_mask  [B, T]      1 on response tokens the loss sees
Log-probs are taken under the sampling distribution, i.e. softmax(logits / temperature), so that
rollouts are exactly on-policy for the objective (the ratio is 1 before the first update).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dph.metrics import entropy_from_log_probs, entropy_from_logits


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


LOGITS_CHUNK_BYTES = 256 << 20  # default bound on the float32 logits that exist at once (token_logprobs)
# config attributes of architectures whose logits are not the plain output embedding of the last
# hidden state (Gemma 2/3 soft-cap, Cohere logit_scale, Granite logits_scaling): their logits come whole
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def token_logprobs(model, batch: SequenceBatch, temperature: float, group: int = 1, *,
                   entropy_grad: bool = False, logits_chunk_bytes: int = LOGITS_CHUNK_BYTES
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the response tokens and the policy's entropy there, both [B, T].

    Runs with or without grad depending on the caller's context (the entropy carries grad only with
    `entropy_grad`, for an entropy bonus); padding positions hold zeros. group > 1: every `group`
    consecutive rows share one prompt (as engines lay them out); the prompt then runs once per group
    and its key/value cache is shared by the group's responses: the same values and gradients,
    without recomputing the prompt `group` times.

    Memory: when the float32 logits of all B x T positions fit in `logits_chunk_bytes`, they are
    computed at once. Otherwise the model returns its final hidden states instead and the output
    embedding runs over chunks of response tokens (chunked_logprobs_entropy): at a 150k vocabulary
    the [B, T, V] logits, their log_softmax and entropy never exist whole, and with grad each chunk's
    logits are recomputed in the backward instead of kept. Values and gradients are the same.
    """
    targets = batch.input_ids[:, batch.prompt_width :]
    inner = getattr(model, "module", model)
    head, vocab = _output_head(inner)
    rows = rows_per_chunk(vocab, logits_chunk_bytes)
    if targets.numel() <= rows:  # one chunk: the whole logits at once
        logits = _response_outputs(model, batch, group).float() / temperature  # logits[:, t] predicts token t
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)
    else:  # hidden states [B, T, H] (or, for a model that transforms its logits, logits [B, T, V] not upcast)
        outputs = _response_outputs(model, batch, group, head)
        valid = batch.response_mask.flatten().nonzero().squeeze(1)  # padding is never scored
        logp_valid, entropy_valid = chunked_logprobs_entropy(
            outputs.flatten(0, 1)[valid], targets.flatten()[valid], temperature, chunk_rows=rows, head=head,
            entropy_grad=entropy_grad)
        zeros = torch.zeros(targets.numel(), dtype=logp_valid.dtype, device=logp_valid.device)
        logp = zeros.index_copy(0, valid, logp_valid).view(targets.shape)
        entropy = zeros.index_copy(0, valid, entropy_valid).view(targets.shape)
    mask = batch.response_mask.to(logp.dtype)
    return logp * mask, entropy * mask


def rows_per_chunk(vocab_size: int, logits_chunk_bytes: int) -> int:
    """Positions per chunk whose float32 logits over `vocab_size` fit in `logits_chunk_bytes` (at least 1)."""
    return max(1, logits_chunk_bytes // (4 * vocab_size))


def chunked_logprobs_entropy(inputs: torch.Tensor, targets: torch.Tensor, temperature: float, *, chunk_rows: int,
                             head=None, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(z / temperature) at `targets` and the entropy of softmax(z / temperature), per row:
    z = head(inputs) for hidden states inputs [N, H] (head: the output embedding), or z = inputs for
    logits [N, V] (head None); returns two float32 [N].

    Rows go through in chunks of `chunk_rows`; only one chunk's logits exist at a time, upcast to
    float32 chunk by chunk. With grad, each chunk is checkpointed: its logits are dropped after the
    forward and recomputed chunk by chunk in the backward. Values and gradients are those of the
    whole computation (every op is per row); the entropy carries grad only with `entropy_grad`.
    """
    grad = torch.is_grad_enabled()

    def stats(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = torch.log_softmax((x if head is None else head(x)).float() / temperature, dim=-1)
        logp = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # first: the backward's recomputation stops here
        with torch.set_grad_enabled(entropy_grad and grad):  # unless the entropy has grad too
            entropy = entropy_from_log_probs(log_p)
        return logp, entropy

    parts = [checkpoint(stats, x, y, use_reentrant=False) if grad else stats(x, y)
             for x, y in zip(inputs.split(chunk_rows), targets.split(chunk_rows), strict=True)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _output_head(inner) -> tuple[torch.nn.Module | None, int]:
    """The model's output embedding when its logits are exactly that layer applied to the final hidden
    states (else None), and the vocabulary size."""
    head = inner.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else inner.config.vocab_size
    transforms = [a for a in _LOGIT_TRANSFORMS if getattr(inner.config, a, None) not in (None, 1, 1.0)]
    return (None if transforms else head), vocab


def _response_outputs(model, batch: SequenceBatch, group: int, head: torch.nn.Module | None = None
                      ) -> torch.Tensor:
    """At the T positions that predict the response tokens: the model's logits [B, T, V] (its dtype),
    or with `head` (the model's output embedding) the final hidden states [B, T, H] that it turns
    into those logits (the model then computes logits at one position only)."""
    width_p, width_r = batch.prompt_width, batch.response_mask.shape[1]
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    inner = getattr(model, "module", model)

    def run(module, **kwargs) -> tuple[torch.Tensor, object]:
        if head is None:
            out = module(**kwargs)
            return out.logits, out
        with _head_inputs(head) as seen:
            out = module(**kwargs)
        if len(seen) != 1:
            raise RuntimeError(f"{type(inner).__name__} called its output embedding {len(seen)} times in one "
                               "forward; token_logprobs needs exactly one call")
        _check_plain_head(inner, head, seen[0], out.logits)
        return seen[0], out

    # gradient checkpointing recomputes layers without a cache: the prompt cannot be shared then
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # transformers >= 5.2x; older: the other name
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    recomputed = checkpointing and inner.training  # transformers turns the cache off then, with or without grad
    if group <= 1 or recomputed or not shares_prompts(batch, group):
        outputs, _ = run(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=position_ids, logits_to_keep=width_r + 1, use_cache=False)
        return outputs[:, :-1]
    # The prompts once (the unwrapped model: a DDP wrapper expects one forward per backward), then
    # the responses on top of their cache, repeated for each row of the group.
    prompt_outputs, prompt = run(
        inner, input_ids=batch.input_ids[::group, :width_p], attention_mask=batch.attention_mask[::group, :width_p],
        position_ids=position_ids[::group, :width_p], logits_to_keep=1, use_cache=True,
    )
    cache_kwarg = "cache" if "cache" in prompt else "past_key_values"  # transformers >= 5.x / older
    cache = prompt[cache_kwarg]
    cache.batch_repeat_interleave(group)
    outputs, _ = run(model, input_ids=batch.input_ids[:, width_p:], attention_mask=batch.attention_mask,
                     position_ids=position_ids[:, width_p:], use_cache=True, logits_to_keep=width_r,
                     **{cache_kwarg: cache})
    first = prompt_outputs[:, -1:].repeat_interleave(group, dim=0)  # predicts response token 0
    return torch.cat([first, outputs[:, :-1]], dim=1)


@contextlib.contextmanager
def _head_inputs(head: torch.nn.Module):
    """Inside: each call of the output embedding `head` records its input (hidden states [B, n, H])
    and computes the logits of the last of the n positions only (which _check_plain_head compares)."""
    seen: list[torch.Tensor] = []

    def record(module, args):
        seen.append(args[0])
        return (args[0][..., -1:, :], *args[1:])

    handle = head.register_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def _check_plain_head(inner, head: torch.nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """Fail loudly if the model's logits are not head(hidden): chunked log-probs would be wrong."""
    with torch.no_grad():
        if not torch.allclose(head(hidden[..., -1:, :]).float(), logits.float(), rtol=1e-3, atol=1e-3):
            raise RuntimeError(
                f"{type(inner).__name__} transforms its logits after the output embedding (a soft-cap or scale), "
                "so token_logprobs cannot compute them in chunks: add the config attribute that sets the "
                "transform to dph.rollout._LOGIT_TRANSFORMS")


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
def logprobs_no_grad(model, batch: SequenceBatch, temperature: float, group: int, micro_batch_size: int, *,
                     logits_chunk_bytes: int = LOGITS_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs of a prompt-major batch (``group`` responses per prompt), in micro-batches."""
    parts = [token_logprobs(model, batch.select(s), temperature, group, logits_chunk_bytes=logits_chunk_bytes)
             for s in micro_slices(len(batch), micro_batch_size, group)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

