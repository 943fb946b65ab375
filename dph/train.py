"""`dph-train`: compose the config, check it, train, and return the metric a sweeper optimizes."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dph.builders import (PromptEncoder, build_rollout_engine, check_command_line, cli, device_of, load_initial_policy,
                          run_tasks, setup)
from dph.config import package_root

log = logging.getLogger(__name__)


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
            summary.update(trainer.split_metrics())
            summary["model_dir"] = str(trainer.model_dir)
            summary["trained_model"] = str(trainer.save_policy()) if cfg.trainer.save_model else None
        if trainer.acc.is_main_process:
            if ok:
                trainer.logger.summary(summary)
            trainer.logger.finish(0 if ok else 1)
            metrics_file = run_dir / "metrics.jsonl"
            if metrics_file.exists():
                try:
                    plot_run(load_metrics(metrics_file), run_dir)
                except OSError as e:  # e.g. a full disk: the run's own error matters more
                    log.warning("could not write the plots of %s: %s", run_dir, e)
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


def main() -> None:
    """`dph-train`: an unknown option of a config group is one line before Hydra starts; then `train_main`."""
    check_command_line("dph-train")
    train_main()


@hydra.main(version_base="1.3", config_path=str(package_root() / "conf"), config_name="config")
def train_main(cfg: DictConfig) -> float | list[float] | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = cli("dph-train", run_dir, lambda: run(cfg, run_dir), multirun=HydraConfig.get().mode == RunMode.MULTIRUN,
                  sweeper_records=cfg.get("trial") is not None)
    if summary is None:  # a multirun job that could not run: the sweep goes on
        return None
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(result_block(summary, run_dir))
        sys.stdout.flush()
    if cfg.optimized_metric is None:
        return None
    return objective(cfg, summary)


class MultirunDirCallback(Callback):
    """Says where a multirun's job directories are when it ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sys.stdout.write(f"dph-train: multirun done: {config.hydra.sweep.dir}\n")
        sys.stdout.flush()


def presample_main() -> None:
    """`dph-presample` (see `presample_job`)."""
    check_command_line("dph-presample")
    presample_job()


@hydra.main(version_base="1.3", config_path=str(package_root() / "conf"), config_name="config")
def presample_job(cfg: DictConfig) -> None:
    """`dph-presample`: only the pre-sampling stage (sample, split, cache) for the composed config.

    dph-train runs it by itself when the divergence uses `source: reference` and no valid cache
    exists; running it first lets several runs or sweep trials start from a ready cache.
    """
    from dph.cluster import prepare_job_process

    prepare_job_process()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    for key, value in cli("dph-presample", out_dir, lambda: presample(cfg)).items():
        log.info("%s: %s", key, value)


def presample(cfg: DictConfig) -> dict[str, Any]:
    """Build (or find) the pre-sampling cache of this config; returns its split metrics."""
    from dph.models import model_fingerprint
    from dph.reference import Rehearsal

    task, eval_sets = setup(cfg)
    tasks = run_tasks(task, eval_sets)
    model_dir, policy, tokenizer = load_initial_policy(cfg, tasks, device_of(cfg))
    encode = PromptEncoder(cfg, tokenizer)
    encode.check(task.problems("train")[0].prompt)
    engine = build_rollout_engine(cfg, policy, tokenizer, model_dir, tasks)
    try:
        rehearsal = Rehearsal.load_or_build(engine, policy, encode, task, model_fingerprint(model_dir), cfg)
    finally:
        engine.close()
    rehearsal.exploration_problems(task)  # an empty side of the split is an error here too
    return rehearsal.split_metrics()


if __name__ == "__main__":
    main()
