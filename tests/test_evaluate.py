"""`dph-eval`: a run's initial and trained policy (and a checkpoint) evaluated with training's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DPH, read_jsonl, run_cli, with_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tiny_model, cache_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "run"
    args = with_overrides(DPH, "experiment=grpo", "trainer.checkpoint_every=2", "optimizer.lr=2e-3",
                          f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}")
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def dph_eval(args: list[str], out: Path):
    return run_cli([*args, f"hydra.run.dir={out}"], executable="dph-eval", cwd=out.parent)


def test_dph_eval_reproduces_the_runs_own_evaluations(trained_run, tmp_path):
    """With the run's eval settings, the initial policy scores what the run logged at step 0, the
    trained policy and the last checkpoint what it logged at the end: same seeds, same weights."""
    out = tmp_path / "eval"
    checkpoint = trained_run / "checkpoints" / "step-000002"
    result = dph_eval([f"run_dir={trained_run}", f"models=[initial,trained,{checkpoint}]"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dph-eval: done" in result.stdout
    models = json.loads((out / "eval.json").read_text())["models"]
    assert list(models) == ["initial", "trained", "checkpoints/step-000002"]
    records = read_jsonl(trained_run / "metrics.jsonl")
    first, last = records[0], records[-1]
    for label, logged in (("initial", first), ("trained", last), ("checkpoints/step-000002", last)):
        metrics = models[label]["metrics"]
        shared = [k for k in metrics if k in logged and not k.endswith(("forgotten", "newly_solved", "coverage"))]
        assert len(shared) >= 7 and {k: metrics[k] for k in shared} == {k: logged[k] for k in shared}, label
    assert models["trained"]["model_dir"] == str(trained_run / "model")
    assert (out / "passk_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    assert {r["model"] for r in read_jsonl(out / "samples.jsonl")} == set(models)


def test_dph_eval_with_more_samples(trained_run, tmp_path):
    out = tmp_path / "eval"
    result = dph_eval([f"run_dir={trained_run}", "eval.n=32"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    models = json.loads((out / "eval.json").read_text())["models"]
    assert list(models) == ["initial", "trained"]  # the default with run_dir
    for metrics in (m["metrics"] for m in models.values()):
        passk = [metrics[f"eval/test/pass@{k}"] for k in (1, 2, 4, 8, 16, 32)]
        assert passk == sorted(passk)
    assert models["initial"]["metrics"]["eval/test/forgotten"] == 0  # the first model is the baseline
    prompts = read_jsonl(out / "eval_prompts.jsonl")
    assert {r["split"] for r in prompts} == {"initial/test", "trained/test"} and {r["n"] for r in prompts} == {32}


def test_dph_eval_refuses_what_it_cannot_load(trained_run, tmp_path):
    result = dph_eval([f"run_dir={trained_run}", f"models=[{tmp_path}]"], tmp_path / "eval")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dph-eval: error: models:"), result.stderr
    result = dph_eval(["models=[trained]"], tmp_path / "eval2")
    assert result.returncode == 2 and "needs run_dir" in result.stderr
