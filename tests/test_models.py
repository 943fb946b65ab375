"""dph.models: the character tokenizer, the hash-cached tiny base model, and local HF models
(model=hf) loaded and trained through the same code path."""

from __future__ import annotations

import json
import logging
import os
import shutil
import string

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY_OVERRIDES, read_jsonl, run_cli, with_overrides
from dph.models import (
    SPECIAL_TOKENS, char_tokenizer, encode_prompts, fingerprint_hash, load_policy, model_fingerprint,
    resolve_model_dir, tiny_spec,
)
from dph.engines.hf import sample
from dph.tasks import build_task

# A tiny base model that builds in about a second (the cache logic does not depend on its size).
MICRO = {
    "name": "tiny",
    "path": None,
    "chat_template": False,
    "architecture": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "max_positions": 48},
    "warmup": {"problems": 16, "answers_per_problem": 1, "steps": 2, "batch_size": 8, "lr": 1.0e-3},
    "seed": 0,
}


@pytest.fixture(scope="module")
def countdown():
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / "countdown.yaml"))
    return build_task(cfg)


def test_char_tokenizer_round_trips_offline(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "3 5 7 -> 22: (3+5)*7-34\nAb{}~"
    for t in (tok, loaded):
        ids = t.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character
        assert t.decode(ids) == text
        assert t.padding_side == "left"
        for attr, token in SPECIAL_TOKENS.items():
            assert getattr(t, attr) == token
    assert loaded.get_vocab() == tok.get_vocab()
    assert [loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id] == [tok.pad_token_id, tok.bos_token_id,
                                                                             tok.eos_token_id]
    printable = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
    assert loaded.decode(loaded.encode(printable, add_special_tokens=False)) == printable
    assert loaded.encode("é", add_special_tokens=False) == [loaded.unk_token_id]
    ids = [loaded.bos_token_id, *loaded.encode("12", add_special_tokens=False), loaded.eos_token_id, loaded.pad_token_id]
    assert loaded.decode(ids, skip_special_tokens=True) == "12"
    assert encode_prompts(loaded, ["12"], chat_template=False) == [[loaded.bos_token_id, *ids[1:3]]]


def test_encode_prompts_without_a_chat_template_is_the_raw_prompt():
    """The tiny model's tokenizer has no chat template: auto leaves its prompts as they were (bos +
    characters), a prefill is appended as text, and asking for a template or a system prompt is a
    one-line error naming the key."""
    tok = char_tokenizer()
    prompts = ["3 5 7 -> 22: ", "1 -> ", ""]
    raw = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in prompts]
    assert encode_prompts(tok, prompts, "auto") == raw
    assert encode_prompts(tok, prompts, False, chat_template_kwargs={"enable_thinking": False}) == raw
    with_prefill = [tok.bos_token_id, *tok.encode("1 -> <a>", add_special_tokens=False)]
    assert encode_prompts(tok, ["1 -> "], "auto", prefill="<a>") == [with_prefill]
    with pytest.raises(ValueError, match="model.chat_template=true .* use model.chat_template=auto"):
        encode_prompts(tok, prompts, True)
    with pytest.raises(ValueError, match="model.system_prompt is set .* set model.system_prompt=null"):
        encode_prompts(tok, prompts, "auto", system_prompt="Be brief.")
    with pytest.raises(ValueError, match="model.chat_template='yes' must be auto, true or false"):
        encode_prompts(tok, prompts, "yes")


def test_the_tiny_build_does_not_depend_on_the_chat_keys(countdown):
    chat = {**MICRO, "chat_template": "auto", "system_prompt": None, "chat_template_kwargs": {}}
    assert tiny_spec(chat, [countdown], 0) == tiny_spec(MICRO, [countdown], 0)


def test_tiny_build_is_cached_by_hash(tmp_path, countdown, caplog):
    caplog.set_level(logging.INFO, logger="dph.models")
    first = resolve_model_dir(MICRO, [countdown], tmp_path)
    assert first.parent == tmp_path / "models"
    assert first.name == f"tiny-{fingerprint_hash(tiny_spec(MICRO, [countdown], 0))}"
    build = json.loads((first / "dph_build.json").read_text())
    assert build["spec"] == json.loads(json.dumps(tiny_spec(MICRO, [countdown], 0)))
    assert build["stats"]["parameters"] > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert "Building the tiny base model" in caplog.text

    caplog.clear()
    again = resolve_model_dir(MICRO, [countdown], tmp_path)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps  # nothing rewritten
    assert "Using cached base model" in caplog.text and "Building" not in caplog.text

    # A changed warm-up setting is another model: another directory, built beside the first one.
    changed = {**MICRO, "warmup": {**MICRO["warmup"], "steps": 3}}
    other = resolve_model_dir(changed, [countdown], tmp_path)
    assert other != first and (other / "dph_build.json").is_file()
    assert json.loads((other / "dph_build.json").read_text())["spec"]["warmup"]["steps"] == 3
    # ... and so are another model.seed and another task configuration (hash only: not built here).
    assert fingerprint_hash(tiny_spec(MICRO, [countdown], 1)) != fingerprint_hash(tiny_spec(MICRO, [countdown], 0))
    other_task = build_task({**OmegaConf.to_container(OmegaConf.load(ROOT / "conf/task/countdown.yaml")), "seed": 1})
    assert fingerprint_hash(tiny_spec(MICRO, [other_task], 0)) != fingerprint_hash(tiny_spec(MICRO, [countdown], 0))
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []

    model, tok = load_policy(first, MICRO)
    assert model.config.hidden_size == 16 and tok.padding_side == "left"
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_a_stale_temporary_build_does_not_break_the_cache(tmp_path, countdown):
    """A build killed half-way leaves `<name>.tmp-XXXX/` (and its lock file): the next build removes it."""
    spec_name = f"tiny-{fingerprint_hash(tiny_spec(MICRO, [countdown], 0))}"
    models = tmp_path / "models"
    stale = models / f"{spec_name}.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{half written")
    (models / f"{spec_name}.lock").touch()
    built = resolve_model_dir(MICRO, [countdown], tmp_path)
    assert built == models / spec_name and (built / "dph_build.json").is_file()
    model, _ = load_policy(built, MICRO)
    assert model.num_parameters() == json.loads((built / "dph_build.json").read_text())["stats"]["parameters"]
    assert not stale.exists()


def test_a_damaged_cached_model_is_rebuilt_with_a_warning(tmp_path, countdown, caplog):
    """A truncated model.safetensors fails its checksum: warned about and rebuilt, never loaded."""
    built = resolve_model_dir(MICRO, [countdown], tmp_path)
    weights = built / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="dph.models"):
        again = resolve_model_dir(MICRO, [countdown], tmp_path)
    assert again == built and "model.safetensors does not match its checksum" in caplog.text
    assert weights.read_bytes() == good  # the same seeded build again
    load_policy(again, MICRO)


def test_model_fingerprint_is_by_content(tmp_path, countdown, hf_model_dir):
    """The pre-sampling cache is keyed by what a model is, not by where it lies or when it was written."""
    built = resolve_model_dir(MICRO, [countdown], tmp_path / "a")
    moved = tmp_path / "elsewhere" / built.name
    shutil.copytree(built, moved)
    os.utime(moved / "model.safetensors", (0, 0))
    assert model_fingerprint(moved) == model_fingerprint(built)
    copy = tmp_path / "hf-copy"
    shutil.copytree(hf_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(hf_model_dir)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("32", "33", 1))
    assert model_fingerprint(copy) != model_fingerprint(hf_model_dir)


def test_hf_model_loads_through_the_same_code_path(hf_model_dir):
    model_cfg = {"name": "hf", "path": str(hf_model_dir), "dtype": "auto", "trust_remote_code": False}
    assert resolve_model_dir(model_cfg, [], "/nonexistent-cache") == hf_model_dir
    model, tok = load_policy(hf_model_dir, model_cfg)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32  # auto on CPU
    assert tok.padding_side == "left"
    assert tok.pad_token_id == tok.eos_token_id  # no pad token saved: eos pads
    prompts = encode_prompts(tok, ["3 5 -> 8: ", "1 -> "], chat_template=False)
    assert prompts[1] == tok.encode("1 -> ", add_special_tokens=False)  # no bos token to prepend
    torch.manual_seed(0)
    batch = sample(model, tok, prompts, n=3, max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=8)
    assert len(batch) == 6 and batch.response_mask.shape[1] <= 6
    _, bf16_tok = load_policy(hf_model_dir, {**model_cfg, "dtype": "bfloat16"})
    assert bf16_tok.pad_token_id == tok.pad_token_id


@pytest.mark.slow
def test_dph_train_with_a_local_hf_model(hf_model_dir, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [a for a in TINY_OVERRIDES if not a.startswith("model.")]
    args = with_overrides(args, "model=hf", f"model.path={hf_model_dir}", "divergence=none", "logger=none",
                          "device=cpu", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}")
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["train/step"] for r in records] == [0, 1, 2, 2]
    assert all(0 <= r["train/response_length"] <= 16 for r in records if "train/loss" in r)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model_dir"] == str(hf_model_dir)
    assert not (cache / "models").exists()  # nothing was built for model=hf
