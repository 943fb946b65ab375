"""What the entry points build from a composed config, shared by dph-train, dph-presample and dph-eval.

The entry points (dph.train, dph.evaluate) compose a config and call these builders; they never
import each other. Nothing here runs the algorithm:

- `setup`: the trained task and the evaluation sets, the config checked (dph.config.validate);
- `unique_tasks`, `load_initial_policy`, `PromptEncoder`, `build_rollout_engine`, `build_evaluator`: the initial
  policy (built or resolved, loaded), its rollout engine and the evaluator;
- `cli`: the one place where a refused config (ConfigError) or a run that cannot go on (RunError,
  VerifierError) becomes one line on stderr and a non-zero exit, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from dph.config import ConfigError, RunError, package_root, split_eval_spec, validate

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------- tasks


def setup(cfg: DictConfig):
    """Build the task and eval sets and validate the config; nothing expensive happens here."""
    from dph.evaluation import EvalSet

    task = build_task(cfg.task, "task", cfg)
    tasks = {task.name: task}
    for spec in cfg.eval.splits or []:
        other, _ = split_eval_spec(str(spec), task.name)
        if other not in tasks:
            tasks[other] = load_other_task(cfg, other)
    labels = validate(cfg, {name: t.split_names for name, t in tasks.items()})
    eval_sets = []
    for label in labels:
        name, split = split_eval_spec(label, task.name)
        eval_sets.append(EvalSet(label, tasks[name], split))
        size, wanted = len(tasks[name].problems(split)), cfg.eval.max_prompts
        if wanted is not None and size < wanted:
            log.warning("eval.max_prompts=%d is more than the %d prompts of %s: evaluating all %d", wanted, size,
                        label, size)
    return task, eval_sets


def load_other_task(cfg: DictConfig, label: str):
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
    return build_task(task_cfg, f"eval.splits: task {label} ({source})", cfg)


def build_task(task_cfg: DictConfig, where: str, cfg: DictConfig | None = None):
    """The task of a config node; a bad key or a missing data file is a ConfigError naming `where`.
    A task without a `prompt_template` of its own takes the run's prompt preset's template for its
    name (`prompt.templates.<name>`)."""
    from dph.tasks import build_task as construct

    kwargs = OmegaConf.to_container(task_cfg, resolve=True)
    templates = OmegaConf.select(cfg, "prompt.templates") if cfg is not None else None
    if "prompt_template" in kwargs and kwargs["prompt_template"] is None:
        template = None if templates is None else templates.get(kwargs.get("name"))
        if template is None:
            kwargs.pop("prompt_template")  # the task's own default
        else:
            kwargs["prompt_template"] = template
    try:
        return construct(kwargs)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {e}") from e


def unique_tasks(tasks: Sequence) -> list:
    """The distinct tasks (by name and data: e.g. sql on BIRD and sql on Spider are two), in order."""
    seen: dict[str, Any] = {}
    for t in tasks:
        seen.setdefault(json.dumps([t.name, t.fingerprint()], sort_keys=True, default=str), t)
    return list(seen.values())


def run_tasks(task, eval_sets) -> list:
    """Every distinct task a run touches: the trained one first, then those it evaluates."""
    return unique_tasks([task, *(e.task for e in eval_sets)])


# ---------------------------------------------------------------------------------------- policy


def load_initial_policy(cfg: DictConfig, tasks: Sequence, device) -> tuple[Path, Any, Any]:
    """The initial policy's directory (the tiny model built and cached first when it is the one),
    the policy loaded on `device`, and its tokenizer."""
    from dph.models import load_policy, resolve_model_dir

    model_dir = resolve_model_dir(cfg.model, tasks, cfg.paths.cache_dir, prefill=prompt_prefill(cfg))
    policy, tokenizer = load_policy(model_dir, cfg.model, device)
    return model_dir, policy, tokenizer


def prompt_prefill(cfg: DictConfig) -> str:
    """The text that starts the assistant's turn (the prompt preset's prefill; "" when none)."""
    return OmegaConf.select(cfg, "prompt.prefill", default="") or ""


class PromptEncoder:
    """prompts -> token ids, as the run's config says: the chat template (model.chat_template: auto,
    true, false), model.system_prompt, model.chat_template_kwargs and the assistant prefill
    (prompt.prefill); dph.models.encode_prompts does the work."""

    def __init__(self, cfg: DictConfig, tokenizer):
        m = cfg.model
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        kwargs = m.get("chat_template_kwargs")
        self.options = {
            "chat_template": m.chat_template,
            "system_prompt": m.get("system_prompt"),
            "prefill": prompt_prefill(cfg),
            "chat_template_kwargs": OmegaConf.to_container(kwargs, resolve=True) if kwargs else None,
        }

    def check(self, example: str) -> None:
        """Encode `example` now, so that options this tokenizer cannot honour (a system prompt without a
        chat template) are a ConfigError before any work; log it as the policy sees it (special tokens
        and all), which shows at a glance whether the chat template and prefill are what the model expects."""
        try:
            [ids] = self([example])
        except ValueError as e:
            raise ConfigError(str(e)) from e
        log.info("A prompt as the policy sees it (%d tokens): %r", len(ids), self.tokenizer.decode(ids))

    def __call__(self, prompts: Sequence[str]) -> list[list[int]]:
        from dph.models import encode_prompts

        return encode_prompts(self.tokenizer, prompts, **self.options)

    def spec(self) -> dict[str, Any]:
        """What decides the encoding, for cache keys: whether a chat template is applied, and the
        system prompt, prefill and template options when set."""
        from dph.models import chat_template_enabled

        spec: dict[str, Any] = {"chat_template": chat_template_enabled(self.tokenizer, self.options["chat_template"])}
        spec.update({k: v for k, v in self.options.items() if k != "chat_template" and v})
        return spec


def context_length(model) -> int:
    """The context length of a causal LM config."""
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))


def engine_context(cfg: DictConfig, policy, encode, tasks: Sequence) -> int:
    """Tokens per sequence the run needs: its longest prompt (every split of every task) plus
    generation.max_new_tokens; more than the model's context length is a ConfigError."""
    longest = max((len(ids) for t in tasks for split in t.split_names
                   for ids in encode([p.prompt for p in t.problems(split)])), default=0)
    needed, context = longest + int(cfg.generation.max_new_tokens), context_length(policy)
    if needed > context:
        raise ConfigError(f"generation.max_new_tokens={cfg.generation.max_new_tokens} after the longest prompt "
                          f"({longest} tokens) exceeds the model's context length ({context}): lower "
                          f"generation.max_new_tokens to at most {max(1, context - longest)}")
    return needed


def build_rollout_engine(cfg: DictConfig, policy, tokenizer, model_dir: Path, tasks: Sequence, *,
                         sharded: bool = False):
    """The rollout engine `rollout.engine` names, sampling from `policy`; vLLM reserves the run's
    longest prompt plus generation.max_new_tokens per sequence (rollout.vllm.max_model_len overrides)."""
    from dph.engines import build_engine

    g = cfg.generation
    max_len = engine_context(cfg, policy, PromptEncoder(cfg, tokenizer), tasks)
    try:
        return build_engine(cfg.rollout, policy, tokenizer, model_dir=model_dir, batch_size=g.batch_size,
                            max_model_len=max_len, sharded=sharded, stop=list(g.stop))
    except ValueError as e:  # settings this model or setup cannot take (one line each)
        raise ConfigError(str(e)) from e


def build_evaluator(cfg: DictConfig, eval_sets, tokenizer, ranks):
    """The evaluator of `eval.*` over `eval_sets`, sampling as `generation.*` says."""
    from dph.evaluation import Evaluator

    g = cfg.generation
    return Evaluator(eval_sets, PromptEncoder(cfg, tokenizer), ranks, n=cfg.eval.n, max_prompts=cfg.eval.max_prompts,
                     sample_rows=cfg.eval.sample_rows, temperature=g.temperature, top_p=g.top_p,
                     max_new_tokens=g.max_new_tokens, micro_batch_size=cfg.trainer.micro_batch_size, seed=cfg.seed)


def check_sharding(accelerator, cfg: DictConfig) -> bool:
    """Whether the policy is sharded over the ranks (FSDP, DeepSpeed): then every rank must run the
    same number of forward passes, so the per-step counts must split evenly (a ConfigError if not)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return False
    k = accelerator.num_processes
    counts = {"trainer.prompts_per_step": cfg.trainer.prompts_per_step, "eval.max_prompts": cfg.eval.max_prompts}
    if cfg.divergence.get("source") == "reference":
        counts["divergence.rehearsal_batch_size"] = cfg.divergence.rehearsal_batch_size
    for key, value in counts.items():
        if value is None or value % k:
            raise ConfigError(f"{key}={value} does not split evenly over {k} ranks of a sharded model "
                              f"({accelerator.distributed_type.value}): use a multiple of {k}")
    return True


def device_of(cfg: DictConfig) -> str:
    """Where a process without an accelerate Accelerator runs the policy (dph-presample)."""
    import torch

    return "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------- CLI


def cli(prog: str, output_dir: Path, fn: Callable[[], T], *, multirun: bool = False, sweeper_records: bool = False
        ) -> T | None:
    """Run `fn`; a refused config or a run that cannot go on is one line on stderr (its traceback only in
    the job's log file), then exit 2 (config) or 1 (run). In a multirun the sweep goes on: the error is
    raised for a sweeper that records failed trials (`sweeper_records`: dph's Optuna sweeper), and for
    others (Hydra's basic grid) the job ends with its one line and returns None."""
    from dph.tasks import VerifierError

    try:
        return fn()
    except (ConfigError, RunError, VerifierError) as e:
        if multirun and sweeper_records:
            raise
        _traceback_to_log_file(e)
        line = f"{prog}: error: {'verifier: ' if isinstance(e, VerifierError) else ''}{_one_line(e)}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if multirun:
            log.error("job failed (the sweep goes on): %s", line)
            return None
        remove_if_empty(output_dir)
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def check_command_line(prog: str) -> None:
    """An unknown option of a config group on the command line (dph.config.check_group_choices) is one
    line on stderr and exit 2, before Hydra starts."""
    from dph.config import check_group_choices

    try:
        check_group_choices(sys.argv[1:], package_root() / "conf")
    except ConfigError as e:
        sys.stderr.write(f"{prog}: error: {_one_line(e)}\n")
        sys.exit(2)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _traceback_to_log_file(error: BaseException) -> None:
    """The error's traceback, written to the log files of the root logger (Hydra's job log) only."""
    text = "".join(traceback.format_exception(error))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            with contextlib.suppress(Exception):
                handler.stream.write(text)
                handler.flush()


def remove_if_empty(run_dir: Path) -> None:
    """Remove a run directory that holds only what Hydra wrote before the run was refused (its .hydra/
    and the job's log), and the date folder of the default layout (runs/<date>/<time>) when that is
    left empty."""
    from hydra.core.hydra_config import HydraConfig

    hydra_files = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_files:
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_dir.parent.name):
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # only if empty
