"""The ready-made sweeps of sweeps/ with the real dph-train, in subprocesses, on a tiny config.

Every sweep runs the trials of conftest.DPH (a tiny countdown the quickly warmed-up model partly
solves, 2 RL steps, 4 eval prompts x 8 samples) from the session's model cache, and checks the
study in its storage, the files the sweep leaves, each trial's run directory and, where it matters,
the pre-sampling cache the DPH trials share.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import DPH, read_jsonl, run_cli, with_overrides
from dph.pruning import open_storage
from wandb_records import find_offline_run, read_config, read_run_info

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"
WROTE, REUSED = "Wrote the pre-sampling cache", "Using the pre-sampling cache"


def sweep(cache_dir: Path, sweep_dir: Path, *overrides: str, expect_ok: bool = True):
    """`dph-train -m <overrides>` on the DPH tiny config, in sweep_dir."""
    args = ["-m", *with_overrides(DPH, f"paths.cache_dir={cache_dir}"), f"hydra.sweep.dir={sweep_dir}", *overrides]
    proc = run_cli(args, cwd=sweep_dir.parent, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def study_of(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(sweep_dir / "optuna.journal")))


def job_log(job_dir: Path) -> str:
    return (job_dir / "train.log").read_text()


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG, path


def assert_trained(job_dir: Path) -> None:
    """A finished run: the initial and final evaluation and both RL steps are in metrics.jsonl."""
    rows = read_jsonl(job_dir / "metrics.jsonl")
    assert [r["train/step"] for r in rows if "train/loss" in r] == [1, 2]
    assert [r["train/step"] for r in rows if "eval/test/pass@8" in r] == [0, 2]


@pytest.fixture(scope="module")
def tpe_sweep(cache_dir, tmp_path_factory) -> Path:
    """sweep=divergence_tpe cut to 3 trials, logging to W&B offline."""
    sweep_dir = tmp_path_factory.mktemp("tpe") / "sweep"
    sweep(cache_dir, sweep_dir, "sweep=divergence_tpe", "hydra.sweeper.n_trials=3", "logger=wandb")
    return sweep_dir


def test_tpe_sweep_leaves_study_report_and_trial_runs(tpe_sweep):
    study = study_of(tpe_sweep, "divergence_tpe")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.metric_names == ["eval/test/pass@8"]

    summary = yaml.safe_load((tpe_sweep / "summary.yaml").read_text())
    assert summary["best"]["number"] == study.best_trial.number
    assert summary["best"]["value"] == pytest.approx(study.best_value)
    rows = list(csv.DictReader((tpe_sweep / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2] and {r["state"] for r in rows} == {"COMPLETE"}
    assert_png(tpe_sweep / "history.png")
    assert_png(tpe_sweep / "objective_vs_divergence.weight.png")

    for trial in study.trials:
        job_dir = tpe_sweep / str(trial.number)
        assert_trained(job_dir)
        last = read_jsonl(job_dir / "metrics.jsonl")[-1]
        assert trial.value == pytest.approx(last["eval/test/pass@8"])  # the value the trial returned
        # the conditional space: a weight exactly when there is a divergence term
        divergence = trial.params["divergence"]
        assert ("divergence.weight" in trial.params) == (divergence != "none")
        assert ("divergence.alpha" in trial.params) == (divergence == "alpha")
        # W&B: one run per trial, grouped by study, the trial in its name, the sampled params in its config
        run_file = find_offline_run(job_dir / "wandb")
        info = read_run_info(run_file)
        assert info["group"] == "divergence_tpe" and f"trial-{trial.number}" in info["name"].split()
        assert "divergence_tpe" in info["tags"]
        config = read_config(run_file)
        assert config["divergence"]["name"] == divergence
        if divergence != "none":
            assert config["divergence"]["weight"] == pytest.approx(trial.params["divergence.weight"])


def test_tpe_sweep_resumes_to_more_trials_without_rerunning(tpe_sweep, cache_dir):
    stamps = {n: (tpe_sweep / str(n) / "metrics.jsonl").stat().st_mtime_ns for n in range(3)}
    # logger=none instead of logger=wandb changes a fixed override: allowed only when asked for
    sweep(cache_dir, tpe_sweep, "sweep=divergence_tpe", "hydra.sweeper.n_trials=4", "logger=none",
          "hydra.sweeper.resume_with_changed_overrides=true")
    study = study_of(tpe_sweep, "divergence_tpe")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.user_attrs["fixed_overrides"]["logger"] == "logger=wandb"
    assert study.trials[3].user_attrs["fixed_overrides"]["logger"] == "logger=none"
    assert_trained(tpe_sweep / "3")
    assert {n: (tpe_sweep / str(n) / "metrics.jsonl").stat().st_mtime_ns for n in range(3)} == stamps
    assert yaml.safe_load((tpe_sweep / "summary.yaml").read_text())["trials"]["complete"] == 4


def test_a_sweep_with_other_fixed_overrides_does_not_resume_the_study(cache_dir, tmp_path):
    """The issue's case: a quick sweep with trainer.steps=2, then the same sweep with more steps.
    The study records the overrides it was started with; the second sweep stops in one line before
    any trial, so the quick trials never count toward the real sweep."""
    sweep_dir = tmp_path / "sweep"
    preset = ["hydra/sweeper=optuna", "hydra.sweeper.study_name=quick", "divergence=none",
              "optimizer.lr=tag(log, interval(1e-5, 1e-3))", "hydra.sweeper.n_trials=1"]
    sweep(cache_dir, sweep_dir, *preset)
    assert study_of(sweep_dir, "quick").user_attrs["fixed_overrides"]["trainer.steps"] == "trainer.steps=2"

    args = ["-m", *with_overrides(DPH, f"paths.cache_dir={cache_dir}", "trainer.steps=3"),
            f"hydra.sweep.dir={sweep_dir}", *preset[:-1], "hydra.sweeper.n_trials=2"]
    proc = run_cli(args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"dph-train: error: study quick in {sweep_dir / 'optuna.journal'} was started with other fixed overrides "
        "(trainer.steps: 2 -> 3): start a new study with another hydra.sweeper.study_name=... or "
        "hydra.sweep.dir=..., or add hydra.sweeper.resume_with_changed_overrides=true to continue it anyway"]
    assert len(study_of(sweep_dir, "quick").trials) == 1 and not (sweep_dir / "1").exists()


def test_parallel_dph_trials_build_one_presampling_cache(cache_dir, tmp_path):
    """Two DPH trials at once (joblib launcher, journal storage) on a cache key no run has used:
    one builds the pre-sampling cache under the file lock, the other waits and reuses it."""
    sweep_dir = tmp_path / "sweep"
    sweep(cache_dir, sweep_dir, "sweep=divergence_tpe", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
          "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "divergence=choice(forward_kl,js)",
          "presample.n=7")  # presample.n=7: a cache key of this test alone
    study = study_of(sweep_dir, "divergence_tpe")
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    logs = [job_log(sweep_dir / str(n)) for n in (0, 1)]
    caches = {m for text in logs for m in re.findall(r"(\S+/presample/[0-9a-f]{16})", text)}
    assert len(caches) == 1, caches
    assert sorted((WROTE in text, REUSED in text) for text in logs) == [(False, True), (True, False)]
    for n in (0, 1):
        assert_trained(sweep_dir / str(n))


def test_pareto_sweep_gives_the_front(cache_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep(cache_dir, sweep_dir, "sweep=pareto", "hydra.sweeper.n_trials=2", "eval.n=8",
          "optimized_metric=[eval/test/pass@1,eval/test/pass@8]")
    study = study_of(sweep_dir, "pareto")
    assert len(study.directions) == 2 and study.metric_names == ["eval/test/pass@1", "eval/test/pass@8"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    summary = yaml.safe_load((sweep_dir / "summary.yaml").read_text())
    front = {entry["number"] for entry in summary["pareto_front"]}
    assert front == {t.number for t in study.best_trials} and front
    for trial in study.trials:
        last = read_jsonl(sweep_dir / str(trial.number) / "metrics.jsonl")[-1]
        assert trial.values == pytest.approx([last["eval/test/pass@1"], last["eval/test/pass@8"]])
    assert_png(sweep_dir / "pareto_front.png")


def test_a_hopeless_trial_is_pruned_at_its_first_evaluation(cache_dir, tmp_path):
    """Minimizing eval entropy, a trial sampling at temperature 30 (almost uniform) is far above the
    median of the finished temperature-1 trial at step 0, so the median pruner stops it there."""
    sweep_dir = tmp_path / "sweep"
    sweep(cache_dir, sweep_dir, "hydra/sweeper=optuna", "hydra.sweeper.study_name=prune",
          "hydra.sweeper.direction=minimize", "optimized_metric=eval/test/entropy", "eval.every=1",
          "hydra.sweeper.sampler.name=grid", "hydra.sweeper.sampler.seed=1", "generation.temperature=choice(1.0,30.0)",
          "hydra.sweeper.pruner.name=median", "hydra.sweeper.pruner.n_startup_trials=1",
          "hydra.sweeper.pruner.n_warmup_steps=0", "divergence=none")
    trials = study_of(sweep_dir, "prune").trials
    assert [t.params["generation.temperature"] for t in trials] == [1.0, 30.0]  # the grid's seeded order
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert sorted(trials[0].intermediate_values) == [0, 1, 2] and sorted(trials[1].intermediate_values) == [0]
    pruned_rows = read_jsonl(sweep_dir / "1" / "metrics.jsonl")
    assert not [r for r in pruned_rows if "train/loss" in r]  # stopped before any RL step
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED"]


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(cache_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep(cache_dir, sweep_dir, "hydra/sweeper=optuna", "hydra.sweeper.study_name=fail",
          "hydra.sweeper.sampler.name=grid", "hydra.sweeper.max_failure_rate=0.5", "divergence=js",
          "divergence.weight=choice(-1.0,0.05)")
    trials = sorted(study_of(sweep_dir, "fail").trials, key=lambda t: t.params["divergence.weight"])
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "divergence.weight=-1.0 is not allowed" in trials[0].user_attrs["fail_reason"]
    assert_trained(sweep_dir / str(trials[1].number))
    rows = {r["state"]: r for r in csv.DictReader((sweep_dir / "trials.csv").open())}
    assert "divergence.weight" in rows["FAIL"]["fail_reason"]


def test_methods_grid_runs_each_method_and_compares_them(cache_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep(cache_dir, sweep_dir, "sweep=methods_grid", "experiment=grpo,dph_js", "seed=0")
    for job, experiment in (("0", "grpo"), ("1", "dph_js")):
        assert f"experiment={experiment}" in (sweep_dir / job / ".hydra" / "overrides.yaml").read_text()
        assert_trained(sweep_dir / job)
    rows = {(r["method"], r["metric"]): r for r in csv.DictReader((sweep_dir / "comparison.csv").open())}
    assert list(dict.fromkeys(method for method, _ in rows)) == ["base", "experiment=grpo", "experiment=dph_js"]
    for method, job in (("experiment=grpo", "0"), ("experiment=dph_js", "1")):
        records = read_jsonl(sweep_dir / job / "metrics.jsonl")
        last = records[-1]
        row = rows[(method, "eval/test/pass@8")]
        assert float(row["value"]) == pytest.approx(last["eval/test/pass@8"]) and row["runs"] == "1"
        assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"]) and row["interval"] == "bootstrap"
        assert float(rows[(method, "eval/test/forgotten")]["value"]) == pytest.approx(last["eval/test/forgotten"])
        initial = [r for r in records if "eval/test/pass@1" in r][0]
        base = rows[("base", "eval/test/pass@1")]
        assert float(base["value"]) == pytest.approx(initial["eval/test/pass@1"])  # every job starts from one policy
    assert rows[("experiment=dph_js", "eval/test/pass@8")]["significant"] in ("True", "False")
    assert rows[("experiment=grpo", "eval/test/pass@8")]["diff"] == ""  # the reference itself
    table = (sweep_dir / "comparison.md").read_text()
    assert "**test** (difference to experiment=grpo" in table and "| experiment=dph_js | 1 |" in table
    assert_png(sweep_dir / "comparison.png")
    # dph-compare rebuilds the same comparison from the run directories alone
    out = tmp_path / "rebuilt"
    proc = run_cli([str(sweep_dir), "--out", str(out)], executable="dph-compare", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "comparison.csv").read_text() == (sweep_dir / "comparison.csv").read_text()
    proc = run_cli([str(tmp_path / "missing")], executable="dph-compare", timeout=120)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
