"""The HF engine: `generate` (KV cache) on the training model itself, so it always has the current weights."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from dph.engines import RolloutEngine
from dph.rollout import SequenceBatch, collate


class HFEngine(RolloutEngine):
    """Samples with HF ``generate`` on ``model`` in chunks of ``batch_size`` sequences; reports no
    log-probs of its own (the trainer computes them with the same model)."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int, synced_gpus: bool = False):
        self.model, self.tokenizer, self.batch_size, self.synced_gpus = model, tokenizer, batch_size, synced_gpus

    def update_weights(self, model) -> None:
        self.model = model

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> SequenceBatch:
        with seeded(seed, next(self.model.parameters()).device):
            return sample(self.model, self.tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, batch_size=self.batch_size,
                          synced_gpus=self.synced_gpus)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block on torch's global generators seeded with ``seed``, restoring their state after it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int,
           temperature: float, top_p: float, batch_size: int, synced_gpus: bool = False) -> SequenceBatch:
    """Sample `n` responses per prompt with HF `generate` (KV cache); rows are prompt-major.

    Each response ends at (and includes) the first eos; a response that never emits eos is cut at
    `max_new_tokens`. Only temperature and top_p shape sampling (top_k and penalties are off).
    synced_gpus: keep every rank generating until all are done (a sharded model, FSDP or ZeRO-3,
    needs every rank in every forward).
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    rows = [list(p) for p in prompts for _ in range(n)]
    responses: list[list[int]] = []
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
            eos_token_id=eos,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
        for seq in out[:, width:].tolist():
            responses.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    model.train(was_training)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    finish = ["stop" if r and r[-1] == eos else "length" for r in responses]
    return collate(rows, responses, texts, tokenizer.pad_token_id, device, finish_reasons=finish)
