"""Settings of the optuna sweeper: ``hydra/sweeper=optuna``, keys under ``hydra.sweeper``.

A sweep preset (``# @package _global_``)::

    defaults:
      - override /hydra/sweeper: optuna
    hydra:
      sweeper:
        direction: maximize
        n_trials: 30
        n_jobs: 2
        params:
          divergence: choice(none, reverse_kl, forward_kl, js, alpha)
          divergence.weight: tag(log, interval(0.001, 0.3))
          divergence.alpha: interval(0.0, 1.0)
          optimizer.lr: tag(log, interval(1e-6, 1e-4))
        conditional:
          divergence.weight: {divergence: [reverse_kl, forward_kl, js, alpha]}
          divergence.alpha: {divergence: [alpha]}
"""

# No `from __future__ import annotations` here: Hydra execs plugin modules before adding them to
# sys.modules, and dataclasses then cannot resolve string annotations.

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConf:
    # tpe | random | grid | nsgaii (multi-objective). grid needs choice()/range() params only.
    name: str = "tpe"
    # Seeds the sampler; a resumed sweep uses seed + (trials already in the study), so it does not
    # repeat the first sweep's draws. null: unseeded.
    seed: Optional[int] = 0
    # Extra keyword arguments of the Optuna sampler, e.g. {n_startup_trials: 5} for tpe or
    # {population_size: 20} for nsgaii.
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerConf:
    # none | median | successive_halving | hyperband. Trials report through dph.pruning.TrialReporter;
    # a pruned trial is recorded PRUNED with its last reported value. Single-objective studies only.
    name: str = "none"
    n_startup_trials: int = 5      # median: finished trials before any trial is pruned
    n_warmup_steps: int = 0        # median: a trial is not pruned before this step
    interval_steps: int = 1        # median: check every this many reported steps
    min_resource: Any = "auto"     # successive_halving, hyperband: steps before the first decision (hyperband: auto = 1)
    max_resource: Any = "auto"     # hyperband: the last step a trial reports (auto: the first finished trial's)
    reduction_factor: int = 3      # successive_halving, hyperband: keep 1/reduction_factor at each rung


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.dph_optuna_sweeper.optuna_sweeper.OptunaSweeper"

    # The search space, in Hydra's override grammar: choice(a, b) or a,b (categorical),
    # range(start, stop[, step]) (integers or a float grid; stop excluded, as in Hydra),
    # interval(a, b) (uniform float), int(interval(a, b)) (integer), tag(log, interval(a, b))
    # (log-uniform), or a fixed value. Sweep overrides on the command line join the space.
    params: Dict[str, Any] = field(default_factory=dict)
    # Define-by-run conditions: {child: {parent: [values]}}; the child is sampled (or its fixed
    # value passed) only when every parent was given one of the listed values in this trial.
    conditional: Dict[str, Any] = field(default_factory=dict)
    direction: str = "maximize"              # maximize | minimize (one objective)
    directions: Optional[List[str]] = None   # several objectives, e.g. [maximize, minimize]; replaces direction
    n_trials: int = 20           # trials in the study in total (a resumed sweep runs only the missing ones)
    n_jobs: int = 1              # trials per batch, launched together (parallel with hydra/launcher=joblib)
    # null: a journal file optuna.journal in hydra.sweep.dir; a path: a journal file there;
    # a URL (sqlite:///..., postgresql://user@host/db): Optuna's RDB storage. Keep passwords in
    # ~/.pgpass or PGPASSWORD: the URL is given to every trial (and saved in its config).
    storage: Optional[str] = None
    study_name: str = "${hydra.job.name}"   # the same storage and study name resume a study (same fixed overrides)
    # The sweep stops (with an error) once more than this fraction of its finished trials failed.
    max_failure_rate: float = 0.0
    # RDB storages (sqlite, postgresql): the sweeper records a heartbeat of each trial it runs every
    # heartbeat_interval seconds; a RUNNING trial without one for grace_period seconds (its sweep
    # was killed) is told FAIL, flagged interrupted, not counted, and run again by any sweep of the
    # study. null: no heartbeat (a resumed sweep then fails every RUNNING trial, as with journals).
    heartbeat_interval: Optional[int] = 60
    grace_period: Optional[int] = 180        # > heartbeat_interval; null: 2 x heartbeat_interval
    # A study records the fixed overrides of the command line that started it (not hydra.*, not the
    # search space); a resumed sweep with other ones is refused, since its trials would optimize
    # another objective. true: continue anyway (new trials record theirs in user attr fixed_overrides).
    resume_with_changed_overrides: bool = False
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="dph")
