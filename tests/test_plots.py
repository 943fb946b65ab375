"""dph.plots: PNGs from a synthetic metrics.jsonl record list."""

import json
import math
import struct

import pytest

from dph.loggers import JsonlLogger
from dph.plots import load_metrics, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPLITS = ("test", "math/test")  # a split name may contain a slash
KS = (1, 2, 4, 8, 16, 32, 64)


def synthetic_records(steps: int = 20, eval_every: int = 5) -> list[dict]:
    """Train records every step and eval records (2 splits) every ``eval_every`` steps."""
    records = []
    for step in range(steps + 1):
        progress = step / steps
        records.append({
            "train/step": step,
            "train/reward_mean": 0.2 + 0.6 * progress,
            "train/entropy": 1.5 - 0.8 * progress,
            "train/divergence": 0.05 * progress,
            "train/loss": -0.1 * progress,
            "train/pg_loss": -0.12 * progress,
            "train/div_loss": 0.02 * progress,
        })
        if step % eval_every == 0 or step == steps:
            record = {"train/step": step}
            for offset, split in enumerate(SPLITS):
                pass1 = 0.15 + 0.4 * progress - 0.05 * offset
                for k in KS:  # pass@k rises with k; training narrows the gap between k=1 and k=64
                    record[f"eval/{split}/pass@{k}"] = 1 - (1 - pass1) ** (k ** (1 - 0.6 * progress))
                record[f"eval/{split}/entropy"] = 1.4 - 0.7 * progress
            records.append(record)
    return records


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_run_writes_three_valid_pngs(tmp_path):
    paths = plot_run(synthetic_records(), tmp_path)
    assert sorted(p.name for p in paths) == ["passk_over_steps.png", "passk_vs_k.png", "train_curves.png"]
    for path in paths:
        width, height = png_size(path)
        assert width >= 400 and height >= 300
        assert path.stat().st_size > 20_000, f"{path.name} looks empty"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files left


def test_plot_run_skips_absent_metrics(tmp_path):
    train_only = [{"train/step": s, "train/entropy": 1.0 - 0.01 * s} for s in range(5)]
    assert [p.name for p in plot_run(train_only, tmp_path / "a")] == ["train_curves.png"]
    assert plot_run([{"train/step": 0, "time/rollout_s": 0.3}], tmp_path / "b") == []


def test_plot_run_with_a_single_evaluation_and_nan(tmp_path):
    records = [{"train/step": 0, "eval/test/pass@1": 0.2, "eval/test/pass@2": math.nan, "eval/test/pass@4": 0.5}]
    names = [p.name for p in plot_run(records, tmp_path)]
    assert names == ["passk_over_steps.png", "passk_vs_k.png"]


def test_load_metrics_round_trip_restores_non_finite(tmp_path):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log({"train/loss": math.nan, "train/entropy": math.inf, "train/divergence": -math.inf}, step=3)
    logger.finish()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"train/step": 4, "train/lo')  # a write cut short by a killed process
    (record,) = load_metrics(tmp_path / "metrics.jsonl")
    assert record["train/step"] == 3
    assert math.isnan(record["train/loss"])
    assert record["train/entropy"] == math.inf and record["train/divergence"] == -math.inf


def test_load_metrics_rejects_corruption_before_the_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("{broken\n" + json.dumps({"train/step": 1}) + "\n")
    with pytest.raises(json.JSONDecodeError):
        load_metrics(path)
