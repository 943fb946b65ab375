"""Checkpoints of a run, resuming from them, and the trained policy saved at the end.

A checkpoint holds everything that determines the rest of a run, so that a run killed at any point
and started again with the same command ends exactly as the run that was never interrupted:

    <run_dir>/checkpoints/step-000020/
        model.safetensors, optimizer.bin     policy weights and optimizer state (accelerate's
                                             save_state: FSDP / DeepSpeed shards as they save them)
        random_states_<rank>.pkl             python, numpy, torch CPU and CUDA generators, per rank
        custom_checkpoint_0.pkl              the learning-rate scheduler
        custom_checkpoint_1.pkl              the trainer's own state (TrainState: step, metric history,
                                             the prompt stream's position, step-0 eval results, ...)
        dph_checkpoint.json                  step, the run's config, the sha256 of every file above;
                                             written last: a checkpoint without it is incomplete

It is written to `step-000020.tmp-write` and renamed into place, so a kill during the write leaves
the previous checkpoint intact. The draws of later steps depend only on the step (dph.seeding), so
restoring this state continues the run exactly.

Resume (`trainer.resume`): `auto` continues from the newest complete checkpoint of the run directory
(a corrupt or truncated one is skipped with a warning in favour of the one before it); `never`
starts over after moving the old outputs aside; a path resumes from that checkpoint. Starting over
in a directory that holds outputs of an earlier attempt (never, or auto without a checkpoint) moves
them into `<run_dir>/replaced-<time>/` first: two runs are never mixed in one metrics.jsonl.
A checkpoint written with a different config (another model, divergence, task, ...) is refused with
one line naming the keys that differ; the keys of RESUMABLE_CHANGES may differ.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from dph.config import ConfigError, RunError
from dph.fileio import checksum_problem, checksums, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "dph_checkpoint.json"
MODEL_DIR = "model"
STEP_DIR = re.compile(r"^step-(\d+)$")
WRITING = ".tmp-write"
# What a run writes into its directory (moved aside when a run starts over in the same directory).
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "samples.jsonl", "eval_prompts.jsonl", "passk_over_steps.png",
               "passk_vs_k.png", "train_curves.png", "wandb", CHECKPOINTS, MODEL_DIR)
# Config keys that may differ between a checkpoint and the run resuming from it: how long to train,
# how to checkpoint, log and report, where files go. Everything else defines the run.
RESUMABLE_CHANGES = ("trainer.steps", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.resume",
                     "trainer.save_model", "eval.every", "logger", "paths", "trial", "optimized_metric")


def run_config(cfg) -> dict[str, Any]:
    """The run's resolved config as plain values, without a `hydra` node: what a checkpoint records."""
    from omegaconf import OmegaConf

    return {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            for key, value in cfg.items() if key != "hydra"}


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def checkpoint_steps(root: Path) -> list[tuple[int, Path]]:
    """The (step, directory) of every checkpoint directory under ``root``, newest first."""
    found = [(int(m[1]), p) for p in root.glob("step-*") if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def problem(directory: Path) -> str | None:
    """None when ``directory`` is a complete checkpoint, else what is wrong with it (one line)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (the write did not finish)"
    return checksum_problem(directory, files)


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``; damaged ones are skipped with a warning."""
    for _, directory in checkpoint_steps(root):
        why = problem(directory)
        if why is None:
            return directory
        log.warning("Skipping checkpoint %s: %s", directory, why)
    return None


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key (saved -> current)' for every run-defining key whose value differs."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(a) | set(b)
                  if a.get(k, "<absent>") != b.get(k, "<absent>")
                  and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES))
    return [f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})" for k in keys]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def select(run_dir: Path, resume: str, config: Mapping[str, Any]) -> Path | None:
    """The checkpoint to resume from (None: start from step 0), by ``trainer.resume``; checks that it
    was written by the same config. Call on rank 0 before anything is written."""
    root = run_dir / CHECKPOINTS
    if resume == "never":
        chosen = None
    elif resume == "auto":
        chosen = latest(root) if root.is_dir() else None
    else:
        chosen = Path(resume).expanduser()
        why = problem(chosen) if chosen.is_dir() else "not a directory"
        if why is not None:
            raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint ({why}): give a "
                              f"{CHECKPOINTS}/step-N directory of a run, or trainer.resume=auto|never")
    if chosen is not None:
        manifest = read_manifest(chosen)
        differ = config_differences(manifest["config"], config)
        if differ:
            raise ConfigError(f"checkpoint {chosen} was written by another config: {'; '.join(differ)}. "
                              "Use the run's own overrides, another hydra.run.dir, or trainer.resume=never to start over")
        steps = config["trainer"]["steps"]
        if manifest["step"] > steps:
            raise ConfigError(f"trainer.steps={steps} is below the step of checkpoint {chosen} "
                              f"({manifest['step']}): raise trainer.steps or use trainer.resume=never")
    return chosen


def set_aside(run_dir: Path) -> Path | None:
    """Move the outputs of an earlier attempt in ``run_dir`` into ``run_dir/replaced-<time>/``."""
    present = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    aside.mkdir()
    for path in present:
        shutil.move(str(path), str(aside / path.name))
    log.warning("Starting over: moved the earlier outputs of %s into %s", run_dir, aside)
    return aside


class TrainState:
    """The trainer's own state in a checkpoint (registered with accelerate; rank 0 saves it)."""

    def __init__(self):
        self.step = 0
        self.history: dict[str, Any] = {}
        self.initial_results: dict[str, list] = {}  # split -> [[id, correct, [answers]], ...] (step-0 eval)
        self.initial_metrics: dict[str, float] = {}  # the step-0 evaluation's metrics
        self.prompt_stream: dict[str, Any] = {}
        self.logger_run_id: str | None = None
        self.extra: dict[str, Any] = {}  # state of optional algorithm parts (e.g. an adaptive coefficient)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vars(self).update(state)


class ModelState:
    """A model that is not trained but changes during a run (ProRL's reset reference): its weights
    go into checkpoints as a registered object."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state)


class Checkpointer:
    """Writes, keeps and restores the checkpoints of one run through an accelerate Accelerator.

    Every rank calls ``save`` and ``load`` (accelerate's save_state / load_state are collective:
    each rank saves and restores its own RNG state, FSDP its shards); rank 0 writes the manifest,
    renames the directory into place and deletes checkpoints beyond ``keep`` (only after the new
    one is complete).
    """

    def __init__(self, accelerator, run_dir: Path, keep: int, config: Mapping[str, Any], objects: list,
                 trainable_only: bool = False):
        self.acc, self.root, self.keep, self.config = accelerator, run_dir / CHECKPOINTS, keep, config
        self.trainable_only = trainable_only
        for obj in objects:  # the same order when saving and loading
            accelerator.register_for_checkpointing(obj)
        if trainable_only:  # LoRA: the frozen base is the initial policy, loaded again on resume
            accelerator.register_save_state_pre_hook(_keep_trainable_weights)

    def save(self, step: int) -> Path:
        target = step_dir(self.root, step)
        tmp = target.with_name(target.name + WRITING)
        if self.acc.is_main_process:
            for stale in self.root.glob(f"*{WRITING}"):  # writes cut short by a kill
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        try:
            with _quiet_accelerate():
                self.acc.save_state(str(tmp))
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                manifest = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": self.config,
                            "files": checksums(tmp, exclude=[MANIFEST])}
                write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, a quota, a file size limit
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunError(f"checkpoint: could not write {tmp} ({type(e).__name__}: {_first_line(e)}): free space "
                           f"on that disk (or set trainer.keep_checkpoints=1, or trainer.checkpoint_every=0); run the "
                           "same command again to resume from the last complete checkpoint") from e
        if self.acc.is_main_process:
            if target.exists():  # the same step again (a resumed run re-saving): replace it
                shutil.rmtree(target)
            tmp.rename(target)
            complete = [d for _, d in checkpoint_steps(self.root) if (d / MANIFEST).is_file()]
            unfinished = [d for _, d in checkpoint_steps(self.root) if not (d / MANIFEST).is_file()]
            for old in complete[self.keep:] + unfinished:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return target

    def load(self, directory: Path) -> None:
        with _quiet_accelerate():
            self.acc.load_state(str(directory), **({"strict": False} if self.trainable_only else {}))


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def _keep_trainable_weights(models: list, weights: list[dict], output_dir: str) -> None:
    """accelerate save-state hook: keep only the trainable parameters of each model's state dict."""
    for model, state in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]


@contextlib.contextmanager
def _quiet_accelerate():
    """accelerate logs every file it saves or loads at INFO, and warns that tied weights (an LM head
    sharing the embedding) are stored once, which is expected: keep the run log for dph's own lines."""
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_policy(accelerator, model, tokenizer, target: Path) -> Path:
    """Write the policy with save_pretrained (safetensors) and its tokenizer into ``target``,
    atomically, on rank 0 (every rank calls it: gathering a sharded model's weights is collective).
    It loads with AutoModelForCausalLM.from_pretrained and as `model=hf model.path=<target>`."""
    from dph.fileio import new_dir

    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with new_dir(target) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return target



def load_policy_weights(model, directory: Path) -> None:
    """Load the policy weights of a checkpoint into ``model`` (built from the run's initial policy)."""
    from safetensors.torch import load_file

    state = {k.removeprefix("module."): v for k, v in load_file(str(directory / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {directory} does not fit this model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def _tied_names(model) -> set[str]:
    """Names of parameters that share their tensor with another name (e.g. a tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied |= {name, seen[id(param)]}
        seen.setdefault(id(param), name)
    return tied

