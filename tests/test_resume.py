"""Runs that keep their results: a run killed with SIGKILL (real subprocesses) and started again with
the same command ends with the same weights (bitwise) and the same metrics.jsonl rows as the run that
was never interrupted; damaged checkpoints, other configs and a fresh start; the saved policy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DPH, ROOT, read_jsonl, run_cli, with_overrides
from wandb_records import find_offline_runs, read_history

pytestmark = pytest.mark.slow

# 4 steps, two minibatches (old log-probs, minibatch shuffling), checkpoints at 2 and 4, evaluations at 0, 2, 4.
BASE = with_overrides(DPH, "trainer.steps=4", "trainer.checkpoint_every=2", "eval.every=2", "algorithm.minibatches=2",
                      "trainer.prompts_per_step=8", "optimizer.lr=2e-3",
                      "eval.cache_initial=false")  # every evaluation runs, so the kill points count them all
# (method overrides, where the first attempt is killed: point, count) -- see tests/kill_at.py
CASES = {
    "grpo": (["experiment=grpo"], ("update", 5)),  # inside step 3, after checkpoint 2 (two updates per step)
    # reverse KL with ProRL's reset at step 2: checkpoint 2 holds the reset reference model
    "reverse_kl": (["experiment=prorl", "divergence.reference_reset_every=2"], ("checkpoint", 2)),  # while checkpoint 4 is written
    "dph_js": (["experiment=dph_js", "logger=wandb"], ("evaluate", 3)),  # during the last evaluation
}


def dph_train(args: list[str], run_dir: Path, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    args = [*args, f"hydra.run.dir={run_dir}"]
    if kill is None:
        return run_cli(args, cwd=run_dir.parent)
    command = [sys.executable, str(ROOT / "tests" / "kill_at.py"), kill[0], str(kill[1]), *args]
    return subprocess.run(command, cwd=run_dir.parent, capture_output=True, text=True, timeout=300)


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings (the only values that may differ between two runs)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(run_dir / "metrics.jsonl")]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    assert rows(a) == rows(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"


@pytest.fixture(scope="module")
def references(tiny_model, cache_dir, tmp_path_factory) -> dict[str, Path]:
    """Each method's run that was never interrupted."""
    out = {}
    for name, (method, _) in CASES.items():
        run_dir = tmp_path_factory.mktemp("ref") / name
        result = dph_train([*BASE, *method, f"paths.cache_dir={cache_dir}"], run_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = run_dir
    return out


@pytest.mark.parametrize("name", CASES)
def test_a_killed_run_resumes_to_the_same_result(name, references, cache_dir, tmp_path):
    method, kill = CASES[name]
    args = [*BASE, *method, f"paths.cache_dir={cache_dir}"]
    run_dir = tmp_path / name
    killed = dph_train(args, run_dir, kill)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run_dir / "model").exists()
    resumed = dph_train(args, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log_text = (run_dir / "train.log").read_text()
    assert "Resuming from checkpoint" in log_text and "step-000002: step 2 of 4" in log_text
    if name == "reverse_kl":
        assert "Step 4: the reference is now the current policy" in log_text
    assert_same_run(references[name], run_dir)
    steps = [r["train/step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [0, 0, 1, 2, 2, 3, 4, 4] if name == "dph_js" else steps == [0, 1, 2, 2, 3, 4, 4]
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert [r["train/step"] for r in samples] == sorted(r["train/step"] for r in samples)  # no rows of the killed try
    if name == "dph_js":  # W&B: the resumed attempt's directory holds the whole run, each step once
        runs = find_offline_runs(run_dir / "wandb")
        assert [p.parent.parent.name for p in runs] == ["replaced", "wandb"]  # the killed attempt, moved aside
        assert len({p.parent.name.split("-")[3] for p in runs}) == 1  # one run id
        history = read_history(runs[-1])
        scalars = [{k: v for k, v in r.items() if not k.startswith(("_", "charts/", "samples/", "time/"))}
                   for r in history]
        logged = [r["train/step"] for r in scalars if len(r) > 1]
        assert logged == [r["train/step"] for r in rows(run_dir)]
        assert [s for s in scalars if len(s) > 1] == rows(run_dir)


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("wandb"))
    return to


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(references, cache_dir, tmp_path):
    """A truncated newest checkpoint is never loaded: the run resumes from the previous complete one
    (and a checkpoint directory whose write never finished is ignored and removed)."""
    run_dir = copy_run(references["grpo"], tmp_path / "run")
    weights_file = run_dir / "checkpoints" / "step-000004" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    unfinished = run_dir / "checkpoints" / "step-000003"
    unfinished.mkdir()  # no manifest: its write never finished
    (unfinished / "model.safetensors").write_bytes(b"half")
    resumed = dph_train([*BASE, *CASES["grpo"][0], f"paths.cache_dir={cache_dir}"], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log_text = (run_dir / "train.log").read_text()
    assert "Skipping checkpoint" in log_text and "model.safetensors does not match its checksum" in log_text
    assert "step-000002: step 2 of 4" in log_text
    assert_same_run(references["grpo"], run_dir)
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-000002", "step-000004"]


def test_a_checkpoint_of_another_config_is_refused_and_never_starts_over(references, cache_dir, tmp_path):
    run_dir = copy_run(references["grpo"], tmp_path / "run")
    args = [*BASE, *CASES["grpo"][0], f"paths.cache_dir={cache_dir}"]
    before = (run_dir / "metrics.jsonl").read_text()
    other = dph_train([*args, "divergence=reverse_kl", "divergence.source=rollouts"], run_dir)
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "was written by another config" in lines[0] and "divergence.name ('none' -> 'reverse_kl')" in lines[0]
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing touched

    fresh = dph_train([*args, "trainer.resume=never", "trainer.steps=2"], run_dir)  # start over: old outputs moved aside
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    aside = [p for p in run_dir.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == before
    assert [r["train/step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2, 2]  # one run, not two


def test_the_trained_policy_loads_and_trains_further(references, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = references["grpo"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trained_model"] == str(run_dir / "model")
    assert summary["initial/eval/test/pass@1"] == read_jsonl(run_dir / "metrics.jsonl")[0]["eval/test/pass@1"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", local_files_only=True)
    trained = weights(run_dir)
    assert all(torch.equal(p, trained[k]) for k, p in model.state_dict().items() if k in trained)
    further = tmp_path / "further"
    args = [a for a in BASE if not a.startswith("model.")]
    result = dph_train([*args, "experiment=grpo", "model=hf", f"model.path={run_dir / 'model'}", "trainer.steps=1",
                        "trainer.save_model=false", f"paths.cache_dir={cache_dir}"], further)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (further / "model").exists()
    first = read_jsonl(further / "metrics.jsonl")[0]
    assert first["eval/test/pass@1"] == read_jsonl(run_dir / "metrics.jsonl")[-1]["eval/test/pass@1"]


# ---------------------------------------------------------------------------- sweeps
def sweep_command(cache_dir: Path, sweep_dir: Path, *overrides: str) -> list[str]:
    return ["-m", *with_overrides(BASE, f"paths.cache_dir={cache_dir}"), f"hydra.sweep.dir={sweep_dir}", *overrides]


def kill_sweep(args: list[str], cwd: Path, point: str, count: int) -> None:
    """Run a sweep (its jobs in its own process: the basic launcher) and SIGKILL it mid-trial."""
    command = [sys.executable, str(ROOT / "tests" / "kill_at.py"), point, str(count), *args]
    killed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]


def test_a_killed_optuna_sweep_resumes_its_interrupted_trial_from_its_checkpoint(tiny_model, cache_dir, tmp_path):
    import optuna

    from dph.pruning import open_storage

    sweep_dir = tmp_path / "sweep"
    args = sweep_command(cache_dir, sweep_dir, "experiment=grpo", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                         "hydra.sweeper.study_name=resume", "optimizer.lr=interval(1e-3, 3e-3)")
    kill_sweep(args, tmp_path, "update", 4 * 2 + 5)  # trial 1 (4 steps x 2 updates each), inside its step 3
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="resume", storage=open_storage(str(sweep_dir / "optuna.journal")))
    states = [(t.number, t.state.name, t.user_attrs.get("interrupted", False)) for t in study.trials]
    assert states == [(0, "COMPLETE", False), (1, "FAIL", True), (2, "COMPLETE", False)]
    retry = study.trials[2]
    assert retry.params == study.trials[1].params and retry.user_attrs["resumes_trial"] == 1
    assert retry.user_attrs["job_dir"] == str(sweep_dir / "1") and not (sweep_dir / "2").exists()
    assert "step-000002: step 2 of 4" in (sweep_dir / "1" / "train.log").read_text()
    steps = [r["train/step"] for r in read_jsonl(sweep_dir / "1" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 2, 3, 4, 4]  # each step once
    assert retry.value == read_jsonl(sweep_dir / "1" / "metrics.jsonl")[-1]["eval/test/pass@8"]


def test_a_killed_grid_resumes_each_job(tiny_model, cache_dir, tmp_path):
    """A grid (the basic sweeper) run again in the same sweep directory: the finished job returns at
    once from its last checkpoint, the interrupted one resumes from its own."""
    sweep_dir = tmp_path / "grid"
    args = sweep_command(cache_dir, sweep_dir, "experiment=grpo,dapo")
    kill_sweep(args, tmp_path, "update", 4 * 2 + 5)  # the second job, inside its step 3
    first = (sweep_dir / "0" / "metrics.jsonl").read_text()
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep_dir / "0" / "metrics.jsonl").read_text() == first  # nothing of job 0 ran again
    assert "step-000004: step 4 of 4" in (sweep_dir / "0" / "train.log").read_text()
    assert "step-000002: step 2 of 4" in (sweep_dir / "1" / "train.log").read_text()
    assert [r["train/step"] for r in read_jsonl(sweep_dir / "1" / "metrics.jsonl")] == [0, 1, 2, 2, 3, 4, 4]
