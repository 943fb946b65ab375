"""`dph-train`: compose the config, check it, train, and return the metric a sweeper optimizes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dph.config import ConfigError, package_root, split_eval_spec, validate

log = logging.getLogger(__name__)


def setup(cfg: DictConfig):
    """Build the task and eval sets and validate the config; nothing expensive happens here."""
    from dph.trainer import EvalSet

    task = _build_task(cfg.task, "task")
    tasks = {task.name: task}
    for spec in cfg.eval.splits or []:
        other, _ = split_eval_spec(str(spec), task.name)
        if other not in tasks:
            tasks[other] = _load_other_task(cfg, other)
    labels = validate(cfg, {name: t.split_names for name, t in tasks.items()})
    eval_sets = []
    for label in labels:
        name, split = split_eval_spec(label, task.name)
        eval_sets.append(EvalSet(label, tasks[name], split))
    return task, eval_sets


def _load_other_task(cfg: DictConfig, label: str):
    """A task evaluated out of domain: `eval.tasks.<label>` (a task name and the keys that differ
    from its conf/task/<name>.yaml), else the task named `label` as its conf/task/<label>.yaml."""
    from dph.tasks import TASKS

    extra = (cfg.eval.get("tasks") or {}).get(label)
    name = extra.get("name", label) if extra is not None else label
    if name not in TASKS:
        where = f"eval.tasks.{label}.name={name!r}" if extra is not None else f"eval.splits names task {label!r}"
        raise ConfigError(f"{where}: choose a task of {', '.join(sorted(TASKS))} "
                          "(or define the label under eval.tasks, e.g. eval.tasks.spider={name: sql, source: spider})")
    task_cfg = OmegaConf.load(package_root() / "conf" / "task" / f"{name}.yaml")
    if extra is not None:
        task_cfg = OmegaConf.merge(task_cfg, extra)
    source = f"eval.tasks.{label}" if extra is not None else f"conf/task/{name}.yaml"
    return _build_task(task_cfg, f"eval.splits: task {label} ({source})")


def _build_task(task_cfg: DictConfig, where: str):
    """The task of a config node; a bad key or a missing data file is a ConfigError naming `where`."""
    from dph.tasks import build_task

    try:
        return build_task(OmegaConf.to_container(task_cfg, resolve=True))
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {e}") from e


def run(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Validate, train and evaluate; returns the last value of every logged metric."""
    from dph.loggers import NullLogger, build_logger
    from dph.plots import load_metrics, plot_run
    from dph.trainer import Trainer

    task, eval_sets = setup(cfg)
    reporter = None
    if cfg.get("trial") is not None:
        from dph.pruning import TrialReporter

        reporter = TrialReporter.from_config(cfg.trial, cfg.optimized_metric)

    trainer = Trainer(cfg, task, eval_sets, run_dir, NullLogger(), reporter)
    if trainer.acc.is_main_process:
        trainer.logger = build_logger(_logger_cfg(cfg, run_dir), run_dir, OmegaConf.to_container(cfg, resolve=True))
    ok = False
    try:
        history = trainer.fit()
        ok = True
    finally:
        if trainer.acc.is_main_process:
            if ok:
                trainer.logger.summary({**history, **trainer.split_summary(), "model_dir": str(trainer.model_dir)})
            trainer.logger.finish(0 if ok else 1)
            metrics_file = run_dir / "metrics.jsonl"
            if metrics_file.exists():
                plot_run(load_metrics(metrics_file), run_dir)
    return history


def _logger_cfg(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The logger config with a run name and group filled in (a sweep trial is named after it)."""
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    trial = cfg.get("trial")
    if trial is not None:
        logger_cfg["group"] = logger_cfg.get("group") or trial.study_name
        logger_cfg["name"] = logger_cfg.get("name") or f"trial-{trial.number}"
    logger_cfg["name"] = logger_cfg.get("name") or run_dir.name
    return OmegaConf.create(logger_cfg)


def objective(cfg: DictConfig, history: dict[str, float]) -> float | list[float]:
    wanted = cfg.optimized_metric
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    missing = [m for m in names if m not in history]
    if missing:
        raise KeyError(f"optimized_metric {missing} was never logged; logged: {sorted(history)}")
    values = [float(history[m]) for m in names]
    return values[0] if isinstance(wanted, str) else values


@hydra.main(version_base="1.3", config_path=str(package_root() / "conf"), config_name="config")
def main(cfg: DictConfig) -> float | list[float] | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        history = run(cfg, run_dir)
    except ConfigError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the job as failed
        sys.stderr.write(f"dph-train: error: {e}\n")
        sys.exit(2)
    if cfg.optimized_metric is None:
        return None
    return objective(cfg, history)


@hydra.main(version_base="1.3", config_path=str(package_root() / "conf"), config_name="config")
def presample_main(cfg: DictConfig) -> None:
    """`dph-presample`: only the pre-sampling stage (sample, split, cache) for the composed config.

    dph-train runs it by itself when the divergence uses `source: reference` and no valid cache
    exists; running it first lets several runs or sweep trials start from a ready cache.
    """
    from dph.models import load_policy, model_fingerprint, resolve_model_dir
    from dph.presample import load_or_build, split_metrics
    from dph.trainer import _unique_tasks

    try:
        task, eval_sets = setup(cfg)
    except ConfigError as e:
        sys.stderr.write(f"dph-presample: error: {e}\n")
        sys.exit(2)
    tasks = _unique_tasks([task, *(e.task for e in eval_sets)])
    model_dir = resolve_model_dir(cfg.model, tasks, cfg.paths.cache_dir)
    policy, tokenizer = load_policy(model_dir, cfg.model, "cuda" if cfg.device != "cpu" and _cuda() else "cpu")
    data = load_or_build(policy, tokenizer, task, model_fingerprint(model_dir), cfg, cfg.paths.cache_dir)
    for key, value in split_metrics(data.manifest).items():
        log.info("%s: %s", key, value)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
