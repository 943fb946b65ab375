"""Pruning from inside a sweep trial, and the Optuna storage both sides of a sweep open.

The optuna sweeper (``hydra/sweeper=optuna``) gives every job the override
``++trial={storage:'<journal file or RDB URL>',study_name:'<name>',number:<n>}``. The job reopens
that storage in its own process (so it works with the basic, joblib or submitit launchers) and
reports its optimized metric after each evaluation::

    reporter = TrialReporter.from_config(cfg.trial, cfg.optimized_metric)  # None outside a sweep
    ...
    if reporter is not None:
        reporter.report(step, eval_metrics)  # raises optuna.TrialPruned when the pruner says so

Let ``optuna.TrialPruned`` propagate out of the task function: the sweeper records the trial as
PRUNED (with the last reported value), not as FAIL.

Multi-objective studies (``hydra.sweeper.directions`` with several entries, or a list
``optimized_metric``) cannot report intermediate values in Optuna, so ``from_config`` returns None
there and nothing is reported or pruned.

The pruner is chosen by ``hydra.sweeper.pruner``; the sweeper stores its settings in the study's
user attributes (``PRUNER_ATTR``) so that the job builds the same pruner.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optuna

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna.journal"  # the default storage, in the sweep directory
PRUNER_ATTR = "dph_pruner"       # study user attribute: the pruner settings of the sweep


# ------------------------------------------------------------------ storage
def is_rdb_url(storage: str) -> bool:
    """'sqlite:///x.db', 'postgresql://host/db', ... (anything else is a journal file path)."""
    return "://" in storage


def absolute_storage(storage: str) -> str:
    """The storage with relative paths made absolute, so that a job that changes directory (or
    runs on another node with the same file system) opens the same file."""
    if not is_rdb_url(storage):
        return os.path.abspath(os.path.expanduser(storage))
    prefix = "sqlite:///"
    path = storage[len(prefix):]
    if storage.startswith(prefix) and path and not path.startswith("/") and not path.startswith(":memory:"):
        return prefix + os.path.abspath(path)
    return storage


class StorageError(ValueError):
    """A storage that cannot be opened here, e.g. its database driver is not installed (one line)."""


def check_storage_driver(storage: str) -> None:
    """Raise StorageError, before any work, when an RDB URL's database driver is not installed
    (``postgresql://`` needs psycopg or psycopg2: the ``postgres`` extra); nothing for journal files."""
    if not is_rdb_url(storage):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(storage)
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError) as e:
        raise StorageError(f"is not a database URL that SQLAlchemy knows ({e}): use e.g. "
                           "sqlite:///path/study.db or postgresql://user@host/db") from None
    except ImportError as e:
        backend, driver = url.get_backend_name(), url.get_driver_name()
        if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
            fix = 'pip install -e ".[postgres]"'
        else:
            fix = f"install the Python package of the {backend} driver {driver!r}"
        raise StorageError(f"needs the database driver {e.name or driver}, which is not installed: {fix}") from None


def open_storage(storage: str, heartbeat_interval: int | None = None,
                 grace_period: int | None = None) -> optuna.storages.BaseStorage:
    """Open a journal file (created if missing; safe for several processes on one machine or a
    shared file system) or an RDB URL (sqlite, PostgreSQL, MySQL: as Optuna takes it; its driver
    is checked first). ``heartbeat_interval`` / ``grace_period`` (seconds, RDB only) enable Optuna's
    heartbeat: the sweeper records one for each trial it runs, and a RUNNING trial without one for
    ``grace_period`` is stale (its sweep died)."""
    if is_rdb_url(storage):
        check_storage_driver(storage)
        if heartbeat_interval is None:
            return optuna.storages.get_storage(storage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        return optuna.storages.get_storage(rdb)
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    path = absolute_storage(storage)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def display_storage(storage: str) -> str:
    """The storage with any password in an RDB URL hidden (for logs and summary files)."""
    if not is_rdb_url(storage):
        return storage
    scheme, rest = storage.split("://", 1)
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return storage


# ------------------------------------------------------------------ pruners
def _median(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """Prune when the trial's value is worse than the median of earlier trials at the same step."""
    return optuna.pruners.MedianPruner(n_startup_trials=int(spec.get("n_startup_trials", 5)),
                                       n_warmup_steps=int(spec.get("n_warmup_steps", 0)),
                                       interval_steps=int(spec.get("interval_steps", 1)))


def _successive_halving(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """Asynchronous successive halving: keep the top 1/reduction_factor at each rung of steps."""
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.get("min_resource", "auto"),
                                                  reduction_factor=int(spec.get("reduction_factor", 3)))


def _hyperband(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """Hyperband: several successive-halving brackets with different minimum resources."""
    min_resource = spec.get("min_resource", "auto")
    return optuna.pruners.HyperbandPruner(min_resource=1 if min_resource == "auto" else int(min_resource),
                                          max_resource=spec.get("max_resource", "auto"),
                                          reduction_factor=int(spec.get("reduction_factor", 3)))


def _no_pruning(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """Never prune (intermediate values are still recorded, e.g. for learning-curve plots)."""
    return optuna.pruners.NopPruner()


PRUNERS: dict[str, Callable[[Mapping[str, Any]], optuna.pruners.BasePruner]] = {
    "none": _no_pruning,
    "median": _median,
    "successive_halving": _successive_halving,
    "hyperband": _hyperband,
}


def build_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    """The pruner named by ``spec["name"]`` (none when spec is None) with the spec's settings."""
    name = (spec or {}).get("name", "none") or "none"
    if name not in PRUNERS:
        raise ValueError(f"hydra.sweeper.pruner.name={name!r} is not a known pruner: choose one of {', '.join(PRUNERS)}")
    return PRUNERS[name](spec or {})


# ------------------------------------------------------------------ reporting
def _single_metric(metric: Any) -> str | None:
    """The metric name when one metric is optimized; None for several (multi-objective)."""
    if isinstance(metric, str):
        return metric
    names = list(metric or [])
    return str(names[0]) if len(names) == 1 else None


class TrialReporter:
    """Reports one metric of a running sweep trial to its Optuna study and prunes the trial."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial = trial
        self.metric = metric

    @classmethod
    def from_config(cls, trial_cfg: Mapping[str, Any] | None, metric: Any) -> TrialReporter | None:
        """The reporter of the trial described by ``trial_cfg`` (``{storage, study_name, number}``,
        the ``trial`` key the sweeper sets), or None when there is nothing to report to: no trial
        (not a sweep job) or a multi-objective study."""
        if trial_cfg is None:
            return None
        missing = [key for key in ("storage", "study_name", "number") if trial_cfg.get(key) is None]
        if missing:
            raise ValueError(f"trial={dict(trial_cfg)!r} lacks {', '.join(missing)}: it is set by the optuna "
                             "sweeper as trial={storage: ..., study_name: ..., number: ...} (leave trial=null otherwise)")
        name = _single_metric(metric)
        if name is None:
            log.debug("several optimized metrics (multi-objective): intermediate values are not reported")
            return None
        storage = open_storage(str(trial_cfg["storage"]))
        study_name = str(trial_cfg["study_name"])
        study_id = storage.get_study_id_from_name(study_name)
        if len(storage.get_study_directions(study_id)) > 1:
            log.debug("study %s is multi-objective: intermediate values are not reported", study_name)
            return None
        pruner = build_pruner(storage.get_study_user_attrs(study_id).get(PRUNER_ATTR))
        # The trial is already sampled by the sweeper; a random sampler keeps Trial() from doing any work.
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner,
                                  sampler=optuna.samplers.RandomSampler())
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(trial_cfg["number"]))
        return cls(optuna.Trial(study, trial_id), name)

    @property
    def number(self) -> int:
        return self.trial.number

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics[metric]`` at ``step``; raise ``optuna.TrialPruned`` if the pruner says stop."""
        if self.metric not in metrics:
            raise KeyError(f"optimized metric {self.metric!r} is not among the reported metrics: {sorted(metrics)}")
        value = float(metrics[self.metric])
        self.trial.report(value, int(step))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.number} pruned at step {step}: {self.metric}={value:.6g}")
