"""The sweep loop: ask a batch of trials, launch their jobs, tell the results, refresh the report.

1. The study is created once (``load_if_exists``) before any job starts, and records the sweep's
   fixed command-line overrides (``FIXED_OVERRIDES_ATTR``); resuming it with other ones is refused
   unless ``resume_with_changed_overrides``. Trials that an earlier, killed sweep left RUNNING are
   told FAIL, flagged ``interrupted`` and not counted. On an RDB storage with a heartbeat, only the
   stale ones (no heartbeat for ``grace_period``): the others belong to a sweep still running. An
   interrupted trial's parameters are queued for the next trial, which runs in the interrupted
   one's job directory, so that dph-train resumes it from its newest checkpoint.
2. While the study holds fewer than ``n_trials`` counted trials (COMPLETE, PRUNED, FAIL; RUNNING
   ones of a concurrent sweep on the same study are counted as well), ask ``n_jobs`` trials,
   sample each define-by-run (parents first) and launch them through the configured launcher,
   recording their heartbeats while they run (RDB storages). When every trial is counted but some
   run in another sweep with a heartbeat, wait for them: one that goes stale is run again here.
   Job ``k`` of a batch gets the sampled overrides plus
   ``++trial={storage:'...',study_name:'...',number:<n>}`` (see dph.pruning) and runs in the
   sweep subdirectory numbered like the trial.
3. A job's result is told: its return value (a number, or one per direction) -> COMPLETE;
   ``optuna.TrialPruned`` -> PRUNED; any other exception or an unusable return value -> FAIL with
   ``fail_reason`` in the trial's user and system attributes.
4. After each batch ``summary.yaml``, ``trials.csv`` and the plots are rewritten in the sweep
   directory (``dph.sweep_report``), and the sweep stops with an error once more than
   ``max_failure_rate`` of its finished trials failed.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from dph.config import ConfigError, RunError
from dph.pruning import (JOURNAL_FILE, PRUNER_ATTR, StorageError, absolute_storage, build_pruner,
                         check_storage_driver, display_storage, is_rdb_url, open_storage)
from dph.sweep_report import (FAIL_REASON_ATTR, INTERRUPTED_ATTR, JOB_DIR_ATTR, OVERRIDES_ATTR, counts_toward_n_trials,
                              write_report)
from dph.tasks import VerifierError

from ._errors import SweepConfigError
from ._heartbeat import Heartbeats
from ._search_space import SearchSpace, SearchSpaceError, fixed_overrides, param_text, quote

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
MAX_REASON_CHARS = 2000
RESUMES_ATTR = "resumes_trial"  # user attribute: the interrupted trial (and job directory) this trial continues
FIXED_OVERRIDES_ATTR = "fixed_overrides"   # study (and changed-resume trial) user attribute: name -> override


def _tpe(seed: int | None, space: SearchSpace, kwargs: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    """Tree-structured Parzen estimator (handles conditional spaces; constant liar for batches)."""
    return optuna.samplers.TPESampler(seed=seed, **kwargs)


def _random(seed: int | None, space: SearchSpace, kwargs: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    """Independent uniform / log-uniform draws."""
    return optuna.samplers.RandomSampler(seed=seed, **kwargs)


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its ``study.stop()`` at the end of the grid, which only works inside
    ``study.optimize``; the sweep caps n_trials at the grid size instead."""

    def after_trial(self, study: optuna.Study, trial: Any, state: TrialState, values: Sequence[float] | None) -> None:
        return None


def _grid(seed: int | None, space: SearchSpace, kwargs: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    """Every combination of choice()/range() values once, in random order."""
    return _AskTellGridSampler(space.grid(), seed=seed, **kwargs)


def _nsgaii(seed: int | None, space: SearchSpace, kwargs: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    """NSGA-II genetic algorithm, for several objectives (a Pareto front)."""
    return optuna.samplers.NSGAIISampler(seed=seed, **kwargs)


SAMPLERS: dict[str, Callable[[int | None, SearchSpace, Mapping[str, Any]], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": _random,
    "grid": _grid,
    "nsgaii": _nsgaii,
}


def trial_override(storage: str, study_name: str, number: int) -> str:
    """The override that tells a job which trial it is (read by dph.pruning.TrialReporter)."""
    return f"++trial={{storage:{quote(storage)},study_name:{quote(study_name)},number:{number}}}"


def objective_values(value: Any, n_objectives: int) -> tuple[list[float] | None, str | None]:
    """(values, None) for a usable return value of the task function, else (None, why not)."""
    expected = "a number" if n_objectives == 1 else f"a list of {n_objectives} numbers (one per direction)"
    if value is None:
        return None, f"the task function returned None; it must return {expected} (set optimized_metric)"
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    try:
        values = [float(v) for v in items if not isinstance(v, bool)]
    except (TypeError, ValueError):
        return None, f"the task function returned {value!r}; it must return {expected}"
    if len(values) != len(items) or len(values) != n_objectives:
        return None, f"the task function returned {value!r}; it must return {expected}"
    if not all(math.isfinite(v) for v in values):
        return None, f"the task function returned a non-finite value {values}"
    return values, None


class OptunaSweeperImpl(Sweeper):
    def __init__(self, params: Mapping[str, Any] | None = None, conditional: Mapping[str, Any] | None = None,
                 direction: str = "maximize", directions: Sequence[str] | None = None, n_trials: int = 20,
                 n_jobs: int = 1, storage: str | None = None, study_name: str = "dph",
                 max_failure_rate: float = 0.0, sampler: Mapping[str, Any] | None = None,
                 pruner: Mapping[str, Any] | None = None, heartbeat_interval: int | None = 60,
                 grace_period: int | None = 180, resume_with_changed_overrides: bool = False) -> None:
        self.params = dict(params or {})
        self.conditional = _plain(conditional)
        self.directions = [str(d) for d in directions] if directions else [str(direction)]
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.storage = storage
        self.study_name = str(study_name)
        self.max_failure_rate = max_failure_rate
        self.sampler_cfg = {"name": "tpe", "seed": 0, "kwargs": {}, **_plain(sampler)}
        self.pruner_cfg = {"name": "none", **_plain(pruner)}
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.resume_with_changed_overrides = resume_with_changed_overrides
        self.heartbeats = Heartbeats(None, 0, None, None)  # this sweep's trials' heartbeats (RDB storages only)
        self.changed_overrides: dict[str, str] | None = None   # set on a resume allowed to change them
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None
        self.storage_obj: optuna.storages.BaseStorage | None = None
        self.study_id: int | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # ------------------------------------------------------------------ checks
    def _check_settings(self) -> None:
        """Impossible settings fail here, before any trial, with the key and the fix."""
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad:
            raise SweepConfigError(f"hydra.sweeper.direction(s)={self.directions} is not allowed: use maximize or minimize")
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise SweepConfigError(f"hydra.sweeper.n_trials={self.n_trials!r} is not allowed: use an integer >= 1")
        if not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            raise SweepConfigError(f"hydra.sweeper.n_jobs={self.n_jobs!r} is not allowed: use an integer >= 1")
        if not 0.0 <= float(self.max_failure_rate) <= 1.0:
            raise SweepConfigError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate!r} is not allowed: "
                                   "use a number in [0, 1]")
        name = self.sampler_cfg.get("name")
        if name not in SAMPLERS:
            raise SweepConfigError(f"hydra.sweeper.sampler.name={name!r} is not a known sampler: "
                                   f"choose one of {', '.join(SAMPLERS)}")
        try:
            build_pruner(self.pruner_cfg)  # an unknown name raises here
        except ValueError as e:
            raise SweepConfigError(str(e)) from None
        for key in ("heartbeat_interval", "grace_period"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SweepConfigError(f"hydra.sweeper.{key}={value!r} is not allowed: use a whole number of "
                                       "seconds >= 1 (or null)")
        if self.heartbeat_interval and self.grace_period and self.grace_period <= self.heartbeat_interval:
            raise SweepConfigError(f"hydra.sweeper.grace_period={self.grace_period} must exceed "
                                   f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval}: a live trial would "
                                   "be failed between two heartbeats (use e.g. 3x the interval)")
        if len(self.directions) > 1 and self.pruner_cfg.get("name", "none") != "none":
            raise SweepConfigError("hydra.sweeper.pruner needs a single objective (Optuna cannot prune multi-objective "
                                   "trials): set hydra.sweeper.pruner.name=none or use one direction")
        if self.storage and is_rdb_url(str(self.storage)):
            try:
                check_storage_driver(str(self.storage))
            except StorageError as e:
                raise SweepConfigError(f"hydra.sweeper.storage={display_storage(str(self.storage))} {e}") from None

    def _search_space(self, arguments: list[str]) -> tuple[SearchSpace, dict[str, str]]:
        """The search space (hydra.sweeper.params, then the command line's overrides) and the fixed
        overrides of the command line that are not search-space parameters (see fixed_overrides)."""
        for key, value in self.params.items():
            if OmegaConf.is_dict(value) or isinstance(value, Mapping):
                raise SearchSpaceError(f"hydra.sweeper.params.{key} is a mapping: write dotted keys "
                                       f"(e.g. {key}.weight: interval(0, 1)), one per parameter")
        lines = [f"{key}={param_text(value)}" for key, value in self.params.items()]
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        from_params, from_arguments = parser.parse_overrides(lines), parser.parse_overrides(list(arguments))
        space = SearchSpace.from_overrides(from_params + from_arguments, self.conditional)
        space_names = [p.name for p in SearchSpace.from_overrides(from_params).params]
        return space, fixed_overrides(from_arguments, exclude=space_names)

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        # Optuna's own messages go through Hydra's logging (the sweep's log), not to a handler of their own.
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        self._check_settings()
        space, fixed = self._search_space(arguments)
        n_trials = self.n_trials
        if self.sampler_cfg["name"] == "grid" and space.grid_size() < n_trials:
            log.warning("the grid has %d points: running %d trials, not hydra.sweeper.n_trials=%d",
                        space.grid_size(), space.grid_size(), n_trials)
            n_trials = space.grid_size()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage_url = absolute_storage(self.storage or str(sweep_dir / JOURNAL_FILE))
        study = self._open_study(storage_url, space, fixed)
        log.info("optuna sweep: study %s in %s, %d of %d trials already counted, batches of %d",
                 self.study_name, display_storage(storage_url), self._n_counted(study), n_trials, self.n_jobs)

        returns: list[Sequence[JobReturn]] = []
        finished = failed = 0
        while (n_left := n_trials - self._n_counted(study)) > 0 or self.heartbeats.wait_for_other_sweeps(study, self._fail):
            if n_left <= 0:
                continue  # a trial of another sweep went stale: run it again here
            batch = [self.heartbeats.ask(study) for _ in range(min(self.n_jobs, n_left))]
            job_overrides = []
            for trial in batch:
                overrides = space.overrides(space.suggest(trial))
                trial.set_user_attr(OVERRIDES_ATTR, overrides)
                if self.changed_overrides is not None:
                    trial.set_user_attr(FIXED_OVERRIDES_ATTR, self.changed_overrides)
                resumes = trial.user_attrs.get(RESUMES_ATTR)
                if resumes is not None:  # an interrupted trial again, in its own directory: it resumes there
                    overrides = [*overrides, f"hydra.sweep.subdir={resumes}"]
                    log.info("trial %d continues interrupted trial %d in its directory (from its checkpoint)",
                             trial.number, resumes)
                job_overrides.append(overrides + [trial_override(storage_url, self.study_name, trial.number)])
            with self.heartbeats.beating([trial._trial_id for trial in batch]):
                results = self._launch(study, batch, job_overrides)
            states = [self._tell(study, trial, result) for trial, result in zip(batch, results)]
            returns.append(results)
            finished += len(states)
            failed += states.count(TrialState.FAIL)
            self._report(study, sweep_dir, storage_url)
            self.heartbeats.fail_stale(study, self._fail)
            if failed / finished > self.max_failure_rate:
                raise RuntimeError(f"{failed} of {finished} trials of this sweep failed, more than "
                                   f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: see fail_reason in "
                                   f"{sweep_dir / 'trials.csv'} (raise the limit to let the sweep go on)")
        self._report(study, sweep_dir, storage_url)
        self._log_best(study)
        return returns

    def _open_study(self, storage_url: str, space: SearchSpace, fixed: dict[str, str]) -> optuna.Study:
        """Create or load the study (once, before any job), check that it was started with the same
        fixed overrides, fail the trials an earlier killed sweep left RUNNING, and give it this
        sweep's sampler and pruner settings."""
        local_file = storage_url[len("sqlite:///"):] if storage_url.startswith("sqlite:///") else storage_url
        if not is_rdb_url(local_file):
            Path(local_file).parent.mkdir(parents=True, exist_ok=True)
        heartbeat = is_rdb_url(storage_url) and self.heartbeat_interval is not None
        try:
            self.storage_obj = open_storage(storage_url, self.heartbeat_interval if heartbeat else None,
                                            self.grace_period if heartbeat else None)
        except StorageError as e:
            raise SweepConfigError(f"hydra.sweeper.storage={display_storage(storage_url)} {e}") from None
        study = optuna.create_study(storage=self.storage_obj, study_name=self.study_name,
                                    directions=self.directions, load_if_exists=True)
        wanted = [optuna.study.StudyDirection[d.upper()] for d in self.directions]
        if list(study.directions) != wanted:
            raise SweepConfigError(f"study {self.study_name} in {display_storage(storage_url)} has directions "
                                   f"{[d.name.lower() for d in study.directions]}, this sweep asks for "
                                   f"{self.directions}: use another hydra.sweeper.study_name (or storage), or the "
                                   "study's directions")
        self.study_id = self.storage_obj.get_study_id_from_name(self.study_name)
        if heartbeat:
            self.heartbeats = Heartbeats(self.storage_obj, self.study_id, self.heartbeat_interval, self.grace_period)
        self._check_fixed_overrides(study, fixed, storage_url)
        self._check_search_space(study, space)
        study.set_user_attr(PRUNER_ATTR, self.pruner_cfg)
        self._set_metric_names(study)
        self.heartbeats.fail_stale(study, self._fail)
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self.heartbeats.beats_elsewhere(stale):
                continue  # its sweep records heartbeats: it is running, or will go stale after grace_period
            self._fail(study, stale.number, "left RUNNING by an earlier sweep that did not finish; not counted",
                       interrupted=True)
            log.warning("trial %d was left RUNNING by an earlier sweep: marked FAIL (not counted)", stale.number)
        # A resumed sweep offsets the seed by the trials already there, so it does not repeat earlier draws.
        seed = self.sampler_cfg.get("seed")
        seed = None if seed is None else int(seed) + len(study.get_trials(deepcopy=False))
        study.sampler = SAMPLERS[self.sampler_cfg["name"]](seed, space, dict(self.sampler_cfg.get("kwargs") or {}))
        return study

    def _check_fixed_overrides(self, study: optuna.Study, fixed: dict[str, str], storage_url: str) -> None:
        """Record the fixed overrides in a new study; refuse to resume a study started with other
        ones (its trials would not be comparable) unless resume_with_changed_overrides is set."""
        recorded = study.user_attrs.get(FIXED_OVERRIDES_ATTR)
        if recorded is None:
            study.set_user_attr(FIXED_OVERRIDES_ATTR, fixed)
            if study.get_trials(deepcopy=False):
                log.info("study %s had no record of its fixed overrides: recorded this sweep's %s",
                         self.study_name, sorted(fixed.values()))
            return
        if recorded == fixed:
            return
        changes = "; ".join(f"{key}: {_value_of(recorded.get(key))} -> {_value_of(fixed.get(key))}"
                            for key in sorted(set(recorded) | set(fixed)) if recorded.get(key) != fixed.get(key))
        if not self.resume_with_changed_overrides:
            raise SweepConfigError(
                f"study {self.study_name} in {display_storage(storage_url)} was started with other fixed overrides "
                f"({changes}): start a new study with another hydra.sweeper.study_name=... or hydra.sweep.dir=..., "
                "or add hydra.sweeper.resume_with_changed_overrides=true to continue it anyway")
        log.warning("resuming study %s with changed fixed overrides (%s): its new trials record them in the user "
                    "attribute %s", self.study_name, changes, FIXED_OVERRIDES_ATTR)
        self.changed_overrides = fixed

    def _check_search_space(self, study: optuna.Study, space: SearchSpace) -> None:
        """A resumed study keeps each parameter's kind, log scale and, for a choice, its values
        (Optuna refuses the first suggest otherwise, with a trial left RUNNING): say so up front."""
        recorded: dict[str, Any] = {}
        for trial in study.get_trials(deepcopy=False):
            for name, distribution in trial.distributions.items():
                recorded.setdefault(name, distribution)
        for param in space.sampled:
            if param.name not in recorded:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(recorded[param.name], param.distribution)
            except ValueError as e:
                raise SweepConfigError(
                    f"hydra.sweeper.params: {param.name} was {_describe(recorded[param.name])} in study "
                    f"{self.study_name}, this sweep asks for {_describe(param.distribution)} ({e}): keep the study's, "
                    "or start a new study with another hydra.sweeper.study_name=... or hydra.sweep.dir=...") from None

    def _launch(self, study: optuna.Study, batch: list[optuna.Trial], job_overrides: list[list[str]]) -> Sequence[JobReturn]:
        numbers = [trial.number for trial in batch]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            log.info("trials %s run in job directories %d..%d", numbers, numbers[0], numbers[0] + len(numbers) - 1)
        try:
            self.validate_batch_is_legal(job_overrides)
            return self.launcher.launch(job_overrides, initial_job_idx=numbers[0])
        except BaseException as error:  # a config that does not compose, Ctrl-C, a launcher failure
            for trial in batch:
                self._fail(study, trial.number, f"not run to an end: {type(error).__name__}: {error}", interrupted=True)
            raise

    def _tell(self, study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> TrialState:
        job_dir = OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir", default=None) if result.hydra_cfg else None
        if job_dir:
            trial.set_user_attr(JOB_DIR_ATTR, str(job_dir))
        if result.status == JobStatus.COMPLETED:
            values, problem = objective_values(result.return_value, len(self.directions))
            if problem is not None:
                log.error("trial %d failed: %s", trial.number, problem)
                return self._fail(study, trial.number, problem)
            study.tell(trial, values)
            log.info("trial %d: %s", trial.number, ", ".join(f"{v:.6g}" for v in values))
            return TrialState.COMPLETE
        error = result._return_value  # the job's exception (return_value would re-raise it)
        if isinstance(error, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, error)
            return TrialState.PRUNED
        reason = f"{type(error).__name__}: {error}"
        # a refused config or a run that could not go on is one line; anything else comes with its traceback
        expected = isinstance(error, (ConfigError, RunError, VerifierError))
        log.error("trial %d failed: %s", trial.number, reason,
                  exc_info=(type(error), error, error.__traceback__)
                  if isinstance(error, BaseException) and not expected else None)
        return self._fail(study, trial.number, reason)

    def _fail(self, study: optuna.Study, number: int, reason: str, interrupted: bool = False) -> TrialState:
        """Tell FAIL with the reason in the user and system attributes; an interrupted trial (it
        never ran to an end) is not counted toward n_trials, so a resumed sweep runs it again."""
        reason = reason[:MAX_REASON_CHARS]
        trial_id = self.storage_obj.get_trial_id_from_study_id_trial_number(self.study_id, number)
        self.storage_obj.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
        self.storage_obj.set_trial_system_attr(trial_id, FAIL_REASON_ATTR, reason)
        if interrupted:
            self.storage_obj.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        if interrupted:
            self._rerun(study, trial_id, number)
        return TrialState.FAIL

    def _rerun(self, study: optuna.Study, trial_id: int, number: int) -> None:
        """Queue an interrupted trial's parameters for the next trial, which runs in the interrupted
        one's job directory: dph-train resumes there from its newest checkpoint."""
        frozen = self.storage_obj.get_trial(trial_id)
        if not frozen.params:
            return  # never sampled: nothing to resume
        job = frozen.user_attrs.get(RESUMES_ATTR, number)  # a retry that was interrupted too: the first directory
        study.enqueue_trial(frozen.params, user_attrs={RESUMES_ATTR: job}, skip_if_exists=False)

    # ------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _n_counted(study: optuna.Study) -> int:
        return sum(counts_toward_n_trials(t) for t in study.get_trials(deepcopy=False))

    def _set_metric_names(self, study: optuna.Study) -> None:
        """Name the objectives after the app's optimized_metric when it has one per direction."""
        assert self.config is not None
        metric = OmegaConf.select(self.config, "optimized_metric", default=None)
        names = [metric] if isinstance(metric, str) else [str(m) for m in metric] if OmegaConf.is_list(metric) else []
        if len(names) == len(self.directions) and study.metric_names != names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)

    def _report(self, study: optuna.Study, sweep_dir: Path, storage_url: str) -> None:
        """Refresh the summary, CSV and plots; a failure here is logged, never fatal (the study is
        safe in its storage and ``dph-sweep-report`` rebuilds them)."""
        try:
            write_report(study, sweep_dir, storage=display_storage(storage_url))
        except Exception:  # noqa: BLE001 - the report is a by-product of the sweep
            log.warning("could not write the sweep report in %s", sweep_dir, exc_info=True)

    @staticmethod
    def _log_best(study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning("no trial completed")
        elif len(study.directions) == 1:
            best = study.best_trial
            log.info("best trial %d: %.6g with %s", best.number, best.value, best.params)
        else:
            log.info("Pareto front: trials %s", [t.number for t in study.best_trials])


def _describe(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return f"choice({', '.join(map(str, distribution.choices))})"
    kind = "log " if getattr(distribution, "log", False) else ""
    return f"a {kind}{type(distribution).__name__.removesuffix('Distribution').lower()} in " \
           f"[{distribution.low}, {distribution.high}]"


def _value_of(override: str | None) -> str:
    """The value part of a recorded override, for messages: '(not set)' when absent."""
    if override is None:
        return "(not set)"
    return override.split("=", 1)[1] if "=" in override else "(deleted)"


def _plain(cfg: Any) -> dict[str, Any]:
    """A config node (or None) as a plain dict."""
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
