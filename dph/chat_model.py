"""`model=tiny_chat`: a realistic miniature of an instruction model, built here and cached like `model=tiny`.

It exercises on a laptop the code paths that real models take and the character-level tiny model
never does; it is not a stand-in for the embedded default's science. The build:
  1. a byte-level BPE tokenizer trained with `tokenizers` on the warm-up text of the run's tasks
     (their prompts and reasoning demonstrations), split as Qwen2's (digits one by one, words with
     their leading space), with Qwen's special tokens `<|endoftext|>` (pad), `<|im_start|>` and
     `<|im_end|>` (eos) and a Qwen-style chat template (`enable_thinking=false` writes an empty think
     block, as Qwen3's does); saved as a standard `tokenizer.json` that `AutoTokenizer` loads offline;
  2. a small `Qwen2ForCausalLM` from config (tied embeddings, grouped-query attention, a head size
     that vLLM's CPU attention supports), with more embedding rows than tokens, as Qwen2.5 has;
  3. a short "pretraining" on synthetic copy sequences (`copy_sequences`): copying numbers and names
     from the prompt is what the tasks need, and without it a warm-up of minutes does not learn it;
  4. a supervised warm-up on the tasks' `reasoning_demonstrations`: the run's prompts (the task's
     `prompt_template`, `model.system_prompt`, the preset's prefill) in the chat template, then a few
     lines of reasoning and the final answer in the task's real format, ending with `<|im_end|>` or
     `<|endoftext|>` in turn; the loss is on the response tokens only, each prompt computed once for
     all its responses (`packed_batch`);
  5. `generation_config.json` lists both EOS ids, as Qwen2.5-Instruct's does, so that a run that
     stops on the tokenizer's eos alone runs on after every `<|endoftext|>`.
Saved under `<cache_dir>/models/tiny_chat-<hash>` by `dph.models.cached_build`, the hash covering
everything above (`tiny_chat_spec`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dph.models import cached_build, causal_lm_loss, encode_prompts, supervised_warmup
from dph.tasks import Task

log = logging.getLogger(__name__)

BUILDER_VERSION = 1  # bump when the tiny_chat build procedure changes
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen2's pre-tokenizer split: contractions, words with one leading non-letter, single digits,
# punctuation runs with their newlines, newline runs, other whitespace.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5's chat template without its tool calls and default system prompt; Qwen3's enable_thinking.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
ROLES = ("system", "user", "assistant")
COPY_BATCH = 64  # sequences per step of the copy pretraining


def tiny_chat_spec(model_cfg: Mapping[str, Any], tasks: Sequence[Task], prefill: str = "") -> dict[str, Any]:
    """Everything that determines the tiny_chat model; its hash names the cache entry."""
    return {
        "builder": "tiny_chat",
        "builder_version": BUILDER_VERSION,
        "tokenizer": dict(model_cfg["tokenizer"]),
        "architecture": dict(model_cfg["architecture"]),
        "warmup": dict(model_cfg["warmup"]),
        "system_prompt": model_cfg.get("system_prompt"),
        "chat_template_kwargs": dict(model_cfg.get("chat_template_kwargs") or {}),
        "prefill": prefill,
        "tasks": [{"name": t.name, **t.fingerprint()} for t in tasks],
        "seed": model_cfg["seed"],
        "torch": torch.__version__.split("+")[0],
    }


def tiny_chat_model_dir(model_cfg: Mapping[str, Any], tasks: Sequence[Task], cache_dir: str | Path,
                        prefill: str = "") -> Path:
    """Build the tiny_chat model (seeded by model.seed) unless a valid build is cached; return its directory."""
    spec = tiny_chat_spec(model_cfg, tasks, prefill)
    return cached_build("tiny_chat", spec, cache_dir, "the tiny_chat model",
                        lambda out: build_tiny_chat(spec, tasks, out))


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE fast tokenizer trained on `texts` (at most `vocab_size` tokens, fewer when the
    text has fewer frequent pairs), with Qwen's special tokens and chat template; pads on the left."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=ENDOFTEXT,
                                  padding_side="left", model_max_length=1 << 20)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def after_prefill(response: str, prefill: str) -> str:
    """The part of `response` that follows `prefill` when the two overlap (a prefill `<think>` and a
    response `<think>\\n...` give `\\n...`); the whole response when they do not."""
    for size in range(min(len(prefill), len(response)), 0, -1):
        if prefill.endswith(response[:size]):
            return response[size:]
    return response


def build_tiny_chat(spec: Mapping[str, Any], tasks: Sequence[Task], out_dir: Path) -> dict[str, Any]:
    """Tokenizer, model and warm-up (module docstring); saved into `out_dir`. Returns build stats."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    arch, warm, seed = spec["architecture"], spec["warmup"], spec["seed"]
    system_prompt, prefill, template_kwargs = spec["system_prompt"], spec["prefill"], spec["chat_template_kwargs"]
    rng = random.Random(seed)
    per_task = max(1, warm["problems"] // len(tasks))
    # (prompt text, responses) per warm-up problem: the tokenizer is trained on them, then encodes them.
    dialogues: list[tuple[str, list[str]]] = []
    for task in tasks:
        for problem in task.warmup_problems(per_task, seed):
            demos = task.reasoning_demonstrations(problem, warm["answers_per_problem"], rng)
            dialogues.append((problem.prompt, [after_prefill(d, prefill) for d in demos]))
    corpus = [*ROLES, *([system_prompt] if system_prompt else []), prefill,
              *(text for prompt, responses in dialogues for text in (prompt, *responses))]
    tok = train_tokenizer(corpus, spec["tokenizer"]["vocab_size"])
    eos_ids = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]

    examples: list[tuple[list[int], list[list[int]]]] = []  # (prompt ids, [response ids + eos, ...])
    count = 0
    for prompt, responses in dialogues:
        [prompt_ids] = encode_prompts(tok, [prompt], True, system_prompt=system_prompt, prefill=prefill,
                                      chat_template_kwargs=template_kwargs)
        kept = []
        for response in responses:
            ids = tok.encode(response, add_special_tokens=False) + [eos_ids[count % 2]]
            if len(prompt_ids) + len(ids) <= arch["max_positions"]:
                kept.append(ids)
                count += 1
        if kept:
            examples.append((prompt_ids, kept))
    if not examples:
        raise ValueError("model.warmup: the tasks produced no warm-up example that fits "
                         "model.architecture.max_positions; raise it")

    torch.manual_seed(seed)
    rows = -(-len(tok) // arch["vocab_multiple"]) * arch["vocab_multiple"]  # embedding rows: padded, as Qwen2.5's
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"],
        max_position_embeddings=arch["max_positions"],
        tie_word_embeddings=True,
        bos_token_id=eos_ids[1],
        eos_token_id=eos_ids[0],
        pad_token_id=eos_ids[1],
    )
    model = Qwen2ForCausalLM(config)
    if warm["copy_steps"]:  # a short "pretraining" on copying, which the task warm-up then builds on
        text = [token for prompt, responses in examples for ids in (prompt, *responses) for token in ids]
        copies = copy_sequences(text, warm["copy_steps"] * COPY_BATCH, rng)
        supervised_warmup(model, copies, {**warm, "steps": warm["copy_steps"], "batch_size": COPY_BATCH}, rng,
                          lambda m, batch: causal_lm_loss(m, batch, tok.pad_token_id), desc="copy pretraining")
    losses = supervised_warmup(model, examples, warm, rng, lambda m, batch: packed_loss(m, batch, tok.pad_token_id))
    model.generation_config = GenerationConfig(bos_token_id=eos_ids[1], eos_token_id=eos_ids,
                                               pad_token_id=eos_ids[1])
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    tail = losses[-20:]
    lengths = [len(ids) for _, responses in examples for ids in responses]
    return {"prompts": len(examples), "responses": count, "final_loss": sum(tail) / len(tail),
            "parameters": model.num_parameters(), "tokens": len(tok),
            "mean_prompt_tokens": sum(len(prompt) for prompt, _ in examples) / len(examples),
            "mean_response_tokens": sum(lengths) / len(lengths)}


def copy_sequences(text: Sequence[int], count: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """Copy data, as (token ids, prompt length): a random span of 8 to 32 tokens of `text`, then the
    span again, its first token given; the loss on the rest of the repeat teaches induction heads
    (attend to the token after the previous occurrence of the current one), which copying numbers
    and names from a prompt needs and a warm-up of minutes does not otherwise find."""
    examples = []
    for _ in range(count):
        size = rng.randint(8, 32)
        start = rng.randrange(max(1, len(text) - size))
        span = list(text[start : start + size])
        examples.append((span + span, len(span) + 1))
    return examples


def packed_batch(groups: Sequence[tuple[list[int], list[list[int]]]], pad_id: int):
    """One row per prompt with all its responses after it: (ids, position ids, attention mask
    [B, 1, T, T] (True: attend), source [B, T]). A response token attends to the prompt and to its own
    response only, and its positions continue from the prompt's, so each response is computed exactly
    as if it followed the prompt alone, while the prompt is computed once. `source[b, t]` is the
    position whose logits predict token t (the previous token of its response, the prompt's last token
    for a response's first), -1 where nothing is predicted (prompt, padding)."""
    rows = []
    for prompt, responses in groups:
        ids, positions, segment, source = list(prompt), list(range(len(prompt))), [0] * len(prompt), [-1] * len(prompt)
        for number, response in enumerate(responses, 1):
            for j, token in enumerate(response):
                source.append(len(prompt) - 1 if j == 0 else len(ids) - 1)
                ids.append(token)
                positions.append(len(prompt) + j)
                segment.append(number)
        rows.append((ids, positions, segment, source))
    width = max(len(row[0]) for row in rows)
    out = [torch.full((len(rows), width), fill, dtype=torch.long) for fill in (pad_id, 0, -1, -1)]
    for b, row in enumerate(rows):
        for tensor, values in zip(out, row):
            tensor[b, : len(values)] = torch.tensor(values)
    ids, positions, segment, source = out
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (key >= 0) & ((key == 0) | (key == query))
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty row
    return ids, positions, mask[:, None], source


def packed_loss(model, groups: Sequence[tuple[list[int], list[list[int]]]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of every response token of `groups` (prompt ids, [response ids, ...]), each
    prompt computed once for all its responses (`packed_batch`)."""
    ids, positions, mask, source = packed_batch(groups, pad_id)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    rows, cols = (source >= 0).nonzero(as_tuple=True)
    return torch.nn.functional.cross_entropy(logits[rows, source[rows, cols]].float(), ids[rows, cols])
