"""Metric logging: one small interface, a null implementation, and two backends.

- ``Logger`` (= ``NullLogger``): the interface; every method is a no-op.
- ``JsonlLogger``: ``metrics.jsonl`` + ``summary.json`` in the run directory (always on; the
  plots and the sweep report read these files, not W&B).
- ``WandbLogger``: Weights & Biases, offline by default (``wandb sync`` uploads a run later).
- ``MultiLogger``: forwards every call to several loggers.

``build_logger(cfg.logger, run_dir, config)`` returns ``MultiLogger([JsonlLogger, WandbLogger?])``.

Only the rank-0 process may log: the caller builds a real logger on rank 0 and ``NullLogger()``
elsewhere. Metric names are slash-namespaced (``train/entropy``, ``eval/test/pass@8``); the step
is always logged as ``train/step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

STEP_KEY = "train/step"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class Logger:
    """The logging interface; this base class logs nothing (``NullLogger``)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` at optimizer step ``step``."""

    def log_passk(self, split: str, ks: list[int], values: list[float], step: int) -> None:
        """Record a Pass@k-versus-k curve of eval ``split`` at ``step`` (a chart, not scalars)."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into the run summary (later calls override earlier keys)."""

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close; ``exit_code != 0`` marks the run as failed where the backend can."""


NullLogger = Logger


def _plain(value: Any) -> Any:
    """A JSON-safe copy of ``value``: numbers as int/float, non-finite floats as strings.

    ``nan``, ``inf`` and ``-inf`` become ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (plain
    ``json.loads`` reads them back as strings; ``dph.plots.load_metrics`` turns them back into
    floats). Tensors and numpy scalars are unwrapped with ``.item()``.
    """
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class JsonlLogger(Logger):
    """``metrics.jsonl`` (one JSON object per ``log`` call, ``train/step`` included) and ``summary.json``.

    Lines are appended, flushed and fsynced one at a time, so a killed run keeps every logged
    step and a resumed run continues the same file. Non-finite floats are written as the strings
    ``"NaN"``/``"Infinity"``/``"-Infinity"`` (strict JSON has no literal for them).
    ``summary.json`` holds the merged ``summary`` calls and is replaced atomically on each call.
    ``log_passk`` writes nothing: the same numbers are logged as ``eval/<split>/pass@<k>``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.path.with_name(SUMMARY_FILE)
        self._summary: dict[str, Any] = {}
        if self.summary_path.exists():
            self._summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record = {STEP_KEY: int(step), **_plain(dict(metrics))}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def summary(self, values: Mapping[str, Any]) -> None:
        self._summary.update(_plain(dict(values)))
        _write_atomic(self.summary_path, json.dumps(self._summary, indent=2, allow_nan=False) + "\n")

    def finish(self, exit_code: int = 0) -> None:
        if not self._file.closed:
            self._file.close()


class WandbLogger(Logger):
    """Weights & Biases backend (``conf/logger/wandb.yaml`` documents ``cfg``).

    Files go under ``run_dir/wandb/`` (``offline-run-<time>-<id>/run-<id>.wandb`` in offline
    mode). Every call to ``wandb.init`` finishes a run left open by an earlier job of the same
    process (``reinit="finish_previous"``), so Hydra multiruns, which run jobs one after another
    in one process, give one W&B run per job. Console capture, system-metric sampling, machine and
    git metadata, code and requirements saving are off unless ``cfg.system_metrics`` is true:
    offline, init + finish then take about 0.4 s for the first run of a process (wandb starts its
    service; ``import wandb`` adds 0.3 s) and about 0.01 s for later ones (0.05 s with wandb's
    defaults), and nothing tries to reach a server (error reporting is off as well).
    ``mode: online`` needs credentials (``wandb login`` or ``WANDB_API_KEY``) and never prompts.
    """

    def __init__(self, cfg: Mapping[str, Any], run_dir: str | Path, config: Mapping[str, Any] | None = None):
        import wandb

        mode = cfg.get("mode", "offline")
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r}: expected offline | online | disabled")
        if mode == "online":
            _require_wandb_credentials(wandb)
        else:  # the wandb service would otherwise report its own internal errors over the network
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        system = bool(cfg.get("system_metrics", False))
        settings = wandb.Settings(
            console="off",  # stdout/stderr stay the user's (Hydra already writes the job log)
            silent=True,  # no banner lines: dph logs the run's location itself
            x_disable_stats=not system,
            x_disable_meta=not system,
            x_disable_machine_info=not system,
            disable_git=not system,
            save_code=False,
            disable_code=True,
            x_save_requirements=False,
            disable_job_creation=True,
        )
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            mode=mode,
            dir=str(run_dir),
            project=cfg.get("project") or "dph",
            entity=cfg.get("entity"),
            group=cfg.get("group"),
            name=cfg.get("name"),
            tags=[str(tag) for tag in cfg.get("tags") or []],
            notes=cfg.get("notes"),
            config=_to_container(config or {}),
            settings=settings,
            reinit="finish_previous",
        )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        if mode == "offline":
            offline_dir = Path(self.run.dir).parent
            _log.info("W&B offline run %s (upload later with `wandb sync %s`)", offline_dir.name, offline_dir)
        self._finished = False

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({**dict(metrics), STEP_KEY: int(step)})

    def log_passk(self, split: str, ks: list[int], values: list[float], step: int) -> None:
        if len(ks) != len(values):
            raise ValueError(f"log_passk({split!r}): {len(ks)} k values but {len(values)} pass@k values")
        table = self._wandb.Table(columns=["k", "pass@k"], data=[[int(k), float(v)] for k, v in zip(ks, values)])
        chart = self._wandb.plot.line(table, "k", "pass@k", title=f"{split}: Pass@k vs k at step {int(step)}")
        self.run.log({f"charts/{split}/pass@k_vs_k": chart, STEP_KEY: int(step)})

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(_to_container(values))

    def finish(self, exit_code: int = 0) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)


ONLINE_NEEDS_CREDENTIALS = ("logger.mode=online needs W&B credentials: run `wandb login` (or set WANDB_API_KEY), "
                            "or use logger.mode=offline and `wandb sync` later")


def has_wandb_credentials() -> bool:
    """Whether W&B credentials exist (env, settings or .netrc), checked locally; never prompts."""
    import wandb

    # (an open run of this process: credentials were settled when it started)
    return wandb.run is not None or bool(wandb.login(prompt=False, verify=False))


def _require_wandb_credentials(wandb: Any) -> None:
    """Raise a one-line error unless W&B credentials exist."""
    if not has_wandb_credentials():
        raise RuntimeError(ONLINE_NEEDS_CREDENTIALS)


def _to_container(values: Any) -> Any:
    """Plain dicts/lists from an OmegaConf config (resolved); other values unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return dict(values) if isinstance(values, Mapping) else values
    if isinstance(values, (DictConfig, ListConfig)):
        return OmegaConf.to_container(values, resolve=True)
    return dict(values) if isinstance(values, Mapping) else values


class MultiLogger(Logger):
    """Forwards every call to each of ``loggers``; ``finish`` reaches all of them even if one fails."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_passk(self, split: str, ks: list[int], values: list[float], step: int) -> None:
        for logger in self.loggers:
            logger.log_passk(split, ks, values, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def finish(self, exit_code: int = 0) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.finish(exit_code)
            except Exception as error:  # noqa: BLE001 - finish the others, then re-raise
                errors.append(error)
        if errors:
            raise errors[0]


BACKENDS = ("none", "wandb")


def build_logger(
    logger_cfg: Mapping[str, Any] | None, run_dir: str | Path, config: Mapping[str, Any] | None = None
) -> MultiLogger:
    """The run's logger: ``run_dir/metrics.jsonl`` always, plus W&B when ``logger_cfg.backend == "wandb"``.

    ``config`` (the composed run config, a dict or DictConfig) is stored as the W&B run config.
    Call on rank 0 only; other ranks use ``NullLogger()``.
    """
    backend = (logger_cfg or {}).get("backend", "none")
    if backend not in BACKENDS:
        raise ValueError(f"logger.backend={backend!r} is unknown; known backends: {', '.join(BACKENDS)}")
    run_dir = Path(run_dir)
    jsonl = JsonlLogger(run_dir / METRICS_FILE)
    loggers: list[Logger] = [jsonl]
    if backend == "wandb":
        try:
            loggers.append(WandbLogger(logger_cfg, run_dir, config))
        except BaseException:
            jsonl.finish(exit_code=1)
            raise
    return MultiLogger(loggers)
