"""Metric logging: one small interface, a null implementation, and two backends.

- ``Logger`` (= ``NullLogger``): the interface; every method is a no-op.
- ``JsonlLogger``: ``metrics.jsonl``, ``samples.jsonl``, ``eval_prompts.jsonl`` and ``summary.json``
  in the run directory (always on; the plots, comparisons and the sweep report read these files,
  not W&B).
- ``WandbLogger``: Weights & Biases, offline by default (``wandb sync`` uploads a run later).
- ``MultiLogger``: forwards every call to several loggers.

``build_logger(cfg.logger, run_dir, config)`` returns ``MultiLogger([JsonlLogger, WandbLogger?])``.

Only the rank-0 process may log: the caller builds a real logger on rank 0 and ``NullLogger()``
elsewhere. Metric names are slash-namespaced (``train/entropy``, ``eval/test/pass@8``); the step
is always logged as ``train/step``.

Resuming a run (dph.checkpoint): the JSONL files drop their records after the checkpoint's step
(``rewind``) and continue; the W&B run continues under the same id. So that W&B's history has each
step once, a W&B logger built with ``hold_until_flush`` keeps the rows it is given until ``flush``,
which the trainer calls when a checkpoint is complete: rows after the last checkpoint of a run that
fails are not sent (the resumed run sends them again). Offline, W&B's service writes its file only
from time to time and not at all when the process is killed, so a killed attempt's file may hold any
part of its rows: a resumed offline run moves the earlier attempts' directories of its id into
``wandb/replaced/`` and replays the rows the JSONL files hold up to the checkpoint, so that its
directory alone holds the whole history, each step once (``wandb sync`` of it gives the run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dph.fileio import write_text_atomic

_log = logging.getLogger(__name__)

STEP_KEY = "train/step"
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # how the JSONL files store them
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
PROMPTS_FILE = "eval_prompts.jsonl"
SUMMARY_FILE = "summary.json"


class Logger:
    """The logging interface; this base class logs nothing (``NullLogger``)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` at optimizer step ``step``."""

    def log_passk(self, split: str, ks: list[int], values: list[float], step: int) -> None:
        """Record a Pass@k-versus-k curve of eval ``split`` at ``step`` (a chart, not scalars)."""

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """Record a table of sampled completions of the evaluation at ``step``."""

    def log_prompt_results(self, split: str, results: list, n: int, step: int) -> None:
        """Record per-prompt evaluation results (``PromptResult``: id, correct of n, distinct answers)."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into the run summary (later calls override earlier keys)."""

    def flush(self) -> None:
        """Everything logged so far is final (a checkpoint holds it): send what is held back."""

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close; ``exit_code != 0`` marks the run as failed where the backend can."""

    @property
    def run_id(self) -> str | None:
        """The backend's run id, which a resumed run continues (None: no backend run)."""
        return None


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


class JsonlLogger(Logger):
    """JSON-lines files in the run directory, one record per line with ``train/step``:

    - ``metrics.jsonl``: one object per ``log`` call;
    - ``samples.jsonl``: one object per sampled completion of ``log_samples``;
    - ``eval_prompts.jsonl``: one object per prompt of ``log_prompt_results`` (split, id, correct, n,
      answers): what statistics over prompts need;
    - ``summary.json``: the merged ``summary`` calls, replaced atomically on each call.

    Lines are appended, flushed and fsynced one at a time, so a killed run keeps every logged step;
    ``rewind`` rewrites each file (atomically) without the records after a step. Non-finite floats
    are written as the strings ``"NaN"``/``"Infinity"``/``"-Infinity"`` (strict JSON has no literal
    for them). ``log_passk`` writes nothing: the same numbers are logged as ``eval/<split>/pass@<k>``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.path.with_name(SUMMARY_FILE)
        self._summary: dict[str, Any] = {}
        if self.summary_path.exists():
            self._summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
        self._files = {name: self.path.with_name(name) for name in (self.path.name, SAMPLES_FILE, PROMPTS_FILE)}
        self._open: dict[str, Any] = {}

    def _append(self, name: str, records: list[dict[str, Any]]) -> None:
        if name not in self._open:
            self._open[name] = open(self._files[name], "a", encoding="utf-8")
        handle = self._open[name]
        for record in records:
            handle.write(json.dumps(_plain(record), allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._append(self.path.name, [{STEP_KEY: int(step), **dict(metrics)}])

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self._append(SAMPLES_FILE, [{STEP_KEY: int(step), **row} for row in rows])

    def log_prompt_results(self, split: str, results: list, n: int, step: int) -> None:
        self._append(PROMPTS_FILE, [{STEP_KEY: int(step), "split": split, "id": r.id, "correct": r.correct, "n": n,
                                     "answers": list(r.answers)} for r in results])

    def summary(self, values: Mapping[str, Any]) -> None:
        self._summary.update(_plain(dict(values)))
        write_text_atomic(self.summary_path, json.dumps(self._summary, indent=2, allow_nan=False) + "\n")

    def rewind(self, step: int) -> None:
        """Drop the records after ``step`` (a run resuming from a checkpoint at ``step``)."""
        self._close()
        for path in self._files.values():
            if path.exists():
                kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                        if _record_step(line) is not None and _record_step(line) <= step]
                write_text_atomic(path, "".join(kept))

    def records(self, name: str) -> list[dict[str, Any]]:
        """The records of one of the JSON-lines files (a torn last line skipped)."""
        path = self._files[name]
        out = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            out.append({key: NON_FINITE.get(value, value) if isinstance(value, str) else value
                        for key, value in record.items()})
        return out

    def _close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def finish(self, exit_code: int = 0) -> None:
        self._close()


def _record_step(line: str) -> int | None:
    """The ``train/step`` of a JSONL line (None for a torn or foreign line, which a rewind drops)."""
    try:
        return int(json.loads(line)[STEP_KEY])
    except (ValueError, KeyError, TypeError):
        return None


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

    ``run_id`` continues that W&B run (``resume="allow"``; offline, a second ``offline-run-*-<id>``
    directory that ``wandb sync`` uploads into the same run); None starts a new one.
    ``hold_until_flush``: rows, tables and charts wait for ``flush`` (see the module docstring).
    """

    def __init__(self, cfg: Mapping[str, Any], run_dir: str | Path, config: Mapping[str, Any] | None = None,
                 run_id: str | None = None, hold_until_flush: bool = False, replay: JsonlLogger | None = None):
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
        replay = replay if mode == "offline" and run_id else None
        if replay is not None:
            _set_aside_offline_runs(run_dir / "wandb", run_id)
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
            id=run_id or secrets.token_hex(4),
            resume="allow",
        )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        if mode == "offline":
            offline_dir = Path(self.run.dir).parent
            _log.info("W&B offline run %s (upload later with `wandb sync %s`)", offline_dir.name, offline_dir)
        self._finished = False
        self._hold = False
        self._held: list[dict[str, Any]] = []
        if replay is not None:
            self._replay(replay)
        self._hold = hold_until_flush

    def _replay(self, jsonl: JsonlLogger) -> None:
        """Send the history the JSONL files hold (a resumed offline run): rows, charts, sample tables."""
        samples: dict[int, list[dict]] = {}
        for row in jsonl.records(SAMPLES_FILE):
            samples.setdefault(row.pop(STEP_KEY), []).append(row)
        for row in jsonl.records(jsonl.path.name):
            step = row.pop(STEP_KEY)
            self.log(row, step)
            splits: dict[str, list[tuple[int, float]]] = {}
            for key, value in row.items():
                if key.startswith("eval/") and "/pass@" in key:
                    split, k = key[len("eval/"):].rsplit("/pass@", 1)
                    splits.setdefault(split, []).append((int(k), value))
            for split, points in splits.items():
                self.log_passk(split, [k for k, _ in points], [v for _, v in points], step)
            if splits and step in samples:
                self.log_samples(samples.pop(step), step)

    @property
    def run_id(self) -> str:
        return self.run.id

    def _send(self, row: dict[str, Any], step: int) -> None:
        row = {**row, STEP_KEY: int(step)}
        if self._hold:
            self._held.append(row)
        else:
            self.run.log(row)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._send(dict(metrics), step)

    def log_passk(self, split: str, ks: list[int], values: list[float], step: int) -> None:
        if len(ks) != len(values):
            raise ValueError(f"log_passk({split!r}): {len(ks)} k values but {len(values)} pass@k values")
        table = self._wandb.Table(columns=["k", "pass@k"], data=[[int(k), float(v)] for k, v in zip(ks, values)])
        chart = self._wandb.plot.line(table, "k", "pass@k", title=f"{split}: Pass@k vs k at step {int(step)}")
        self._send({f"charts/{split}/pass@k_vs_k/step_{int(step):06d}": chart}, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        table = self._wandb.Table(columns=columns, data=[[_plain(row.get(c)) for c in columns] for row in rows])
        self._send({f"samples/step_{int(step):06d}": table}, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(_to_container(values))

    def flush(self) -> None:
        for row in self._held:
            self.run.log(row)
        self._held.clear()

    def finish(self, exit_code: int = 0) -> None:
        if not self._finished:
            self._finished = True
            if exit_code == 0:
                self.flush()
            self.run.finish(exit_code=exit_code)


ONLINE_NEEDS_CREDENTIALS = ("logger.mode=online needs W&B credentials: run `wandb login` (or set WANDB_API_KEY), "
                            "or use logger.mode=offline and `wandb sync` later")


def _set_aside_offline_runs(wandb_dir: Path, run_id: str) -> None:
    """Move the offline-run directories of `run_id` (earlier attempts) into `wandb_dir/replaced/`."""
    earlier = sorted(wandb_dir.glob(f"offline-run-*-{run_id}")) + sorted(wandb_dir.glob(f"offline-run-*-{run_id}-*"))
    if not earlier:
        return
    aside = wandb_dir / "replaced"
    aside.mkdir(parents=True, exist_ok=True)
    for path in earlier:
        path.rename(aside / path.name)
    _log.info("W&B: the earlier offline attempts of run %s moved to %s; this run's directory holds the whole "
              "history (replayed from metrics.jsonl)", run_id, aside)


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

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for logger in self.loggers:
            logger.log_samples(rows, step)

    def log_prompt_results(self, split: str, results: list, n: int, step: int) -> None:
        for logger in self.loggers:
            logger.log_prompt_results(split, results, n, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    @property
    def run_id(self) -> str | None:
        return next((logger.run_id for logger in self.loggers if logger.run_id is not None), None)

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
    logger_cfg: Mapping[str, Any] | None, run_dir: str | Path, config: Mapping[str, Any] | None = None,
    run_id: str | None = None, hold_until_flush: bool = False, resume_step: int | None = None,
) -> MultiLogger:
    """The run's logger: the JSONL files in ``run_dir`` always, plus W&B when ``logger_cfg.backend == "wandb"``.

    ``config`` (the composed run config, a dict or DictConfig) is stored as the W&B run config;
    ``run_id`` and ``hold_until_flush``: see WandbLogger. ``resume_step``: a run resuming from a
    checkpoint at that step (the JSONL files rewound to it; see the module docstring). Call on rank 0
    only; other ranks use ``NullLogger()``.
    """
    backend = (logger_cfg or {}).get("backend", "none")
    if backend not in BACKENDS:
        raise ValueError(f"logger.backend={backend!r} is unknown; known backends: {', '.join(BACKENDS)}")
    run_dir = Path(run_dir)
    jsonl = JsonlLogger(run_dir / METRICS_FILE)
    if resume_step is not None:
        jsonl.rewind(resume_step)
    loggers: list[Logger] = [jsonl]
    if backend == "wandb":
        try:
            loggers.append(WandbLogger(logger_cfg, run_dir, config, run_id, hold_until_flush,
                                       replay=jsonl if resume_step is not None else None))
        except BaseException:
            jsonl.finish(exit_code=1)
            raise
    return MultiLogger(loggers)
