"""A valid config meeting the user's model, data or environment: each condition that stops a run ends
in one line on stderr and a non-zero exit, never a traceback; in a sweep that trial fails and the
sweep goes on."""

from __future__ import annotations

import csv
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DPH, ROOT, TINY_OVERRIDES, read_jsonl, run_cli, with_overrides

pytestmark = pytest.mark.slow

QUIET = {"TQDM_DISABLE": "1"}  # progress bars write to stderr; the error line is what stderr must hold
PROGRESS = re.compile(r"^[\w -]*:\s+\d+%\|")  # a progress bar's line (the training bar is on regardless)

# countdown with two numbers up to 9 (fast to score, small splits), evaluated on 4 test prompts
SMALL = [o for o in TINY_OVERRIDES if not o.startswith("model.")] + [
    "task.min_solutions=1", "task.warmup_splits=[train]", "~task.splits.ood",
    *(f"task.splits.{split}.{key}" for split in ("train", "test")
      for key in ("numbers_per_problem=2", "max_number=9", "target_min=1")),
    "task.splits.train.size=16", "task.splits.test.size=8", "logger=none", "device=cpu", "presample.n=2",
]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the character tokenizer: it solves nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dph.models import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    directory = tmp_path_factory.mktemp("random-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def error_line(result: subprocess.CompletedProcess, prog: str = "dph-train") -> str:
    """The one line a stopped run leaves on stderr (asserting it is the only one, with no traceback)."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr[-3000:]
    return lines[0]


def test_initial_policy_that_solves_no_training_prompt(random_model, cache_dir, tmp_path):
    args = [*SMALL, "model=hf", f"model.path={random_model}", "divergence=js", f"paths.cache_dir={tmp_path / 'cache'}"]
    first = run_cli([*args, f"hydra.run.dir={tmp_path / 'a'}"], env=QUIET)
    line = error_line(first)
    assert "presample: no training prompt reached presample.threshold=0.5" in line and "lower presample.threshold" in line
    assert not (tmp_path / "a").exists()  # nothing but Hydra's own files was there: removed
    # the split is cached: a second run learns the same thing without sampling again
    second = run_cli([*args, f"hydra.run.dir={tmp_path / 'b'}"], env=QUIET)
    assert error_line(second) == line
    assert "Using the pre-sampling cache" in second.stdout and "Pre-sampling " not in second.stdout


def test_every_training_prompt_in_d_pef_leaves_nothing_for_rl(cache_dir, tmp_path):
    """One training prompt of the easy countdown, which the warmed-up tiny model solves at least once in
    64 samples: with presample.threshold=0.01 it is in D_pef, and RL has no prompt left."""
    result = run_cli([*with_overrides(DPH, "task.splits.train.size=1", "presample.n=64", "presample.threshold=0.01"),
                      f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"], env=QUIET)
    assert "every training prompt is in D_pef" in error_line(result)


def test_an_eval_split_smaller_than_max_prompts_is_evaluated_whole(random_model, tmp_path):
    result = run_cli([*SMALL, "model=hf", f"model.path={random_model}", "divergence=none", "trainer.steps=1",
                      "eval.max_prompts=100", "trainer.save_model=false", f"paths.cache_dir={tmp_path / 'cache'}",
                      f"hydra.run.dir={tmp_path / 'run'}"], env=QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval.max_prompts=100 is more than the 8 prompts of test: evaluating all 8" in result.stdout
    rows = read_jsonl(tmp_path / "run" / "eval_prompts.jsonl")
    assert {row["train/step"] for row in rows} == {0, 1} and len(rows) == 16


# dph-train whose databases disappear after its first RL step: the files are removed and the SQL sandbox
# worker restarts (as after a query that ran past its timeout), so the next query opens them again.
# (Connections already open keep reading a removed file, as SQLite does on POSIX: a removal is noticed
# when a database is next opened.)
REMOVE_DATABASES_AFTER_STEP_1 = """
import shutil, sys
from dph import train, trainer

db_dir = sys.argv.pop(1)
sys.argv[0] = "dph-train"
original, calls = trainer.Trainer.train_step, []

def train_step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        shutil.rmtree(db_dir)
        self.task.sandbox.close()
    return original(self, *args, **kwargs)

trainer.Trainer.train_step = train_step
train.main()
"""


def test_a_sql_database_removed_mid_run(random_model, tmp_path):
    db_dir, run_dir = tmp_path / "databases", tmp_path / "run"
    args = ["task=sql", "task.train_size=16", "task.test_size=8", f"task.cache_dir={db_dir}", "model=hf",
            f"model.path={random_model}", "divergence=none", "trainer.steps=3", "trainer.prompts_per_step=4",
            "algorithm.group_size=2", "eval.every=0", "eval.n=2", "eval.max_prompts=4", "eval.splits=[test]",
            "optimized_metric=eval/test/pass@2", "generation.max_new_tokens=8", "trainer.checkpoint_every=1",
            "logger=none", "device=cpu", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    result = subprocess.run([sys.executable, "-c", REMOVE_DATABASES_AFTER_STEP_1, str(db_dir), *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**__import__("os").environ, **QUIET})
    line = error_line(result)
    assert re.search(r"sql problem train/\d+: database file not found: .*databases/sql-embedded-v1-seed0/\w+\.sqlite", line)
    assert f"writes the embedded databases again under task.cache_dir={db_dir}" in line and "resumes" in line
    assert result.returncode == 1
    assert [r["train/step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r] == [1]


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_writing_a_checkpoint(tiny_model, cache_dir, tmp_path):
    """Files may not grow past 1 MiB (as on a full disk, the write fails): the checkpoint of the tiny
    model (~13 MiB with its optimizer state) cannot be written."""
    exe = Path(sys.executable).parent / "dph-train"
    run_dir = tmp_path / "run"
    args = [*with_overrides(TINY_OVERRIDES, "logger=none", "device=cpu", "divergence=none", "trainer.checkpoint_every=1"),
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**__import__("os").environ, **QUIET}, preexec_fn=_limit_file_size(1 << 20))
    line = error_line(result)
    assert "checkpoint: could not write" in line and "free space" in line and "resume" in line
    assert not list((run_dir / "checkpoints").glob("*")), "a half-written checkpoint was left behind"
    assert read_jsonl(run_dir / "metrics.jsonl"), "the rows logged before the failure are kept"


def test_a_failing_trial_does_not_stop_the_sweep(random_model, tmp_path):
    """A grid of two trials on a model that solves nothing: DPH's trial stops (nothing to rehearse),
    GRPO's runs to its end; the sweep finishes and records the failure's one line as its reason."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", *SMALL, "model=hf", f"model.path={random_model}", "trainer.steps=1",
                      "trainer.save_model=false", f"paths.cache_dir={tmp_path / 'cache'}",
                      "hydra/sweeper=optuna", "hydra.sweeper.sampler.name=grid", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.max_failure_rate=1.0", "divergence=choice(js,none)",
                      f"hydra.sweep.dir={sweep_dir}"], env=QUIET, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    with open(sweep_dir / "trials.csv") as f:
        trials = {row["params_divergence"]: row for row in csv.DictReader(f)}
    assert trials["js"]["state"] == "FAIL" and "nothing to rehearse" in trials["js"]["fail_reason"]
    assert trials["none"]["state"] == "COMPLETE"


def test_a_failing_job_does_not_stop_a_grid(random_model, tmp_path):
    """Hydra's basic sweeper stops a multirun at a job's exception: a job that cannot run ends with its
    one line instead, and the grid's other jobs run."""
    sweep_dir = tmp_path / "grid"
    result = run_cli(["-m", *SMALL, "model=hf", f"model.path={random_model}", "trainer.steps=1",
                      "trainer.save_model=false", f"paths.cache_dir={tmp_path / 'cache'}", "divergence=js,none",
                      f"hydra.sweep.dir={sweep_dir}"], env=QUIET, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to rehearse" in error_line_of_sweep(result)
    assert not (sweep_dir / "0" / "metrics.jsonl").exists() and read_jsonl(sweep_dir / "1" / "metrics.jsonl")


def error_line_of_sweep(result: subprocess.CompletedProcess) -> str:
    """A sweep that went on: no traceback, and one error line on stderr."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("dph-train: error: "), result.stderr[-3000:]
    return lines[0]
