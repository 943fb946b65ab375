"""Shared test fixtures: offline environment, one base-model cache per session, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Never reach a hub or a W&B server from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

# pytest-xdist: the workers share the cores (each worker's runs, and the processes they start, get
# their share of the threads; oversubscribed OpenMP threads make everything many times slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(_share))

# A run small enough for CI: a quickly warmed-up tiny model and a few short steps.
TINY_OVERRIDES = [
    "model.warmup.steps=40",
    "model.warmup.problems=400",
    "trainer.steps=2",
    "trainer.prompts_per_step=4",
    "algorithm.group_size=4",
    "eval.every=0",
    "eval.n=8",
    "eval.max_prompts=4",
    "eval.splits=[test]",
    "optimized_metric=eval/test/pass@8",
    "generation.max_new_tokens=16",
]

# Countdown shrunk to two numbers up to 9 so that the quickly warmed-up tiny model solves some
# prompts (about one in three at least once in 8 samples): D_pef is non-empty at
# presample.threshold=0.125, which DPH needs (there is nothing to rehearse otherwise).
EASY_COUNTDOWN = [
    "task.min_solutions=1",
    "task.warmup_splits=[train]",
    "~task.splits.ood",
    *(f"task.splits.{split}.{key}" for split in ("train", "test")
      for key in ("numbers_per_problem=2", "max_number=9", "target_min=1")),
    "task.splits.train.size=64",
    "task.splits.test.size=16",
    "model.warmup.problems=100",  # about all the distinct problems there are
    "model.warmup.steps=40",
    "model.warmup.batch_size=128",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model / pre-sampling cache for the whole session (the base model is built once)."""
    return tmp_path_factory.mktemp("dph-cache")


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """Keep W&B's own config and cache files out of the home directory."""
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def run_cli(args: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            executable: str = "dph-train") -> subprocess.CompletedProcess:
    """Run a console script of the installed project in a subprocess; output captured as text."""
    exe = Path(sys.executable).parent / executable
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Impossible config values: (overrides, the key the error must name). Shared by the in-process
# validation tests and the CLI tests (which check the same values fail before any work starts).
BAD_VALUES = [
    (["divergence=js", "divergence.weight=-0.5"], "divergence.weight"),
    (["eval.n=64", "optimized_metric=eval/test/pass@128"], "optimized_metric"),
    (["algorithm.group_size=0"], "algorithm.group_size"),
    (["algorithm.group_size=1"], "algorithm.group_size"),
    (["eval.splits=[nope]"], "eval.splits"),
    (["model=hf", "model.path=/nonexistent/model/dir"], "model.path"),
    (["model=hf"], "model.path"),
    (["generation.temperature=0"], "generation.temperature"),
    (["generation.top_p=1.5"], "generation.top_p"),
    (["algorithm.loss_agg=seq-sum"], "algorithm.loss_agg"),
    (["optimized_metric=train/not_a_metric"], "optimized_metric"),
    (["divergence=reverse_kl", "divergence.estimator=k9"], "divergence.estimator"),
    (["logger.mode=online"], "logger.mode=online needs W&B credentials"),  # no login in tests
    (["logger.mode=onlin"], "logger.mode"),
    (["task=math", "task.source=gsm8k", "task.path=/nonexistent/gsm8k"], "task.path"),
    (["task=sql", "task.source=bird", "task.path=/nonexistent/bird"], "task.path"),
    (["+divergence.wieght=0.1"], "divergence.wieght"),  # a typo, added as Hydra's own hint suggests
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every"),
    (["rollout.engine=sglang"], "rollout.engine"),
]


def with_overrides(base: list[str], *extra: str) -> list[str]:
    """`base` with the `key=value` items of `extra` replacing those of the same key (appended otherwise)."""
    keys = {item.split("=", 1)[0] for item in extra}
    return [item for item in base if item.split("=", 1)[0] not in keys] + list(extra)


DPH = with_overrides(TINY_OVERRIDES, *EASY_COUNTDOWN, "presample.threshold=0.125", "device=cpu", "logger=none")


def compose_config(overrides: list[str], *, hydra: bool = True):
    """The composed dph-train config for `overrides` (Hydra's compose API), with the `hydra` node
    (as a run sees it) or without it (as `--cfg job` prints it and the run config stores it)."""
    from hydra import compose, initialize_config_dir

    import dph.config  # noqa: F401  (registers the dph_root resolver)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    """The tiny base model of TINY_OVERRIDES, built once into the session cache (in-process, so
    that every dph-train subprocess of the session finds it there and only loads it)."""
    from dph.models import resolve_model_dir
    from dph.builders import run_tasks, setup

    cfg = compose_config(with_overrides(TINY_OVERRIDES, f"paths.cache_dir={cache_dir}"))
    task, eval_sets = setup(cfg)
    tasks = run_tasks(task, eval_sets)
    return resolve_model_dir(cfg.model, tasks, cfg.paths.cache_dir)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 saved with save_pretrained, with a Qwen-like character tokenizer: no bos
    and no pad token (the loader falls back to eos for padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    import string
    import torch

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(["<|unk|>", "<|endoftext|>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(""), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|unk|>")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None,
    )
    out = tmp_path_factory.mktemp("qwen2-tiny")
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
