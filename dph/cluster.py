"""Process setup at the start of a job: the torch.distributed environment of a submitit job with
several tasks, then this process's share of the CPU threads (dph.threads).

With ``hydra/launcher=slurm`` (or ``submitit_local``) and ``hydra.launcher.tasks_per_node=N``,
submitit starts N processes per job, each running the Hydra job. accelerate forms its process
group from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which
submitit does not set: ``prepare_job_process`` exports them from submitit's job environment
(``submitit.helpers.TorchDistributedEnvironment``: rank and world size from the tasks, the first
node as master, a port drawn from the job id) before the Accelerator is created. Each process then
takes ``cuda:<LOCAL_RANK>``, so give such a job ``gpus_per_node=N``.
"""

from __future__ import annotations

import logging
import os

from dph.threads import configure_threads

log = logging.getLogger(__name__)

DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def export_distributed_env() -> bool:
    """Export the torch.distributed variables in a submitit job of several tasks; True when done.
    Nothing outside submitit, for one task, or when a launcher inside the job (torchrun,
    accelerate launch) has set RANK already."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return False
    import submitit

    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    log.info("submitit task %d of %d: torch.distributed through %s:%d", env.rank, env.world_size,
             env.master_addr, env.master_port)
    return True


def prepare_job_process() -> int:
    """At the start of a run: the distributed environment (submitit jobs), then the CPU threads of
    this process; returns the thread count."""
    export_distributed_env()
    return configure_threads()
