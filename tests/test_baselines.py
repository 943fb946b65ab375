"""The other answers to diversity collapse, end to end: every preset of conf/experiment/ trains through
`dph-train` (one multirun, real subprocess) and logs the metrics its method acts on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import DPH, ROOT, read_jsonl, run_cli, with_overrides

pytestmark = pytest.mark.slow

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
ALWAYS = ["train/reward_mean", "train/loss", "train/pg_loss", "train/entropy", "train/clip_frac", "train/cov_clip_frac",
          "train/adv_mean_correct", "train/adv_mean_wrong", "train/updated_token_entropy", "train/updated_token_frac",
          "train/entropy_coef"]


@pytest.fixture(scope="module")
def preset_runs(tiny_model, cache_dir, tmp_path_factory) -> dict[str, Path]:
    sweep = tmp_path_factory.mktemp("presets")
    args = with_overrides(DPH, "trainer.steps=2", "trainer.checkpoint_every=0", "trainer.save_model=false",
                          f"paths.cache_dir={cache_dir}")
    result = run_cli(["-m", *args, f"experiment={','.join(PRESETS)}", f"hydra.sweep.dir={sweep}"], cwd=sweep, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"dph-train: multirun done: {sweep}" in result.stdout
    return {preset: sweep / str(i) for i, preset in enumerate(PRESETS)}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_and_logs_what_it_acts_on(preset, preset_runs):
    run_dir = preset_runs[preset]
    assert f"experiment={preset}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/step"] for r in train] == [1, 2]
    for row in train:
        for key in ALWAYS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (preset, key, row.get(key))
        assert 0 < row["train/updated_token_frac"] <= 1
    last = train[-1]
    if preset == "top_entropy":
        assert last["train/updated_token_frac"] < 0.5  # about the top 20% of the tokens
        assert last["train/updated_token_entropy"] > last["train/entropy"]
    elif preset == "kl_cov":
        assert all(r["train/cov_clip_frac"] > 0 for r in train)  # at least one token per micro-batch
    elif preset == "entropy_bonus":
        assert last["train/entropy_coef"] == pytest.approx(0.005)
    elif preset.startswith(("grpo_kl", "prorl")):
        assert all(math.isfinite(r["train/divergence"]) and r["train/divergence"] != 0 for r in train)
    if preset not in ("top_entropy",):
        assert last["train/updated_token_frac"] == 1.0
    if preset != "entropy_bonus":
        assert last["train/entropy_coef"] == 0.0
