"""`dph-train`: compose the config, check it, train, and return the metric a sweeper optimizes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dph.config import ConfigError, package_root, split_eval_spec, validate

log = logging.getLogger(__name__)


def setup(cfg: DictConfig):
    """Build the task and eval sets and validate the config; nothing expensive happens here."""
    from dph.evaluation import EvalSet

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


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate, train (or resume) and evaluate; returns the run summary (the last value of every
    metric, the step-0 evaluation as `initial/...`, the split, the model directories)."""
    from dph import checkpoint
    from dph.cluster import prepare_job_process
    from dph.loggers import NullLogger, build_logger
    from dph.plots import load_metrics, plot_run
    from dph.trainer import Trainer

    prepare_job_process()  # submitit tasks: torch.distributed variables; this process's share of the CPU threads
    task, eval_sets = setup(cfg)
    resume_from = checkpoint.select(run_dir, cfg.trainer.resume, checkpoint.run_config(cfg))
    main_process = int(os.environ.get("RANK", "0")) == 0
    if resume_from is None and main_process:
        checkpoint.set_aside(run_dir)  # never two runs in one metrics.jsonl
    reporter = None
    if cfg.get("trial") is not None:
        from dph.pruning import TrialReporter

        reporter = TrialReporter.from_config(cfg.trial, cfg.optimized_metric)

    trainer = Trainer(cfg, task, eval_sets, run_dir, NullLogger(), reporter, resume_from)
    if trainer.acc.is_main_process:
        resume_step = trainer.state.step if resume_from is not None else None
        trainer.logger = build_logger(_logger_cfg(cfg, run_dir), run_dir, OmegaConf.to_container(cfg, resolve=True),
                                      run_id=trainer.state.logger_run_id, resume_step=resume_step,
                                      hold_until_flush=bool(cfg.trainer.checkpoint_every))
        trainer.state.logger_run_id = trainer.logger.run_id
        if resume_from is not None:
            log.info("Resuming from checkpoint %s: step %d of %d", resume_from, trainer.state.step, cfg.trainer.steps)
    ok, pruned = False, None
    try:
        trainer.fit()
        ok = True
    except Exception as e:
        if type(e).__name__ != "TrialPruned":
            raise
        ok, pruned = True, e  # a pruned sweep trial ends here: keep what it trained, then tell the sweeper
    finally:
        summary = {**trainer.state.history, "train/step": trainer.state.step}
        if ok:
            summary.update({f"initial/{k}": v for k, v in trainer.state.initial_metrics.items()})
            summary.update(trainer.split_summary())
            summary["model_dir"] = str(trainer.model_dir)
            summary["trained_model"] = str(trainer.save_policy()) if cfg.trainer.save_model else None
        if trainer.acc.is_main_process:
            if ok:
                trainer.logger.summary(summary)
            trainer.logger.finish(0 if ok else 1)
            metrics_file = run_dir / "metrics.jsonl"
            if metrics_file.exists():
                plot_run(load_metrics(metrics_file), run_dir)
        trainer.close()
    if pruned is not None:
        raise pruned
    return summary


def _logger_cfg(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The logger config with a run name and group filled in: the run is named after what it is
    (method, divergence and weight, seed) and when it started, e.g. `dph_js js0.05 seed0 17-52-56`;
    a sweep trial after its number first, e.g. `trial-3 js0.2 seed0`."""
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    trial = cfg.get("trial")
    if trial is not None:
        logger_cfg["group"] = logger_cfg.get("group") or trial.study_name
    if not logger_cfg.get("name"):
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        method = choices.get("experiment")
        div = cfg.divergence
        what = [method if method not in (None, "null") else "", div.name if div.name == "none" else f"{div.name}{div.weight:g}",
                f"seed{cfg.seed}"]
        parts = [f"trial-{trial.number}", *what] if trial is not None else [*what, run_dir.name]
        logger_cfg["name"] = " ".join(p for p in parts if p)
    return OmegaConf.create(logger_cfg)


def result_block(summary: dict[str, Any], run_dir: Path) -> str:
    """A few lines for the terminal: where the run is, Pass@1 and Pass@k (largest k) per split at step 0
    and at the end, and the saved policy."""
    lines = [f"dph-train: done: {run_dir}"]
    splits: dict[str, int] = {}
    for key in summary:
        match = PASSK.match(key)
        if match:
            splits[match["split"]] = max(splits.get(match["split"], 0), int(match["k"]))
    step = summary.get("train/step", "end")
    for split, k in splits.items():
        cells = []
        for kk in sorted({1, k}):
            key = f"eval/{split}/pass@{kk}"
            before = summary.get(f"initial/{key}")
            cells.append(f"pass@{kk} {_fmt(before)} -> {_fmt(summary.get(key))}")
        lines.append(f"  {split:<12} " + "   ".join(cells) + f"   (step 0 -> {step})")
    if summary.get("trained_model"):
        lines.append(f"  trained policy: {summary['trained_model']}")
    return "\n".join(lines) + "\n"


PASSK = re.compile(r"^eval/(?P<split>.+)/pass@(?P<k>\d+)$")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def objective(cfg: DictConfig, history: dict[str, Any]) -> float | list[float]:
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
        summary = run(cfg, run_dir)
    except ConfigError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the job as failed
        remove_if_empty(run_dir)
        sys.stderr.write(f"dph-train: error: {e}\n")
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(result_block(summary, run_dir))
        sys.stdout.flush()
    if cfg.optimized_metric is None:
        return None
    return objective(cfg, summary)


def remove_if_empty(run_dir: Path) -> None:
    """Remove a run directory that holds only what Hydra wrote before the run was refused (its .hydra/
    and the job's log), and the date folder of the default layout (runs/<date>/<time>) when that is
    left empty."""
    hydra_files = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_files:
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_dir.parent.name):
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # only if empty


class MultirunDirCallback(Callback):
    """Says where a multirun's job directories are when it ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sys.stdout.write(f"dph-train: multirun done: {config.hydra.sweep.dir}\n")
        sys.stdout.flush()


@hydra.main(version_base="1.3", config_path=str(package_root() / "conf"), config_name="config")
def presample_main(cfg: DictConfig) -> None:
    """`dph-presample`: only the pre-sampling stage (sample, split, cache) for the composed config.

    dph-train runs it by itself when the divergence uses `source: reference` and no valid cache
    exists; running it first lets several runs or sweep trials start from a ready cache.
    """
    from dph.cluster import prepare_job_process
    from dph.engines import build_engine
    from dph.models import load_policy, model_fingerprint, resolve_model_dir
    from dph.presample import load_or_build, split_metrics
    from dph.trainer import _max_model_len, _unique_tasks

    prepare_job_process()
    try:
        task, eval_sets = setup(cfg)
    except ConfigError as e:
        sys.stderr.write(f"dph-presample: error: {e}\n")
        sys.exit(2)
    tasks = _unique_tasks([task, *(e.task for e in eval_sets)])
    model_dir = resolve_model_dir(cfg.model, tasks, cfg.paths.cache_dir)
    policy, tokenizer = load_policy(model_dir, cfg.model, "cuda" if cfg.device != "cpu" and _cuda() else "cpu")
    engine = build_engine(cfg.rollout, policy, tokenizer, model_dir=model_dir, batch_size=cfg.generation.batch_size,
                          max_model_len=_max_model_len(policy))
    try:
        data = load_or_build(engine, policy, tokenizer, task, model_fingerprint(model_dir), cfg, cfg.paths.cache_dir)
    finally:
        engine.close()
    for key, value in split_metrics(data.manifest).items():
        log.info("%s: %s", key, value)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
