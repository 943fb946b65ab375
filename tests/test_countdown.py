"""Countdown: generation, verifier (including hostile input), solver completeness, demonstrations."""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from fractions import Fraction
from itertools import permutations, product
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dph.tasks import RUN_KEYS, Problem, VerifierError, build_task
from dph.tasks.countdown import (
    VERSION,
    Countdown,
    InvalidExpression,
    _expressions,
    _solutions,
    parse_expression,
    solutions,
)

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "task" / "countdown.yaml"


def config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG))


def small_config(seed: int = 0) -> dict:
    cfg = config()
    cfg["seed"] = seed
    for spec in cfg["splits"].values():
        spec["size"] = 40
    return cfg


@pytest.fixture(scope="module")
def task() -> Countdown:
    return build_task(config())


def problem(numbers: list[int], target: int) -> Problem:
    return Problem(id="t/0", prompt="", data={"numbers": numbers, "target": target})


def contents(problems: list[Problem]) -> list[tuple[str, str, dict]]:
    return [(p.id, p.prompt, p.data) for p in problems]


def keys(problems: list[Problem]) -> list[tuple[tuple[int, ...], int]]:
    return [(tuple(sorted(p.data["numbers"])), p.data["target"]) for p in problems]


# --- generation --------------------------------------------------------------------------------


def test_build_from_yaml_and_splits(task):
    cfg = config()
    assert isinstance(task, Countdown) and task.split_names == ("train", "test", "ood")
    fresh = build_task(cfg)
    generated = {split: fresh.problems(split) for split in fresh.split_names}
    for split, problems in generated.items():
        spec = cfg["splits"][split]
        assert len(problems) == spec["size"]
        assert [p.id for p in problems] == [f"{split}/{i}" for i in range(spec["size"])]
        for p in problems:
            numbers, target = p.data["numbers"], p.data["target"]
            assert len(numbers) == spec["numbers_per_problem"]
            assert all(1 <= x <= spec["max_number"] for x in numbers)
            assert spec["target_min"] <= target <= spec["target_max"] and isinstance(target, int)
            assert fresh.solution_count(p) >= cfg["min_solutions"]
            assert p.prompt == f"{' '.join(map(str, numbers))} -> {target}: " and len(p.prompt) <= 24
    assert contents(generated["train"]) == contents(task.problems("train"))


def test_splits_are_disjoint_and_without_repeats(task):
    split_keys = {split: keys(task.problems(split)) for split in task.split_names}
    for split, found in split_keys.items():
        assert len(set(found)) == len(found), split
    names = list(split_keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(split_keys[a]) & set(split_keys[b]), (a, b)


def test_generation_is_deterministic_per_seed():
    first, again, other = (build_task(small_config(seed)) for seed in (0, 0, 1))
    for split in first.split_names:
        assert contents(first.problems(split)) == contents(again.problems(split))
        assert contents(first.problems(split)) != contents(other.problems(split))
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()


def test_held_out_splits_do_not_depend_on_train_size():
    cfg = small_config()
    cfg["splits"]["train"]["size"] = 5
    smaller = build_task(cfg)
    default = build_task(small_config())
    for split in ("test", "ood"):
        assert contents(smaller.problems(split)) == contents(default.problems(split))


def test_warmup_problems_mix_distributions_and_avoid_held_out_splits(task):
    warmup = task.warmup_problems(300, seed=0)
    assert len(warmup) == 300 and len(set(keys(warmup))) == 300
    assert {len(p.data["numbers"]) for p in warmup} == {3, 4}
    held_out = set(keys(task.problems("test"))) | set(keys(task.problems("ood")))
    assert not set(keys(warmup)) & held_out
    assert [p.data for p in task.warmup_problems(300, seed=0)] == [p.data for p in warmup]
    assert [p.data for p in task.warmup_problems(300, seed=1)] != [p.data for p in warmup]


def test_fingerprint_has_every_kwarg_and_version(task):
    """Every key that shapes the problems; not format_reward (rewards, not data); the template null
    in the yaml (the prompt preset's) is the plain one when the task is built on its own."""
    fingerprint = task.fingerprint()
    cfg = {k: v for k, v in config().items() if k not in RUN_KEYS or k == "name"}  # the task's own keys
    assert cfg.pop("format_reward") == 0.0 and "format_reward" not in fingerprint
    assert cfg["prompt_template"] is None and fingerprint["prompt_template"] == "{numbers} -> {target}: "
    cfg["prompt_template"] = fingerprint["prompt_template"]
    assert fingerprint["version"] == VERSION and fingerprint["name"] == "countdown"
    assert {k: fingerprint[k] for k in cfg} == cfg
    json.dumps(fingerprint)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["splits"]["train"].pop("size"), "task.splits.train must have exactly the keys"),
        (lambda c: c["splits"]["ood"].update(target_min=600), "target_min <= target_max"),
        (lambda c: c["splits"]["test"].update(numbers_per_problem=9), "numbers_per_problem=9"),
        (lambda c: c.update(prompt_template="{nums} = {target}"), "task.prompt_template"),
        (lambda c: c.update(warmup_splits=["valid"]), "task.warmup_splits"),
        (lambda c: c["splits"].pop("train"), "must include 'train'"),
    ],
)
def test_bad_config_fails_with_a_message_naming_the_key(change, message):
    cfg = config()
    change(cfg)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_task(cfg)


def test_impossible_split_fails_loudly():
    cfg = small_config()
    cfg["splits"]["test"].update(size=50, max_number=2, target_min=10, target_max=12)
    with pytest.raises(ValueError, match="found only"):
        build_task(cfg).problems("test")


# --- verifier ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "numbers, target, response, status, answer",
    [
        ([3, 5, 7], 22, "3*5+7", "correct", "3*5+7"),
        ([3, 5, 7], 22, "7+5*3", "correct", "7+5*3"),
        ([3, 5, 7], 22, "  3 * 5\t+ 7  ", "correct", "3*5+7"),
        ([3, 5, 7], 22, "(3*5)+7", "correct", "(3*5)+7"),
        ([3, 5, 7], 22, "3*5+7 = 22", "correct", "3*5+7"),
        ([3, 5, 7], 22, "<answer> 3*5+7 </answer> trailing text", "correct", "3*5+7"),
        ([3, 5, 7], 22, "3*5+7\n1+1 garbage on later lines", "correct", "3*5+7"),
        ([1, 3, 4, 6], 24, "6/(1-3/4)", "correct", "6/(1-3/4)"),  # the intermediate 1/4 is exact
        ([2, 2, 3], 3, "3/2*2", "correct", "3/2*2"),
        ([3, 5, 7], 22, "3+5+7", "wrong", "3+5+7"),
        ([3, 5, 7], 22, "3*5+7 = 23", "wrong", "3*5+7"),
        ([3, 5, 7], 22, "3*5+7=", "invalid", "3*5+7"),
        ([3, 5, 7], 22, "3*5+7 = x", "invalid", "3*5+7"),
        ([3, 5, 7], 22, "3*5+3", "invalid", "3*5+3"),  # 3 reused, 7 missing
        ([3, 5, 7], 22, "3*5+7+7-7", "invalid", "3*5+7+7-7"),  # a number reused
        ([3, 5, 7], 15, "3*5", "invalid", "3*5"),  # a number missing
        ([3, 5, 7], 22, "3*5+7*1", "invalid", "3*5+7*1"),  # a number not given
        ([3, 3, 5], 5, "5/(3-3)", "invalid", "5/(3-3)"),  # division by zero
        ([3, 5, 7], -1, "-3+5-7+4", "invalid", "-3+5-7+4"),  # no unary minus
        ([3, 5, 7], 22, "03*5+7", "invalid", "03*5+7"),  # no leading zeros
        ([3, 5, 7], 22, "3*5+7)", "invalid", "3*5+7)"),
        ([3, 5, 7], 22, "(3*5+7", "invalid", "(3*5+7"),
        ([3, 5, 7], 22, "3 5 7", "invalid", "357"),
        ([3, 5, 7], 22, "", "invalid", None),
        ([3, 5, 7], 22, "\n3*5+7", "invalid", None),
        ([3, 5, 7], 22, "<answer>3*5+7", "invalid", None),
    ],
)
def test_score(task, numbers, target, response, status, answer):
    score = task.score(problem(numbers, target), response)
    assert (score.status, score.answer, score.reward) == (status, answer, 1.0 if status == "correct" else 0.0)


HOSTILE = [
    "1" * 100_000,
    "(" * 10_000 + "3+5+7" + ")" * 10_000,
    "(" * 40 + "3*5+7" + ")" * 40,  # short enough, but nested deeper than the bound
    "9" * 5000,
    "3*5+7 = " + "9" * 5000,
    "999999*999999*999999*999999*999999*999999+3+5+7",
    "__import__('os').system('x')",
    "2**999999",
    "３*5+7",
    "3*5+\x007",
    "<answer>" * 20_000,
    "<answer>" + "(" * 50_000,
    "3" + "+3" * 50_000,
    "\u202e3*5+7",
    "+" * 99,
]


def test_hostile_inputs_score_zero(task):
    target = problem([3, 5, 7], 22)
    for response in HOSTILE:
        score = task.score(target, response)
        assert score.reward == 0.0 and score.status == "invalid", response[:40]


def test_parser_bounds_raise_invalid_expression():
    with pytest.raises(InvalidExpression, match="too large"):
        parse_expression("999999*999999*999999")
    with pytest.raises(InvalidExpression, match="nested deeper"):
        parse_expression("(" * 17 + "1" + ")" * 17)
    assert parse_expression("(" * 16 + "1" + ")" * 16) == (Fraction(1), [1])


def test_verifier_bugs_raise():
    task = build_task(small_config())
    with pytest.raises(VerifierError):
        task.score(Problem(id="x", prompt="", data={}), "3*5+7")
    with pytest.raises(VerifierError):
        task.score(problem([3, 5, 7], 22), None)


# --- what real models write --------------------------------------------------------------------

INSTRUCT = OmegaConf.load(CONFIG.parents[1] / "prompt" / "instruct.yaml").prompt.templates.countdown


@pytest.fixture(scope="module")
def instruct() -> Countdown:
    """The task with the `instruct` prompt (TinyZero's), as real models are asked."""
    return build_task({**config(), "prompt_template": INSTRUCT, "format_reward": 0.1})


REASONING = [  # responses to [3, 5, 7] -> 22 in the forms instruction and reasoning models write
    ("Let me solve this step by step.\n<think> 3*5 = 15, 15 + 7 = 22 </think>\n<answer> 3*5+7 </answer>",
     "correct", "3*5+7"),
    ("<think>\nTry 3+5+7 = 15: too small.\n<answer>3+5+7</answer> is a draft.\nTry 3*5+7 = 22.\n</think>\n"
     "<answer>3 * 5 + 7</answer>", "correct", "3*5+7"),  # a draft inside <think> never counts
    ("<think>\nsums first\n</think>\n<answer>3+5+7</answer>\nWait, that is 15, not 22.\n<answer>(3*5)+7 = 22</answer>",
     "correct", "(3*5)+7"),  # a draft answer then a corrected one: the last counts
    ("<answer>3*5+7</answer>\nHmm, or maybe\n<answer>3+5+7</answer>", "wrong", "3+5+7"),  # even when worse
    ("<answer>\n  7 + 5 * 3\n</answer><|im_end|>", "correct", "7+5*3"),  # the tag's inside spans lines
    ("<think>\n3*5+7 = 22\n</think>\nThe answer is 3*5+7.", "invalid", None),  # no tag: the first line (empty)
    ("<think>\nMaybe <answer>3*5+7</answer>, let me check", "invalid", None),  # still thinking: nothing final
    ("<think>\n3*5+7\n</think>\n<answer>3*5+7", "invalid", None),  # the tag never closed
    ("<ANSWER>3*5+7</ANSWER>", "invalid", "<ANSWER>3*5+7</ANSWER>"),  # tags are lower case (TinyZero)
    ("3*5+7\nThat uses each number once: 3*5 = 15 and 15 + 7 = 22.", "correct", "3*5+7"),  # the embedded format
]


@pytest.mark.parametrize("response, status, answer", REASONING)
def test_reasoning_responses_are_read_as_tinyzero_does(task, instruct, response, status, answer):
    for t in (task, instruct):  # every template reads the same (finished) response the same way
        score = t.score(problem([3, 5, 7], 22), response)
        assert (score.status, score.answer) == (status, answer), t.prompt_template[:10]


@pytest.mark.parametrize("response, plain, real", [
    ("<think>\n3*5 = 15\n15+7 = 22\n</think>\n<answer>3*5+7</answer>", "correct", "correct"),  # a closed tag
    ("3*5+7\nCheck: 3*5 = 15, and 15 + ", "correct", "invalid"),  # no tag: only the embedded format reads it
    ("3*5+7", "correct", "invalid"),  # the tiny model cut mid-line: read as before in the embedded default
    ("<think>\nLet me try 3*5+7", "invalid", "invalid"),
    ("<answer>3*5+7</answer> is it? Let me verify: 3*5 = ", "correct", "correct"),
    ("3*5+", "invalid", "invalid"),
])
def test_truncated_responses_count_only_a_closed_answer_tag(task, instruct, response, plain, real):
    """finished=False (cut at max_new_tokens): the plain prompt (the embedded default) reads as before."""
    assert task.score(problem([3, 5, 7], 22), response, finished=False).status == plain
    assert instruct.score(problem([3, 5, 7], 22), response, finished=False).status == real
    assert task.score(problem([3, 5, 7], 22), response).status == task.score(
        problem([3, 5, 7], 22), response, finished=True).status


@pytest.mark.parametrize("response, status, reward", [
    ("<answer>3*5+7</answer>", "correct", 1.0),
    ("<answer>3+5+7</answer>", "wrong", 0.1),  # well formed, wrong: the format reward
    ("<think>x</think>\n<answer>3*5+7 = 23</answer>", "wrong", 0.1),
    ("3+5+7", "wrong", 0.0),  # wrong, and not in the asked-for <answer> tags
    ("<answer>3+3+7</answer>", "invalid", 0.0),  # breaks a rule (3 reused): no format reward
    ("<answer>3 + five</answer>", "invalid", 0.0),
    ("", "invalid", 0.0),
])
def test_format_reward_only_for_a_tagged_wrong_answer(instruct, response, status, reward):
    score = instruct.score(problem([3, 5, 7], 22), response)
    assert (score.status, score.reward) == (status, reward)


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.1", None])
def test_bad_format_reward_is_one_line(value):
    with pytest.raises(ValueError, match=r"^task.format_reward=.* must be a number in \[0, 1\)"):
        build_task({**config(), "format_reward": value})


# --- solver ------------------------------------------------------------------------------------


def substitute(text: str, values: list[int]) -> str:
    """`text` with its number literals replaced, in order, by `values`."""
    replacements = iter(values)
    return re.sub(r"[0-9]+", lambda _: str(next(replacements)), text)


def same_function(a: str, b: str, rng: random.Random) -> bool:
    """Whether two expressions over the same literal slots agree for random values of the slots."""
    slots = len(re.findall(r"[0-9]+", a))
    for _ in range(2):
        values = [rng.randint(2, 999) for _ in range(slots)]
        try:
            if parse_expression(substitute(a, values))[0] != parse_expression(substitute(b, values))[0]:
                return False
        except InvalidExpression:
            return False
    return True


def has_redundant_parentheses(text: str, rng: random.Random) -> bool:
    """Whether removing some pair of matching parentheses leaves the same expression."""
    stack, pairs = [], []
    for i, ch in enumerate(text):
        if ch == "(":
            stack.append(i)
        elif ch == ")":
            pairs.append((stack.pop(), i))
    for open_at, close_at in pairs:
        removed = text[:open_at] + text[open_at + 1 : close_at] + text[close_at + 1 :]
        if same_function(text, removed, rng):
            return True
    return False


def brute_force(numbers: list[int]) -> dict[Fraction, set[str]]:
    """value -> every correct expression string over 3 numbers that has no redundant parentheses.

    Every string of: up to 2 '(' before the first number, up to 1 before the others, up to 1 ')'
    after the first two numbers and up to 2 after the last, with any operators between.
    """
    rng = random.Random(0)
    found: dict[Fraction, set[str]] = defaultdict(set)
    for a, b, c in set(permutations(numbers)):
        shapes = product("+-*/", "+-*/", range(3), range(2), range(2), range(2), range(2), range(3))
        for op1, op2, p0, p1, p2, c0, c1, c2 in shapes:
            text = f"{'(' * p0}{a}{')' * c0}{op1}{'(' * p1}{b}{')' * c1}{op2}{'(' * p2}{c}{')' * c2}"
            try:
                value, _ = parse_expression(text)
            except InvalidExpression:
                continue
            if not has_redundant_parentheses(text, rng):
                found[value].add(text)
    return found


@pytest.mark.parametrize("numbers", [[1, 2, 2], [2, 3, 5]])
def test_solver_matches_brute_force_over_strings(numbers):
    expected = brute_force(numbers)
    assert sum(map(len, expected.values())) > 50
    for target in range(-30, 61):
        assert set(solutions(numbers, target)) == expected.get(Fraction(target), set()), target


def test_solver_on_four_numbers_is_complete_and_minimal():
    numbers = [2, 3, 4, 6]
    _solutions.cache_clear()
    _expressions.cache_clear()
    found = solutions(numbers, 24)
    assert len(found) == len(set(found)) > 20
    assert "(2+4)*3+6" in found and "6/(3-2)*4" in found and "(2*6-4)*3" in found
    # The solved-for top operator agrees with the full enumeration for every value, 0 included.
    table = _expressions(tuple(sorted(numbers)))
    for value, expressions in table.items():
        assert sorted(text for text, _ in expressions) == list(_solutions(tuple(sorted(numbers)), value))
    rng = random.Random(0)
    assert not any(has_redundant_parentheses(text, rng) for text in found)
    assert solutions([1, 1, 2, 2], 0)  # zero target: the degenerate * and / cases
    assert solutions([5], 5) == ["5"] and solutions([5], 4) == [] and solutions([], 0) == []


def test_every_solution_verifies(task):
    for split in task.split_names:
        for p in task.problems(split)[:30]:
            found = task.all_solutions(p)
            assert len(found) == len(set(found)) == task.solution_count(p)
            for text in found:
                score = task.score(p, text)
                assert (score.status, score.answer) == ("correct", text)


def test_demonstrations_are_distinct_random_solutions(task):
    p = task.problems("ood")[0]
    count = task.solution_count(p)
    demos = task.demonstrations(p, 4, random.Random(0))
    assert len(demos) == min(4, count) == len(set(demos))
    assert all(task.score(p, d).status == "correct" for d in demos)
    assert demos == task.demonstrations(p, 4, random.Random(0))
    assert sorted(task.demonstrations(p, count + 10, random.Random(1))) == task.all_solutions(p)
    many = {d for seed in range(20) for d in task.demonstrations(p, 1, random.Random(seed))}
    assert len(many) > 1
