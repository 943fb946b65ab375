"""Prompt presets (conf/prompt/) and the tasks' prompt templates: the plain preset reproduces the
prompts, fingerprints and caches of before presets existed; the others carry the established
instructions; a bad template is a one-line error naming the key and the fix."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from dph.tasks import build_task
from dph.tasks import countdown, math, sql
from dph.tasks.sql_data import create_tables

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "prompt").glob("*.yaml"))
# what the tasks built before presets existed: prompts (sha256 of each split's list, first three) and fingerprints
BEFORE = json.loads((FIXTURES / "prompts_before_presets.json").read_text())
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def templates(preset: str) -> dict[str, str]:
    return dict(compose_config([f"prompt={preset}"], hydra=False).prompt.templates)


def task_config(name: str, **overrides) -> dict:
    return {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml")), **overrides}


def sql_fixture(name: str, dest: Path) -> Path:
    """A copy of a real-data fixture with its .sqlite files built from the .sql scripts beside them."""
    root = dest / name
    shutil.copytree(FIXTURES / "sql" / name, root)
    for script in root.rglob("*.sql"):
        conn = sqlite3.connect(script.with_suffix(".sqlite"))
        conn.executescript(script.read_text())
        conn.close()
    return root


def digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def test_presets_compose_and_plain_is_the_default():
    assert {"plain", "instruct", "gsm8k", "qwen_math"} <= set(PRESETS)
    assert compose_config([], hydra=False).prompt.name == "plain"
    for preset in PRESETS:
        cfg = compose_config([f"prompt={preset}"], hydra=False)
        assert cfg.prompt.name == preset and set(cfg.prompt.templates) == {"countdown", "math", "sql"}
        assert isinstance(cfg.prompt.prefill, str)
    plain = templates("plain")
    assert plain == {"countdown": countdown.PLAIN_TEMPLATE, "math": math.PLAIN_TEMPLATE, "sql": sql.PLAIN_TEMPLATE}


def test_the_plain_preset_reproduces_the_prompts_and_fingerprints_of_before(tmp_path):
    """Every task, embedded and real data: the same prompts byte for byte and the same fingerprints
    (so the tiny model's and pre-sampling's cache keys are unchanged)."""
    plain = templates("plain")
    built = {name: build_task(task_config(name, prompt_template=plain[name], **(
        {"cache_dir": str(tmp_path / "sql-cache")} if name == "sql" else {}))) for name in plain}
    for source in ("bird", "spider"):
        root = sql_fixture(source, tmp_path)
        for evidence in (True, False):
            built[f"sql/{source}/evidence={evidence}"] = build_task(
                {"name": "sql", "source": source, "path": str(root), "train_size": None, "test_size": None,
                 "evidence": evidence, "prompt_template": plain["sql"]})
    for source in ("gsm8k", "math"):
        built[f"math/{source}"] = build_task(
            {"name": "math", "source": source, "path": str(FIXTURES / "math" / source), "train_size": None,
             "test_size": None, "prompt_template": plain["math"]})
    assert set(built) == set(BEFORE)
    for label, task in built.items():
        before = BEFORE[label]
        assert json.loads(json.dumps(task.fingerprint(), default=str)) == before["fingerprint"], label
        for split, expected in before["splits"].items():
            prompts = [p.prompt for p in task.problems(split)]
            assert prompts[:3] == expected["first"], (label, split)
            assert (len(prompts), digest(prompts)) == (expected["count"], expected["sha256"]), (label, split)
        warmup = [p.prompt for p in task.warmup_problems(50, seed=0)]
        assert (warmup[:3], digest(warmup)) == (before["warmup"]["first"], before["warmup"]["sha256"]), label
        # built on their own (task.prompt_template null, no preset), the tasks are the same
        if "/" not in label:
            alone = build_task(task_config(label, **({"cache_dir": str(tmp_path / "b")} if label == "sql" else {})))
            assert alone.fingerprint() == task.fingerprint() and alone.problems("test") == task.problems("test")
        if hasattr(task, "close"):
            task.close()


def test_instruct_prompts_carry_the_established_instructions(tmp_path):
    t = templates("instruct")
    cd = build_task(task_config("countdown", prompt_template=t["countdown"]))
    p = cd.problems("test")[0]
    numbers, target = p.data["numbers"], p.data["target"]
    assert p.prompt == (  # TinyZero's countdown prompt
        f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
        "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
        "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")
    m = build_task(task_config("math", train_size=20, test_size=10, ood_size=10, prompt_template=t["math"]))
    question = build_task(task_config("math", train_size=20, test_size=10, ood_size=10)).problems("test")[0].prompt
    assert m.problems("test")[0].prompt == (
        f"{question.rstrip()}\nPlease reason step by step, and put your final answer within \\boxed{{}}.")
    s = build_task(task_config("sql", train_size=20, test_size=10, ood_size=10, prompt_template=t["sql"],
                               cache_dir=str(tmp_path)))
    problem = s.problems("test")[0]
    prompt = problem.prompt
    assert "Database Engine:\nSQLite\n" in prompt and "```sql\n-- Your SQL query\n```" in prompt
    assert create_tables(problem.data["db_path"]) in prompt and "-- example: [" in prompt
    assert "PRIMARY KEY (id)" in prompt and "FOREIGN KEY (" in prompt
    plain_question = build_task(task_config("sql", train_size=20, test_size=10, ood_size=10,
                                            cache_dir=str(tmp_path))).problems("test")[0].prompt
    assert f"Question:\n{plain_question.split(' | ')[1][:-2]}\n\nInstructions:" in prompt
    # another template: other prompts and fingerprints (caches), the same problems
    assert s.fingerprint()["prompt_template"] == t["sql"] and "prompt_template" not in build_task(
        task_config("sql", train_size=20, test_size=10, ood_size=10, cache_dir=str(tmp_path))).fingerprint()
    assert [p.data["gold"] for p in s.problems("test")] == [
        p.data["gold"] for p in build_task(task_config("sql", train_size=20, test_size=10, ood_size=10,
                                                       cache_dir=str(tmp_path))).problems("test")]
    for task in (m,):
        task.close()


def test_gsm8k_and_qwen_math_presets():
    gsm8k, instruct = templates("gsm8k"), templates("instruct")
    assert gsm8k["math"] == "{question} Let's think step by step and output the final answer after \"####\"."
    assert {k: v for k, v in gsm8k.items() if k != "math"} == {k: v for k, v in instruct.items() if k != "math"}
    cfg = compose_config(["prompt=qwen_math", "model=hf", "model.path=x"], hydra=False)
    assert cfg.model.system_prompt == QWEN_MATH_SYSTEM and cfg.prompt.templates.math == "{question}"
    assert compose_config(["prompt=instruct", "model=hf", "model.path=x"], hydra=False).model.system_prompt is None


def test_sql_evidence_goes_where_the_template_says(tmp_path):
    root = sql_fixture("bird", tmp_path)

    def prompts(template, evidence=True):
        task = build_task({"name": "sql", "source": "bird", "path": str(root), "train_size": None,
                           "test_size": None, "evidence": evidence, "prompt_template": template})
        return [p.prompt for p in task.problems("train")]

    hint = "free meal count refers to `Free Meal Count`"
    question = "List the schools with a free meal count above 100, the highest count first."
    assert prompts("{question}")[1] == f"{question} (evidence: {hint})"  # no {evidence}: appended, as before
    assert prompts("{evidence}\n{question}")[1] == f"{hint}\n{question}"
    assert prompts("{evidence}\n{question}")[0] == "\nHow many schools are in Alameda County?"  # it has none
    assert prompts("[{evidence}] {question}", evidence=False)[1] == f"[] {question}"
    schema = "schools(CDSCode,School,County,`Free Meal Count`) satscores(cds,AvgScrMath,NumTstTakr)"
    assert prompts("{schema}")[0] == schema


def test_create_tables_shows_types_keys_and_example_values(tmp_path):
    root = sql_fixture("bird", tmp_path)
    assert create_tables(str(root / "train" / "train_databases" / "school_mini" / "school_mini.sqlite")) == (
        "CREATE TABLE schools (\n"
        "    CDSCode TEXT, -- example: ['01001', '01002', '10001']\n"
        "    School TEXT, -- example: ['Oak High', 'Elm Middle', 'Pine High']\n"
        "    County TEXT, -- example: ['Alameda', 'Fresno']\n"
        "    `Free Meal Count` INTEGER, -- example: [120, 80, 310]\n"
        "    PRIMARY KEY (CDSCode)\n"
        ");\n"
        "\n"
        "CREATE TABLE satscores (\n"
        "    cds TEXT, -- example: ['01001', '01002', '10001']\n"
        "    AvgScrMath INTEGER, -- example: [510, 480, 455]\n"
        "    NumTstTakr INTEGER, -- example: [200, 90, 300]\n"
        "    FOREIGN KEY (cds) REFERENCES schools (CDSCode)\n"
        ");")
    spider = sql_fixture("spider", tmp_path)
    pets = create_tables(str(spider / "database" / "pets_mini" / "pets_mini.sqlite"))
    assert "    PetType VARCHAR(20), -- example: ['cat', 'dog']\n" in pets
    assert "    weight REAL -- example: [12.0, 13.4, 9.3]\n    PRIMARY KEY" not in pets  # commas between items
    assert "    weight REAL, -- example: [12.0, 13.4, 9.3]\n    PRIMARY KEY (PetID)\n);" in pets


@pytest.mark.parametrize("name, fields", [
    ("countdown", "{numbers}, {numbers_list}, {target}"),
    ("math", "{question}"),
    ("sql", "{schema}, {create_tables}, {question}, {evidence}"),
])
@pytest.mark.parametrize("template, problem", [
    ("Put the answer in \\boxed{}.", "an empty field {}"),
    ("Answer in \\boxed{answer}.", "unknown field {answer}"),
    ("{nope} ", "unknown field {nope}"),
    ("a { b", "a stray brace in the template (expected '}' before end of string)"),
    ("a } b", "a stray brace in the template (Single '}' encountered in format string)"),
    ("{FIELD!z}", "the template does not format (ValueError: Unknown conversion specifier z)"),
    ("{0}", "unknown field {0}"),
])
def test_a_bad_template_is_one_line_naming_the_key_and_the_fix(tmp_path, name, fields, template, problem):
    template = template.replace("FIELD", fields[1:fields.index("}")])  # a known field of the task
    with pytest.raises(ValueError) as info:
        build_task(task_config(name, prompt_template=template, **(
            {"cache_dir": str(tmp_path)} if name == "sql" else {})))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"task.prompt_template (or prompt.templates.{name}): ")
    assert problem in message and f"the fields of {name} are {fields}" in message
    assert "write a literal brace doubled, e.g. \\boxed{{}}" in message
    with pytest.raises(ValueError, match=r"task.prompt_template .* must be a string"):
        build_task(task_config(name, prompt_template=3, **({"cache_dir": str(tmp_path)} if name == "sql" else {})))


def test_literal_braces_doubled_render_once():
    t = "{numbers} -> {target}: write \\boxed{{}} or {{x}}"
    task = build_task(task_config("countdown", prompt_template=t))
    assert task.problems("test")[0].prompt.endswith(": write \\boxed{} or {x}")
