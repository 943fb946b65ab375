"""Embedded math word problems: templates, expression trees and their many written solutions."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

MAX_SOLUTION_CHARS = 60  # embedded solutions longer than this are not demonstrated

# ---------------------------------------------------------------------------------------------
# Embedded word problems: templates, expression trees and their many written solutions.
# ---------------------------------------------------------------------------------------------

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True, eq=False)
class Expr:
    """An arithmetic expression tree with exact values; `+ - * /` on Exprs build bigger trees."""

    value: Fraction
    op: str = ""  # "" for a number
    left: Expr | None = None
    right: Expr | None = None

    def _node(self, op: str, other: Expr, value: Fraction) -> Expr:
        return Expr(value, op, self, other)

    def __add__(self, other: Expr) -> Expr:
        return self._node("+", other, self.value + other.value)

    def __sub__(self, other: Expr) -> Expr:
        return self._node("-", other, self.value - other.value)

    def __mul__(self, other: Expr) -> Expr:
        return self._node("*", other, self.value * other.value)

    def __truediv__(self, other: Expr) -> Expr:
        return self._node("/", other, self.value / other.value)


def number_text(value: Fraction) -> str:
    """7, or 5/4 for a non-integer."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def answer_forms(value: Fraction) -> list[str]:
    """Equivalent spellings of a final answer: 5/4, \\frac{5}{4}, 1.25 (a terminating decimal, <= 4 places)."""
    if value.denominator == 1:
        return [number_text(value)]
    forms = [number_text(value), f"\\frac{{{value.numerator}}}{{{value.denominator}}}"]
    for places in range(1, 5):
        scaled = value * 10**places
        if scaled.denominator == 1:
            forms.append(f"{float(value):.{places}f}")
            break
    return forms


def expression_text(e: Expr) -> str:
    """The expression with minimal parentheses."""
    if not e.op:
        return number_text(e.value)
    left, right = expression_text(e.left), expression_text(e.right)
    if e.left.op and _PRECEDENCE[e.left.op] < _PRECEDENCE[e.op]:
        left = f"({left})"
    if e.right.op and (_PRECEDENCE[e.right.op] < _PRECEDENCE[e.op]
                       or (_PRECEDENCE[e.right.op] == _PRECEDENCE[e.op] and e.op in "-/")):
        right = f"({right})"
    return f"{left}{e.op}{right}"


def _operand_text(value: Fraction, op: str, side: str) -> str:
    text = number_text(value)
    return f"({text})" if value.denominator != 1 and side == "right" and op == "/" else text


def _swaps(e: Expr) -> list[Expr]:
    """The tree with every subset of its + and * nodes' operands swapped."""
    if not e.op:
        return [e]
    out = []
    for left in _swaps(e.left):
        for right in _swaps(e.right):
            out.append(Expr(e.value, e.op, left, right))
            if e.op in "+*":
                out.append(Expr(e.value, e.op, right, left))
    return out


def _interleavings(a: list, b: list) -> list[list]:
    if not a or not b:
        return [a + b]
    return [[a[0], *rest] for rest in _interleavings(a[1:], b)] + [[b[0], *rest] for rest in _interleavings(a, b[1:])]


def _orders(e: Expr) -> list[list[Expr]]:
    """Every order in which the operations of a tree can be computed (children before parents)."""
    if not e.op:
        return [[]]
    return [merged + [e] for lo in _orders(e.left) for ro in _orders(e.right) for merged in _interleavings(lo, ro)]


def _reduce(e: Expr, done: set[int]) -> Expr:
    """The tree with every node whose id is in `done` replaced by its value."""
    if not e.op or id(e) in done:
        return Expr(e.value)
    return Expr(e.value, e.op, _reduce(e.left, done), _reduce(e.right, done))


def _step_text(node: Expr) -> str:
    """One computed operation, e.g. `12-5=7`; empty when it only restates a fraction (`3/4=3/4`)."""
    left, right = _operand_text(node.left.value, node.op, "left"), _operand_text(node.right.value, node.op, "right")
    text = f"{left}{node.op}{right}"
    result = number_text(node.value)
    return "" if text == result else f"{text}={result}"


def solution_paths(trees: Sequence[Expr]) -> list[str]:
    """Distinct written computations of the trees' value, sorted: step by step ("3*4=12, 12-5=7"),
    one line ("3*4-5=7") and chained ("3*4-5=12-5=7"), over operand swaps and step orders."""
    paths = set()
    for tree in trees:
        for variant in _swaps(tree):
            paths.add(f"{expression_text(variant)}={number_text(variant.value)}")
            for order in _orders(variant):
                if _step_text(order[-1]):  # a last step `13/3=13/3` says nothing: the chain covers it
                    paths.add(", ".join(step for step in map(_step_text, order) if step))
                chain, done = [expression_text(variant)], set()
                for node in order:
                    done.add(id(node))
                    text = expression_text(_reduce(variant, done))
                    if text != chain[-1]:
                        chain.append(text)
                paths.add("=".join(chain))
    return sorted(paths)


def solutions_of(trees: Sequence[Expr]) -> list[str]:
    """Every demonstrated solution: a path, then nothing, `. \\boxed{F}` or `. #### F` for each form F."""
    value = trees[0].value
    endings = [""] + [f". {tag}" for form in answer_forms(value) for tag in (f"\\boxed{{{form}}}", f"#### {form}")]
    found = [path + end for path in solution_paths(trees) for end in endings]
    return [s for s in found if len(s) <= MAX_SOLUTION_CHARS]


@dataclass(frozen=True)
class Template:
    """A word-problem template: `sample` draws its parameters (ints are the numbers of the problem,
    strings are cosmetic), `question` is formatted with them, and `trees` maps the numbers (as Expr
    leaves) to equivalent computations of the answer (alternative solution paths)."""

    name: str
    question: str
    sample: Callable[[random.Random], dict[str, Any]]
    trees: Callable[..., list[Expr]]


NAMES = ("Ann", "Bob", "Eva", "Tom", "Mia", "Sam", "Liz", "Max")
ITEMS = ("apples", "pens", "eggs", "cards", "beads")


def _bags(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(2, 6), rng.randint(2, 9)
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    return {"who": who, "item": item, "a": a, "b": b, "c": rng.randint(1, min(a * b - 1, 20))}


def _fraction_left(rng: random.Random) -> dict[str, Any]:
    q = rng.choice((2, 3, 4, 5))
    return {"who": rng.choice(NAMES), "item": rng.choice(ITEMS), "q": q, "p": rng.randint(1, q - 1),
            "x": q * rng.randint(2, 9)}


def _change(rng: random.Random) -> dict[str, Any]:
    p, a = rng.randint(2, 9), rng.randint(2, 5)
    return {"who": rng.choice(NAMES), "p": p, "a": a, "m": rng.choice([m for m in (10, 20, 50, 100) if m > p * a])}


TRAIN_TEMPLATES = (
    Template("bags", "{who} has {a} bags of {b} {item}, gives away {c}. How many are left?", _bags,
             lambda a, b, c: [a * b - c]),
    Template("share", "{a} pizzas and {b} pies are shared by {n} kids. How much each?",
             lambda r: {"a": r.randint(1, 6), "b": r.randint(1, 6), "n": r.randint(2, 6)},
             lambda a, b, n: [(a + b) / n, a / n + b / n]),
    Template("fraction_left", "{who} has {x} {item} and gives away {p}/{q} of them. How many left?",
             _fraction_left,
             lambda x, p, q: [x - x * p / q, x - x / q * p, x * (q - p) / q, x / q * (q - p)]),
    Template("rate", "A car goes {v} km an hour for {t} hours, then {d} km more. How far?",
             lambda r: {"v": r.randint(2, 9) * 10, "t": r.randint(2, 4), "d": r.randint(1, 20)},
             lambda v, t, d: [v * t + d]),
    Template("change", "Pens cost {p} dollars. {who} buys {a} and pays {m}. Change?", _change,
             lambda p, a, m: [m - p * a]),
    Template("groups", "{a} boxes of {b} eggs and {c} boxes of {d} eggs. How many eggs?",
             lambda r: {"a": r.randint(2, 5), "b": r.randint(2, 9), "c": r.randint(2, 5), "d": r.randint(2, 9)},
             lambda a, b, c, d: [a * b + c * d]),
    Template("tap", "A tap fills {a} liters in {b} min. How many liters in {c} min?",
             lambda r: {"a": r.randint(2, 12), "b": r.randint(2, 5), "c": r.randint(2, 9)},
             lambda a, b, c: [a * c / b, a / b * c]),
)
OOD_TEMPLATES = (  # seats: a computation seen in training (bags) in new words; the others: new computations
    Template("seats", "A bus has {a} rows of {b} seats, {c} empty. How many are taken?", _bags,
             lambda a, b, c: [a * b - c]),
    Template("mean", "Tests scored {a}, {b} and {c}. What is the mean score?",
             lambda r: {"a": r.randint(10, 40), "b": r.randint(10, 40), "c": r.randint(10, 40)},
             lambda a, b, c: [(a + b + c) / Expr(Fraction(3)), (a + (b + c)) / Expr(Fraction(3))]),
    Template("perimeter", "A field is {a} m long and {b} m wide. What is its perimeter?",
             lambda r: {"a": r.randint(3, 20), "b": r.randint(2, 15)},
             lambda a, b: [Expr(Fraction(2)) * (a + b), Expr(Fraction(2)) * a + Expr(Fraction(2)) * b,
                           a + b + a + b]),
    Template("parts", "What is half of {a} plus a third of {b}?",
             lambda r: {"a": r.randint(1, 20), "b": r.randint(1, 20)},
             lambda a, b: [a / Expr(Fraction(2)) + b / Expr(Fraction(3))]),
)
TEMPLATES = {t.name: t for t in TRAIN_TEMPLATES + OOD_TEMPLATES}


def template_trees(template: str, params: Mapping[str, Any]) -> list[Expr]:
    """The computations of a problem's answer, from its template and parameters."""
    numbers = {k: Expr(Fraction(v)) for k, v in params.items() if isinstance(v, int)}
    return TEMPLATES[template].trees(**numbers)


def problem_key(template: str, params: Mapping[str, Any]) -> tuple:
    """What makes two embedded problems the same: the template and its numbers (not the names)."""
    return template, tuple(sorted((k, v) for k, v in params.items() if isinstance(v, int)))
