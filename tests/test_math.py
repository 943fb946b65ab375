"""Math task: the embedded generator, final-answer extraction, the two verifier tiers (exact and
math-verify in a worker), hostile answers, GSM8K / MATH loaders, config, and a dph-train run."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
from fractions import Fraction
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, TINY_OVERRIDES, compose_config, read_jsonl, run_cli, with_overrides
from dph.tasks import Problem, VerifierError, build_task
from dph.tasks.countdown import parse_expression
from dph.tasks.math import MathTask
from dph.tasks.math_answers import MathVerifyWorker, as_rational, extract_final_answer
from dph.tasks.math_embedded import (MAX_SOLUTION_CHARS, OOD_TEMPLATES, TRAIN_TEMPLATES, answer_forms, problem_key,
                                     solution_paths, solutions_of, template_trees)

CONFIG = ROOT / "conf" / "task" / "math.yaml"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "math"
SMALL = {"train_size": 300, "test_size": 60, "ood_size": 60}


def yaml_task(**overrides) -> MathTask:
    """The task of conf/task/math.yaml (its verifier limits), with some keys replaced."""
    return build_task({**OmegaConf.to_container(OmegaConf.load(CONFIG)), **overrides})


@pytest.fixture(scope="module")
def task() -> MathTask:
    task = yaml_task(**SMALL)
    yield task
    task.close()


def problem(gold: str) -> Problem:
    return Problem("t/0", "", {"answer": gold})


# --- the embedded generator ----------------------------------------------------------------------


def test_splits_are_deterministic_disjoint_and_held_out_splits_ignore_train_size(task):
    again, other_seed = MathTask(**SMALL), MathTask(seed=1, **SMALL)
    bigger_train = MathTask(**{**SMALL, "train_size": 600})
    assert task.split_names == ("train", "test", "ood")
    keys = {}
    for split in task.split_names:
        problems = task.problems(split)
        assert len(problems) == SMALL[f"{split}_size"]
        assert problems == again.problems(split)
        assert [p.data for p in problems] == [p.data for p in again.problems(split)]
        assert [p.prompt for p in problems] != [p.prompt for p in other_seed.problems(split)]
        keys[split] = [problem_key(p.data["template"], p.data["params"]) for p in problems]
        assert len(set(keys[split])) == len(problems)  # no problem twice in a split
        assert all(len(p.prompt) <= 64 for p in problems)
        json.dumps([p.data for p in problems])
    assert not set(keys["train"]) & set(keys["test"])
    assert {p.data["template"] for p in task.problems("train")} == {t.name for t in TRAIN_TEMPLATES}
    assert {p.data["template"] for p in task.problems("test")} == {t.name for t in TRAIN_TEMPLATES}
    assert {p.data["template"] for p in task.problems("ood")} == {t.name for t in OOD_TEMPLATES}
    for split in ("test", "ood"):
        assert bigger_train.problems(split) == task.problems(split)


def test_warmup_problems_avoid_the_held_out_splits(task):
    warmup = task.warmup_problems(1500, seed=0)
    assert len(warmup) == 1500 and warmup == task.warmup_problems(1500, seed=0)
    assert warmup != task.warmup_problems(1500, seed=1)
    keys = {problem_key(p.data["template"], p.data["params"]) for p in warmup}
    assert len(keys) < len(warmup)  # repeats allowed
    assert not keys & {problem_key(p.data["template"], p.data["params"]) for p in task.problems("test")}
    assert {p.data["template"] for p in warmup} == {t.name for t in TRAIN_TEMPLATES}  # never an ood template


def test_every_solution_path_computes_the_gold_answer():
    rng = random.Random(0)
    for template in TRAIN_TEMPLATES + OOD_TEMPLATES:
        for _ in range(40):
            params = template.sample(rng)
            trees = template_trees(template.name, params)
            assert len({t.value for t in trees}) == 1
            paths = solution_paths(trees)
            assert len(paths) >= 2, (template.name, paths)
            for path in paths:  # "3*4=12, 12-5=7" and "3*4-5=12-5=7": every equation holds
                for step in path.split(", "):
                    assert len({parse_expression(side)[0] for side in step.split("=")}) == 1, path
                assert as_rational(extract_final_answer(path)[0]) == trees[0].value, path


def test_solutions_have_several_paths_and_answer_forms(task):
    value = Fraction(5, 4)
    assert answer_forms(value) == ["5/4", "\\frac{5}{4}", "1.25"] and answer_forms(Fraction(7)) == ["7"]
    found = solutions_of(template_trees("share", {"a": 3, "b": 2, "n": 4}))
    assert {"(3+2)/4=5/4", "3/4+2/4=5/4", "2/4=1/2, 3/4+1/2=5/4"} <= set(solution_paths(
        template_trees("share", {"a": 3, "b": 2, "n": 4})))
    for ending in ("", ". \\boxed{5/4}", ". \\boxed{\\frac{5}{4}}", ". #### 1.25"):
        assert any(s.endswith("=5/4" + ending) for s in found), ending
    for p in task.problems("train")[:100]:
        solutions = task.solutions(p)
        assert len(solutions) >= 4 and all(len(s) <= MAX_SOLUTION_CHARS for s in solutions)
        demos = task.demonstrations(p, 4, random.Random(0))
        assert len(set(demos)) == 4 and set(demos) <= set(solutions)
        assert demos == task.demonstrations(p, 4, random.Random(0))
        assert all(task.score(p, s).status == "correct" for s in demos)
    assert task.verifier_counts["exact"] >= 400 and not any(k.startswith("math_verify") for k in task.verifier_counts)


# --- final answers and the verifier --------------------------------------------------------------


@pytest.mark.parametrize(("response", "final", "marked"), [
    ("so the answer is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", True),
    ("\\boxed{1} then \\fbox{ 2 }", "2", True),
    ("\\boxed{x^{2}} and more text 7", "x^{2}", True),
    ("\\boxed{3", None, True),  # an unclosed last box is invalid, even with numbers before it
    ("Step 1: 5. #### 1,000 dollars\n(check 7)", "1,000", True),
    ("####", None, True),
    ("3*4=12, 12-5=7", "7", False),
    ("3/4+1/2=5/4", "5/4", False),
    ("x = -2.5.", "-2.5", False),
    ("12-5", "5", False),  # a minus after a digit is an operator
    ("in 2024abc", None, False),
    ("it is \\frac{1}{2}", "\\frac{1}{2}", False),
    ("no numbers", None, False),
    ("", None, False),
])
def test_final_answer_extraction(response, final, marked):
    assert extract_final_answer(response) == (final, marked)


def test_equivalent_forms_are_correct_and_others_wrong(task):
    cases = {
        "3/4": (["0.75", "\\boxed{\\frac{3}{4}}", "#### 0.75", "so 3/4", "\\boxed{\\dfrac{3}{4}}", "\\boxed{6/8}",
                 "\\boxed{\\frac34}", "\\boxed{0.750}"],
                ["0.7", "\\boxed{4/3}", "#### 3", "3/5", "\\boxed{3/4 + 1}"]),
        "1000": (["1,000", "#### 1000", "\\boxed{1{,}000}", "\\boxed{10^3}"], ["100", "\\boxed{1000.5}"]),
        "-6": (["#### -6", "\\boxed{-6}", "4-10=-6"], ["4-10=6", "\\boxed{6}"]),
        "\\frac{\\sqrt{3}}{2}": (["\\boxed{\\sqrt{3}/2}", "\\boxed{\\frac{1}{2}\\sqrt{3}}"], ["\\boxed{\\sqrt{2}/2}"]),
        "(3, \\infty)": (["\\boxed{(3,\\infty)}"], ["\\boxed{[3, \\infty)}"]),
    }
    for gold, (right, wrong) in cases.items():
        for response in right:
            assert task.score(problem(gold), response).reward == 1.0, (gold, response)
        for response in wrong:
            score = task.score(problem(gold), response)
            assert score.reward == 0.0 and score.status == "wrong", (gold, response)
    score = task.score(problem("7"), "3*4 = 12,\n 12-5=7")
    assert score.answer == "3*4 = 12, 12-5=7"  # the whole response, whitespace collapsed
    assert task.verifier_counts["exact"] > 0 and task.verifier_counts["math_verify/correct"] > 0


# Each must be scored 0 quickly, never raise. Some reach math-verify and time out there (counted).
HOSTILE = [
    "9" * 100_000,
    "{" * 10_000 + "1" + "}" * 10_000,
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "\\frac{",
    "\\boxed{\\frac{3}{",
    "\\boxed{",
    "\\boxed{}",
    "".join(chr(random.Random(0).randrange(1, 0x10FFFF)) for _ in range(2000)).replace("\\", ""),
    "\x00\x00\\boxed{\x001\x00}",
    "\\boxed{1e999999}",
    "\\boxed{9^9^9^9}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{9^{99999999}}",
    "\\boxed{99999999!}",
    "\\boxed{\ud800}",  # a lone surrogate
    "\\boxed{\u0663/\u0664}",  # Arabic-Indic digits are not numbers here
    "#### " + "1" * 5000,
    "\\boxed{" + "x" * 99 + "}",
    "1/" * 1000 + "0",
]


@pytest.mark.parametrize("max_response_chars", [None, 300_000])
def test_hostile_answers_score_zero(task, max_response_chars):
    hostile = task if max_response_chars is None else yaml_task(**SMALL, max_response_chars=max_response_chars)
    try:
        hostile.score(problem("3/4"), "\\boxed{\\sqrt{1}}")  # start the worker
        before = sum(hostile.status_counts.values())
        kills, crashes = hostile.worker.kills, hostile.worker.crashes
        for response in HOSTILE:
            score = hostile.score(problem("3/4"), response)
            assert score.reward == 0.0 and score.status in ("invalid", "wrong", "timeout"), (response[:40], score)
        assert sum(hostile.status_counts.values()) == before + len(HOSTILE)
        assert hostile.verifier_counts["math_verify/timeout"] >= 2  # 10^{10^{10}}, 9^{99999999}, ...
        assert (hostile.worker.kills, hostile.worker.crashes) == (kills, crashes)  # the worker's own timer stopped them
    finally:
        if hostile is not task:
            hostile.close()


def test_math_verify_timeouts_and_worker_failures_are_counted_not_raised(task):
    counts = dict(task.status_counts)
    assert task.score(problem("3/4"), "\\boxed{10^{10^{10}}}").status == "timeout"
    assert task.status_counts["timeout"] == counts.get("timeout", 0) + 1
    # A worker that died (e.g. out of memory): the answer is invalid, counted, and a new worker starts.
    task.worker._proc.kill()
    task.worker._proc.wait()
    assert task.score(problem("3/4"), "\\boxed{\\sqrt{9}/4}").status == "invalid"
    assert task.verifier_counts["math_verify/crash"] == 1 and task.worker.crashes == 1
    assert task.score(problem("3/4"), "\\boxed{\\sqrt{9}/4}").status == "correct"


def test_a_stuck_worker_is_killed_and_replaced():
    worker = MathVerifyWorker()
    try:
        assert worker.compare("1", "1", 1.0) == ("correct", "")
        os.kill(worker._proc.pid, signal.SIGSTOP)  # stuck where its own timer cannot stop it
        status, _ = worker.compare("1", "\\sqrt{1}", 0.1)
        assert status == "killed" and worker.kills == 1
        assert worker.compare("1", "\\sqrt{1}", 1.0) == ("correct", "")
    finally:
        worker.close()


def test_a_gold_answer_math_verify_cannot_read_is_a_verifier_error(task):
    with pytest.raises(VerifierError, match="gold answer"):
        task.score(problem("\\text{}"), "\\boxed{x}")
    with pytest.raises(VerifierError, match="not a str"):
        task.score(problem("1"), None)


def test_the_task_pickles_with_its_counts(task):
    task.score(problem("\\frac{\\sqrt{3}}{2}"), "\\boxed{\\sqrt{3}/2}")  # the worker is running
    clone = pickle.loads(pickle.dumps(task))
    assert clone.status_counts == task.status_counts and clone.problems("test") == task.problems("test")
    assert clone.score(problem("\\frac{\\sqrt{3}}{2}"), "\\boxed{\\frac{\\sqrt 3}{2}}").status == "correct"
    assert clone.worker._proc is not task.worker._proc
    clone.close()
    assert task.score(problem("\\frac{\\sqrt{3}}{2}"), "\\boxed{\\sqrt{3}/2}").status == "correct"


def test_fingerprint_tracks_the_problems_not_the_time_limit():
    base = MathTask(**SMALL).fingerprint()
    assert json.dumps(base) and base["version"] >= 1
    assert MathTask(**SMALL, timeout_s=3.0).fingerprint() == base
    assert MathTask(**SMALL, seed=1).fingerprint() != base
    assert MathTask(**{**SMALL, "test_size": 61}).fingerprint() != base
    assert MathTask(**SMALL, prompt_template="Q: {question}\nA: ").fingerprint() != base


# --- real data -----------------------------------------------------------------------------------


def real_task(source: str, path, **kwargs) -> MathTask:
    return build_task({"name": "math", "source": source, "path": path if isinstance(path, dict) else str(path),
                       "train_size": None, "test_size": None, **kwargs})


def test_gsm8k_loader(tmp_path):
    task = real_task("gsm8k", FIXTURES / "gsm8k")
    try:
        assert task.split_names == ("train", "test")
        train, test = task.problems("train"), task.problems("test")
        assert [p.id for p in train] == ["train/0", "train/1", "train/2"] and len(test) == 2
        assert [p.data["answer"] for p in train] == ["36", "1200", "1.25"]
        assert train[0].prompt == "Lena picks 24 apples on Monday and half as many on Tuesday. How many apples " \
                                  "does she pick in total? "
        demo = task.demonstrations(train[1], 3, random.Random(0))
        assert demo == ["The school buys 30*40 = 1,200 pencils.\n#### 1200"]  # no <<calculator>> notes
        for p in train + test:
            assert [task.score(p, s).status for s in task.demonstrations(p, 1, random.Random(0))] == ["correct"]
        assert task.score(test[1], "It is 4-10=-6 degrees. #### -6").status == "correct"
        assert task.score(test[1], "#### 6").status == "wrong"
        assert task.score(train[2], "#### 5/4").status == "correct"
        warmup = task.warmup_problems(5, seed=0)
        assert len(warmup) == 5 and {p.id for p in warmup} <= {p.id for p in train}
        subset = real_task("gsm8k", FIXTURES / "gsm8k", train_size=2)
        assert len(subset.problems("train")) == 2
        assert subset.problems("train") == real_task("gsm8k", FIXTURES / "gsm8k", train_size=2).problems("train")
    finally:
        task.close()


def test_math_loader_and_a_parquet_copy(tmp_path):
    task = real_task("math", FIXTURES / "math")
    try:
        train, test = task.problems("train"), task.problems("test")
        assert [p.data["answer"] for p in train] == ["\\frac{\\sqrt{3}}{2}", "10", "\\frac{1}{2}"]
        assert [p.data["answer"] for p in test] == ["-2, 2", "(3, \\infty)"]
        # The solution is cut after its boxed answer, or gets the answer field boxed at its end.
        assert train[2].data["solution"] == "Subtracting 3 gives $2x = 1$, so $x = \\boxed{\\frac{1}{2}}"
        assert test[1].data["solution"] == "The answer is $(3, \\infty)$. \\boxed{(3, \\infty)}"
        for p in train + test:
            assert [task.score(p, s).status for s in task.demonstrations(p, 2, random.Random(0))] == ["correct"]
        assert task.score(train[0], "so \\boxed{\\frac{\\sqrt 3}{2}}").status == "correct"
        assert task.score(test[0], "\\boxed{2, -2}").status == "correct"
        assert task.score(test[0], "\\boxed{2}").status == "wrong"
        assert task.score(train[1], "it is 10").status == "correct"
    finally:
        task.close()

    import pyarrow as pa
    import pyarrow.parquet as pq

    records = json.loads((FIXTURES / "math" / "train.json").read_text())
    folder = tmp_path / "hf"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(records[:2]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(records[2:]), folder / "train-00001-of-00002.parquet")
    shutil.copy(FIXTURES / "math" / "test.jsonl", folder / "test.jsonl")
    from_parquet = real_task("math", folder)
    assert [p.data for p in from_parquet.problems("train")] == [p.data for p in train]
    assert from_parquet.fingerprint()["files"]["train"][1]["file"] == "train-00001-of-00002.parquet"
    only_test = real_task("math", {"test": str(folder / "test.jsonl")})
    assert only_test.split_names == ("test",) and only_test.warmup_problems(3, seed=0) == []


def test_real_data_fingerprint_follows_the_files(tmp_path):
    root = tmp_path / "gsm8k"
    shutil.copytree(FIXTURES / "gsm8k", root)
    before = real_task("gsm8k", root).fingerprint()
    assert before["files"]["test"][0]["sha256"] and json.dumps(before)
    test_file = root / "test.jsonl"
    test_file.write_text(test_file.read_text().replace("#### 180", "#### 181"))
    assert real_task("gsm8k", root).fingerprint() != before


def test_bad_config_and_missing_data_give_one_line_errors(tmp_path):
    def one_line(error_type, match, **cfg):
        with pytest.raises(error_type, match=match) as info:
            build_task({"name": "math", **cfg})
        assert "\n" not in str(info.value)

    one_line(ValueError, r"task.source='nope' is not known", source="nope")
    one_line(ValueError, r"task.source=gsm8k needs task.path", source="gsm8k")
    one_line(FileNotFoundError, r"task.path=.*nowhere: no such folder", source="gsm8k", path=str(tmp_path / "nowhere"))
    one_line(FileNotFoundError, r"task.path=.*no train.jsonl or test.jsonl", source="math", path=str(tmp_path))
    one_line(FileNotFoundError, r"task.path.test=.*no such file", source="math",
             path={"test": str(tmp_path / "x.jsonl")})
    one_line(ValueError, r"task.path maps splits \['dev'\]", source="math", path={"dev": "x.jsonl"})
    one_line(ValueError, r"task.train_size=-1", train_size=-1)
    one_line(ValueError, r"task.test_size=null \(all\) is for real data", test_size=None)
    one_line(ValueError, r"task.timeout_s=0", timeout_s=0)
    one_line(ValueError, r"task.max_answer_chars", max_answer_chars=0)
    one_line(ValueError, r"task.prompt_template .*unknown field \{q\}.*the fields of math are \{question\}",
             prompt_template="{q} ")
    one_line(ValueError, r"task.train_size=100000: math found only", train_size=100_000)
    (tmp_path / "train.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    one_line(ValueError, r"record 0 of .*train.jsonl: its answer does not end with '#### ", source="gsm8k",
             path=str(tmp_path))
    (tmp_path / "train.jsonl").write_text('{"problem": "1+1?"}\n')
    one_line(ValueError, r"record 0 of .*train.jsonl: it lacks a text 'problem' or 'solution'", source="math",
             path=str(tmp_path))
    (tmp_path / "train.jsonl").write_text('{"problem": "1+1?", "solution": "It is 2."}\n')
    one_line(ValueError, r"record 0 of .*: it has no 'answer' and its solution no closed", source="math",
             path=str(tmp_path))
    (tmp_path / "train.jsonl").write_text("{not json\n")
    one_line(ValueError, r"task.path: cannot read .*train.jsonl \(JSONDecodeError", source="math", path=str(tmp_path))
    (tmp_path / "train.json").write_text("[]")
    one_line(ValueError, r"several files hold the train split \(train.json, train.jsonl\)", source="math",
             path=str(tmp_path))


def test_the_yaml_builds_the_embedded_task():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg["name"] == "math" and cfg["source"] == "embedded"
    for line in CONFIG.read_text().splitlines():
        if re.match(r"^\w+:", line) and not line.startswith("name:"):
            assert "#" in line, f"uncommented key: {line}"
    task = yaml_task(**SMALL)
    longest = max(len(s) for split in ("train", "test", "ood") for p in task.problems(split) for s in task.solutions(p))
    assert longest + 1 <= cfg["response_tokens"]  # every demonstration and its eos fit (one token per character)
    assert max(len(p.prompt) for split in task.split_names for p in task.problems(split)) <= 64
    with pytest.raises(KeyError, match="no split"):
        task.problems("dev")


# --- what real models write ----------------------------------------------------------------------

INSTRUCT = OmegaConf.load(ROOT / "conf" / "prompt" / "instruct.yaml").prompt.templates.math


@pytest.fixture(scope="module")
def gsm8k() -> MathTask:
    """Real data (the GSM8K fixture) with a format reward; test problem 0's answer is 180."""
    task = real_task("gsm8k", FIXTURES / "gsm8k", format_reward=0.1)
    assert task.problems("test")[0].data["answer"] == "180"
    yield task
    task.close()


@pytest.mark.parametrize("response, status", [
    ("<think>\nThe train goes 60 miles each hour. Maybe \\boxed{120}? No, it runs 3 hours.\n60*3 = 180\n</think>\n"
     "It travels 60 \\times 3 = 180 miles.\n\n\\boxed{180}", "correct"),  # DeepSeek-R1 style
    ("<think>\nSo \\boxed{120}.\n</think>\nIt travels 180 miles.", "correct"),  # a box inside <think> is a draft
    ("Step 1: the speed is 60 mph.\nStep 2: the time is 3 h.\nStep 3: 60 \\times 3 = 180.\n\n"
     "The final answer is $\\boxed{180}$.", "correct"),  # Qwen-math style
    ("It travels 60*3 = 180 miles.\n#### 180", "correct"),  # GSM8K style
    ("It travels 60*3 = 180 miles.\n#### 180 miles", "correct"),
    ("\\boxed{180}. Let me double check: 60+60+60 = 180, and 2 more checks.", "correct"),  # the box wins
    ("First guess: \\boxed{120}\nWait, 3 hours: \\boxed{180}", "correct"),  # a draft box then the final one
    ("\\boxed{180}\nHmm, actually \\boxed{120}", "wrong"),  # the last box counts even when worse
    ("The answer is 180 miles, not 200.", "wrong"),  # no box, no ####: the last number (the stated rule)
    ("<think>\n60*3 = 180, so \\boxed{180}", "invalid"),  # never left <think>: nothing final
    ("", "invalid"),
])
def test_reasoning_responses(gsm8k, response, status):
    assert gsm8k.score(gsm8k.problems("test")[0], response).status == status


@pytest.mark.parametrize("response, status", [
    ("It travels 60*3 = 180 miles. \\boxed{180}. Let me verify: 60 * 3 = ", "correct"),  # a closed box counts
    ("Step 1: 60 * 3 = 180. Step 2: 180 + ", "invalid"),  # no final answer: the last number is not read
    ("It travels 60*3 = 180 miles.\n#### 180\nThat is", "correct"),
    ("It travels 60*3 = 180 miles.\n#### 180", "invalid"),  # the #### line may have been cut (1800?)
    ("It travels \\boxed{18", "invalid"),
])
def test_truncated_responses_count_only_a_complete_final_answer(gsm8k, response, status):
    assert gsm8k.score(gsm8k.problems("test")[0], response, finished=False).status == status


def test_the_embedded_default_reads_truncated_responses_as_before(task):
    """The issue's example: a cut-off "Step 1: 48/2 = 24. Step 2: 24 + " is no answer (invalid) for
    any other prompt or data; in the embedded default (the tiny model's one-line answers) it reads 24
    as before, whatever `finished` says."""
    response, cut = "Step 1: 48/2 = 24. Step 2: 24 + ", "3*4=12, 12-5=7, 7+1=8, 8+"
    instruct = MathTask(**SMALL, prompt_template=INSTRUCT)
    for t, expected in ((task, ("correct", "wrong")), (instruct, ("invalid", "invalid"))):
        assert (t.score(problem("24"), response, finished=False).status,
                t.score(problem("7"), cut, finished=False).status) == expected
        assert t.score(problem("24"), response).status == "correct"  # finished: the last number, as before
    instruct.close()


def test_format_reward_only_for_a_marked_wrong_answer(gsm8k):
    p = gsm8k.problems("test")[0]
    for response, status, reward in [
        ("\\boxed{180}", "correct", 1.0),
        ("It is 60+3 = 63. \\boxed{63}", "wrong", 0.1),
        ("It is 60+3 = 63.\n#### 63", "wrong", 0.1),
        ("It is 60+3 = 63.", "wrong", 0.0),  # the last number: not the asked-for format
        ("\\boxed{}", "invalid", 0.0),
        ("\\boxed{3", "invalid", 0.0),
    ]:
        score = gsm8k.score(p, response)
        assert (score.status, score.reward) == (status, reward), response
    with pytest.raises(ValueError, match=r"task.format_reward=1 must be a number in \[0, 1\)"):
        MathTask(**SMALL, format_reward=1)


def test_distinct_correct_answers_are_computation_paths_on_real_data(gsm8k, task):
    """Real data: Score.answer is the numbers a solution writes, in order (its computation), so two
    wordings of one computation are one answer and another computation is another; embedded data:
    the whole response (whitespace collapsed), as before."""
    p = gsm8k.problems("test")[0]
    answers = [gsm8k.score(p, r).answer for r in (
        "It travels 60*3 = 180 miles.\n#### 180",
        "Each hour adds 60 miles; over 3 hours that is 60 * 3 = 180 miles.\n#### 180",
        "<think>\nHmm, 1 hour is 60 miles, 2 hours 120.\n</think>\nIt travels 60*3 = 180 miles. \\boxed{180}",
        "60 + 60 + 60 = 180\n#### 180",
        "It travels 3*60 = 180 miles.\n#### 180",
    )]
    assert answers == ["60 3 180", "60 3 180", "60 3 180", "60 180", "3 60 180"]
    assert task.score(problem("7"), "3*4=12,  12-5=7").answer == "3*4=12, 12-5=7"


# --- dph-train -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_short_math_run_logs_pass_at_k(tmp_path):
    run_dir = tmp_path / "run"
    overrides = with_overrides(
        TINY_OVERRIDES, "task=math", "task.train_size=50", "divergence=reverse_kl", "model.warmup.steps=5",
        "model.warmup.batch_size=16", "model.warmup.problems=100", "logger=none", "device=cpu", "eval.splits=[test]",
        "eval.n=4", "optimized_metric=eval/test/pass@4", f"paths.cache_dir={tmp_path / 'cache'}",
    )
    result = run_cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval/test/pass@1" in r]
    trains = [r for r in records if "train/reward_mean" in r]
    assert [r["train/step"] for r in evals] == [0, 2] and [r["train/step"] for r in trains] == [1, 2]
    for r in evals:
        passk = [r[f"eval/test/pass@{k}"] for k in (1, 2, 4)]
        assert all(0 <= p <= 1 for p in passk) and passk == sorted(passk)
    assert all(0 <= r["train/reward_mean"] <= 1 for r in trains)
    assert all(1 <= r["train/response_length"] <= 16 for r in trains)  # generation.max_new_tokens=16


def test_the_response_length_defaults_to_the_tasks():
    assert compose_config(["task=math"], hydra=False).generation.max_new_tokens == 64  # task.response_tokens
