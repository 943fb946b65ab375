"""dph.loggers: metrics.jsonl, real offline W&B runs read back from their record log, logger=none."""

import json
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dph.loggers import JsonlLogger, Logger, MultiLogger, NullLogger, WandbLogger, build_logger
from wandb_records import find_offline_run, iter_records, read_config, read_history, read_summary

CONF = Path(__file__).resolve().parents[1] / "conf" / "logger"
RUN_CONFIG = {"seed": 3, "algorithm": {"group_size": 8, "clip_high": 0.28}, "eval": {"splits": ["test", "math/test"]}}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B confined to tmp_path: its dirs, a fake HOME, no credentials, no mode from the environment."""
    import wandb

    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "HOME"):
        path = tmp_path / name.lower()
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_PROJECT", "WANDB_ENTITY",
                 "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    wandb.teardown()  # a fresh wandb service and settings singleton that see this environment
    yield tmp_path
    wandb.teardown()
    assert not any((tmp_path / "home").iterdir()), "W&B wrote into HOME"


def wandb_cfg(**overrides):
    cfg = OmegaConf.load(CONF / "wandb.yaml")
    return OmegaConf.merge(cfg, overrides)


def user_keys(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.startswith("_")}


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_wandb_offline_run_round_trip(offline_wandb):
    run_dir = offline_wandb / "run"
    steps = [
        {"train/reward_mean": 0.25, "train/entropy": 1.5, "train/loss": math.nan},
        {"train/reward_mean": 0.5, "train/entropy": 1.25, "train/loss": -0.5},
    ]
    evaluation = {"eval/math/test/pass@1": 0.25, "eval/math/test/pass@2": 0.375, "eval/math/test/pass@4": 0.5,
                  "eval/math/test/entropy": 1.125}
    cfg = wandb_cfg(name="job-0", group="sweep-a", tags=["dph", "js"])
    logger = build_logger(cfg, run_dir, OmegaConf.create(RUN_CONFIG))
    assert isinstance(logger, MultiLogger)
    assert [type(child) for child in logger.loggers] == [JsonlLogger, WandbLogger]
    logger.log(evaluation, step=0)
    logger.log_passk("math/test", [1, 2, 4], [0.25, 0.375, 0.5], step=0)
    for step, metrics in enumerate(steps, start=1):
        logger.log(metrics, step=step)
    logger.summary({"d_exp_size": 120, "d_pef_size": 80})
    logger.summary({"final/eval/math/test/pass@4": 0.5})
    logger.finish()

    run_file = find_offline_run(run_dir / "wandb")
    assert run_file.parent.name.startswith("offline-run-")
    history = read_history(run_file)
    chart_rows = [row for row in history if "charts/math/test/pass@k_vs_k/step_000000_table" in row]
    scalar_rows = [user_keys(row) for row in history if row not in chart_rows]
    expected = [{**evaluation, "train/step": 0}] + [{**m, "train/step": s} for s, m in enumerate(steps, start=1)]
    assert len(scalar_rows) == len(expected)
    for got, want in zip(scalar_rows, expected):
        assert got.keys() == want.keys() and all(same(got[key], want[key]) for key in want)

    (chart,) = chart_rows
    assert chart["train/step"] == 0
    table = chart["charts/math/test/pass@k_vs_k/step_000000_table"]
    assert table["_type"] == "table-file" and table["nrows"] == 3
    table_json = json.loads((run_file.parent / "files" / table["path"]).read_text())
    assert table_json["columns"] == ["k", "pass@k"]
    assert table_json["data"] == [[1, 0.25], [2, 0.375], [4, 0.5]]

    config = read_config(run_file)
    assert {key: value for key, value in config.items() if key != "_wandb"} == RUN_CONFIG
    assert "charts/math/test/pass@k_vs_k/step_000000" in config["_wandb"]["visualize"]

    summary = read_summary(run_file)
    assert summary["d_exp_size"] == 120 and summary["d_pef_size"] == 80
    assert summary["final/eval/math/test/pass@4"] == 0.5
    assert summary["train/reward_mean"] == 0.5 and summary["train/step"] == 2

    records = list(iter_records(run_file))
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run_record.display_name, run_record.run_group, list(run_record.tags)) == ("job-0", "sweep-a", ["dph", "js"])
    assert records[-1].WhichOneof("record_type") == "exit" and records[-1].exit.exit_code == 0
    kinds = {r.WhichOneof("record_type") for r in records}
    assert not kinds & {"stats", "environment"}, "system metrics should be off by default"

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["train/step"] for line in lines] == [0, 1, 2]
    assert lines[1]["train/loss"] == "NaN"
    assert json.loads((run_dir / "summary.json").read_text()) == {
        "d_exp_size": 120, "d_pef_size": 80, "final/eval/math/test/pass@4": 0.5}


def test_two_runs_in_one_process_are_separate(offline_wandb):
    """As in a Hydra multirun (jobs one after another in one process), even if a job never finishes."""
    crashed = build_logger(wandb_cfg(), offline_wandb / "multirun" / "0", {"job": 0})
    crashed.log({"train/entropy": 1.0}, step=0)
    second = build_logger(wandb_cfg(), offline_wandb / "multirun" / "1", {"job": 1})
    second.log({"train/entropy": 2.0}, step=0)
    second.finish(exit_code=1)
    crashed.finish()  # late finish of a run already closed by the next init: harmless

    run_ids = set()
    for job in (0, 1):
        run_file = find_offline_run(offline_wandb / "multirun" / str(job))
        run_ids.add(re.fullmatch(r"run-(.+)\.wandb", run_file.name)[1])
        rows = [user_keys(row) for row in read_history(run_file)]
        assert rows == [{"train/entropy": float(job + 1), "train/step": 0}]
        assert read_config(run_file)["job"] == job
        exit_record = list(iter_records(run_file))[-1]
        assert exit_record.WhichOneof("record_type") == "exit" and exit_record.exit.exit_code == job
    assert len(run_ids) == 2


def test_logger_none_writes_only_metrics_jsonl(offline_wandb):
    run_dir = offline_wandb / "run"
    logger = build_logger(OmegaConf.load(CONF / "none.yaml"), run_dir, RUN_CONFIG)
    assert [type(child) for child in logger.loggers] == [JsonlLogger]
    logger.log({"train/entropy": 1.0}, step=0)
    logger.log_passk("test", [1, 2], [0.5, 0.75], step=0)
    logger.finish()
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]
    assert not any((offline_wandb / "wandb_dir").iterdir())


def test_online_without_credentials_fails_fast_with_a_hint(offline_wandb):
    with pytest.raises(RuntimeError, match="wandb login"):
        build_logger(wandb_cfg(mode="online"), offline_wandb / "run", {})
    assert not (offline_wandb / "run" / "wandb").exists()


def test_jsonl_logger_round_trip_append_and_atomic_summary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"train/loss": math.nan, "train/entropy": math.inf, "train/divergence": -math.inf, "count": 3}, step=7)
    logger.summary({"d_exp_size": 10})
    logger.finish()
    resumed = JsonlLogger(path)  # a resumed run appends and keeps the earlier summary
    resumed.log({"train/loss": 0.5}, step=8)
    resumed.summary({"final": 0.5})
    resumed.finish()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"train/step": 7, "train/loss": "NaN", "train/entropy": "Infinity", "train/divergence": "-Infinity",
         "count": 3},
        {"train/step": 8, "train/loss": 0.5},
    ]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"d_exp_size": 10, "final": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.json"]


def test_null_logger_and_unknown_backend(tmp_path):
    assert NullLogger is Logger
    null = NullLogger()
    null.log({"a": 1.0}, 0)
    null.log_passk("test", [1], [0.5], 0)
    null.summary({"a": 1})
    null.finish()
    with pytest.raises(ValueError, match="known backends: none, wandb"):
        build_logger({"backend": "tensorboard"}, tmp_path, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["wandb.yaml", "none.yaml"])
def test_every_logger_yaml_key_is_commented(name):
    lines = (CONF / name).read_text().splitlines()
    keys = [line for line in lines if re.match(r"^[a-z_]+:", line)]
    assert keys and all("#" in line for line in keys)
    assert lines[0].startswith("#")


def test_wandb_disabled_mode_writes_only_metrics_jsonl(offline_wandb):
    run_dir = offline_wandb / "run"
    logger = build_logger(wandb_cfg(mode="disabled"), run_dir, RUN_CONFIG)
    logger.log({"train/entropy": 1.0}, step=0)
    logger.log_passk("test", [1, 2], [0.5, 0.75], step=0)
    logger.finish()
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]
