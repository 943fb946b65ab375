"""dph.chat_model (model=tiny_chat): the BPE tokenizer with Qwen's special tokens and chat template, the
two EOS ids, prompts encoded through the chat template, every task's reasoning demonstrations, and a
small build that answers multi-line in the real format and solves some prompts."""

from __future__ import annotations

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose_config
from dph.chat_model import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, after_prefill, tiny_chat_spec, train_tokenizer
from dph.models import encode_prompts, fingerprint_hash, load_policy, resolve_model_dir
from dph.tasks import build_task

INSTRUCT = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "prompt" / "instruct.yaml"))["prompt"]["templates"]
# Countdown with two numbers up to 9, so that a model warmed up in about a minute solves some prompts.
EASY_SPLITS = {split: {"size": size, "numbers_per_problem": 2, "max_number": 9, "target_min": 1, "target_max": 99}
               for split, size in (("train", 48), ("test", 16))}
# tiny_chat.yaml at a quarter of its width and half its depth, warmed up for under a minute.
TINY_CHAT = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny_chat.yaml"))
SMALL = {**TINY_CHAT,
         "architecture": {**TINY_CHAT["architecture"], "hidden_size": 64, "num_layers": 2, "num_heads": 2,
                          "num_kv_heads": 1, "intermediate_size": 192},
         "warmup": {**TINY_CHAT["warmup"], "problems": 100, "copy_steps": 200, "steps": 150}}


def task(name: str, template: str | None = None, **overrides):
    cfg = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml")), **overrides}
    cfg.pop("response_tokens")
    return build_task({**cfg, "prompt_template": INSTRUCT[name] if template is None else template})


@pytest.fixture(scope="module")
def easy_countdown():
    return task("countdown", min_solutions=1, warmup_splits=["train"], splits=EASY_SPLITS)


@pytest.fixture(scope="module")
def chat_model_dir(easy_countdown, tmp_path_factory):
    return resolve_model_dir(SMALL, [easy_countdown], tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["Using the numbers [3, 5, 7], create an equation.", "<think>\n3*5 = 15\n</think>"] * 4, 512)


def test_the_tokenizer_is_byte_level_bpe_with_qwen_special_tokens(chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir, local_files_only=True)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (IM_END, ENDOFTEXT, None)
    assert tok.chat_template == CHAT_TEMPLATE
    assert 300 < len(tok) <= SMALL["tokenizer"]["vocab_size"]
    specials = [tok.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END)]
    assert specials == [0, 1, 2]
    for text in ("Using the numbers [3, 5, 7]", "héllo wörld ✓ 🙂\n\n\tx  y ", "<|im_end|>x<|endoftext|>", ""):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text  # byte level: every string round-trips, nothing is unknown
    ids = tok.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)
    assert ids[0] == specials[1] and ids[-1] == specials[2]  # special tokens are single ids
    assert len(tok.encode(" 1234", add_special_tokens=False)) == 5  # digits one by one, as Qwen2's
    assert len(tok.encode(" numbers", add_special_tokens=False)) == 1  # a frequent word is one token


def test_generation_config_lists_both_eos_ids(chat_model_dir):
    from transformers import AutoConfig, GenerationConfig

    tok, _ = load_policy(chat_model_dir, {"dtype": "float32"})[::-1]
    im_end, endoftext = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    generation = GenerationConfig.from_pretrained(chat_model_dir, local_files_only=True)
    assert generation.eos_token_id == [im_end, endoftext] and generation.pad_token_id == endoftext
    config = AutoConfig.from_pretrained(chat_model_dir, local_files_only=True)
    assert config.model_type == "qwen2" and config.eos_token_id == im_end
    assert config.hidden_size // config.num_attention_heads == 32  # a head size vLLM's CPU attention supports
    assert config.vocab_size % 128 == 0 and config.vocab_size >= len(tok)  # padded embedding, as Qwen2.5's


def test_encode_prompts_applies_the_chat_template(tokenizer):
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    user = "<|im_start|>user\n3 5 -> 8<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompts(tokenizer, ["3 5 -> 8"], "auto") == [ids(user)]
    assert encode_prompts(tokenizer, ["3 5 -> 8"], True) == [ids(user)]
    assert encode_prompts(tokenizer, ["3 5 -> 8"], False) == [ids("3 5 -> 8")]  # off: the raw prompt, no bos
    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert encode_prompts(tokenizer, ["3 5 -> 8"], "auto", system_prompt="Be brief.", prefill="<think>") == [
        ids(system + user + "<think>")]
    assert encode_prompts(tokenizer, ["3 5 -> 8"], "auto", chat_template_kwargs={"enable_thinking": False}) == [
        ids(user + "<think>\n\n</think>\n\n")]
    assert tokenizer.decode(encode_prompts(tokenizer, ["a", "b c"], "auto")[1]) == user.replace("3 5 -> 8", "b c")
    with pytest.raises(ValueError, match="model.system_prompt"):
        encode_prompts(tokenizer, ["x"], False, system_prompt="Be brief.")


@pytest.mark.parametrize("response, prefill, expected", [
    ("<think>\nx</think>", "", "<think>\nx</think>"),
    ("<think>\nx</think>", "<think>", "\nx</think>"),
    ("<think>\nx</think>", "Let me solve this step by step.\n<think>", "\nx</think>"),
    ("<think>\nx</think>", "<answer>", "<think>\nx</think>"),
    ("abc", "xab", "c"),
    ("ab", "ab", ""),
])
def test_after_prefill_drops_the_overlap(response, prefill, expected):
    assert after_prefill(response, prefill) == expected


@pytest.mark.parametrize("name", ["countdown", "sql", "math"])
def test_reasoning_demonstrations_are_multi_line_and_score_correct(name, tmp_path):
    extra = {"cache_dir": str(tmp_path)} if name == "sql" else {}
    t = task(name, **extra)
    rng = random.Random(0)
    fences = {"countdown": ("</think>\n<answer>", "</answer>"), "sql": ("```sql\n", ";\n```"),
              "math": ("\\boxed{", "}$.")}
    count = 0
    for problem in t.warmup_problems(12, seed=0):
        demos = t.reasoning_demonstrations(problem, 3, rng)
        assert demos and len(demos) <= 3 and len(set(demos)) == len(demos)
        for demo in demos:
            assert demo.count("\n") >= 2 and fences[name][0] in demo and demo.endswith(fences[name][1])
            assert t.score(problem, demo).status == "correct", demo
            count += 1
    assert count >= 12


def test_tiny_chat_config_composes_and_names_its_cache_entry(easy_countdown):
    cfg = compose_config(["model=tiny_chat"], hydra=False)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model["name"] == "tiny_chat" and model["chat_template"] == "auto" and model["system_prompt"] is None
    spec = tiny_chat_spec(model, [easy_countdown], prefill="<think>")
    assert spec["prefill"] == "<think>" and spec["tasks"][0]["prompt_template"] == INSTRUCT["countdown"]
    assert fingerprint_hash(spec) != fingerprint_hash(tiny_chat_spec(model, [easy_countdown]))
    assert fingerprint_hash(tiny_chat_spec({**model, "system_prompt": "Be brief."}, [easy_countdown])) != \
        fingerprint_hash(tiny_chat_spec(model, [easy_countdown]))


def test_the_built_model_reasons_on_several_lines_and_solves_some_prompts(chat_model_dir, easy_countdown):
    from dph.engines.hf import sample

    build = json.loads((chat_model_dir / "dph_build.json").read_text())
    assert build["spec"]["builder"] == "tiny_chat" and build["stats"]["mean_response_tokens"] > 20
    model, tok = load_policy(chat_model_dir, {"dtype": "float32"})
    problems = easy_countdown.problems("test")
    prompts = encode_prompts(tok, [p.prompt for p in problems], "auto")
    assert all(ids[:1] == [tok.convert_tokens_to_ids(IM_START)] for ids in prompts)
    torch.manual_seed(0)
    n = 4
    with torch.no_grad():
        out = model.generate(**tok.pad({"input_ids": prompts}, return_tensors="pt"), do_sample=True, top_p=1.0,
                             temperature=1.0, max_new_tokens=96, num_return_sequences=n)
    eos = set(model.generation_config.eos_token_id)
    statuses, ends, reasoned = [], [], 0
    for row, ids in enumerate(out[:, max(map(len, prompts)):].tolist()):
        stop = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        ends.append(ids[stop] if stop < len(ids) else None)
        text = tok.decode(ids[:stop])
        statuses.append(easy_countdown.score(problems[row // n], text, finished=stop < len(ids)).status)
        reasoned += text.startswith("<think>\nWe need ") and text.count("\n") >= 4 and "</think>\n<answer>" in text
    assert reasoned >= 0.75 * len(statuses)  # reasoning lines, then the tagged answer
    assert statuses.count("correct") > 0, statuses
    assert ends.count(None) <= len(ends) // 4 and set(ends) - {None} <= eos  # turns end with an EOS id
