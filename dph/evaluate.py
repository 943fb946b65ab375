"""`dph-eval`: evaluate models with the metrics of training's evaluation, side by side.

    dph-eval run_dir=outputs/runs/<date>/<time> eval.n=256      # a run's initial policy vs its trained one
    dph-eval model=hf model.path=/models/qwen 'eval.splits=[test,sql/test]'
    dph-eval 'models=[initial,outputs/runs/A/model,outputs/runs/B/checkpoints/step-000020]'

The config is dph-train's (task, model, eval, generation, rollout, ...: every override works the
same), plus `models` and `run_dir` (conf/evaluate.yaml). With `run_dir`, that run's own overrides are
composed first and the command line's on top, so its task and initial policy need not be repeated.

Each entry of `models` is evaluated on every split of `eval.splits` with `eval.n` samples per prompt
(dph.evaluation: pass@k for k up to eval.n, entropy, distinct correct answers) and the same eval
seed, so that the models differ by their weights alone; the forgetting metrics of every model are
taken against the first one. Written into the output directory (hydra.run.dir):

- `eval.json`: per model, what was evaluated and its metrics;
- `eval_prompts.jsonl`, `samples.jsonl`: per-prompt results and sampled completions, by model;
- `passk_vs_k.png`: Pass@k versus k of every model, one panel per split;
- with `logger=wandb`, one W&B run holding all of it.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dph.config import ConfigError, package_root

log = logging.getLogger(__name__)

# a run's overrides that say how it was run, not what it is (dph-eval has its own)
IGNORED_RUN_OVERRIDES = ("hydra.", "trial=", "++trial=", "+trial=", "logger", "trainer.resume=")


@dataclass
class ModelSpec:
    """One model to evaluate: its label, the directory its weights and tokenizer load from, and a
    checkpoint whose policy weights replace them (None: the directory's own weights)."""

    label: str
    model_dir: Path | None  # None: the config's initial policy (built or resolved when evaluated)
    checkpoint: Path | None = None


def resolve_models(entries: list[str], run_dir: Path | None) -> list[ModelSpec]:
    """What each entry of `models` names; an entry that names nothing usable is a ConfigError."""
    from dph import checkpoint

    specs = []
    for entry in entries:
        entry = str(entry)
        path = Path(entry).expanduser()
        if entry == "initial":
            specs.append(ModelSpec("initial", None))
        elif entry == "trained":
            if run_dir is None:
                raise ConfigError("models: 'trained' needs run_dir=<a dph-train run directory>")
            if not (run_dir / checkpoint.MODEL_DIR / "config.json").is_file():
                raise ConfigError(f"models: run_dir={run_dir} has no trained policy ({checkpoint.MODEL_DIR}/): "
                                  "the run did not finish, or ran with trainer.save_model=false (give a checkpoint)")
            specs.append(ModelSpec("trained", run_dir / checkpoint.MODEL_DIR))
        elif (path / checkpoint.MANIFEST).is_file():
            why = checkpoint.problem(path)
            if why is not None:
                raise ConfigError(f"models: {entry} is not a complete checkpoint ({why})")
            specs.append(ModelSpec(_label(path), None, path))
        elif (path / checkpoint.MODEL_DIR / "config.json").is_file():
            specs.append(ModelSpec(_label(path), path / checkpoint.MODEL_DIR))
        elif (path / "config.json").is_file():
            specs.append(ModelSpec(_label(path), path))
        else:
            raise ConfigError(f"models: {entry!r} is none of initial, trained, a saved model directory (config.json), "
                              "a run directory (model/) or a checkpoint (dph_checkpoint.json)")
    labels = [s.label for s in specs]
    if len(set(labels)) < len(labels):
        for i, spec in enumerate(specs):
            spec.label = f"{i}:{spec.label}"
    return specs


def _label(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[-2:])


def compose_for_run(cfg: DictConfig) -> DictConfig:
    """With `run_dir`: the config of that run (its own overrides) with this command line on top."""
    if not cfg.get("run_dir"):
        return cfg
    from hydra import compose

    run_dir = Path(cfg.run_dir).expanduser()
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        raise ConfigError(f"run_dir={cfg.run_dir}: not a dph-train run directory (no .hydra/overrides.yaml)")
    run_overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or []
                     if not o.startswith(IGNORED_RUN_OVERRIDES)]
    cli = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]
    return compose(config_name="evaluate", overrides=[*run_overrides, *cli])


def evaluate_models(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate every model of `cfg.models` and write the outputs; returns eval.json's content."""
    import torch

    from dph import checkpoint
    from dph.builders import build_evaluator, build_rollout_engine, load_initial_policy, run_tasks, setup
    from dph.distributed import Ranks
    from dph.loggers import build_logger
    from dph.models import load_policy
    from dph.plots import plot_passk_curves

    task, eval_sets = setup(cfg)
    tasks = run_tasks(task, eval_sets)
    run_dir = Path(cfg.run_dir).expanduser() if cfg.get("run_dir") else None
    specs = resolve_models(list(cfg.models or (["initial", "trained"] if run_dir else ["initial"])), run_dir)
    from accelerate import Accelerator

    acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.precision)
    ranks = Ranks(acc)
    logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), out_dir, checkpoint.run_config(cfg)) \
        if ranks.is_main else None
    results: dict[str, Any] = {}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    baseline = None
    try:
        for spec in specs:
            if spec.model_dir is None:
                model_dir, policy, tokenizer = load_initial_policy(cfg, tasks, acc.device)
            else:
                model_dir = spec.model_dir
                policy, tokenizer = load_policy(model_dir, cfg.model, acc.device)
            if spec.checkpoint is not None:
                checkpoint.load_policy_weights(policy, spec.checkpoint)
            policy.eval()
            engine = build_rollout_engine(cfg, policy, tokenizer, model_dir, tasks)
            evaluator = build_evaluator(cfg, eval_sets, tokenizer, ranks)
            try:
                if spec.checkpoint is not None:
                    engine.update_weights(policy)
                with torch.no_grad():
                    result = evaluator.run(engine, policy, 0, baseline)
            finally:
                engine.close()
            baseline = baseline or result.results
            log.info("%s: %s", spec.label, ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in result.metrics.items()
                                                       if k.endswith(("/pass@1", f"/pass@{cfg.eval.n}"))))
            results[spec.label] = {"model_dir": str(model_dir),
                                   "checkpoint": None if spec.checkpoint is None else str(spec.checkpoint),
                                   "metrics": result.metrics}
            for es in eval_sets:
                curves.setdefault(es.label, {})[spec.label] = [
                    (k, result.metrics[f"eval/{es.label}/pass@{k}"]) for k in evaluator.ks]
            if logger is not None:
                logger.log({f"{spec.label}/{k}": v for k, v in result.metrics.items()}, 0)
                for es in eval_sets:
                    logger.log_prompt_results(f"{spec.label}/{es.label}", result.results[es.label], cfg.eval.n, 0)
                logger.log_samples([{"model": spec.label, **row} for row in result.samples], 0)
            del policy, engine
        out = {"eval": {"n": cfg.eval.n, "splits": list(cfg.eval.splits), "max_prompts": cfg.eval.max_prompts,
                        "seed": cfg.seed}, "models": results}
        if ranks.is_main:
            from dph.fileio import write_text_atomic

            write_text_atomic(out_dir / "eval.json", json.dumps(out, indent=2))
            plot_passk_curves(curves, out_dir / "passk_vs_k.png", "Pass@k versus k by model")
            logger.summary({f"{label}/{k}": v for label, r in results.items() for k, v in r["metrics"].items()})
    finally:
        if logger is not None:
            logger.finish(0)
    return out


def main() -> None:
    """`dph-eval`: an unknown option of a config group is one line before Hydra starts; then `eval_main`."""
    from dph.builders import check_command_line

    check_command_line("dph-eval")
    eval_main()


@hydra.main(version_base="1.3", config_path=str(package_root() / "conf"), config_name="evaluate")
def eval_main(cfg: DictConfig) -> None:
    from dph.cluster import prepare_job_process

    from dph.builders import cli

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    prepare_job_process()
    cfg = cli("dph-eval", out_dir, lambda: compose_for_run(cfg))
    out = cli("dph-eval", out_dir, lambda: evaluate_models(cfg, out_dir))
    lines = [f"dph-eval: done: {out_dir}"]
    for label, r in out["models"].items():
        cells = [f"{k.removeprefix('eval/')} {v:.3f}" for k, v in r["metrics"].items()
                 if k.endswith(("/pass@1", f"/pass@{cfg.eval.n}"))]
        lines.append(f"  {label:<24} " + "   ".join(cells))
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
