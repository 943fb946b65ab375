"""`dph-train` as users run it (subprocesses): bad input fails fast with one line, a tiny run logs
every metric to metrics.jsonl and W&B alike, multiruns, and a real 2-process accelerate run on CPU."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import BAD_VALUES, DPH, ROOT, TINY_OVERRIDES, compose_config, read_jsonl, run_cli, with_overrides
from dph.metrics import ks_up_to
from dph.train import objective
from wandb_records import find_offline_run, read_config, read_history, read_run_info

pytestmark = pytest.mark.slow

TRAIN_METRICS = [
    "train/reward_mean", "train/entropy", "train/divergence", "train/loss", "train/pg_loss", "train/div_loss",
    "train/clip_frac", "train/response_length", "time/rollout_s", "time/update_s",
]
EVAL_METRICS = [f"eval/test/pass@{k}" for k in (1, 2, 4, 8)] + [
    f"eval/test/{m}" for m in ("entropy", "reward_mean", "distinct_correct")
]
STEPS = 2  # trainer.steps in TINY_OVERRIDES


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------- bad input
# test_config checks every BAD_VALUES message in-process; the command line's contract (exit 2, one
# line, nothing started) is checked here on one value of each kind of check (each run imports torch).
CLI_KEYS = ("divergence.weight", "optimized_metric", "model.path", "logger.mode=online needs W&B credentials",
            "task.path", "divergence.wieght", "rollout.engine")
CLI_BAD_VALUES = [next(case for case in BAD_VALUES if case[1] == key) for key in CLI_KEYS]  # the first of each


@pytest.mark.parametrize(("overrides", "key"), CLI_BAD_VALUES, ids=[" ".join(o) for o, _ in CLI_BAD_VALUES])
def test_impossible_value_fails_fast_with_one_line(overrides, key, tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    result = run_cli([*overrides, f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dph-train: error: ") and key in lines[0], lines[0]
    _no_traceback(result)
    # Nothing was started: no model built or loaded, no logger, no metrics, and no empty run directory.
    assert not cache.exists()
    assert not run_dir.exists()
    assert "base model" not in result.stdout and "Training on" not in result.stdout


@pytest.mark.parametrize(("args", "line"), [
    (["divergence=nope"], "divergence=nope: no such option of the config group divergence: use one of alpha, "
                          "forward_kl, js, none, reverse_kl (conf/divergence/)"),
    (["prompt=chatml"], "prompt=chatml: no such option of the config group prompt: use one of gsm8k, instruct, "
                        "plain, qwen_math (conf/prompt/)"),
    (["-m", "model=tiny,tiny_chatt"], "model=tiny_chatt: no such option of the config group model"),
])
def test_unknown_group_option_is_one_line_with_the_options(args, line, tmp_path):
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dph-train: error: {line}"), result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_cfg_job_prints_the_composed_config(tmp_path):
    overrides = ["divergence=reverse_kl", "divergence.weight=0.3", "trainer.steps=7"]
    result = run_cli([*overrides, "--cfg", "job"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    composed = compose_config(overrides, hydra=False)
    assert OmegaConf.to_container(printed, resolve=False) == OmegaConf.to_container(composed, resolve=False)
    assert printed.divergence.name == "reverse_kl" and printed.divergence.weight == 0.3
    assert list(tmp_path.iterdir()) == []  # nothing ran, no output directory


def test_help_lists_the_config_groups(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "== Configuration groups ==" in result.stdout
    assert "divergence: alpha, forward_kl, js, none, reverse_kl" in result.stdout
    assert "logger: none, wandb" in result.stdout and "model: hf, tiny" in result.stdout


# ---------------------------------------------------------------------------- a whole run
def _by_step(records: list[dict]) -> dict[int, dict]:
    """Records merged per train/step (the train record and the eval record of a step)."""
    merged: dict[int, dict] = {}
    for record in records:
        merged.setdefault(int(record["train/step"]), {}).update(record)
    return merged


def _check_metrics(records: list[dict], steps: int = STEPS) -> None:
    assert [r["train/step"] for r in records] == [0, *range(1, steps + 1), steps]  # eval, train..., eval
    evals = [r for r in records if "eval/test/pass@1" in r]
    trains = [r for r in records if "train/loss" in r]
    assert [r["train/step"] for r in evals] == [0, steps]
    assert [r["train/step"] for r in trains] == list(range(1, steps + 1))
    for r in trains:
        missing = [m for m in TRAIN_METRICS if m not in r]
        assert not missing, f"step {r['train/step']} lacks {missing}"
        assert all(isinstance(r[m], (int, float)) and math.isfinite(r[m]) for m in TRAIN_METRICS), r
        assert 0 <= r["train/reward_mean"] <= 1 and 0 <= r["train/clip_frac"] <= 1
        assert 1 <= r["train/response_length"] <= 16  # generation.max_new_tokens=16
        assert r["train/entropy"] > 0 and r["time/rollout_s"] > 0 and r["time/update_s"] > 0
        statuses = [r[f"train/status/{s}"] for s in ("correct", "wrong", "invalid", "timeout")]
        assert sum(statuses) == pytest.approx(1.0) and statuses[0] == pytest.approx(r["train/reward_mean"])
    for r in evals:
        missing = [m for m in EVAL_METRICS if m not in r]
        assert not missing, f"eval at step {r['train/step']} lacks {missing}"
        passk = [r[f"eval/test/pass@{k}"] for k in ks_up_to(8)]
        assert all(0 <= p <= 1 for p in passk) and passk == sorted(passk)  # pass@k grows with k
        assert r["eval/test/reward_mean"] == pytest.approx(r["eval/test/pass@1"])
        assert r["eval/test/entropy"] > 0 and r["eval/test/distinct_correct"] >= 0


def test_tiny_run_logs_everything_to_jsonl_plots_and_wandb(tiny_model, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = with_overrides(
        TINY_OVERRIDES, "divergence=reverse_kl", "logger=wandb", "device=cpu",
        "optimized_metric=[eval/test/pass@1,eval/test/pass@8]", f"paths.cache_dir={cache_dir}",
    )
    # The subprocess sees the W&B directories that the autouse fixture put into os.environ.
    assert Path(os.environ["WANDB_CONFIG_DIR"]).is_relative_to(tmp_path)
    result = run_cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using cached base model" in result.stdout  # the session's model, not a rebuild
    # The result block: where the run is, Pass@1 and Pass@8 at step 0 and at the end, the saved policy.
    summary = json.loads((run_dir / "summary.json").read_text())
    block = result.stdout[result.stdout.index("dph-train: done: "):].splitlines()
    assert block[0] == f"dph-train: done: {run_dir}"
    p1, p8 = (f"{summary[f'initial/eval/test/pass@{k}']:.3f} -> {summary[f'eval/test/pass@{k}']:.3f}" for k in (1, 8))
    assert block[1].split() == ["test", "pass@1", *p1.split(), "pass@8", *p8.split(), "(step", "0", "->", "2)"]
    assert block[2] == f"  trained policy: {run_dir / 'model'}" and summary["trained_model"] == str(run_dir / "model")

    records = read_jsonl(run_dir / "metrics.jsonl")
    _check_metrics(records)
    for name in ("passk_over_steps.png", "passk_vs_k.png", "train_curves.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (tmp_path / "wandb").exists()  # W&B's files stay inside the run directory

    # W&B offline: the same values per train/step, and the composed config.
    run_file = find_offline_run(run_dir / "wandb")
    history = [
        {k: v for k, v in row.items() if not k.startswith(("_", "charts/", "samples/"))} for row in read_history(run_file)
    ]
    assert _by_step(history) == _by_step(records)
    assert read_run_info(run_file)["name"] == f"reverse_kl0.01 seed0 {run_dir.name}"  # what the run is, and when
    config = read_config(run_file)
    config.pop("_wandb", None)
    assert config == OmegaConf.to_container(compose_config(overrides, hydra=False), resolve=True)

    # The objective a sweeper gets: the last values of the optimized metrics.
    summary = json.loads((run_dir / "summary.json").read_text())
    last_eval = records[-1]
    cfg = OmegaConf.create({"optimized_metric": ["eval/test/pass@1", "eval/test/pass@8"]})
    assert objective(cfg, summary) == [last_eval["eval/test/pass@1"], last_eval["eval/test/pass@8"]]
    assert summary["model_dir"] == str(tiny_model)


def test_multirun_gives_one_run_per_job(tiny_model, cache_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = with_overrides(TINY_OVERRIDES, "logger=wandb", "device=cpu", f"paths.cache_dir={cache_dir}")
    result = run_cli(["-m", *overrides, "divergence=none,reverse_kl", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = set()
    for job, divergence in (("0", "none"), ("1", "reverse_kl")):
        job_dir = sweep_dir / job
        _check_metrics(read_jsonl(job_dir / "metrics.jsonl"))
        assert f"divergence={divergence}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
        run_file = find_offline_run(job_dir / "wandb")
        assert read_config(run_file)["divergence"]["name"] == divergence
        runs.add(run_file.name)
    assert len(runs) == 2
    train = [r for r in read_jsonl(sweep_dir / "1" / "metrics.jsonl") if "train/loss" in r]
    assert all(r["train/divergence"] >= -1e-6 for r in train)  # k3 estimates are >= 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(overrides: list[str], cwd: Path) -> str:
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "dph.train", *overrides,
    ]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # Accelerate's process group holds both ranks (it cannot form with one).
    assert "with 2 process(es)" in output, output[-4000:]
    return output


def test_two_process_accelerate_run_checkpoints_and_resumes_on_cpu(tiny_model, cache_dir, tmp_path):
    """Two ranks (gloo): rank 0 alone logs and writes checkpoints, each rank saves and restores its
    own RNG state; a run of 2 steps resumed to 3 equals a run of 3 steps."""
    from safetensors.torch import load_file


    base = with_overrides(DPH, "experiment=grpo_kl", "logger=wandb", "device=cpu", "trainer.checkpoint_every=1",
                          "eval.every=1", "optimizer.lr=2e-3", f"paths.cache_dir={cache_dir}")
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    _two_processes([*base, "trainer.steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 1  # rank 0 alone logs
    assert [r["train/step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 1, 2, 2]  # rank 1 wrote nothing
    find_offline_run(run_dir / "wandb")  # exactly one W&B run
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-000002").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]

    output = _two_processes([*base, "trainer.steps=3", f"hydra.run.dir={run_dir}"], tmp_path)
    assert "Resuming from checkpoint" in output and "step 2 of 3" in output
    _two_processes([*base, "trainer.steps=3", "logger=none", f"hydra.run.dir={reference}"], tmp_path)
    rows = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(d / "metrics.jsonl")]
            for d in (run_dir, reference)]
    assert rows[0] == rows[1] and [r["train/step"] for r in rows[0]] == [0, 1, 1, 2, 2, 3, 3]
    resumed, uninterrupted = (load_file(str(d / "model" / "model.safetensors")) for d in (run_dir, reference))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


# ---------------------------------------------------------------------------- one seed, one result
def test_a_seed_gives_one_result_whether_or_not_the_run_built_its_caches(tmp_path):
    """The RL run's draws do not depend on what was built before it: a run that builds the base model
    and the pre-sampling cache and a run that finds them ready log identical metrics."""

    cache = tmp_path / "cache"
    runs = []
    for name in ("cold", "warm"):
        run_dir = tmp_path / name
        result = run_cli([*with_overrides(DPH, "trainer.steps=3", "eval.every=2"), f"paths.cache_dir={cache}",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append([{k: v for k, v in r.items() if not k.startswith("time/")}
                     for r in read_jsonl(run_dir / "metrics.jsonl")])
        log_text = (run_dir / "train.log").read_text()
        built = "Building the tiny base model" in log_text and "Wrote the pre-sampling cache" in log_text
        assert built == (name == "cold"), log_text
    assert runs[0] == runs[1]


def test_a_run_waiting_for_a_build_says_so(tiny_model, cache_dir, tmp_path):
    from filelock import FileLock

    from dph.fileio import lock_path

    lock = FileLock(str(lock_path(tiny_model)))
    lock.acquire()
    overrides = with_overrides(TINY_OVERRIDES, "divergence=none", "logger=none", "trainer.steps=0",
                               f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}")
    exe = Path(sys.executable).parent / "dph-train"
    proc = subprocess.Popen([str(exe), *overrides], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Waiting for another process" in line:
                break
        assert f"Waiting for another process that is building the tiny base model (lock {lock_path(tiny_model)})" \
            in lines[-1], "".join(lines)
    finally:
        lock.release()
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, rest[-3000:]
    assert "Using cached base model" in rest


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dph_js", "grpo"])
def test_embedded_default_logs_what_it_logged_before_the_real_model_changes(method, cache_dir, tmp_path):
    """The embedded default's prompts, stops and verdicts did not change when dph learned to read real
    models (answer extraction, stop ids, prompt presets, truncation, chunked log-probs) or when the
    trainer was redesigned: its rows equal those recorded with the code before (tests/fixtures), every
    metric that existed then; new metrics (e.g. train/truncated_frac) may be added. What counts samples
    (pass@k, rewards, verdicts, distinct answers, lengths) is equal exactly; what sums log-probs over a
    vocabulary (entropies, losses, divergences) to float32 rounding (the chunked log-probs add in
    another order: relative differences of about 1e-6)."""

    recorded = json.loads((ROOT / "tests" / "fixtures" / "embedded_default_before.json").read_text())[method]
    run_dir = tmp_path / "run"
    result = run_cli([*with_overrides(DPH, "trainer.steps=2", "trainer.save_model=false", "trainer.checkpoint_every=0"),
                      *recorded["overrides"], f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == len(recorded["rows"])
    summed = ("entropy", "loss", "div", "kl", "logprob", "ratio", "grad_norm", "clip")
    for row, before in zip(rows, recorded["rows"], strict=True):
        exact = {k for k in before if not any(word in k for word in summed)}
        assert {k: row.get(k) for k in exact} == {k: before[k] for k in exact}
        assert {k: row.get(k) for k in before} == pytest.approx(before, rel=1e-5, abs=1e-7)
