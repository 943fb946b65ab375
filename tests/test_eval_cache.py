"""dph.eval_cache: the step-0 evaluation of one initial policy is computed once per eval config and
seed; a run with a warm cache logs exactly the rows a cold one logs; a damaged entry is rebuilt."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_OVERRIDES, read_jsonl, run_cli, with_overrides

pytestmark = pytest.mark.slow

RUN = with_overrides(TINY_OVERRIDES, "logger=none", "device=cpu", "trainer.steps=1", "trainer.save_model=false",
                     "trainer.checkpoint_every=0", "eval.sample_rows=4")
HIT, WROTE = "Using the step-0 evaluation cache", "Wrote the step-0 evaluation cache"


def _rows(run_dir):
    """Every row a run logged, without its timings."""
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}  # noqa: E731
    return {name: [strip(r) for r in read_jsonl(run_dir / name)]
            for name in ("metrics.jsonl", "eval_prompts.jsonl", "samples.jsonl")}


def test_warm_cache_logs_the_rows_of_a_cold_run(tiny_model, cache_dir, tmp_path):
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / tiny_model.name).symlink_to(tiny_model)  # the session's base model, not rebuilt
    args = [*RUN, f"paths.cache_dir={cache}", "experiment=grpo"]
    cold = run_cli([*args, f"hydra.run.dir={tmp_path / 'cold'}"])
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert WROTE in cold.stdout and HIT not in cold.stdout
    # another method from the same initial policy: its step-0 evaluation comes from the cache
    warm = run_cli([*RUN, f"paths.cache_dir={cache}", "experiment=dapo", f"hydra.run.dir={tmp_path / 'warm'}"])
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert HIT in warm.stdout
    same = run_cli([*args, f"hydra.run.dir={tmp_path / 'same'}"])
    assert HIT in same.stdout
    assert _rows(tmp_path / "same") == _rows(tmp_path / "cold")
    step0 = lambda run: [r for r in _rows(tmp_path / run)["metrics.jsonl"] if r["train/step"] == 0]  # noqa: E731
    assert step0("warm") == step0("cold")

    # another eval seed is another evaluation
    other = run_cli([*args, "seed=1", f"hydra.run.dir={tmp_path / 'seed1'}"])
    assert WROTE in other.stdout and HIT not in other.stdout

    # a damaged entry is evaluated again, with a warning, and gives the same rows
    entries = [p for p in (cache / "eval0").iterdir() if p.is_dir()]
    for entry in entries:
        data = json.loads((entry / "evaluation.json").read_text())
        data["metrics"] = {k: 0.0 for k in data["metrics"]}
        (entry / "evaluation.json").write_text(json.dumps(data))
    again = run_cli([*args, f"hydra.run.dir={tmp_path / 'again'}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is not valid" in again.stdout and WROTE in again.stdout
    assert _rows(tmp_path / "again") == _rows(tmp_path / "cold")


def test_the_cache_can_be_turned_off(tiny_model, cache_dir, tmp_path):
    result = run_cli([*RUN, f"paths.cache_dir={cache_dir}", "eval.cache_initial=false", "divergence=none",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert HIT not in result.stdout and WROTE not in result.stdout
