"""Heartbeats of a sweep's trials on an RDB storage (PostgreSQL, SQLite), and stale-trial handling.

While a batch of trials runs, its sweep records each trial's heartbeat every ``interval`` seconds
and flags the trial (``HEARTBEAT_ATTR``), so that other sweeps on the same study know it is alive.
A RUNNING trial whose heartbeat is older than ``grace_period`` belonged to a sweep that died: it
is told FAIL (through the sweeper's own ``fail``, which records the reason and the
``interrupted`` flag) and not counted, so that it is run again. Without a storage that records
heartbeats (``storage=None``: a journal file), every method is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

HEARTBEAT_ATTR = "heartbeat"  # trial user attribute: its sweep records its heartbeat

Fail = Callable[..., object]  # the sweeper's fail(study, number, reason, interrupted=True)


class Heartbeats:
    """The heartbeats of one sweep's trials (see the module docstring)."""

    def __init__(self, storage, study_id: int, interval: int | None, grace_period: int | None):
        self.storage, self.study_id, self.interval, self.grace_period = storage, study_id, interval, grace_period

    @property
    def enabled(self) -> bool:
        return self.storage is not None and self.interval is not None

    def ask(self, study: optuna.Study) -> optuna.Trial:
        """A new trial; with heartbeats its first one is recorded at once and the trial flagged, so
        that it is failed after grace_period if this sweep dies."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "heartbeat is supposed to be used with optimize"
            trial = study.ask()
        if self.enabled:
            self.storage.record_heartbeat(trial._trial_id)
            trial.set_user_attr(HEARTBEAT_ATTR, True)
        return trial

    def beats_elsewhere(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether a RUNNING trial records heartbeats: it is running in a live sweep, or will go stale."""
        return self.enabled and bool(trial.user_attrs.get(HEARTBEAT_ATTR))

    @contextlib.contextmanager
    def beating(self, trial_ids: list[int]):
        """Record the heartbeat of ``trial_ids`` every ``interval`` seconds while the block runs."""
        if not self.enabled:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.interval):
                for trial_id in trial_ids:
                    try:
                        self.storage.record_heartbeat(trial_id)
                    except Exception:  # noqa: BLE001 - a missed heartbeat is retried; grace_period covers a few
                        log.warning("could not record the heartbeat of trial id %d", trial_id, exc_info=True)

        thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def fail_stale(self, study: optuna.Study, fail: Fail) -> list[int]:
        """Optuna's fail_stale_trials, with the reason and the ``interrupted`` flag recorded first (an
        RDB storage refuses attributes on a finished trial): RUNNING trials whose heartbeat is older
        than grace_period are told FAIL and not counted, so that they are run again."""
        if not self.enabled:
            return []
        failed = []
        for trial_id in self.storage._get_stale_trial_ids(self.study_id):
            number = self.storage.get_trial_number_from_id(trial_id)
            try:
                fail(study, number, f"no heartbeat for more than hydra.sweeper.grace_period="
                     f"{self.grace_period or 2 * self.interval} s: the process of its sweep died; not counted",
                     interrupted=True)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another sweep failed (or a late job finished) it first
            log.warning("trial %d had no heartbeat for the grace period: marked FAIL (not counted)", number)
            failed.append(number)
        return failed

    def wait_for_other_sweeps(self, study: optuna.Study, fail: Fail) -> bool:
        """Every trial is counted: wait while trials of another sweep (with a heartbeat) still run.
        True when one of them went stale (and so another trial is needed), False when none is left."""
        if not self.enabled:
            return False
        announced = False
        while True:
            if self.fail_stale(study, fail):
                return True
            running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t.user_attrs.get(HEARTBEAT_ATTR)]
            if not running:
                return False
            if not announced:
                log.info("waiting for trials %s of another sweep of study %s (failed and run again here if their "
                         "heartbeat stops for hydra.sweeper.grace_period)", running, study.study_name)
                announced = True
            time.sleep(min(self.interval, 10))
