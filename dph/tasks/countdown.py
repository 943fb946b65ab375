"""Countdown: write an arithmetic expression over the given numbers that equals the target.

The embedded default task (as in TinyZero-style RLVR work). A problem gives a few numbers and a
target, e.g. the prompt `"3 5 7 -> 22: "`; a correct response is `3*5+7` or `5*3+7` or `(7-3)*5+...`.

Prompt template fields: {numbers} ("3 5 7"), {numbers_list} ("[3, 5, 7]", TinyZero's) and {target}.
The `plain` preset's template is `PLAIN_TEMPLATE` ("{numbers} -> {target}: ").

The answer of a response (read after its last `</think>`: `dph.tasks.base.final_section`) is
  1. the inside of its LAST `<answer>...</answer>` (TinyZero/verl; a draft answer followed by a
     corrected one counts the corrected one); else
  2. the embedded format: its first line, or the inside of `<answer>...</answer>` on that line (an
     unclosed tag there is invalid). A response cut at max_new_tokens (`finished=False`) gets this
     fallback only in the embedded default (`plain` template), whose verdicts so stay as before.
A trailing `= <target>` is tolerated. Rules the verifier enforces on the answer:
  1. Each given number is used exactly once (the literals are exactly the given multiset).
  2. Only integer literals, `+ - * /`, parentheses and spaces. No unary minus, no leading zeros.
  3. Arithmetic is exact (fractions): intermediate fractions are allowed, division by zero is not.
A wrong answer (it follows these rules, the value differs) from an `<answer>` tag gets
`format_reward` (TinyZero: 0.1; TinyZero also gives it to answers that break rules 1-3, which dph
scores invalid, 0).

Most problems have many correct answers; this is what makes the diversity of a policy measurable.
Distinct answers are counted as distinct strings with whitespace removed. The solver enumerates
all of them in a canonical form with minimal parentheses: every tree shape, permutation and
operator, with `a+(b+c)` printed `a+b+c` (the same string as `(a+b)+c`) and `a*(b/c)` as `a*b/c`.

Splits are generated from one `seed` (a `random.Random` per split): numbers are drawn uniformly
from 1..max_number, the target is the value of a random expression over all of them (random order,
tree shape and operators) when that value is an integer within the split's target range, and a
problem with fewer than `min_solutions` distinct solutions is rejected. No problem (sorted numbers,
target) appears twice in a split or in two splits: the held-out splits are generated first, in
config order, and `train` last, each skipping the problems of those before it.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from itertools import product
from typing import Any

from dph.tasks.base import (
    Problem,
    Score,
    Task,
    VerifierError,
    check_format_reward,
    check_template,
    final_section,
    verdict_reward,
)

log = logging.getLogger(__name__)

VERSION = 1  # bump whenever problem generation or the solution format changes

TRAIN_SPLIT = "train"  # the split used for RL training; every other split is held out
PLAIN_TEMPLATE = "{numbers} -> {target}: "  # the embedded default's prompt (the `plain` preset)
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_DEPTH = 16  # parenthesis nesting allowed in an answer
MAX_LITERAL_DIGITS = 6  # digits allowed in one integer literal
MAX_MAGNITUDE = 10**12  # bound on |numerator| and denominator of every intermediate value
ATTEMPTS_PER_PROBLEM = 200  # generator attempts per wanted problem before giving up

_TOKEN = re.compile(r"[0-9]+|[-+*/()]")
_SPACES = " \t"

# Kinds of expression, by their top operator: decides where parentheses are needed.
_ATOM, _ADDITIVE, _MULTIPLICATIVE = 0, 1, 2


class InvalidExpression(ValueError):
    """An answer that breaks the grammar or a bound (reported as status "invalid", never raised out of score)."""


# ---------------------------------------------------------------------------------------------
# Restricted arithmetic: tokenizer + recursive-descent parser, exact evaluation. Never `eval`.
#   expr   := term (('+' | '-') term)*
#   term   := factor (('*' | '/') factor)*
#   factor := INTEGER | '(' expr ')'
# ---------------------------------------------------------------------------------------------


def _tokenize(text: str) -> list[str]:
    tokens = []
    position = 0
    while position < len(text):
        if text[position] in _SPACES:
            position += 1
            continue
        match = _TOKEN.match(text, position)  # [0-9] is ASCII only: '３' or NUL fail here
        if match is None:
            raise InvalidExpression(f"unexpected character {text[position]!r}")
        token = match.group()
        if token[0].isdigit():
            if len(token) > MAX_LITERAL_DIGITS:
                raise InvalidExpression(f"literal longer than {MAX_LITERAL_DIGITS} digits")
            if len(token) > 1 and token[0] == "0":
                raise InvalidExpression(f"leading zero in {token!r}")
        tokens.append(token)
        position = match.end()
    return tokens


def _apply(op: str, left: Fraction, right: Fraction) -> Fraction:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    return left / right


class _Parser:
    """Evaluates a token list exactly, collecting the literals it uses."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.position = 0
        self.literals: list[int] = []

    def parse(self) -> Fraction:
        value = self._expr(depth=0)
        if self.position != len(self.tokens):
            raise InvalidExpression(f"unexpected {self.tokens[self.position]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.position]
            self.position += 1
            value = _checked(_apply(op, value, self._term(depth)))
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.position]
            self.position += 1
            right = self._factor(depth)
            if op == "/" and right == 0:
                raise InvalidExpression("division by zero")
            value = _checked(_apply(op, value, right))
        return value

    def _factor(self, depth: int) -> Fraction:
        token = self._peek()
        if token is None:
            raise InvalidExpression("expression ends early")
        self.position += 1
        if token == "(":
            if depth >= MAX_DEPTH:
                raise InvalidExpression(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise InvalidExpression("unbalanced parenthesis")
            self.position += 1
            return value
        if token[0].isdigit():
            self.literals.append(int(token))
            return Fraction(int(token))
        raise InvalidExpression(f"unexpected {token!r}")


def _checked(value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise InvalidExpression("intermediate value too large")
    return value


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """(exact value, literals in order) of an expression; raises InvalidExpression on any bad input."""
    parser = _Parser(_tokenize(text))
    return parser.parse(), parser.literals


# ---------------------------------------------------------------------------------------------
# Solver: every distinct correct expression, memoised over sub-multisets.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _splits(multiset: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Ordered (left, right) pairs of non-empty sub-multisets that partition a sorted multiset."""
    counts = sorted(Counter(multiset).items())
    pairs = []
    for taken in product(*(range(count + 1) for _, count in counts)):
        left = tuple(x for (x, _), k in zip(counts, taken) for _ in range(k))
        right = tuple(x for (x, count), k in zip(counts, taken) for _ in range(count - k))
        if left and right:
            pairs.append((left, right))
    return tuple(pairs)


def _join(op: str, lefts: list[tuple[str, int]], rights: list[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    """Canonical strings of `left op right` with minimal parentheses, skipping duplicate forms.

    `a+(b+c)` / `a+(b-c)` read the same as `a+b+c` / `a+b-c` (which the enumeration also makes),
    and likewise `a*(b*c)` / `a*(b/c)`: those trees are skipped so every string appears once.
    """
    kind = _ADDITIVE if op in "+-" else _MULTIPLICATIVE
    for right, right_kind in rights:
        if right_kind == kind and op in "+*":
            continue
        if (right_kind == _ADDITIVE and op != "+") or (right_kind == _MULTIPLICATIVE and op == "/"):
            right = f"({right})"
        for left, left_kind in lefts:
            if left_kind == _ADDITIVE and kind == _MULTIPLICATIVE:
                left = f"({left})"
            yield f"{left}{op}{right}", kind


@functools.lru_cache(maxsize=4096)
def _expressions(multiset: tuple[int, ...]) -> dict[Fraction, list[tuple[str, int]]]:
    """value -> [(canonical string, kind)] of every expression over a sorted multiset."""
    if len(multiset) == 1:
        return {Fraction(multiset[0]): [(str(multiset[0]), _ATOM)]}
    table: dict[Fraction, list[tuple[str, int]]] = defaultdict(list)
    for left, right in _splits(multiset):
        for left_value, lefts in _expressions(left).items():
            for right_value, rights in _expressions(right).items():
                for op in "+-*/":
                    if op == "/" and right_value == 0:
                        continue
                    table[_apply(op, left_value, right_value)].extend(_join(op, lefts, rights))
    return dict(table)


def _right_operands(op: str, left: Fraction, target: Fraction, rights: Mapping) -> Iterator[Fraction]:
    """Values r of `rights` with `left op r == target`."""
    if op == "+":
        candidates = [target - left]
    elif op == "-":
        candidates = [left - target]
    elif op == "*":
        candidates = [target / left] if left != 0 else (list(rights) if target == 0 else [])
    elif target != 0:
        candidates = [left / target] if left != 0 else []
    else:
        candidates = [r for r in rights if r != 0] if left == 0 else []
    return (r for r in candidates if r in rights)


def _left_operands(op: str, right: Fraction, target: Fraction, lefts: Mapping) -> Iterator[Fraction]:
    """Values l of `lefts` with `l op right == target`."""
    if op == "+":
        candidates = [target - right]
    elif op == "-":
        candidates = [target + right]
    elif op == "*":
        candidates = [target / right] if right != 0 else (list(lefts) if target == 0 else [])
    else:
        candidates = [target * right] if right != 0 else []
    return (value for value in candidates if value in lefts)


@functools.lru_cache(maxsize=65536)
def _solutions(multiset: tuple[int, ...], target: Fraction) -> tuple[str, ...]:
    """Sorted canonical solutions. The top operator is solved for (meet in the middle), so only the
    sub-multisets' tables are enumerated in full."""
    if len(multiset) == 1:
        return (str(multiset[0]),) if multiset[0] == target else ()
    found: list[str] = []
    for left, right in _splits(multiset):
        lefts, rights = _expressions(left), _expressions(right)
        for op in "+-*/":
            if len(lefts) <= len(rights):
                pairs = ((lv, rv) for lv in lefts for rv in _right_operands(op, lv, target, rights))
            else:
                pairs = ((lv, rv) for rv in rights for lv in _left_operands(op, rv, target, lefts))
            for left_value, right_value in pairs:
                found.extend(text for text, _ in _join(op, lefts[left_value], rights[right_value]))
    return tuple(sorted(found))


def solutions(numbers: Sequence[int], target: int) -> list[str]:
    """All distinct expressions using each number exactly once that equal `target`, sorted.

    Canonical form: no spaces, minimal parentheses; every permutation, tree shape and operator is
    covered, so `3+5+7`, `5+3+7` and `7+5+3` are three solutions. Memoised over sub-multisets.
    """
    if not numbers:
        return []
    return list(_solutions(tuple(sorted(numbers)), Fraction(target)))


# ---------------------------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSpec:
    """How one split is drawn (the keys are documented in conf/task/countdown.yaml)."""

    size: int
    numbers_per_problem: int
    max_number: int
    target_min: int
    target_max: int

    @classmethod
    def from_config(cls, split: str, cfg: Mapping[str, Any]) -> SplitSpec:
        keys = set(cls.__dataclass_fields__)
        if not isinstance(cfg, Mapping) or set(cfg) != keys:
            got = sorted(cfg) if isinstance(cfg, Mapping) else cfg
            raise ValueError(f"task.splits.{split} must have exactly the keys {sorted(keys)}; got {got}")
        for key, value in cfg.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"task.splits.{split}.{key}={value!r} must be an integer")
        spec = cls(**cfg)
        if spec.size < 0:
            raise ValueError(f"task.splits.{split}.size={spec.size} must be >= 0")
        if not 2 <= spec.numbers_per_problem <= 5:
            raise ValueError(
                f"task.splits.{split}.numbers_per_problem={spec.numbers_per_problem} must be in 2..5 "
                "(the solver enumerates every expression)"
            )
        if spec.max_number < 1:
            raise ValueError(f"task.splits.{split}.max_number={spec.max_number} must be >= 1")
        if not 1 <= spec.target_min <= spec.target_max:
            raise ValueError(
                f"task.splits.{split}: need 1 <= target_min <= target_max; "
                f"got target_min={spec.target_min}, target_max={spec.target_max}"
            )
        return spec


def _problem_key(numbers: Sequence[int], target: int) -> tuple[tuple[int, ...], int]:
    return tuple(sorted(numbers)), target


def _random_expression_value(numbers: list[int], rng: random.Random) -> Fraction | None:
    """Value of a random expression over `numbers` in the given order (None on division by zero)."""
    if len(numbers) == 1:
        return Fraction(numbers[0])
    cut = rng.randint(1, len(numbers) - 1)
    op = rng.choice("+-*/")
    left = _random_expression_value(numbers[:cut], rng)
    right = _random_expression_value(numbers[cut:], rng)
    if left is None or right is None or (op == "/" and right == 0):
        return None
    return _apply(op, left, right)


class Countdown(Task):
    """Countdown problems with an exact verifier and a complete solver (see the module docstring)."""

    name = "countdown"

    def __init__(
        self,
        seed: int = 0,
        min_solutions: int = 3,
        prompt_template: str | None = None,
        max_answer_chars: int = 100,
        warmup_splits: Sequence[str] = (TRAIN_SPLIT, "ood"),
        splits: Mapping[str, Mapping[str, int]] | None = None,
        format_reward: float = 0.0,
    ):
        if splits is None:
            raise ValueError("task.splits is required: split name -> {size, numbers_per_problem, ...}")
        self.seed = seed
        self.min_solutions = min_solutions
        self.prompt_template = PLAIN_TEMPLATE if prompt_template is None else prompt_template
        self.max_answer_chars = max_answer_chars
        self.format_reward = check_format_reward(format_reward)
        self.warmup_splits = tuple(warmup_splits)
        self.specs = {name: SplitSpec.from_config(name, spec) for name, spec in splits.items()}
        self._validate()
        # Held-out splits first (config order), train last: each skips the problems made before it.
        self._generation_order = [s for s in self.specs if s != TRAIN_SPLIT] + [TRAIN_SPLIT]
        self._problems: dict[str, list[Problem]] = {}

    def _validate(self) -> None:
        if TRAIN_SPLIT not in self.specs:
            raise ValueError(f"task.splits must include {TRAIN_SPLIT!r}; got {list(self.specs)}")
        if not isinstance(self.min_solutions, int) or self.min_solutions < 1:
            raise ValueError(f"task.min_solutions={self.min_solutions!r} must be an integer >= 1")
        if not isinstance(self.max_answer_chars, int) or self.max_answer_chars < 1:
            raise ValueError(f"task.max_answer_chars={self.max_answer_chars!r} must be an integer >= 1")
        check_template(self.name, self.prompt_template, {"numbers": "1 2 3", "numbers_list": "[1, 2, 3]", "target": 6})
        unknown = [s for s in self.warmup_splits if s not in self.specs]
        if unknown or not self.warmup_splits:
            raise ValueError(f"task.warmup_splits={list(self.warmup_splits)} must name splits of {list(self.specs)}")

    # --- problems ------------------------------------------------------------------------------

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def prompt(self, numbers: Sequence[int], target: int) -> str:
        return self.prompt_template.format(numbers=" ".join(map(str, numbers)), numbers_list=str(list(numbers)),
                                           target=target)

    @property
    def embedded_default(self) -> bool:
        """Whether the prompt is the `plain` one the tiny model answers on one line: every response is
        then read as finished (as before `finished` existed)."""
        return self.prompt_template == PLAIN_TEMPLATE

    def problems(self, split: str) -> list[Problem]:
        self.check_split(split)
        for name in self._generation_order:
            if name not in self._problems:
                self._generate_split(name)
            if name == split:
                break
        return self._problems[split]

    def _generate_split(self, split: str) -> None:
        start = time.perf_counter()
        taken = self._keys(*self._problems)
        rng = random.Random(f"countdown/{self.seed}/{split}")
        drawn = self._draw(split, [self.specs[split]], self.specs[split].size, rng, taken)
        self._problems[split] = self._make_problems(split, drawn)
        log.debug("countdown: generated %d %s problems in %.3f s", len(drawn), split, time.perf_counter() - start)

    def _make_problems(self, prefix: str, drawn: list[tuple[list[int], int]]) -> list[Problem]:
        return [
            Problem(id=f"{prefix}/{i}", prompt=self.prompt(numbers, target), data={"numbers": numbers, "target": target})
            for i, (numbers, target) in enumerate(drawn)
        ]

    def _keys(self, *splits: str) -> set[tuple[tuple[int, ...], int]]:
        """The (sorted numbers, target) of every problem of these splits."""
        return {_problem_key(p.data["numbers"], p.data["target"]) for s in splits for p in self.problems(s)}

    def _draw(
        self,
        what: str,
        specs: Sequence[SplitSpec],
        count: int,
        rng: random.Random,
        excluded: set[tuple[tuple[int, ...], int]],
    ) -> list[tuple[list[int], int]]:
        """`count` distinct problems, each from a spec chosen at random, none of them in `excluded`."""
        drawn: list[tuple[list[int], int]] = []
        seen = set(excluded)
        attempts = ATTEMPTS_PER_PROBLEM * count
        for _ in range(attempts):
            if len(drawn) == count:
                break
            spec = rng.choice(specs)
            numbers = [rng.randint(1, spec.max_number) for _ in range(spec.numbers_per_problem)]
            value = _random_expression_value(numbers, rng)
            if value is None or value.denominator != 1 or not spec.target_min <= value <= spec.target_max:
                continue
            target = int(value)
            key = _problem_key(numbers, target)
            if key in seen or len(_solutions(key[0], value)) < self.min_solutions:
                continue
            seen.add(key)
            drawn.append((numbers, target))
        if len(drawn) < count:
            raise ValueError(
                f"countdown {what}: found only {len(drawn)} of {count} distinct problems with >= "
                f"{self.min_solutions} solutions in {attempts} attempts; widen the target range or "
                "max_number, or ask for fewer problems"
            )
        return drawn

    def warmup_problems(self, n: int, seed: int) -> list[Problem]:
        """`n` distinct problems, each drawn from one of `warmup_splits`' distributions at random,
        none of them in a held-out split (they may coincide with train problems)."""
        held_out = self._keys(*(s for s in self.specs if s != TRAIN_SPLIT))
        rng = random.Random(f"countdown/{self.seed}/warmup/{seed}")
        specs = [self.specs[s] for s in self.warmup_splits]
        return self._make_problems("warmup", self._draw("warm-up", specs, n, rng, held_out))

    # --- verifier ------------------------------------------------------------------------------

    def extract_answer(self, response: str, finished: bool = True) -> tuple[str | None, bool]:
        """(the answer of a response or None, whether it came from an `<answer>` tag): the module
        docstring's rules."""
        text = final_section(response)
        close = text.rfind(ANSWER_CLOSE)  # str.rfind, not a regex: linear even on hostile input
        start = text.rfind(ANSWER_OPEN, 0, close) if close >= 0 else -1
        if start >= 0:
            inside = text[start + len(ANSWER_OPEN) : close].strip()
            return (inside if inside and len(inside) <= self.max_answer_chars else None), True
        return (self.first_line_answer(text) if finished else None), False

    def first_line_answer(self, response: str) -> str | None:
        """The embedded format: the first line, inside `<answer>` tags if it has them."""
        line = response.split("\n", 1)[0]
        start = line.find("<answer>")
        if start >= 0:  # str.find, not a regex: linear even on hostile input
            end = line.find("</answer>", start)
            if end < 0:
                return None
            line = line[start + len("<answer>") : end]
        line = line.strip()
        if not line or len(line) > self.max_answer_chars:
            return None
        return line

    def score(self, problem: Problem, response: str, *, finished: bool = True) -> Score:
        try:
            numbers, target = problem.data["numbers"], problem.data["target"]
            if not isinstance(response, str):
                raise TypeError(f"response must be a str, got {type(response).__name__}")
            return self._score(list(numbers), int(target), response, finished or self.embedded_default)
        except Exception as exc:
            raise VerifierError(f"countdown verifier failed on problem {problem.id!r}: {exc!r}") from exc

    def _score(self, numbers: list[int], target: int, response: str, finished: bool) -> Score:
        text, tagged = self.extract_answer(response, finished)
        if text is None:
            return Score(reward=0.0, answer=None, status="invalid")
        expression, equals, claimed = text.partition("=")
        answer = "".join(ch for ch in expression if ch not in _SPACES)
        invalid = Score(reward=0.0, answer=answer, status="invalid")
        wrong = Score(reward=verdict_reward("wrong", tagged, self.format_reward), answer=answer, status="wrong")
        claimed = claimed.strip(_SPACES)
        if equals and not (claimed.isascii() and claimed.isdigit() and len(claimed) <= MAX_LITERAL_DIGITS):
            return invalid
        try:
            value, literals = parse_expression(expression)
        except InvalidExpression:
            return invalid
        if Counter(literals) != Counter(numbers):
            return invalid
        if value != target or (equals and int(claimed) != target):
            return wrong
        return Score(reward=1.0, answer=answer, status="correct")

    # --- demonstrations ------------------------------------------------------------------------

    def all_solutions(self, problem: Problem) -> list[str]:
        """All canonical solutions of a problem, sorted (memoised)."""
        return solutions(problem.data["numbers"], problem.data["target"])

    def solution_count(self, problem: Problem) -> int:
        """How many distinct canonical solutions a problem has (memoised)."""
        return len(self.all_solutions(problem))

    def demonstrations(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        found = self.all_solutions(problem)
        return rng.sample(found, min(n, len(found)))

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": VERSION,
            "seed": self.seed,
            "min_solutions": self.min_solutions,
            "prompt_template": self.prompt_template,
            "max_answer_chars": self.max_answer_chars,
            "warmup_splits": list(self.warmup_splits),
            "splits": {name: asdict(spec) for name, spec in self.specs.items()},
        }

    def reasoning_demonstrations(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """Up to `n` correct responses as instruction models write them (the `instruct` preset): in
        `<think>`, the goal, a solution drawn at random and its check, one per line, then
        `<answer>EXPR</answer>`. No intermediate values: the lines restate what the prompt and the
        solution hold, which a small model warmed up in minutes can learn."""
        numbers, target = problem.data["numbers"], problem.data["target"]
        goal = f"We need {target} from {', '.join(map(str, numbers))}."
        return [f"<think>\n{goal}\nTry {expression}.\n{expression} = {target}\n</think>\n<answer>{expression}</answer>"
                for expression in self.demonstrations(problem, n, rng)]
