"""CPU threads per process, so that trials running side by side do not oversubscribe the cores.

On C cores (the ones this process may run on), W processes at once each get
``max(1, C // W)`` threads: ``torch.set_num_threads`` here, and ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` for their child processes. OpenMP threads spin at barriers, so processes that
together ask for more threads than there are cores are not W times slower but 10-20x.

W comes from the job's Hydra config (``hydra.*``):

- ``hydra/launcher=joblib``: ``hydra.launcher.n_jobs`` (-1: all cores), at most the sweep's batch
  (``hydra.sweeper.n_jobs`` of the optuna sweeper, ``max_batch_size`` of the basic one);
- ``hydra/launcher=submitit_local``: the jobs of a batch start together, each with
  ``hydra.launcher.tasks_per_node`` processes: W = batch x tasks (an unknown batch: W = C);
  ``hydra.launcher.cpus_per_task``, when set, is each process's share;
- ``submitit_slurm`` (``hydra/launcher=slurm``): ``SLURM_CPUS_PER_TASK`` (``cpus_per_task``),
  else the job's cores over its tasks on the node;
- a single run or the basic launcher (jobs one after another): W = the processes of the job
  (``LOCAL_WORLD_SIZE`` under ``accelerate launch`` / torchrun, else 1).

An ``OMP_NUM_THREADS`` already in the environment wins: the user's, or the one joblib's loky
backend gives its workers (``cores // hydra.launcher.n_jobs``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")   # read by OpenMP / MKL in child processes
# The thread variables as the process found them, before configure_threads exported its own (the
# jobs of a basic launcher run one after another in one process: the second must not take the
# first one's value for the user's).
_INHERITED = {name: os.environ.get(name) for name in THREAD_VARIABLES}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: what SLURM or taskset granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _positive_int(value) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 1 else None


def _sweep_batch(hydra_cfg: DictConfig) -> int | None:
    """Jobs the sweeper launches together: optuna's n_jobs, the basic sweeper's max_batch_size."""
    target = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or "")
    if target.endswith("OptunaSweeper"):
        return _positive_int(OmegaConf.select(hydra_cfg, "sweeper.n_jobs", default=None))
    if target.endswith("BasicSweeper"):
        return _positive_int(OmegaConf.select(hydra_cfg, "sweeper.max_batch_size", default=None))
    return None


def threads_per_process(hydra_cfg: DictConfig | None, environ: Mapping[str, str], cores: int) -> tuple[int, str]:
    """(threads for each process of this job, why), from the job's ``hydra`` node (None outside
    Hydra), the environment and the available cores."""
    explicit = _positive_int(environ.get("OMP_NUM_THREADS"))
    if explicit is not None:
        return explicit, "OMP_NUM_THREADS is set"
    local = _positive_int(environ.get("LOCAL_WORLD_SIZE")) or 1
    mode = str(OmegaConf.select(hydra_cfg, "mode", default="")) if hydra_cfg is not None else ""
    if hydra_cfg is None or not mode.endswith("MULTIRUN"):
        return max(1, cores // local), f"{local} process(es) on {cores} core(s)"
    launcher = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    batch = _sweep_batch(hydra_cfg)
    if launcher.endswith("JoblibLauncher"):
        raw = OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=None)
        n_jobs = int(raw) if raw is not None else -1
        n_jobs = max(1, cores + 1 + n_jobs if n_jobs < 0 else n_jobs)   # joblib: -1 all cores, -2 all but one
        workers = min(n_jobs, batch) if batch else n_jobs
        return max(1, cores // workers), f"{workers} joblib worker(s) on {cores} core(s)"
    if launcher.endswith(("LocalLauncher", "SlurmLauncher")):
        per_task = _positive_int(environ.get("SLURM_CPUS_PER_TASK")) if launcher.endswith("SlurmLauncher") else None
        per_task = per_task or _positive_int(OmegaConf.select(hydra_cfg, "launcher.cpus_per_task", default=None))
        if per_task is not None:
            return per_task, "hydra.launcher.cpus_per_task"
        tasks = _positive_int(OmegaConf.select(hydra_cfg, "launcher.tasks_per_node", default=1)) or 1
        if launcher.endswith("SlurmLauncher"):  # the job's own node: its cores are the job's
            return max(1, cores // tasks), f"{tasks} task(s) of the job on {cores} core(s)"
        workers = (batch or cores) * tasks
        return max(1, cores // workers), f"{workers} submitit process(es) on {cores} core(s)"
    return max(1, cores // local), f"jobs one at a time, {local} process(es) each, on {cores} core(s)"


def configure_threads(hydra_cfg: DictConfig | None = None) -> int:
    """Give this process its share of the cores (see the module docstring) before torch does any
    work; child processes inherit it through OMP_NUM_THREADS / MKL_NUM_THREADS. Returns the count."""
    import torch

    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    environ = {name: value for name, value in os.environ.items() if name not in THREAD_VARIABLES}
    environ.update({name: value for name, value in _INHERITED.items() if value is not None})
    threads, why = threads_per_process(hydra_cfg, environ, available_cores())
    torch.set_num_threads(threads)
    for name in THREAD_VARIABLES:
        if _INHERITED[name] is None:
            os.environ[name] = str(threads)
    log.info("%d CPU thread(s) per process (%s)", threads, why)
    return threads
