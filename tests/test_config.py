"""dph.config: every config group option composes and validates; impossible values name their key;
every key of conf/ is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import BAD_VALUES, ROOT, compose_config
from dph.config import ConfigError, split_eval_spec, validate
from dph.builders import setup
from dph.train import objective

CONF = ROOT / "conf"
ACCELERATE = CONF / "accelerate"  # accelerate's own config files (accelerate launch --config_file), not Hydra's
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p != ACCELERATE)
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]


def test_groups_are_found():
    names = {group for group, _ in OPTIONS}
    assert {"task", "model", "divergence", "optimizer", "logger"} <= names
    assert {"countdown", "sql"} <= {option for group, option in OPTIONS if group == "task"}
    assert {"none", "reverse_kl", "forward_kl", "js", "alpha"} <= {o for g, o in OPTIONS if g == "divergence"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option, hf_model_dir, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "hf"):
        overrides.append(f"model.path={hf_model_dir}")
    if (group, option) == ("task", "sql"):
        overrides.append(f"task.cache_dir={tmp_path / 'sql'}")
    cfg = compose_config(overrides)
    task, eval_sets = setup(cfg)
    assert task.name == cfg.task.name
    assert [e.label for e in eval_sets] == list(cfg.eval.splits)
    for e in eval_sets:
        assert e.split in e.task.split_names
    if group in ("task", "model", "divergence", "optimizer"):
        assert cfg[group].name == option
    if group == "logger":
        assert cfg.logger.backend == option


def test_values_given_on_the_command_line_are_kept():
    cfg = compose_config(["divergence=js", "divergence.weight=0.1", "optimizer.lr=1e-4"])
    setup(cfg)
    assert cfg.divergence.name == "js"
    assert cfg.divergence.weight == 0.1
    assert cfg.optimizer.lr == 1e-4
    assert cfg.hydra.runtime.choices.divergence == "js"


@pytest.mark.parametrize("task", [o for g, o in OPTIONS if g == "task"])
def test_eval_on_another_task(task, tmp_path):
    """eval.splits may name a split of another task ("<task>/<split>"), configured by conf/task/<task>.yaml."""
    other = "sql" if task != "sql" else "countdown"
    overrides = [f"task={task}", f"eval.splits=[test,{other}/ood]", f"optimized_metric=eval/{other}/ood/pass@8"]
    if task == "sql":
        overrides.append(f"task.cache_dir={tmp_path / 'sql'}")
    main_task, eval_sets = setup(compose_config(overrides))
    assert [(e.label, e.task.name, e.split) for e in eval_sets] == [
        ("test", task, "test"), (f"{other}/ood", other, "ood")
    ]
    assert split_eval_spec(f"{other}/ood", task) == (other, "ood")


@pytest.mark.parametrize(("task", "steps", "n", "splits"), [
    ("countdown", 40, 64, ["test", "ood"]), ("sql", 30, 16, ["test", "math/test"]), ("math", 40, 64, ["test", "ood"]),
])
def test_the_paper_preset_is_sized_per_task(task, steps, n, splits, tmp_path):
    """sweep=paper picks each task's steps, eval samples and splits; the command line still wins."""
    overrides = ["sweep=paper", f"task={task}", f"task.cache_dir={tmp_path / 'sql'}" if task == "sql" else "seed=0"]
    cfg = compose_config(overrides)
    _, eval_sets = setup(cfg)
    assert (cfg.trainer.steps, cfg.eval.n, [e.label for e in eval_sets]) == (steps, n, splits)
    assert cfg.hydra.sweeper.params.experiment == "grpo,dapo,grpo_kl,dph_fkl,dph_js"
    assert cfg.hydra.sweep.dir.endswith(f"sweeps/paper/{task}/" + cfg.hydra.sweep.dir.rsplit("/", 1)[1])
    assert compose_config([*overrides, "trainer.steps=5", "eval.n=8"], hydra=False).trainer.steps == 5


@pytest.mark.parametrize(("overrides", "key"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_impossible_values_raise_config_error_naming_the_key(overrides, key):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as info:
        setup(cfg)
    assert key in str(info.value)


def test_validate_reports_the_first_bad_key_and_the_fix():
    cfg = compose_config(["generation.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"generation\.top_p=1\.5 is not allowed: use a number > 0 and <= 1"):
        validate(cfg, {"countdown": ("train", "test", "ood")})
    cfg = compose_config(["eval.splits=[test]", "eval.n=8"])  # the default optimized_metric is eval/test/pass@8
    assert validate(cfg, {"countdown": ("train", "test", "ood")}) == ["test"]
    cfg = compose_config(["eval.splits=[test]", "eval.n=4"])
    with pytest.raises(ConfigError, match=r"optimized_metric='eval/test/pass@8'.*eval\.n=4"):
        validate(cfg, {"countdown": ("train", "test", "ood")})


def test_a_task_without_train_split_cannot_be_trained():
    cfg = compose_config(["eval.splits=[test]"])
    with pytest.raises(ConfigError, match="no train split"):
        validate(cfg, {"countdown": ("test",)})


def test_a_list_of_optimized_metrics_validates():
    cfg = compose_config(["optimized_metric=[eval/test/pass@1,eval/ood/pass@64,train/entropy]"])
    setup(cfg)
    with pytest.raises(ConfigError, match="optimized_metric"):
        setup(compose_config(["optimized_metric=[eval/test/pass@1,eval/ood/pass@128]"]))


def test_objective_returns_the_optimized_metrics():
    history = {"eval/test/pass@1": 0.25, "eval/test/pass@8": 0.75, "train/entropy": 1.5}
    assert objective(OmegaConf.create({"optimized_metric": "eval/test/pass@8"}), history) == 0.75
    both = OmegaConf.create({"optimized_metric": ["eval/test/pass@1", "eval/test/pass@8"]})
    assert objective(both, history) == [0.25, 0.75]
    with pytest.raises(KeyError, match="eval/ood/pass@8"):
        objective(OmegaConf.create({"optimized_metric": "eval/ood/pass@8"}), history)


# ---------------------------------------------------------------------------- documentation of conf/
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w@.-]*):(?P<rest>(?: .*)?)$")


def _comment(rest: str) -> bool:
    """Whether the text after a key's colon holds a `#` comment (outside quotes)."""
    unquoted = re.sub(r"\"[^\"]*\"|'[^']*'", "", rest)
    return re.search(r"(^|\s)#", unquoted) is not None


def _leaf_keys(path: Path) -> tuple[list[tuple[tuple[str, ...], bool, int, str]], bool]:
    """([(key path, documented, line number, value)] of the keys that hold a value, global package flag)."""
    lines = path.read_text().splitlines()
    stack: list[tuple[int, str]] = []
    out = []
    for number, line in enumerate(lines, 1):
        m = _KEY.match(line)
        if m is None:
            continue
        indent, key, rest = len(m["indent"]), m["key"], m["rest"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value = re.sub(r"\s#.*$", "", rest).strip()
        if value == "" and key != "defaults":  # a section: its keys are documented one by one
            stack.append((indent, key))
            continue
        if key == "defaults":
            stack.append((indent, key))
            continue
        above = lines[number - 2].strip() if number > 1 else ""
        documented = _comment(rest) or (above.startswith("#") and not above.startswith("# @package"))
        out.append(((*[k for _, k in stack], key), documented, number, value))
    return out, lines[0].strip() == "# @package _global_"


def test_every_conf_key_is_documented():
    """Each option is documented once, by a comment on its line (or the line above). Exempt:
    a group file's `name` equal to the option (the file's header says what it is), a key repeated
    in a sibling block (countdown's `test`/`ood` splits repeat `train`'s keys), and a key that an
    experiment preset (`# @package _global_`) sets but that its own group file or config.yaml
    documents."""
    files = sorted(p for p in CONF.rglob("*.yaml") if ACCELERATE not in p.parents)
    files += sorted((CONF / "sweep").glob("*.yaml"))  # conf/sweep links to sweeps/
    documented: set[tuple[str, ...]] = set()
    parsed = {}
    for path in files:
        keys, is_global = _leaf_keys(path)
        prefix = () if path.parent == CONF or is_global else (path.parent.name,)
        parsed[path] = (keys, is_global, prefix)
        if not is_global:
            documented |= {prefix + k for k, doc, _, _ in keys if doc}
    assert {("algorithm", "group_size"), ("task", "splits", "train", "size"), ("divergence", "weight")} <= documented
    undocumented = []
    for path, (keys, is_global, prefix) in parsed.items():
        header = [ln for ln in path.read_text().splitlines()[:2] if ln.startswith("#") and "@package" not in ln]
        if not header:
            undocumented.append(f"{path.relative_to(ROOT)}: no header comment saying what the file is")
        for key, doc, number, value in keys:
            full = prefix + key
            sibling = any(len(d) == len(full) and d[:-2] == full[:-2] and d[-1] == full[-1] for d in documented)
            is_name = bool(prefix) and key == ("name",) and value == path.stem
            if doc or is_name or sibling or (is_global and full in documented):
                continue
            undocumented.append(f"{path.relative_to(ROOT)}:{number}: {'.'.join(key)}")
    assert not undocumented, "keys without a comment:\n" + "\n".join(undocumented)


@pytest.mark.parametrize("task", [o for g, o in OPTIONS if g == "task"])
def test_response_length_follows_the_task_unless_overridden(task, tmp_path):
    """generation.max_new_tokens defaults to the task's response_tokens (a run key the task
    constructor never sees), and fits the tiny model's context with the task's prompts."""
    extra = [f"task.cache_dir={tmp_path / 'sql'}"] if task == "sql" else []
    cfg = compose_config([f"task={task}", *extra])
    assert cfg.generation.max_new_tokens == cfg.task.response_tokens
    main_task, _ = setup(cfg)
    assert not hasattr(main_task, "response_tokens")
    longest_prompt = max(len(p.prompt) for split in main_task.split_names for p in main_task.problems(split)[:200])
    assert longest_prompt + cfg.generation.max_new_tokens + 2 <= cfg.model.architecture.max_positions
    assert compose_config([f"task={task}", "generation.max_new_tokens=7", *extra]).generation.max_new_tokens == 7


def test_an_eval_task_of_its_own_by_label(tmp_path):
    """eval.tasks.<label> configures another instance of a task (e.g. GSM8K files while training on
    the embedded math), logged under eval/<label>/<split>/...; the base model warms up on both."""
    from dph.builders import unique_tasks

    gsm8k = ROOT / "tests" / "fixtures" / "math" / "gsm8k"
    cfg = compose_config(["task=math", f"+eval.tasks.gsm={{name:math,source:gsm8k,path:'{gsm8k}'}}",
                          "eval.splits=[test,gsm/test]", "optimized_metric=eval/gsm/test/pass@8"])
    task, eval_sets = setup(cfg)
    assert [(e.label, e.task.name, e.split) for e in eval_sets] == [("test", "math", "test"), ("gsm/test", "math", "test")]
    assert eval_sets[1].task.source == "gsm8k" and task.source == "embedded"
    assert len(unique_tasks([task, *(e.task for e in eval_sets)])) == 2
    bad = compose_config(["+eval.tasks.x={name:nope}", "eval.splits=[test,x/test]"])
    with pytest.raises(ConfigError, match=r"eval.tasks.x.name='nope'"):
        setup(bad)


def test_an_unknown_divergence_parameter_names_the_known_ones():
    cfg = compose_config(["divergence=alpha", "+divergence.alpah=0.3"])
    with pytest.raises(ConfigError, match=r"divergence.alpah is not a parameter of divergence=alpha: its keys are "
                                          r"name, weight, source, rehearsal_batch_size, alpha"):
        setup(cfg)


def test_a_weight_without_a_divergence_is_said_to_be_ignored(caplog):
    with caplog.at_level("WARNING", logger="dph.config"):
        setup(compose_config(["divergence=none", "divergence.weight=0.1"]))
    assert "divergence.weight=0.1 is ignored: divergence=none has no term to weight" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dph.config"):
        setup(compose_config(["divergence=none"]))
    assert "ignored" not in caplog.text


@pytest.mark.parametrize("preset", sorted(p.stem for p in ACCELERATE.glob("*.yaml")))
def test_accelerate_presets_load(preset):
    """The multi-GPU presets are valid accelerate config files of the kind their name says."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / f"{preset}.yaml"))
    kind = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}[preset]
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if preset == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"] is True
    if preset.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(preset[-1])


INERT_ON_POLICY = {"clip_low", "clip_high"}  # the ratio is 1 on the first update: the clip never binds there


@pytest.mark.parametrize("grid", ["paper", "baselines_grid"])
def test_no_grid_method_equals_another_by_construction(grid):
    """Two methods of a grid whose training configs differ only in what cannot act (the PPO clip of an
    on-policy update) would give the same row twice: every pair must differ in what the update does."""
    import itertools

    from omegaconf import OmegaConf

    grid_cfg = OmegaConf.load(ROOT / "sweeps" / f"{grid}.yaml")
    methods = str(grid_cfg.hydra.sweeper.params.experiment).split(",")
    trained = {}
    for method in methods:
        cfg = compose_config([f"sweep={grid}", f"experiment={method}", "seed=0"], hydra=False)
        trained[method] = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["algorithm", "divergence"]), resolve=True)
    for a, b in itertools.combinations(methods, 2):
        differ = {k for k in trained[a]["algorithm"] if trained[a]["algorithm"][k] != trained[b]["algorithm"][k]}
        if trained[a]["divergence"] != trained[b]["divergence"]:
            differ.add("divergence")
        on_policy = trained[a]["algorithm"]["epochs"] * trained[a]["algorithm"]["minibatches"] == 1
        assert differ and not (on_policy and differ <= INERT_ON_POLICY), (a, b, differ)
    assert len({t["algorithm"]["minibatches"] for t in trained.values()}) == 1  # the same compute for every method
