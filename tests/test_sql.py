"""SQL task: embedded data, execution-accuracy verifier, sandbox attacks, BIRD/Spider loaders, config."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import random
import re
import shutil
import sqlite3
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dph.tasks import Problem, VerifierError, build_task, sql_sandbox
from dph.tasks.sql import SQLTask
from dph.tasks.sql_embedded import (
    OOD_SCHEMAS,
    SCHEMAS,
    TEMPLATES,
    TRAIN_SCHEMAS,
    build_database,
    make_question,
    sample_params,
)
from dph.tasks.sql_sandbox import extract_sql, has_top_level_order_by, normalise_sql, results_match, run_query

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "task" / "sql.yaml"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sql"
SMALL = {"train_size": 150, "test_size": 40, "ood_size": 40}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> SQLTask:
    """A small embedded task with a short time limit (attacks time out quickly)."""
    return SQLTask(cache_dir=str(tmp_path_factory.mktemp("sql-cache")), timeout_s=0.2, **SMALL)


def company_problem(task: SQLTask, gold: str) -> Problem:
    db = task.databases()["company"]
    data = {"db_id": "company", "db_path": db, "gold": gold, "ordered": has_top_level_order_by(gold)}
    return Problem("t/0", "", data)


def company_rows(task: SQLTask, sql: str) -> list[tuple]:
    conn = sqlite3.connect(task.databases()["company"])
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# --- embedded data -----------------------------------------------------------------------------


def test_databases_are_the_same_bytes_per_seed(tmp_path):
    a = SQLTask(cache_dir=str(tmp_path / "a"), **SMALL).databases()
    b = SQLTask(cache_dir=str(tmp_path / "b"), **SMALL).databases()
    c = SQLTask(cache_dir=str(tmp_path / "c"), seed=1, **SMALL).databases()
    assert set(a) == set(SCHEMAS)
    for db in SCHEMAS:
        assert Path(a[db]).read_bytes() == Path(b[db]).read_bytes() == build_database(SCHEMAS[db], 0)[0]
        assert Path(a[db]).read_bytes() != Path(c[db]).read_bytes()
    mtime = Path(a["company"]).stat().st_mtime_ns
    SQLTask(cache_dir=str(tmp_path / "a"), **SMALL).databases()  # same bytes already there: not rewritten
    assert Path(a["company"]).stat().st_mtime_ns == mtime


def test_splits_are_deterministic_and_disjoint(task, tmp_path):
    again = SQLTask(cache_dir=str(tmp_path), timeout_s=0.2, **SMALL)
    other_seed = SQLTask(cache_dir=str(tmp_path), seed=1, **SMALL)
    assert task.split_names == ("train", "test", "ood")
    prompts = {}
    for split in task.split_names:
        problems = task.problems(split)
        assert len(problems) == SMALL[f"{split}_size"]
        same = again.problems(split)
        assert [(p.prompt, p.data["gold"]) for p in problems] == [(p.prompt, p.data["gold"]) for p in same]
        assert len({p.id for p in problems}) == len({p.prompt for p in problems}) == len(problems)
        prompts[split] = {p.prompt for p in problems}
    assert prompts["test"] != {p.prompt for p in other_seed.problems("test")}
    warmup = {p.prompt for p in task.warmup_problems(500, seed=3)}
    assert not prompts["test"] & prompts["train"] and not prompts["test"] & warmup and not prompts["ood"] & warmup
    # the ood schema is never seen in train, test or warm-up; every training schema is
    assert {p.data["db_id"] for p in task.problems("ood")} == set(OOD_SCHEMAS)
    for split_prompts in (prompts["train"], prompts["test"], warmup):
        assert not any(re.search(r"\b(ship|port)\(", p) for p in split_prompts)
    assert {p.data["db_id"] for p in task.problems("train")} == set(TRAIN_SCHEMAS)
    assert all(p.prompt.endswith(": ") and " | " in p.prompt for p in task.problems("train"))


def test_fingerprint_tracks_data_not_verifier_limits(tmp_path):
    base = SQLTask(cache_dir=str(tmp_path / "a"), **SMALL).fingerprint()
    json.dumps(base)
    assert base["version"] >= 1 and base["source"] == "embedded"
    assert SQLTask(cache_dir=str(tmp_path / "b"), timeout_s=3.0, **SMALL).fingerprint() == base
    assert SQLTask(cache_dir=str(tmp_path / "a"), seed=2, **SMALL).fingerprint() != base
    assert SQLTask(cache_dir=str(tmp_path / "a"), **{**SMALL, "test_size": 41}).fingerprint() != base


def questions_of_every_template(db: str, task: SQLTask) -> list[Problem]:
    """One problem per template on `db` (parameters drawn at random)."""
    facts = task._embedded()[1][db]
    rng, found = random.Random(0), {}
    while len(found) < len(TEMPLATES):
        params = sample_params(facts, rng)
        found.setdefault(params["t"], params)
    out = []
    for kind, params in sorted(found.items()):
        q = make_question(db, params)
        out.append(Problem(f"{db}/{kind}", q.prompt, {"db_id": db, "db_path": task.databases()[db], "gold": q.gold,
                                                      "ordered": has_top_level_order_by(q.gold), "params": params}))
    return out


@pytest.mark.parametrize("db", sorted(SCHEMAS))
def test_every_equivalent_form_is_correct(task, db):
    for problem in questions_of_every_template(db, task):
        forms = task.solutions(problem)
        assert forms[0] == problem.data["gold"] and len(set(forms)) == len(forms) >= 4, problem.prompt
        for sql in forms:
            score = task.score(problem, sql)
            expected = (1.0, "correct", normalise_sql(sql))
            assert (score.reward, score.status, score.answer) == expected, (problem.prompt, sql)
        demos = task.demonstrations(problem, 4, random.Random(1))
        assert len(demos) == 4 == len(set(demos)) and set(demos) <= set(forms)


def test_forms_cover_the_promised_variations(task):
    text = "\n".join(f for p in task.problems("train") for f in task.solutions(p))
    for needle in (" > ", " < ", "NOT ", "BETWEEN", "JOIN", " IN (SELECT", "EXISTS", " AS ", "COUNT(*)", "COUNT(1)",
                   "ORDER BY", "LIMIT 1", "GROUP BY", "select ", "count(", "DISTINCT"):
        assert needle in text, needle


def test_prompts_and_answers_are_short(task):
    problems = task.problems("train")
    assert statistics.mean(len(p.prompt) for p in problems) < 80 and max(len(p.prompt) for p in problems) < 100
    assert statistics.mean(len(p.data["gold"]) for p in problems) < 55


# --- verifier ------------------------------------------------------------------------------------


def test_extraction_and_normal_form():
    assert extract_sql("SELECT 1;\nthen some text") == ("SELECT 1", False)
    assert extract_sql("\n  SELECT  name FROM emp ;;  ") == ("SELECT  name FROM emp", False)
    assert extract_sql("Here:\n```sql\nSELECT name\nFROM emp;\n```\nDone") == ("SELECT name\nFROM emp", True)
    assert extract_sql("<think>x</think><answer> SELECT 2 </answer>") == ("SELECT 2", True)
    assert extract_sql("   \n") == ("", False)
    assert normalise_sql("SELECT  name\n FROM emp ; ") == "SELECT name FROM emp"


def test_known_wrong_and_invalid_answers(task):
    v = company_rows(task, "SELECT salary FROM emp ORDER BY salary LIMIT 1 OFFSET 5")[0][0]
    problem = company_problem(task, f"SELECT name FROM emp WHERE salary > {v}")
    assert task.score(problem, f"select name from emp where {v} < salary").status == "correct"
    assert task.score(problem, f"SELECT name FROM emp WHERE salary > {v} ORDER BY name DESC").status == "correct"
    for wrong in (f"SELECT name FROM emp WHERE salary >= {v}", f"SELECT id FROM emp WHERE salary > {v}",
                  f"SELECT name, salary FROM emp WHERE salary > {v}",
                  f"SELECT name FROM emp WHERE salary > {v} LIMIT 1",
                  "SELECT name FROM emp", f"SELECT name FROM emp WHERE salary < {v}"):
        score = task.score(problem, wrong)
        assert (score.reward, score.status, score.answer) == (0.0, "wrong", wrong), wrong
    for invalid in ("SELEC name FROM emp", "SELECT nope FROM emp", "SELECT name FROM nowhere", "hello"):
        score = task.score(problem, invalid)
        assert (score.reward, score.status, score.answer) == (0.0, "invalid", invalid), invalid
    assert task.score(problem, "\n") == task.score(problem, "") and task.score(problem, "").answer is None
    duplicates = company_problem(task, "SELECT dept FROM emp")  # rows as a multiset: duplicates count
    assert task.score(duplicates, "SELECT DISTINCT dept FROM emp").status == "wrong"
    assert task.score(duplicates, "SELECT e.dept FROM emp e JOIN dept d ON e.dept = d.id").status == "correct"


def test_ordering_matters_only_when_the_gold_orders(task):
    by_salary = company_rows(task, "SELECT name FROM emp ORDER BY salary DESC")
    assert by_salary != company_rows(task, "SELECT name FROM emp")  # so that the unordered answer is wrong
    ordered = company_problem(task, "SELECT name FROM emp ORDER BY salary DESC")
    assert ordered.data["ordered"]
    assert task.score(ordered, "SELECT name FROM emp ORDER BY -salary").status == "correct"
    assert task.score(ordered, "SELECT name FROM emp ORDER BY salary").status == "wrong"
    assert task.score(ordered, "SELECT name FROM emp").status == "wrong"
    unordered = company_problem(task, "SELECT name FROM emp WHERE id IN (SELECT id FROM emp ORDER BY salary)")
    assert not unordered.data["ordered"]
    assert task.score(unordered, "SELECT name FROM emp ORDER BY name DESC").status == "correct"


def test_top_level_order_by_detection():
    assert has_top_level_order_by("SELECT a FROM t ORDER BY a")
    assert has_top_level_order_by("select a from t order\n  by a limit 3")
    assert has_top_level_order_by("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1")
    assert not has_top_level_order_by("SELECT a FROM (SELECT a FROM t ORDER BY a)")
    assert not has_top_level_order_by("WITH x AS (SELECT a FROM t ORDER BY a LIMIT 2) SELECT a FROM x")
    assert not has_top_level_order_by("SELECT 'order by' FROM t -- order by a")
    assert not has_top_level_order_by('SELECT "order" FROM t WHERE "by" = 1')


def test_results_compare_as_multisets_with_rounded_floats():
    assert results_match([(1,), (2,), (2,)], [(2,), (1,), (2,)], ordered=False)
    assert not results_match([(1,), (2,)], [(2,), (1,)], ordered=True)
    assert not results_match([(1,), (2,)], [(1,), (2,), (2,)], ordered=False)
    assert results_match([(1500, 0.1 + 0.2)], [(1500.0, 0.3)], ordered=True)


@pytest.mark.parametrize("rows, cols, values", [(2, 2, 2), (3, 2, 2), (2, 3, 2), (1, 3, 3), (0, 2, 2)])
@pytest.mark.parametrize("ordered", [False, True])
def test_compare_rules_equal_their_definitions_on_every_small_table(rows, cols, values, ordered):
    """Every pair of tables of this shape: multiset, set and column_permutation against brute force."""
    cells = list(itertools.product(range(values), repeat=cols))
    tables = [list(t) for t in itertools.product(cells, repeat=rows)]
    for pred, gold in itertools.product(tables, repeat=2):
        same = (lambda a, b: a == b) if ordered else (lambda a, b: Counter(a) == Counter(b))
        assert results_match(pred, gold, ordered) is same(pred, gold)
        assert results_match(pred, gold, ordered, "multiset") is same(pred, gold)
        assert results_match(pred, gold, ordered, "set") is (set(pred) == set(gold))
        permuted = any(same([tuple(r[i] for i in p) for r in pred], gold) for p in itertools.permutations(range(cols)))
        assert results_match(pred, gold, ordered, "column_permutation") is permuted, (pred, gold)


def test_column_permutation_gives_up_past_its_budget(monkeypatch):
    gold = [(1, "a", 2.5), (2, "b", 3.5)]
    pred = [(2.5, "a", 1), (3.5, "b", 2)]
    assert results_match(pred, gold, False, "column_permutation") is True
    assert results_match([(1, 2, 3)] * 4, [(3, 2, 1)] * 4, False, "column_permutation") is True
    monkeypatch.setattr(sql_sandbox, "PERMUTATION_ROWS", 1)  # a search that needs more work than this gives up
    assert results_match(pred, gold, False, "column_permutation") is None
    assert results_match(gold, gold, False, "column_permutation") is True  # the identity needs no search


def test_compare_rules_through_score(tmp_path, monkeypatch):
    tasks = {rule: SQLTask(cache_dir=str(tmp_path), compare=rule, **SMALL) for rule in sql_sandbox.COMPARE_RULES}
    cases = [  # gold, prediction, verdict under multiset / set / column_permutation
        ("SELECT name, salary FROM emp", "SELECT salary, name FROM emp", ("wrong", "wrong", "correct")),
        ("SELECT dept FROM emp", "SELECT DISTINCT dept FROM emp", ("wrong", "correct", "wrong")),
        ("SELECT name FROM emp ORDER BY salary DESC", "SELECT name FROM emp", ("wrong", "correct", "wrong")),
        ("SELECT name, age FROM emp ORDER BY salary", "SELECT age, name FROM emp ORDER BY salary",
         ("wrong", "wrong", "correct")),
        ("SELECT name, age FROM emp ORDER BY salary", "SELECT age, name FROM emp ORDER BY age",
         ("wrong", "wrong", "wrong")),
        ("SELECT name FROM emp", "SELECT name FROM emp ORDER BY name", ("correct", "correct", "correct")),
        ("SELECT name FROM emp", "SELECT name, name FROM emp", ("wrong", "wrong", "wrong")),
    ]
    for gold, pred, verdicts in cases:
        for rule, verdict in zip(("multiset", "set", "column_permutation"), verdicts, strict=True):
            problem = company_problem(tasks[rule], gold)
            assert tasks[rule].score(problem, pred).status == verdict, (rule, gold, pred)
    monkeypatch.setattr(sql_sandbox, "PERMUTATION_ROWS", 1)
    score = tasks["column_permutation"].score(company_problem(tasks["multiset"], cases[0][0]), cases[0][1])
    assert (score.status, score.reward) == ("timeout", 0.0)  # the search gave up: counted, never a guess
    with pytest.raises(ValueError, match=r"^task.compare='bird' is not a rule; choose one of \['multiset', 'set', "):
        SQLTask(cache_dir=str(tmp_path), compare="bird", **SMALL)
    assert "compare" not in tasks["multiset"].fingerprint()  # the default: the caches of before
    assert tasks["set"].fingerprint() == {**tasks["multiset"].fingerprint(), "compare": "set"}


INSTRUCT = OmegaConf.load(ROOT / "conf" / "prompt" / "instruct.yaml").prompt.templates.sql


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> SQLTask:
    """The task with the `instruct` (OmniSQL) prompt and a format reward, as real models are asked."""
    return SQLTask(cache_dir=str(tmp_path_factory.mktemp("sql-instruct")), prompt_template=INSTRUCT,
                   format_reward=0.1, timeout_s=0.2, **SMALL)


def real_responses(v: int) -> list[tuple[str, str]]:
    """(response, status) for the question "names of emp with salary > v", as real models write them."""
    right, wrong = f"SELECT name FROM emp WHERE salary > {v}", "SELECT name FROM emp"
    return [
        (f"Let me think step by step.\nThe salaries are in emp.\n```sql\n{right};\n```", "correct"),
        (f"<think>\nFirst try:\n```sql\n{wrong}\n```\nNo, it needs a filter.\n</think>\n```sql\n{right}\n```",
         "correct"),
        (f"<think>\n```sql\n{right}\n```\n</think>\nThe query above answers the question.", "invalid"),  # a draft only
        (f"```sql\n{wrong}\n```\nWait, the question filters by salary:\n```sql\n{right}\n```", "correct"),
        (f"```sql\n{right}\n```\nOr simply:\n```sql\n{wrong}\n```", "wrong"),  # the last block counts
        (f"```python\nimport sqlite3\nrows = conn.execute('{wrong}')\n```\n```sql\n{right}\n```", "correct"),
        (f"```python\nprint('{right}')\n```", "invalid"),  # another language is never SQL
        (f"```bash\nsqlite3 company.sqlite '{right}'\n```", "invalid"),
        (f"```\n{right}\n```", "invalid"),  # untagged: not read (DPH-RL reads ```sql)
        (f"```SQL\n{right}\n```", "correct"),
        (f"```sqlite\n{right}\n```", "correct"),
        (f"```sql {right}```", "correct"),
        (f"```sql\n-- names above {v}\nSELECT name\nFROM emp\nWHERE salary > {v};\n```", "correct"),
        (f"I filter emp by salary.\n<answer>{right}</answer>", "correct"),
        (f"<answer>{wrong}</answer>\n```sql\n{right}\n```", "correct"),  # a fence before a tag
        (f"{right}\nThis selects the names.", "correct"),  # the embedded format: the first line
        (f"To answer this, filter emp.\n{right}", "invalid"),  # prose first, no fence: the first line is prose
    ]


def test_real_model_responses(task, instruct):
    v = company_rows(task, "SELECT salary FROM emp ORDER BY salary LIMIT 1 OFFSET 5")[0][0]
    for t in (task, instruct):
        problem = company_problem(t, f"SELECT name FROM emp WHERE salary > {v}")
        for response, status in real_responses(v):
            assert t.score(problem, response).status == status, response


def test_truncated_responses_count_only_a_closed_fence_or_tag(task, instruct):
    v = company_rows(task, "SELECT salary FROM emp ORDER BY salary LIMIT 1 OFFSET 5")[0][0]
    right, wrong = f"SELECT name FROM emp WHERE salary > {v}", "SELECT name FROM emp"
    cases = [  # response, finished=False under plain (embedded default) / instruct, finished=True
        (f"```sql\n{right}\n```\nThis query selects", "correct", "correct", "correct"),
        (f"```sql\n{right}", "correct", "invalid", "correct"),  # a fence left open: only when the turn ended
        (f"<answer>{right}", "correct", "invalid", "correct"),
        (f"```sql\n{wrong}\n```\nBetter:\n```sql\n{right[:-3]}", "invalid", "wrong", "invalid"),  # the closed one
        (f"{right}\nThis returns the", "correct", "invalid", "correct"),  # the first line: embedded format only
        (right[:-len(str(v))] + "1", "wrong", "invalid", "wrong"),  # the tiny model cut mid-query: as before
        (f"<think>\nThe filter is salary > {v}, so\n```sql\n{right}\n```", "invalid", "invalid", "invalid"),
    ]
    for response, plain, real, done in cases:
        problem = company_problem(task, f"SELECT name FROM emp WHERE salary > {v}")
        assert task.score(problem, response, finished=False).status == plain, response
        assert instruct.score(problem, response, finished=False).status == real, response
        assert instruct.score(problem, response, finished=True).status == done, response


def test_format_reward_only_for_a_marked_wrong_query(instruct):
    problem = company_problem(instruct, "SELECT name FROM emp WHERE salary > 60")
    for response, status, reward in [
        ("```sql\nSELECT name FROM emp WHERE salary > 60\n```", "correct", 1.0),
        ("```sql\nSELECT name FROM emp\n```", "wrong", 0.1),
        ("<answer>SELECT name FROM emp</answer>", "wrong", 0.1),
        ("SELECT name FROM emp", "wrong", 0.0),  # the first line: not the asked-for fence
        ("```sql\nSELECT nope FROM emp\n```", "invalid", 0.0),
        ("```sql\nDELETE FROM emp\n```", "invalid", 0.0),
        ("```sql\nWITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c\n```",
         "timeout", 0.0),
    ]:
        score = instruct.score(problem, response)
        assert (score.status, score.reward) == (status, reward), response
    with pytest.raises(ValueError, match=r"task.format_reward=2"):
        SQLTask(format_reward=2, **SMALL)


def test_a_failing_gold_query_or_database_is_a_verifier_error(task, tmp_path):
    with pytest.raises(VerifierError, match="gold query failed"):
        task.score(company_problem(task, "SELECT nope FROM emp"), "SELECT 1")
    data = {"db_id": "x", "db_path": str(tmp_path / "none.sqlite"), "gold": "SELECT 1", "ordered": False}
    missing = Problem("t/1", "", data)
    with pytest.raises(VerifierError, match="not found"):
        task.score(missing, "SELECT 1")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(VerifierError):
        task.score(Problem("t/2", "", {**missing.data, "db_path": str(garbage)}), "SELECT 1")


# --- sandbox -------------------------------------------------------------------------------------

ATTACKS = {
    # statement: allowed statuses
    "DROP TABLE emp": {"invalid"},
    "DELETE FROM emp": {"invalid"},
    "INSERT INTO emp VALUES (99, 'X', 1, 1, 1)": {"invalid"},
    "UPDATE emp SET salary = 0": {"invalid"},
    "ATTACH DATABASE '{tmp}/attached.db' AS evil": {"invalid"},
    "DETACH DATABASE main": {"invalid"},
    "PRAGMA writable_schema=1": {"invalid"},
    "PRAGMA journal_mode=WAL": {"invalid"},
    "PRAGMA query_only=OFF": {"invalid"},
    "VACUUM INTO '{tmp}/copy.db'": {"invalid"},
    "VACUUM": {"invalid"},
    "SELECT load_extension('x')": {"invalid"},
    "SELECT 1; DROP TABLE emp": {"invalid"},
    "SELECT 1;DELETE FROM emp;": {"invalid"},
    "/* comment */ DROP TABLE emp": {"invalid"},
    "WITH x AS (SELECT 1) DELETE FROM emp": {"invalid"},
    "CREATE TEMP TABLE t AS SELECT * FROM emp": {"invalid"},
    "BEGIN IMMEDIATE": {"invalid"},
    "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r": {"timeout"},
    "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT x FROM r": {"invalid"},  # row cap
    "SELECT count(*) FROM emp a, emp b, emp c, emp d, emp e, emp f, emp g, emp h, emp i": {"timeout"},
    "SELECT randomblob(1000000000)": {"invalid"},
    "SELECT length(zeroblob(1000000000))": {"invalid"},
    "SELECT zeroblob(900000) || zeroblob(900000)": {"invalid"},
    # over the byte budget (60 MB of random bytes: on a loaded machine the 0.2 s time limit may come first)
    "SELECT " + ", ".join(["randomblob(999999)"] * 60): {"invalid", "timeout"},
    "SELECT name FROM emp WHERE name LIKE printf('%.*c', 100000, '%')": {"invalid"},
    "SELECT printf('%.*c', 1000000000, 'x')": {"timeout"},  # one long C call: the worker is killed
}


def test_attacks_score_zero_and_leave_the_database_unchanged(task, tmp_path):
    problem = company_problem(task, "SELECT name FROM emp WHERE salary > 50")
    db = Path(problem.data["db_path"])
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    timeouts_before, kills_before = task.status_counts["timeout"], task.sandbox.kills
    timeouts = 0
    for attack, allowed in ATTACKS.items():
        score = task.score(problem, attack.format(tmp=tmp_path))
        assert score.reward == 0.0 and score.status in allowed, (attack, score)
        timeouts += score.status == "timeout"
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not (tmp_path / "copy.db").exists() and not (tmp_path / "attached.db").exists()
    assert sorted(p.name for p in db.parent.iterdir()) == sorted(f"{name}.sqlite" for name in SCHEMAS)
    assert timeouts >= sum(allowed == {"timeout"} for allowed in ATTACKS.values())
    assert task.status_counts["timeout"] - timeouts_before == timeouts  # every timeout counted
    assert task.sandbox.kills - kills_before >= 1
    assert task.score(problem, "SELECT name FROM emp WHERE salary > 50").status == "correct"  # a fresh worker


def test_in_process_sandbox_enforces_the_limits(task):
    db = task.databases()["company"]
    assert run_query(db, "SELECT count(*) FROM emp").status == "ok"
    assert run_query(db, "DELETE FROM emp").status == "invalid"
    assert run_query(db, "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT max(x) FROM r",
                     timeout_s=0.1).status == "timeout"
    assert run_query(db, "SELECT * FROM emp", max_rows=3).status == "invalid"


def test_gold_results_are_cached_and_the_task_pickles(task):
    problems = task.problems("test")
    for p in problems * 2:
        assert task.score(p, p.data["gold"]).status == "correct"
    cached = {(p.data["db_path"], p.data["gold"]) for p in problems}
    assert cached <= set(task._gold)  # each gold query runs once
    clone = pickle.loads(pickle.dumps(task))
    assert clone.score(problems[0], problems[0].data["gold"]).status == "correct"


# --- real data sets ------------------------------------------------------------------------------


def copy_fixture(name: str, dest: Path) -> Path:
    """Copy a fixture data set and build its .sqlite files from the .sql scripts beside them."""
    root = dest / name
    shutil.copytree(FIXTURES / name, root)
    for script in root.rglob("*.sql"):
        conn = sqlite3.connect(script.with_suffix(".sqlite"))
        conn.executescript(script.read_text())
        conn.close()
    return root


def real_task(source: str, root: Path, **kwargs) -> SQLTask:
    return build_task({"name": "sql", "source": source, "path": str(root), "train_size": None, "test_size": None,
                       **kwargs})


def test_bird_loader(tmp_path):
    root = copy_fixture("bird", tmp_path)
    task = real_task("bird", root)
    assert task.split_names == ("train", "test")
    train, test = task.problems("train"), task.problems("test")
    assert [p.id for p in train] == ["train/0", "train/1", "train/2"] and len(test) == 2
    schema = "schools(CDSCode,School,County,`Free Meal Count`) satscores(cds,AvgScrMath,NumTstTakr)"
    assert train[0].prompt.startswith(schema + " | ")
    assert train[0].prompt.endswith("| How many schools are in Alameda County?: ")
    assert "(evidence: free meal count refers to `Free Meal Count`)" in train[1].prompt
    assert [p.data["ordered"] for p in train] == [False, True, False]
    for p in train + test:
        assert task.score(p, p.data["gold"]).status == "correct"
        assert task.demonstrations(p, 3, random.Random(0)) == [p.data["gold"]]
    assert task.score(train[1], "SELECT School FROM schools WHERE `Free Meal Count` > 100").status == "wrong"
    assert task.score(test[0], "SELECT COUNT(*) FROM cards WHERE rarity = 'rare'").status == "correct"
    assert "evidence" not in real_task("bird", root, evidence=False).problems("train")[1].prompt
    assert len(task.warmup_problems(5, seed=0)) == 5
    subset = real_task("bird", root, train_size=2)
    assert len(subset.problems("train")) == 2
    assert subset.problems("train") == real_task("bird", root, train_size=2).problems("train")


def test_spider_loader(tmp_path):
    root = copy_fixture("spider", tmp_path)
    task = real_task("spider", root)
    train, test = task.problems("train"), task.problems("test")
    assert len(train) == 3 and len(test) == 2
    schema = "singer(Singer_ID,Name,Country,Age) concert(concert_ID,concert_Name,Year)"
    assert train[0].prompt == schema + " | How many singers do we have?: "
    assert {p.data["db_id"] for p in train} == {"concert_mini", "pets_mini"}
    for p in train + test:
        assert task.score(p, p.data["gold"]).status == "correct"
    assert task.score(train[1], "SELECT name, country, age FROM singer ORDER BY age").status == "wrong"
    assert task.score(test[0], "SELECT AVG(Age) FROM singer WHERE Country = 'France'").status == "correct"


def test_real_data_fingerprint_follows_the_questions_file(tmp_path):
    root = copy_fixture("spider", tmp_path)
    before = real_task("spider", root).fingerprint()
    assert before["files"]["train"]["sha256"] and json.dumps(before)
    dev = root / "dev.json"
    dev.write_text(dev.read_text().replace("dog pets", "dog pets please"))
    assert real_task("spider", root).fingerprint() != before


def test_missing_real_data_gives_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task.path=.*no such folder"):
        real_task("bird", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs task.path"):
        build_task({"name": "sql", "source": "spider"})
    (tmp_path / "bird").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        real_task("bird", tmp_path / "bird")
    assert "task.path=" in str(err.value) and "train/train.json" in str(err.value) and "\n" not in str(err.value)
    root = copy_fixture("spider", tmp_path)
    (root / "database" / "pets_mini" / "pets_mini.sqlite").unlink()
    with pytest.raises(FileNotFoundError, match=r"task.path=.*database/pets_mini/pets_mini.sqlite"):
        real_task("spider", root).problems("train")


# --- config --------------------------------------------------------------------------------------


def test_build_from_the_yaml(tmp_path):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg["name"] == "sql" and cfg["source"] == "embedded" and cfg["timeout_s"] == 1.0
    for line in CONFIG.read_text().splitlines():
        if re.match(r"^\w+:", line) and not line.startswith("name:"):
            assert "#" in line, f"uncommented key: {line}"
    task = build_task({**cfg, "cache_dir": str(tmp_path), "train_size": 20, "test_size": 10, "ood_size": 10})
    assert isinstance(task, SQLTask) and task.timeout_s == 1.0 and task.max_rows == 10_000
    problem = task.problems("ood")[0]
    assert task.score(problem, f"```sql\n{problem.data['gold']};\n```").status == "correct"
    with pytest.raises(ValueError, match="task.source"):
        build_task({**cfg, "source": "nope"})
    with pytest.raises(ValueError, match="task.timeout_s"):
        build_task({**cfg, "timeout_s": 0})
    with pytest.raises(KeyError, match="no split"):
        task.problems("dev")


def test_template_count_by_split(task):
    kinds = defaultdict(set)
    for split in task.split_names:
        for p in task.problems(split):
            kinds[split].add(p.data["params"]["t"])
    assert len(kinds["train"]) >= 12 and len(kinds["ood"]) >= 8


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_dph_train_on_sql_with_math_out_of_domain(cache_dir, tmp_path):
    """The paper's setting in miniature: train on sql, evaluate sql/test and math/test (another task
    with its own verifier) from a base model warmed up on both."""
    from conftest import TINY_OVERRIDES, read_jsonl, run_cli, with_overrides

    run_dir = tmp_path / "run"
    overrides = with_overrides(
        TINY_OVERRIDES, "task=sql", f"task.cache_dir={tmp_path / 'sql'}", "task.train_size=200",
        "task.test_size=20", "task.ood_size=20", "divergence=reverse_kl", "logger=none", "device=cpu",
        "eval.splits=[test,math/test]", "optimized_metric=eval/math/test/pass@8", "generation.max_new_tokens=48",
        "model.warmup.batch_size=32",  # long sequences: a smaller warm-up keeps this test short
    )
    result = run_cli([*overrides, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/test/pass@1" in r]
    assert [r["train/step"] for r in evals] == [0, 2]
    for r in evals:
        for split in ("test", "math/test"):
            passk = [r[f"eval/{split}/pass@{k}"] for k in (1, 2, 4, 8)]
            assert all(0 <= p <= 1 for p in passk) and passk == sorted(passk)
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 2 and all(0 <= r["train/status/invalid"] <= 1 for r in train)
    build = json.loads((Path(json.loads((run_dir / "summary.json").read_text())["model_dir"]) / "dph_build.json").read_text())
    assert [t["name"] for t in build["spec"]["tasks"]] == ["sql", "math"]  # warmed up on both
