"""The HF engine: `generate` (KV cache) on the training model itself, so it always has the current weights."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from dph.engines import RolloutEngine, cut_at_stop
from dph.rollout import SequenceBatch, collate


class HFEngine(RolloutEngine):
    """Samples with HF ``generate`` on ``model`` in chunks of ``batch_size`` sequences; reports no
    log-probs of its own (the trainer computes them with the same model). Responses stop at every
    id of ``eos_ids`` (None: the tokenizer's eos) and at the ``stop`` strings."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int, synced_gpus: bool = False,
                 eos_ids: Sequence[int] | None = None, stop: Sequence[str] = ()):
        self.model, self.tokenizer, self.batch_size, self.synced_gpus = model, tokenizer, batch_size, synced_gpus
        self.eos_ids, self.stop = eos_ids, list(stop)

    def update_weights(self, model) -> None:
        self.model = model

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> SequenceBatch:
        with seeded(seed, next(self.model.parameters()).device):
            return sample(self.model, self.tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, batch_size=self.batch_size,
                          synced_gpus=self.synced_gpus, eos_ids=self.eos_ids, stop=self.stop)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block on torch's global generators seeded with ``seed``, restoring their state after it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int,
           temperature: float, top_p: float, batch_size: int, synced_gpus: bool = False,
           eos_ids: Sequence[int] | None = None, stop: Sequence[str] = ()) -> SequenceBatch:
    """Sample `n` responses per prompt with HF `generate` (KV cache); rows are prompt-major.

    Each response runs up to and including its first stop (dph.engines.cut_at_stop: an id of
    `eos_ids`, None: the tokenizer's eos; or the token completing a `stop` string), else it is cut at
    `max_new_tokens`. A row ends early once it has a stop; rows of a chunk still running go on, and
    every row is cut at its first stop afterwards. Only temperature and top_p shape sampling (top_k
    and penalties are off). synced_gpus: keep every rank generating until all are done (a sharded
    model, FSDP or ZeRO-3, needs every rank in every forward).
    """
    device = next(model.parameters()).device
    eos_ids = [tokenizer.eos_token_id] if eos_ids is None else list(eos_ids)
    stop = list(stop)
    rows = [list(p) for p in prompts for _ in range(n)]
    responses: list[list[int]] = []
    finish: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.as_tensor(p)
            attn[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            stopping_criteria=StoppingCriteriaList([StopStrings(stop, tokenizer, width)]) if stop else None,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
        for seq in out[:, width:].tolist():
            response, stopped = cut_at_stop(seq, eos_ids=eos_ids, stop=stop, decode=_decoder(tokenizer))
            responses.append(response)
            finish.append("stop" if stopped else "length")
    model.train(was_training)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return collate(rows, responses, texts, tokenizer.pad_token_id, device, finish_reasons=finish)


def _decoder(tokenizer):
    """A response's text as the verifier reads it (special tokens skipped)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class StopStrings(StoppingCriteria):
    """Ends a row of ``generate`` once its response (the tokens after the prompt's ``width``) has a
    stop string by cut_at_stop's rule. HF's own ``stop_strings`` also match a string that begins in
    the prompt, where cut_at_stop (and vLLM) would not cut: the row would then hold padding.

    Each step decodes the last few tokens of every row (a new stop string ends in the newest token,
    and each token adds at least one character or one byte of one); a row whose tail has a stop
    string is confirmed on its whole response. A string the tail misses only lets the row run on:
    cut_at_stop still cuts it at its first stop."""

    def __init__(self, stop: Sequence[str], tokenizer, width: int):
        self.stop, self.tokenizer, self.width = list(stop), tokenizer, width
        self.tail = 4 * (max(len(s) for s in self.stop) + 2)  # tokens decoded per row and step
        self.ended: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        decode = _decoder(self.tokenizer)
        tails = self.tokenizer.batch_decode(input_ids[:, max(self.width, input_ids.shape[1] - self.tail) :].tolist(),
                                            skip_special_tokens=True)
        for row, text in enumerate(tails):
            if row not in self.ended and any(s in text for s in self.stop) and \
                    any(s in decode(input_ids[row, self.width :].tolist()) for s in self.stop):
                self.ended.add(row)
        return torch.tensor([row in self.ended for row in range(input_ids.shape[0])], device=input_ids.device)
