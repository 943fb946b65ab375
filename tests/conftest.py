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
