"""Job processes: CPU threads per parallel trial (dph.threads), submitit jobs and their
torch.distributed environment (dph.cluster), and the SLURM preset (conf/hydra/launcher/slurm.yaml).

There is no SLURM here: sweeps run end to end on ``hydra/launcher=submitit_local`` (the same
launcher code, jobs as local processes), and the preset's sbatch script is rendered by submitit's
own SLURM executor without submitting anything.
"""

from __future__ import annotations

import os

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import TINY_OVERRIDES, compose_config, run_cli, with_overrides
from dph import threads
from dph.pruning import open_storage
from dph.threads import configure_threads, threads_per_process

submitit = pytest.importorskip("submitit", reason='the slurm extra is not installed: pip install -e ".[slurm]"')

CORES = 16


def hydra_node(*overrides: str):
    """The ``hydra`` node of a composed dph-train config, as a job of that multirun sees it."""
    return compose_config(["hydra.mode=MULTIRUN", *overrides]).hydra


@pytest.mark.parametrize("overrides, environ, expected", [
    (["hydra.mode=RUN"], {}, 16),                                                       # a single run
    (["hydra.mode=RUN"], {"LOCAL_WORLD_SIZE": "4"}, 4),                                 # accelerate launch, 4 ranks
    ([], {}, 16),                                                                       # basic launcher: one at a time
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"], {}, 4),
    (["hydra/launcher=joblib", "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=2"], {}, 8),   # n_jobs=-1, batches of 2
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=-2"], {}, 1),                     # 15 workers
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"], {"OMP_NUM_THREADS": "3"}, 3),   # the user's setting wins
    (["hydra/launcher=submitit_local", "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=2",
      "hydra.launcher.tasks_per_node=2"], {}, 4),                                       # 2 jobs x 2 tasks at once
    (["hydra/launcher=submitit_local"], {}, 1),                                         # batch unknown: all cores busy
    (["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=3"], {}, 3),
    (["hydra/launcher=slurm"], {}, 8),                                                  # the preset's cpus_per_task
    (["hydra/launcher=slurm"], {"SLURM_CPUS_PER_TASK": "6"}, 6),
    (["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=null", "hydra.launcher.tasks_per_node=4"], {}, 4),
])
def test_each_parallel_process_gets_its_share_of_the_cores(overrides, environ, expected):
    assert threads_per_process(hydra_node(*overrides), environ, CORES)[0] == expected


def test_configure_threads_sets_torch_and_the_threads_of_child_processes(monkeypatch):
    """In a process started without thread variables: torch gets the share, and so do children
    (the variables exported); a second job in the same process is not misled by them."""
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_INHERITED", {"OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None})
    cores = len(os.sched_getaffinity(0))
    try:
        node = hydra_node("hydra/launcher=joblib", "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=2")
        assert configure_threads(node) == max(1, cores // 2)
        assert torch.get_num_threads() == max(1, cores // 2)
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(max(1, cores // 2))
        assert configure_threads(hydra_node("hydra.mode=RUN")) == cores  # not the exported value
        assert torch.get_num_threads() == cores and os.environ["OMP_NUM_THREADS"] == str(cores)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ submitit, end to end
def tiny_run(cache_dir) -> list[str]:
    return with_overrides(TINY_OVERRIDES, "device=cpu", "logger=none", "divergence=none",
                          f"paths.cache_dir={cache_dir}")


@pytest.mark.slow
def test_a_sweep_on_the_submitit_local_launcher(cache_dir, tiny_model, tmp_path, monkeypatch):
    """Two trials at once, each a submitit job (its own process) with its share of the cores."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # else the jobs inherit it and use it
        monkeypatch.delenv(name, raising=False)
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *tiny_run(cache_dir), f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=submitit_local",
                    "hydra/sweeper=optuna", "hydra.sweeper.study_name=local", "hydra.sweeper.n_trials=2",
                    "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.name=random",
                    "optimizer.lr=tag(log, interval(1e-5, 1e-3))"],
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    study = optuna.load_study(study_name="local", storage=open_storage(str(sweep_dir / "optuna.journal")))
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    cores = len(os.sched_getaffinity(0))
    for n in (0, 1):
        log = (sweep_dir / str(n) / "train.log").read_text()
        assert f"{max(1, cores // 2)} CPU thread(s) per process (2 submitit process(es) on {cores} core(s))" in log
        assert "Training on cpu with 1 process(es)" in log
    assert list((sweep_dir / ".submitit").glob("*/*_0_log.out"))  # the jobs ran through submitit


@pytest.mark.slow
def test_a_submitit_job_with_two_tasks_trains_as_two_processes(cache_dir, tiny_model, tmp_path):
    """tasks_per_node=2: submitit starts two processes for the job; dph-train exports RANK,
    WORLD_SIZE, MASTER_ADDR, ... from submitit's environment and accelerate forms a 2-process
    gloo group."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *tiny_run(cache_dir), "seed=0", f"hydra.sweep.dir={sweep_dir}",
                    "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    log = (sweep_dir / "0" / "train.log").read_text()
    assert "submitit task 0 of 2: torch.distributed through" in log and "submitit task 1 of 2" in log
    assert "with 2 process(es)" in log and "with 1 process(es)" not in log
    assert (sweep_dir / "0" / "metrics.jsonl").is_file()


# ------------------------------------------------------------------ the SLURM preset
class SbatchRenderer(submitit.SlurmExecutor):
    """submitit's SLURM executor where there is no SLURM: it renders job scripts, never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1  # the executor refuses to start without srun on PATH


def sbatch_script(tmp_path, *overrides: str) -> str:
    """The sbatch script the preset's launcher would submit for a job, rendered by submitit with the
    launcher's settings as hydra_submitit_launcher passes them (generic names, then SLURM ones)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_config(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", *overrides])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    executor = SbatchRenderer(params.pop("submitit_folder"), max_num_timeout=params.pop("max_num_timeout"))
    generic = set(OmegaConf.structured(BaseQueueConf))  # as submitit's AutoExecutor: generic names converted
    executor.update_parameters(**executor._convert_parameters({k: v for k, v in params.items() if k in generic}),
                               **{k: v for k, v in params.items() if k not in generic})
    return executor._make_submission_file_text("python -u -m submitit.core._submit", "0")


def test_the_slurm_preset_renders_the_sbatch_lines_a_gpu_job_needs(tmp_path):
    script = sbatch_script(tmp_path, "hydra.launcher.partition=gpu", "hydra.launcher.tasks_per_node=4",
                           "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=90",
                           "hydra.launcher.account=rl-lab", "hydra.launcher.setup=[source .venv/bin/activate]")
    lines = script.splitlines()
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                     "#SBATCH --time=90", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --nodes=1",
                     "#SBATCH --account=rl-lab", "#SBATCH --signal=USR2@120"):
        assert expected in lines, f"{expected} missing from:\n{script}"
    assert "source .venv/bin/activate" in lines
    assert any(line.startswith("srun ") for line in lines)  # one process per task
    assert not any("--partition" in line for line in sbatch_script(tmp_path / "default").splitlines())
