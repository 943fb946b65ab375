"""dph.presample: the D_pef / D_exp split, the stored reference log-probs and the cache.

A tiny random LlamaForCausalLM samples the responses and a scripted task fixes every prompt's pass
count exactly (its verifier accepts the first `quota` responses it is shown for a prompt), so the
split, the histogram and the kept rows are known in advance whatever the model samples.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dph.presample as presample
from conftest import compose_config
from dph.builders import PromptEncoder
from dph.engines.hf import HFEngine
from dph.models import char_tokenizer, fingerprint_hash
from dph.presample import MANIFEST_FILE, TENSOR_FILE, load_or_build, presample_spec, split_metrics
from dph.rollout import collate, token_logprobs
from dph.tasks import Problem, Score, Task

N = 4  # presample.n in these tests
# Prompt id -> responses the verifier accepts (of N). Interleaved so that D_pef rows come from
# several generation chunks (generation.batch_size=8 -> 2 prompts per chunk).
QUOTAS = {"always/0": 4, "never/0": 0, "some2/0": 2, "always/1": 4, "some1/0": 1, "never/1": 0, "some3/0": 3}
OVERRIDES = [
    f"presample.n={N}",
    "presample.threshold=1.0",
    "presample.temperature=1.0",
    "generation.max_new_tokens=6",
    "generation.batch_size=8",
    "generation.temperature=0.7",  # log-probs are stored under this one, not presample.temperature
    "logger=none",
]
MODEL_FP = {"name": "random-llama", "seed": 0}


class ScriptedTask(Task):
    """Train prompts with known pass counts: the verifier accepts the first `quota` responses it
    is shown for each prompt (and records them), whatever their text."""

    name = "scripted"

    def __init__(self, quotas: dict[str, int] = QUOTAS):
        self.quotas = dict(quotas)
        self.shown: Counter[str] = Counter()
        self.accepted: dict[str, list[str]] = defaultdict(list)

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("train",)

    def problems(self, split: str) -> list[Problem]:
        self.check_split(split)
        return [Problem(id=pid, prompt=f"{pid} -> ") for pid in self.quotas]

    def score(self, problem: Problem, response: str) -> Score:
        seen = self.shown[problem.id]
        self.shown[problem.id] += 1
        if seen < self.quotas[problem.id]:
            self.accepted[problem.id].append(response)
            return Score(reward=1.0, answer=response, status="correct")
        return Score(reward=0.0, answer=response, status="wrong")

    def warmup_problems(self, n: int, seed: int) -> list[Problem]:
        return []

    def demonstrations(self, problem: Problem, n: int, rng) -> list[str]:
        return []

    def fingerprint(self) -> dict:
        return {"quotas": [[pid, q] for pid, q in sorted(self.quotas.items())]}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    """A tiny random Llama: the 'initial policy' (no warm-up; what it samples does not matter here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@functools.lru_cache(maxsize=None)
def make_cfg(*extra: str):
    """The composed dph-train config with OVERRIDES and `extra` (composed once per argument list)."""
    return compose_config([*OVERRIDES, *extra])


def encoder(cfg) -> PromptEncoder:
    """How the run encodes prompts (the character tokenizer has no chat template)."""
    return PromptEncoder(cfg, char_tokenizer())


def cache_key(cfg, task: Task | None = None, model_fp: dict = MODEL_FP) -> str:
    return fingerprint_hash(presample_spec(model_fp, task or ScriptedTask(), cfg, encoder(cfg)))


def build(policy, tokenizer, cache_dir: Path, cfg=None, task: Task | None = None):
    task, cfg = task or ScriptedTask(), cfg or make_cfg()
    engine = HFEngine(policy, tokenizer, batch_size=cfg.generation.batch_size)
    return load_or_build(engine, policy, PromptEncoder(cfg, tokenizer), task, MODEL_FP, cfg, cache_dir), task


@pytest.fixture
def count_sampling(monkeypatch):
    """Counts calls of the rollout engine by the pre-sampling stage (the real engine still runs)."""
    calls = []
    real = HFEngine.generate

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("n"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFEngine, "generate", counted)
    return calls


def response_tokens(batch, row: int) -> list[int]:
    return batch.input_ids[row, batch.prompt_width :][batch.response_mask[row].bool()].tolist()


# ---------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.25])
def test_split_matches_known_pass_rates(policy, tokenizer, tmp_path, threshold):
    data, task = build(policy, tokenizer, tmp_path, make_cfg(f"presample.threshold={threshold}"))
    m = data.manifest
    ids = list(QUOTAS)
    pef = [pid for pid in ids if QUOTAS[pid] / N >= threshold]
    exp = [pid for pid in ids if QUOTAS[pid] / N < threshold]
    assert m["d_pef"] == pef and m["d_exp"] == exp
    assert [p.id for p in data.exploration_problems(task)] == exp
    assert m["counts"] == {"prompts": len(ids), "d_pef": len(pef), "d_exp": len(exp),
                           "reference_samples": sum(QUOTAS[pid] for pid in pef)}
    assert m["pass_rate_histogram"] == {f"{c}/{N}": sum(q == c for q in QUOTAS.values()) for c in range(N + 1)}
    if threshold == 1.0:  # D_pef = the always-solved prompts, each with all N responses kept
        assert pef == ["always/0", "always/1"] and len(data) == N * len(pef)

    # Each stored row is an accepted response of a D_pef prompt, in sampling order.
    assert len(data) == len(data.ref_logprobs) == len(data.problem_index) == m["counts"]["reference_samples"]
    assert Counter(ids[i] for i in data.problem_index.tolist()) == {pid: QUOTAS[pid] for pid in pef}
    stored = defaultdict(list)
    for row, index in enumerate(data.problem_index.tolist()):
        stored[ids[index]].append(tokenizer.decode(response_tokens(data.batch, row), skip_special_tokens=True))
    assert stored == {pid: task.accepted[pid] for pid in pef}
    # ...and its prompt is the D_pef prompt's (left-padded to the common width).
    for row, index in enumerate(data.problem_index.tolist()):
        prompt = data.batch.input_ids[row, : data.batch.prompt_width][data.batch.attention_mask[row, : data.batch.prompt_width].bool()]
        assert tokenizer.decode(prompt, skip_special_tokens=True) == f"{ids[index]} -> "

    summary = split_metrics(m)
    assert summary["presample/d_pef"] == len(pef) and summary["presample/d_exp"] == len(exp)
    assert summary["presample/d_pef_fraction"] == pytest.approx(len(pef) / len(ids))
    assert summary["presample/reference_samples"] == len(data)


def test_no_prompt_reaches_the_threshold(policy, tokenizer, tmp_path):
    data, _ = build(policy, tokenizer, tmp_path, task=ScriptedTask({"never/0": 0, "never/1": 0}))
    assert data.manifest["counts"]["reference_samples"] == 0 and len(data) == 0
    assert data.manifest["d_pef"] == [] and data.manifest["d_exp"] == ["never/0", "never/1"]


def test_stored_logprobs_are_the_initial_policy_on_the_stored_tokens(policy, tokenizer, tmp_path):
    cfg = make_cfg("presample.threshold=0.25")
    data, _ = build(policy, tokenizer, tmp_path, cfg)
    batch, ref = data.batch, data.ref_logprobs
    mask = batch.response_mask.bool()
    assert len(data) >= 8 and ref.dtype == torch.float32
    assert torch.all(ref[~mask] == 0) and torch.all(ref[mask] < 0)
    with torch.no_grad():
        fresh, _ = token_logprobs(policy, batch, cfg.generation.temperature)
        assert torch.allclose(ref, fresh, atol=1e-5, rtol=0)
        # Under the sampling temperature they would differ: the stored ones use generation.temperature.
        assert not torch.allclose(ref, token_logprobs(policy, batch, cfg.presample.temperature)[0], atol=1e-3)
        # Padding does not change them: each row scored alone, without padding.
        for row in range(len(data)):
            keep = batch.attention_mask[row, : batch.prompt_width].bool()
            alone = collate([batch.input_ids[row, : batch.prompt_width][keep].tolist()],
                            [response_tokens(batch, row)], [""], tokenizer.pad_token_id)
            logp, _ = token_logprobs(policy, alone, cfg.generation.temperature)
            assert torch.allclose(ref[row][mask[row]], logp[0], atol=1e-5, rtol=0)


def test_draw_is_a_seeded_subset(policy, tokenizer, tmp_path):
    data, _ = build(policy, tokenizer, tmp_path, make_cfg("presample.threshold=0.25"))
    a = data.draw(5, torch.Generator().manual_seed(3))
    b = data.draw(5, torch.Generator().manual_seed(3))
    assert torch.equal(a[0].input_ids, b[0].input_ids) and torch.equal(a[1], b[1])
    rows = [next(i for i in range(len(data)) if torch.equal(data.batch.input_ids[i], x) and torch.equal(data.ref_logprobs[i], lp))
            for x, lp in zip(a[0].input_ids, a[1], strict=True)]
    assert len(set(rows)) == 5  # without replacement within one draw


# ---------------------------------------------------------------------------------------- cache


def test_cache_is_deterministic_across_cache_dirs(policy, tokenizer, tmp_path):
    build(policy, tokenizer, tmp_path / "a")
    build(policy, tokenizer, tmp_path / "b")
    key = cache_key(make_cfg())
    dir_a, dir_b = tmp_path / "a" / "presample" / key, tmp_path / "b" / "presample" / key
    assert (dir_a / TENSOR_FILE).read_bytes() == (dir_b / TENSOR_FILE).read_bytes()
    man_a, man_b = (json.loads((d / MANIFEST_FILE).read_text()) for d in (dir_a, dir_b))
    man_a.pop("created"), man_b.pop("created")
    assert man_a == man_b and man_a["key"] == key and man_a["spec"] == presample_spec(MODEL_FP, ScriptedTask(), make_cfg(), encoder(make_cfg()))


def test_cache_is_reused_without_sampling(policy, tokenizer, tmp_path, monkeypatch, caplog):
    first, _ = build(policy, tokenizer, tmp_path)
    target = tmp_path / "presample" / cache_key(make_cfg())
    before = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (target, *sorted(target.iterdir()))]

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(HFEngine, "generate", no_sampling)
    monkeypatch.setattr(presample, "token_logprobs", no_sampling)
    caplog.set_level(logging.INFO, logger="dph.presample")
    second, task = build(policy, tokenizer, tmp_path)
    assert any("Using the pre-sampling cache" in r.getMessage() and str(target) in r.getMessage() for r in caplog.records)
    assert not any("Pre-sampling" in r.getMessage() for r in caplog.records)
    assert sum(task.shown.values()) == 0  # the verifier was never called
    assert [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in (target, *sorted(target.iterdir()))] == before
    assert torch.equal(first.batch.input_ids, second.batch.input_ids) and torch.equal(first.ref_logprobs, second.ref_logprobs)
    assert first.manifest == second.manifest


CHANGES_KEY = [
    ["presample.n=3"],
    ["presample.threshold=0.5"],
    ["presample.temperature=0.9"],
    ["presample.seed=1"],
    ["generation.max_new_tokens=7"],
    ["generation.temperature=0.9"],
]
KEEPS_KEY = [
    ["experiment=dph_fkl"],
    ["experiment=dph_js"],
    ["experiment=dph_alpha"],
    ["divergence=alpha", "divergence.alpha=0.2"],
    ["divergence.weight=0.3", "divergence.rehearsal_batch_size=8"],
    ["trainer.steps=3", "optimizer.lr=1e-4", "algorithm.group_size=2"],
    ["seed=1"],  # runs of every seed rehearse the same pre-sampled data
    ["generation.top_p=0.9", "generation.batch_size=4"],  # pre-sampling uses top_p=1 and batching does not matter
    ["eval.n=4", "eval.splits=[test]", "optimized_metric=eval/test/pass@4"],
]


@pytest.mark.parametrize("extra", CHANGES_KEY, ids=lambda e: " ".join(e))
def test_a_setting_of_the_presample_changes_the_key(extra):
    assert cache_key(make_cfg(*extra)) != cache_key(make_cfg())


@pytest.mark.parametrize("extra", KEEPS_KEY, ids=lambda e: " ".join(e))
def test_divergence_and_training_settings_keep_the_key(extra):
    """DPH runs that differ only in the divergence (or in training settings) share one cache."""
    assert cache_key(make_cfg(*extra)) == cache_key(make_cfg())


def test_model_and_task_change_the_key():
    cfg = make_cfg()
    assert cache_key(cfg, model_fp={**MODEL_FP, "seed": 1}) != cache_key(cfg)
    assert cache_key(cfg, task=ScriptedTask({**QUOTAS, "never/0": 1})) != cache_key(cfg)


def _truncate_tensors(d: Path) -> None:
    data = (d / TENSOR_FILE).read_bytes()
    (d / TENSOR_FILE).write_bytes(data[: len(data) // 2])


def _replace_tensors(d: Path) -> None:  # a valid file, but not the one the manifest describes
    t = load_file(d / TENSOR_FILE)
    save_file({**t, "ref_logprobs": t["ref_logprobs"] * 0.5}, str(d / TENSOR_FILE))


def _edit_manifest(**changes):
    def edit(d: Path) -> None:
        m = json.loads((d / MANIFEST_FILE).read_text())
        for key, value in changes.items():
            m[key] = value(m[key]) if callable(value) else value
        (d / MANIFEST_FILE).write_text(json.dumps(m))

    return edit


CORRUPTIONS = {
    "truncated tensors": _truncate_tensors,
    "tensors replaced": _replace_tensors,
    "tensors missing": lambda d: (d / TENSOR_FILE).unlink(),
    "manifest missing": lambda d: (d / MANIFEST_FILE).unlink(),
    "manifest not json": lambda d: (d / MANIFEST_FILE).write_text('{"key": '),
    "manifest of another key": _edit_manifest(key="0" * 16),
    "manifest sha256 mismatch": _edit_manifest(sha256="0" * 64),
    "manifest of an older format": _edit_manifest(format=0),
    "manifest sample count mismatch": _edit_manifest(counts=lambda c: {**c, "reference_samples": c["reference_samples"] + 1}),
    "empty directory": lambda d: [p.unlink() for p in d.iterdir()],
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_invalid_cache_is_rebuilt_with_a_warning(policy, tokenizer, tmp_path, corrupt, count_sampling, caplog):
    build(policy, tokenizer, tmp_path)
    target = tmp_path / "presample" / cache_key(make_cfg())
    good = {name: (target / name).read_bytes() for name in (TENSOR_FILE, MANIFEST_FILE)}
    good_manifest = json.loads(good[MANIFEST_FILE])
    corrupt(target)
    count_sampling.clear()
    caplog.set_level(logging.INFO, logger="dph.presample")

    data, _ = build(policy, tokenizer, tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(target) in warnings[0].getMessage() and "rebuilding" in warnings[0].getMessage()
    assert count_sampling, "an invalid cache must be rebuilt, never used"
    assert (target / TENSOR_FILE).read_bytes() == good[TENSOR_FILE]  # the same (deterministic) result
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    assert {k: v for k, v in manifest.items() if k != "created"} == {k: v for k, v in good_manifest.items() if k != "created"}
    assert data.manifest == manifest and len(data) == good_manifest["counts"]["reference_samples"]
    assert torch.equal(data.ref_logprobs, load_file(target / TENSOR_FILE)["ref_logprobs"])

    count_sampling.clear()
    build(policy, tokenizer, tmp_path)
    assert not count_sampling  # the rebuilt cache is valid


def test_stale_temporary_directories_are_removed(policy, tokenizer, tmp_path, count_sampling):
    """A build killed half-way leaves `<key>.tmp-*`: the next build never reads it and removes it,
    and those of other keys whose build is not running (their lock is free) too."""
    key = cache_key(make_cfg())
    root = tmp_path / "presample"
    stale = root / f"{key}.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / TENSOR_FILE).write_bytes(b"partial")
    (stale / MANIFEST_FILE).write_text(json.dumps({"key": key}))
    other = root / "0123abcd.tmp-killed"
    other.mkdir()
    running = root / "4567cdef.tmp-building"  # its build holds its lock: left alone
    running.mkdir()
    from filelock import FileLock

    with FileLock(str(root / "4567cdef.lock")):
        data, _ = build(policy, tokenizer, tmp_path)
    assert count_sampling and data.manifest["key"] == key
    assert (root / key / MANIFEST_FILE).is_file()
    assert not stale.exists() and not other.exists() and running.is_dir()
    count_sampling.clear()
    build(policy, tokenizer, tmp_path)
    assert not count_sampling


def test_a_failed_build_leaves_nothing_under_the_final_name(policy, tokenizer, tmp_path, monkeypatch):
    """The cache is written under a temporary name and renamed into place only when complete."""
    key = cache_key(make_cfg())
    root, target = tmp_path / "presample", tmp_path / "presample" / key
    real_build = presample._build
    seen = {}

    def build_then_crash(*args):
        out_dir = args[-1]
        real_build(*args)
        seen["files"] = sorted(p.name for p in out_dir.iterdir())
        seen["target_existed"] = target.exists()
        assert out_dir.parent == root and out_dir.name.startswith(f"{key}.tmp-")
        raise KeyboardInterrupt  # killed after writing, before the rename

    monkeypatch.setattr(presample, "_build", build_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build(policy, tokenizer, tmp_path)
    assert seen == {"files": [MANIFEST_FILE, TENSOR_FILE], "target_existed": False}
    assert not target.exists()
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []  # temporary dir removed

    monkeypatch.setattr(presample, "_build", real_build)
    data, _ = build(policy, tokenizer, tmp_path)
    assert data.manifest["key"] == key and sorted(os.listdir(target)) == [MANIFEST_FILE, TENSOR_FILE]


def test_cache_survives_being_moved(policy, tokenizer, tmp_path, count_sampling):
    """The cache holds no absolute path of its own: a copied cache directory is used as it is."""
    build(policy, tokenizer, tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "presample", tmp_path / "b" / "presample")
    count_sampling.clear()
    data, _ = build(policy, tokenizer, tmp_path / "b")
    assert not count_sampling and data.manifest["key"] == cache_key(make_cfg())
