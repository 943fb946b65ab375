"""The initial policy: the embedded tiny model (built, warmed up and cached here) or a local HF model.

No weights can be downloaded, so `model=tiny` builds its own base model:
  1. a character-level tokenizer (printable ASCII + newline) made with `tokenizers`, saved as a
     Hugging Face fast tokenizer;
  2. a small `LlamaForCausalLM` from config;
  3. a short supervised warm-up on correct answers drawn at random among ALL solutions of each
     warm-up problem, so that the initial policy is broad (several distinct correct answers per
     problem) and imperfect (Pass@1 well below Pass@k).
The result is saved with `save_pretrained` under `<cache_dir>/models/tiny-<hash>`, where the hash
covers everything that determines it (architecture, warm-up settings, tasks' fingerprints, seed,
builder version, `model.seed`). Built once with a progress bar, then reused; written atomically (a temporary
directory renamed into place) under a file lock, so parallel runs build it once, with the sha256 of
every file in its manifest (`dph_build.json`): a damaged cache is rebuilt, never loaded.

`model=hf model.path=DIR` loads any local causal LM and its tokenizer through the same code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import string
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dph.fileio import building, checksum_problem, checksums, new_dir, sha256_file, write_text_atomic
from dph.tasks import Task

log = logging.getLogger(__name__)

MODEL_NAMES = ("tiny", "tiny_chat", "hf")  # model.name: built here (tiny, tiny_chat) or a local HF model
BUILDER_VERSION = 1  # bump when the tiny model's build procedure changes
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def fingerprint_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII and newline, left-padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS.values(), *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(""), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **SPECIAL_TOKENS)
    return tok


def tiny_spec(model_cfg: Mapping[str, Any], tasks: Sequence[Task], seed: int) -> dict[str, Any]:
    """Everything that determines the tiny base model; its hash names the cache entry."""
    return {
        "builder_version": BUILDER_VERSION,
        "architecture": dict(model_cfg["architecture"]),
        "warmup": dict(model_cfg["warmup"]),
        "tasks": [{"name": t.name, **t.fingerprint()} for t in tasks],
        "seed": seed,
        "torch": torch.__version__.split("+")[0],
    }


BUILD_MANIFEST = "dph_build.json"  # the tiny model's spec, build stats and file checksums (written last)


def tiny_model_dir(model_cfg: Mapping[str, Any], tasks: Sequence[Task], cache_dir: str | Path) -> Path:
    """Build the tiny base model (seeded by model.seed) if no valid build is cached; return its directory."""
    spec = tiny_spec(model_cfg, tasks, model_cfg["seed"])
    return cached_build("tiny", spec, cache_dir, "the tiny base model", lambda out: _build_tiny(spec, tasks, out))


def cached_build(prefix: str, spec: Mapping[str, Any], cache_dir: str | Path, what: str,
                 build: Callable[[Path], dict[str, Any]]) -> Path:
    """`<cache_dir>/models/<prefix>-<hash of spec>`, built by `build(tmp_dir) -> stats` unless a valid
    build is cached there.

    A cached build is used only when every file matches the checksums of its manifest; a damaged one
    (e.g. a truncated model.safetensors) is rebuilt with a warning. The build runs under a file lock
    in a temporary directory renamed into place, so parallel runs build once."""
    target = Path(cache_dir) / "models" / f"{prefix}-{fingerprint_hash(spec)}"
    with building(target, what):
        problem = _build_problem(target)
        if problem is None:
            log.info("Using cached base model %s", target)
            return target
        if target.exists():
            log.warning("Cached base model %s is not valid (%s): rebuilding it", target, problem)
        log.info("Building %s (once per configuration) into %s", what, target)
        with new_dir(target) as tmp:
            start = time.perf_counter()
            stats = {**build(tmp), "build_s": round(time.perf_counter() - start, 1)}
            log.info("Built %s in %.0f s", what, stats["build_s"])
            manifest = {"spec": spec, "stats": stats, "files": checksums(tmp)}
            write_text_atomic(tmp / BUILD_MANIFEST, json.dumps(manifest, indent=2))
    return target


def _build_problem(directory: Path) -> str | None:
    """None when ``directory`` holds a complete tiny-model build, else what is wrong with it."""
    try:
        manifest = json.loads((directory / BUILD_MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable {BUILD_MANIFEST} with file checksums ({type(e).__name__})"
    return checksum_problem(directory, files)


def _build_tiny(spec: Mapping[str, Any], tasks: Sequence[Task], out_dir: Path) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    arch, warm, seed = spec["architecture"], spec["warmup"], spec["seed"]
    tok = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_heads"],
        max_position_embeddings=arch["max_positions"],
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)

    # Warm-up data: for each problem, several distinct correct answers drawn among all solutions.
    rng = random.Random(seed)
    per_task = max(1, warm["problems"] // len(tasks))
    examples: list[tuple[list[int], int]] = []  # (token ids, prompt length incl. bos)
    for task in tasks:
        for problem in task.warmup_problems(per_task, seed):
            prompt_ids = [tok.bos_token_id, *tok.encode(problem.prompt, add_special_tokens=False)]
            for answer in task.demonstrations(problem, warm["answers_per_problem"], rng):
                ids = prompt_ids + tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
                if len(ids) <= arch["max_positions"]:
                    examples.append((ids, len(prompt_ids)))
    if not examples:
        raise ValueError("model.warmup: the tasks produced no warm-up example that fits model.architecture.max_positions")

    losses = supervised_warmup(model, examples, warm, rng, lambda m, batch: causal_lm_loss(m, batch, tok.pad_token_id))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    tail = losses[-20:]
    return {"examples": len(examples), "final_loss": sum(tail) / len(tail), "parameters": model.num_parameters()}


def supervised_warmup(model, examples: Sequence[Any], warm: Mapping[str, Any], rng: random.Random,
                      batch_loss: Callable[[Any, list[Any]], torch.Tensor],
                      desc: str = "base model warm-up") -> list[float]:
    """Train `model` on `examples`: `warm["steps"]` AdamW steps on `batch_loss(model, batch)` of
    `warm["batch_size"]` examples drawn without replacement (reshuffled by `rng` each pass), peak lr
    `warm["lr"]` after a 5% linear warm-up, cosine decay to 5%. Returns the loss of every step; leaves
    the model in eval mode."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=warm["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    steps, bs = warm["steps"], warm["batch_size"]
    warmup_steps = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order: list[int] = []
    losses = []
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        if len(order) < bs:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[i] for i in order[:bs]]
        del order[:bs]
        loss = batch_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def causal_lm_loss(model, batch: Sequence[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the tokens after the prompt of (token ids, prompt length) examples."""
    ids, labels, mask = pad_batch(batch, pad_id)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def pad_batch(batch: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels, attention mask): labels are -100 on the prompt and the padding (loss
    on the answer and its eos), the mask is 1 on every token of a sequence."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (seq, prompt_len) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, prompt_len : len(seq)] = torch.tensor(seq[prompt_len:])
        mask[row, : len(seq)] = 1
    return ids, labels, mask


def resolve_model_dir(model_cfg: Mapping[str, Any], tasks: Sequence[Task], cache_dir: str | Path, *,
                      prefill: str = "") -> Path:
    """The directory to load the initial policy from (building the tiny or tiny_chat model when needed;
    `prefill`, the prompt preset's assistant prefill, shapes tiny_chat's warm-up prompts)."""
    if model_cfg["name"] == "tiny":
        return tiny_model_dir(model_cfg, tasks, cache_dir)
    if model_cfg["name"] == "tiny_chat":
        from dph.chat_model import tiny_chat_model_dir

        return tiny_chat_model_dir(model_cfg, tasks, cache_dir, prefill=prefill)
    return Path(model_cfg["path"]).expanduser()


def model_fingerprint(model_dir: Path) -> dict[str, str]:
    """What a saved model is, by content (not by where it lies): {file name: sha256} of the files
    that define it (weights, config, tokenizer). Cache keys built on it survive a move or a copy."""
    manifest = model_dir / BUILD_MANIFEST
    if manifest.is_file():  # a tiny build: its checksums were verified when it was resolved
        return json.loads(manifest.read_text())["files"]
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix != ".lock"}


def load_policy(model_dir: Path, model_cfg: Mapping[str, Any], device: torch.device | str = "cpu"):
    """Load (model, tokenizer) from a local directory, offline. The tokenizer pads on the left.

    A directory holding a LoRA adapter (adapter_config.json, as a LoRA run saves its policy) loads
    its base model and merges the adapter into it: the result is a plain model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir).expanduser().resolve()
    dtype = _dtype(model_cfg.get("dtype", "float32"), device)
    remote = bool(model_cfg.get("trust_remote_code", False))
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=remote)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"model.path={model_dir}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    adapter = model_dir / "adapter_config.json"
    base_dir = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else model_dir
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=dtype, trust_remote_code=remote)
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir, local_files_only=True).merge_and_unload()
    return model.to(device), tok


def prepare_for_training(model, model_cfg: Mapping[str, Any]):
    """The policy as it trains: with LoRA adapters (`model.lora.r > 0`: only they train; the frozen
    base stays the initial policy) and gradient checkpointing when asked."""
    if model_cfg.get("gradient_checkpointing", False):
        enable_checkpointing(model)
    lora = model_cfg.get("lora") or {}
    if lora.get("r", 0) > 0:
        from peft import LoraConfig, get_peft_model

        targets = lora["target_modules"]
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], task_type="CAUSAL_LM",
            target_modules=targets if isinstance(targets, str) else list(targets)))
    return model


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing, under the name this transformers version gives it."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def uses_lora(model_cfg: Mapping[str, Any]) -> bool:
    return (model_cfg.get("lora") or {}).get("r", 0) > 0


def _dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def chat_template_enabled(tokenizer, chat_template: str | bool) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template: model.chat_template is auto (when
    the tokenizer has one), true (it must have one) or false."""
    if not (isinstance(chat_template, bool) or chat_template == "auto"):
        raise ValueError(f"model.chat_template={chat_template!r} must be auto, true or false")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is True and not has_template:
        raise ValueError("model.chat_template=true but this model's tokenizer has no chat template: "
                         "use model.chat_template=auto (raw prompts) or a model whose tokenizer has one")
    return has_template if chat_template == "auto" else bool(chat_template)


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: str | bool, *, system_prompt: str | None = None,
                   prefill: str = "", chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each prompt as the policy sees it.

    With the chat template (`chat_template_enabled`): the messages [system (when `system_prompt`),
    user], rendered with the generation prompt (`apply_chat_template(..., add_generation_prompt=True,
    **chat_template_kwargs)`), then `prefill` appended as text, the whole encoded without added
    special tokens (the template writes its own). Without: bos (where the tokenizer has one) and the
    raw prompt + `prefill`. A system prompt needs a chat template (ValueError before any work).
    """
    wrap = chat_template_enabled(tokenizer, chat_template)
    if system_prompt is not None and not wrap:
        raise ValueError("model.system_prompt is set but prompts are not wrapped in a chat template (this model's "
                         "tokenizer has none, or model.chat_template=false): set model.system_prompt=null")
    if not wrap:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return [bos + tokenizer.encode(p + prefill, add_special_tokens=False) for p in prompts]
    head = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    kwargs = dict(chat_template_kwargs or {})
    texts = [tokenizer.apply_chat_template([*head, {"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False, **kwargs) + prefill for p in prompts]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]
