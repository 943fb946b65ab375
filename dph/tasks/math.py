"""Math word problems verified by their final answer (`task=math`): embedded generator, GSM8K, MATH.

A response's final answer is, in this order of precedence:
  1. the inside of its last `\\boxed{...}` (or `\\fbox{...}`); an unclosed last box is invalid;
  2. else the first number after its last `####` (GSM8K style);
  3. else its last number: an integer, decimal, `a/b`, `\\frac{a}{b}` or `1,000`-style integer.
It is compared with the gold answer in two tiers:
  - exact: when both sides are plain rationals, they are compared as `Fraction`s (about 10 us);
    a decimal with >= 6 decimals is left to math-verify, which compares such values rounded;
  - math-verify (`parse` + `verify`, the reference) for everything else, in a worker process
    (`MathVerifyWorker`) that any thread can use: a SIGALRM timer in the worker's main thread stops
    a comparison at `timeout_s`, and one stuck in C code is killed with its worker.
Statuses: correct, wrong, invalid (response over `max_response_chars`, nothing extracted, final
answer over `max_answer_chars` or braces nested over 8 deep, unparseable, math-verify raised or
crashed its worker) and timeout (over `timeout_s`, or the worker killed). Every verdict is counted in
`status_counts`, and where it came from in `verifier_counts` (too_long, no_answer, exact,
math_verify/<worker status>). A gold answer math-verify cannot read is a VerifierError.
`Score.answer` is the whole response with whitespace collapsed, so different solution paths (and
different spellings of the final answer) count as different answers.

Sources (`source`):
  embedded: seeded 1-3 step arithmetic word problems. `test` and `ood` are drawn from their own
      random streams (so they do not depend on train's size); `train` uses test's templates with
      other numbers (no problem of test in it), `ood` templates never seen in train or warm-up (one
      a trained computation in new words, the others new computations).
      Warm-up problems are drawn like train's, with repeats, never a test problem. Each problem has
      many solution paths (operand orders, step orders, alternative computations; step by step, one
      line or chained) and final-answer forms (bare, `. \\boxed{F}`, `. #### F`; F = 5/4, \\frac{5}{4},
      1.25). Prompts are at most 64 characters and solutions at most 60 (for a character policy).
  gsm8k: records {"question", "answer" ending in "#### N"} (GSM8K); the demonstration is the answer
      without its <<calculator>> notes.
  math: records {"problem", "solution" with a \\boxed answer, "answer"?} (MATH, MATH-500); the gold is
      `answer` when present, else the solution's last box; the demonstration ends with that box.
  Real data has splits `train` and `test` (either may be missing): `path` is a folder holding
  `train.jsonl` and `test.jsonl` (or `.json`, a list of records, or `.parquet`), or shards of one
  kind such as `train-00000-of-00002.parquet` (the Hugging Face layout), or a mapping
  {train: FILE or [FILES], test: ...}. Every split is built by the constructor, so a bad record or
  an impossible size fails before any work starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import marshal
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from dph.tasks.base import Problem, Score, Task, VerifierError

log = logging.getLogger(__name__)

VERSION = 1  # bump whenever problem generation, solutions or the prompt format change
SOURCES = ("embedded", "gsm8k", "math")
SPLITS = ("train", "test", "ood")
FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}  # (prompt, solution) keys
MAX_SOLUTION_CHARS = 60  # embedded solutions longer than this are not demonstrated
MAX_BRACE_DEPTH = 8  # a final answer with deeper {} nesting is invalid (math-verify slows down sharply)
MAX_DIGITS = 40  # longer numbers skip the exact tier
FLOAT_DIGITS = 6  # math-verify rounds decimals to this many places; such decimals go to it
ATTEMPTS_IN_A_ROW = 1000  # generator draws in a row that find no new problem before it gives up

# ---------------------------------------------------------------------------------------------
# Final-answer extraction and the exact tier. Every pattern is linear on any input.
# ---------------------------------------------------------------------------------------------

# ASCII patterns: \d is [0-9] (int() would accept other scripts' digits), \w is [A-Za-z0-9_].
_NUMBER = re.compile(  # \frac{a}{b}, or a number not glued to a word, dot or comma before it
    r"\\[dt]?frac\{\s*-?\d+\s*\}\{\s*-?\d+\s*\}"
    r"|(?:(?<![\w)\]}])-)?(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?!\w)",
    re.ASCII,
)
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}", re.ASCII)
_RATIONAL = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)(?:/(\d+))?", re.ASCII)
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)", re.ASCII)
_LATEX_NOISE = ("\\!", "\\,", "\\;", "\\ ", "{,}", "\\left", "\\right", "$")


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the `{` at `start - 1`; None when unclosed or nested too deep."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH:
                return None
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def last_box(text: str) -> tuple[int, int | None] | None:
    """(start of the content, index of its closing brace or None) of the last `\\boxed{` or
    `\\fbox{` of a text; None when it has none."""
    box = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if box < 0:
        return None
    start = text.index("{", box) + 1
    return start, _closing_brace(text, start)


def extract_final_answer(response: str) -> str | None:
    """The final answer of a response (module docstring), stripped; None when there is none."""
    box = last_box(response)
    if box is not None:
        start, end = box
        return response[start:end].strip() or None if end is not None else None
    hashes = response.rfind("####")
    if hashes >= 0:
        line_end = response.find("\n", hashes)
        match = _NUMBER.search(response, hashes + 4, line_end if line_end >= 0 else len(response))
        return match.group() if match else None
    last = None
    for last in _NUMBER.finditer(response):
        pass
    return last.group() if last else None


def as_rational(answer: str) -> Fraction | None:
    """The exact value of a plain rational answer (7, -2, 0.75, 3/4, \\frac{3}{4}, 1,000), else None."""
    text = answer
    for noise in _LATEX_NOISE:
        text = text.replace(noise, "")
    text = text.replace(" ", "").rstrip(".")
    if len(text) > 2 * MAX_DIGITS + 16:
        return None
    frac = _FRAC.fullmatch(text)
    if frac:
        sign, num, den = frac.groups()
        value = as_rational(num), as_rational(den)
        if None in value or value[1] == 0:
            return None
        return -value[0] / value[1] if sign == "-" else value[0] / value[1]
    if _THOUSANDS.fullmatch(text.lstrip("+-")):
        text = text.replace(",", "")
    match = _RATIONAL.fullmatch(text)
    if not match or sum(c.isdigit() for c in text) > MAX_DIGITS:
        return None
    sign, number, denominator = match.groups()
    value = Fraction(number)
    if denominator is not None:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    return -value if sign == "-" else value


def _decimal_places(answer: str) -> int:
    _, dot, decimals = answer.partition(".")
    return len(decimals.rstrip(". ")) if dot else 0


# ---------------------------------------------------------------------------------------------
# math-verify in a worker process: usable from any thread, killed when stuck in C code.
# ---------------------------------------------------------------------------------------------

WORKER_START_S = 60.0  # how long a fresh worker may take to import math-verify and answer a ping
KILL_GRACE_S = 1.0  # a comparison is killed this long after its deadline (the worker's timer missed it)
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of the worker (RLIMIT_AS)
_HEADER = struct.Struct("<I")


def _send(fd: int, message: Any) -> None:
    payload = marshal.dumps(message)
    data = _HEADER.pack(len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def _receive(fd: int, deadline: float = float("inf")) -> Any:
    """One message, or TimeoutError when `deadline` (perf_counter) passes; EOFError when the pipe closes."""
    import select

    buf, need, have_header = bytearray(), _HEADER.size, False
    while True:
        while len(buf) < need:
            wait = deadline - time.perf_counter()
            if wait <= 0 or (wait != float("inf") and not select.select([fd], [], [], wait)[0]):
                raise TimeoutError
            chunk = os.read(fd, need - len(buf))
            if not chunk:
                raise EOFError("the math-verify worker closed its pipe")
            buf += chunk
        if have_header:
            return marshal.loads(bytes(buf[_HEADER.size:]))
        need, have_header = _HEADER.size + _HEADER.unpack(buf[: _HEADER.size])[0], True


class _Deadline(BaseException):
    """Raised by the worker's timer; a BaseException, so math-verify's `except Exception` lets it pass."""


def serve_worker(fd_in: int = 0) -> None:
    """Worker loop: (gold, answer, timeout_s) in, (status, detail) out, until EOF.

    Statuses: correct, wrong, invalid (answer unparseable), error (math-verify raised on the answer),
    timeout, gold_invalid, gold_error, gold_timeout. Stray output of the libraries goes to stderr.
    """
    import signal

    fd_out = os.dup(1)
    os.dup2(2, 1)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # no address-space limit here; the parent's kill still bounds the time
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": this loop times out
    from math_verify import parse, verify

    def on_alarm(signum, frame):
        raise _Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    verify(parse("\\boxed{1/2}"), parse("\\boxed{0.5}"))  # load the parsers now, not on the first answer
    golds: dict[str, list] = {}
    while True:
        try:
            request = _receive(fd_in)
        except EOFError:
            return
        if request is None:
            _send(fd_out, ("pong", ""))
            continue
        gold, answer, timeout_s = request
        stage, reply = "gold_", ("", "")
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            if gold not in golds:
                if len(golds) > 4096:
                    golds.clear()
                golds[gold] = parse("\\boxed{" + gold + "}", parsing_timeout=None, raise_on_error=True)
            parsed_gold = golds[gold]
            if not parsed_gold:
                reply = ("gold_invalid", "math-verify found no answer in the gold")
            else:
                stage = ""
                parsed = parse("\\boxed{" + answer + "}", parsing_timeout=None, raise_on_error=True)
                if not parsed:
                    reply = ("invalid", "math-verify found no answer")
                else:
                    ok = verify(parsed_gold, parsed, timeout_seconds=None, raise_on_error=True)
                    reply = ("correct" if ok else "wrong", "")
        except _Deadline:
            reply = (stage + "timeout", f"over {timeout_s:g} s")
        except Exception as e:  # noqa: BLE001 - any failure on an answer is that answer's verdict
            reply = (stage + "error", f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        _send(fd_out, reply)


class MathVerifyWorker:
    """math-verify comparisons in a worker process, one at a time (thread-safe, fork-aware).

    `kills` counts workers killed past their deadline, `crashes` those that died on an answer.
    """

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self.kills = 0
        self.crashes = 0

    def __getstate__(self) -> dict:
        return {"kills": self.kills, "crashes": self.crashes}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.kills, self.crashes = state["kills"], state["crashes"]

    def _start(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[2])  # the checkout holding dph/, if not installed
        code = f"import sys; sys.path.insert(0, {root!r}); from dph.tasks.math import serve_worker; serve_worker()"
        proc = subprocess.Popen([sys.executable, "-I", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                close_fds=True)
        try:
            _send(proc.stdin.fileno(), None)
            reply = _receive(proc.stdout.fileno(), time.perf_counter() + WORKER_START_S)
        except (OSError, EOFError, TimeoutError):
            reply = None
        if reply is None or reply[0] != "pong":
            self._stop(proc)
            raise VerifierError(f"the math-verify worker did not start ({sys.executable}; is math-verify installed?)")
        return proc

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._pid == os.getpid():
                self._stop(self._proc)
            self._proc = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean up
            pass

    def compare(self, gold: str, answer: str, timeout_s: float) -> tuple[str, str]:
        """(status, detail) of math-verify on one answer: `serve_worker`'s statuses, or killed (the
        worker ran past the deadline and was killed) and crash (the worker died)."""
        with self._lock:
            if self._proc is None or self._pid != os.getpid():
                self._proc, self._pid = self._start(), os.getpid()
            proc = self._proc
            try:
                _send(proc.stdin.fileno(), (gold, answer, float(timeout_s)))
                return tuple(_receive(proc.stdout.fileno(), time.perf_counter() + timeout_s + KILL_GRACE_S))
            except TimeoutError:
                self._discard(proc)
                self.kills += 1
                log.warning("math-verify worker killed: a comparison ran past %.1f s", timeout_s)
                return "killed", f"killed after {timeout_s:g} s"
            except (OSError, EOFError):
                self._discard(proc)
                self.crashes += 1
                log.warning("math-verify worker died on an answer; starting a new one")
                return "crash", "the answer crashed the math-verify worker"

    def _discard(self, proc: subprocess.Popen) -> None:
        self._stop(proc)
        self._proc = None


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


def _problem_key(template: str, params: Mapping[str, Any]) -> tuple:
    """What makes two embedded problems the same: the template and its numbers (not the names)."""
    return template, tuple(sorted((k, v) for k, v in params.items() if isinstance(v, int)))


# ---------------------------------------------------------------------------------------------
# Real data: GSM8K and MATH records in local JSONL / JSON / parquet files.
# ---------------------------------------------------------------------------------------------

DATA_SPLITS = ("train", "test")  # the splits of real data, each present when its files are
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))", re.ASCII)


@dataclass(frozen=True)
class Example:
    """One record of a real data set."""

    question: str
    answer: str  # the gold final answer
    solution: str  # the record's own solution, rewritten to end with its final answer


def data_files(source: str, path: str | Mapping[str, Any]) -> dict[str, list[Path]]:
    """split -> its files, in the layout of the module docstring; one-line errors naming task.path."""
    if isinstance(path, Mapping):
        unknown = sorted(set(path) - set(DATA_SPLITS))
        if unknown or not path:
            raise ValueError(f"task.path maps splits {unknown or '{}'} to files; use the splits {list(DATA_SPLITS)}")
        files = {}
        for split in (s for s in DATA_SPLITS if s in path):
            given = path[split]
            files[split] = [Path(f).expanduser() for f in ([given] if isinstance(given, str) else given)]
            for file in files[split]:
                if file.suffix not in DATA_SUFFIXES:
                    raise ValueError(f"task.path.{split}={file}: use a {' / '.join(DATA_SUFFIXES)} file")
                if not file.is_file():
                    raise FileNotFoundError(f"task.path.{split}={file}: no such file (task.source={source})")
        return files
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"task.path={path}: no such folder (expected one holding train.jsonl and "
                                f"test.jsonl, or .json / .parquet, for task.source={source})")
    files = {}
    for split in DATA_SPLITS:
        found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES
                       and (p.stem == split or p.name.startswith(f"{split}-")))
        shards = all(p.name.startswith(f"{split}-") for p in found) and len({p.suffix for p in found}) == 1
        if len(found) > 1 and not shards:
            raise ValueError(f"task.path={root}: several files hold the {split} split "
                             f"({', '.join(p.name for p in found)}); keep one, or only shards {split}-*")
        if found:
            files[split] = found
    if not files:
        raise FileNotFoundError(f"task.path={root}: no train.jsonl or test.jsonl there (nor .json, .parquet, or "
                                f"shards like train-00000-of-00001.parquet) for task.source={source}")
    return files


def read_records(file: Path, blob: bytes) -> list[Any]:
    """The records of a data file's bytes: JSON Lines, a JSON list, or a parquet table."""
    if file.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        return pq.read_table(pa.BufferReader(blob)).to_pylist()
    text = blob.decode("utf-8")
    if file.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError("a .json data file must hold a list of records")
    return records


def gsm8k_example(record: Mapping[str, Any]) -> Example:
    """GSM8K: the gold is what follows the last `####` (thousands commas dropped); the solution
    loses its calculator annotations and ends with `#### <gold>`."""
    reasoning, hashes, final = record["answer"].rpartition("####")
    gold = _DIGIT_COMMA.sub("", final.strip())
    if not hashes or not gold:
        raise ValueError("its answer does not end with '#### <final answer>'")
    steps = _CALCULATOR.sub("", reasoning).strip()
    return Example(record["question"].strip(), gold, f"{steps}\n#### {gold}" if steps else f"#### {gold}")


def math_example(record: Mapping[str, Any]) -> Example:
    """MATH: the gold is the `answer` field when present, else the last `\\boxed{}` of the solution;
    the solution is cut after that box when it holds the gold, else `\\boxed{<gold>}` is appended."""
    solution = record["solution"].strip()
    box = last_box(solution)
    boxed = solution[box[0]:box[1]].strip() if box is not None and box[1] is not None else None
    answer = record.get("answer")
    gold = (str(answer).strip() if answer is not None else "") or boxed
    if not gold:
        raise ValueError("it has no 'answer' and its solution no closed \\boxed{...}")
    if boxed == gold:
        solution = solution[: box[1] + 1]
    else:
        solution = f"{solution} \\boxed{{{gold}}}"
    return Example(record["problem"].strip(), gold, solution)


def load_data(source: str, path: str | Mapping[str, Any]) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """(split -> examples, split -> [{file, bytes, sha256}] for the fingerprint) of a real data set."""
    make, (question_key, solution_key) = {"gsm8k": gsm8k_example, "math": math_example}[source], FIELDS[source]
    examples: dict[str, list[Example]] = {}
    hashes: dict[str, Any] = {}
    for split, files in data_files(source, path).items():
        examples[split], hashes[split] = [], []
        for file in files:
            blob = file.read_bytes()
            hashes[split].append({"file": file.name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
            try:
                records = read_records(file, blob)
            except (ValueError, UnicodeDecodeError, OSError) as e:  # json and pyarrow errors are ValueErrors
                detail = " ".join(str(e).split())[:200]
                raise ValueError(f"task.path: cannot read {file} ({type(e).__name__}: {detail})") from None
            for i, record in enumerate(records):
                try:
                    examples[split].append(make(record))
                except (KeyError, TypeError, AttributeError, ValueError) as e:
                    reason = e if isinstance(e, ValueError) else f"it lacks a text {question_key!r} or {solution_key!r}"
                    raise ValueError(f"task.path: record {i} of {file}: {reason} (task.source={source})") from None
    return examples, hashes


# ---------------------------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------------------------

MATH_VERIFY_STATUS = {"correct": "correct", "wrong": "wrong", "invalid": "invalid", "error": "invalid",
                      "crash": "invalid", "timeout": "timeout", "killed": "timeout"}  # worker status -> verdict


@functools.lru_cache(maxsize=8192)
def _embedded_solutions(template: str, numbers: tuple) -> tuple[str, ...]:
    """`solutions_of` a problem, from its `_problem_key` (memoised: warm-up asks for each many times)."""
    return tuple(solutions_of(template_trees(template, dict(numbers))))


class MathTask(Task):
    """Math problems verified by their final answer; built from the keys of conf/task/math.yaml."""

    name = "math"

    def __init__(self, source: str = "embedded", path: str | Mapping[str, Any] | None = None, seed: int = 0,
                 train_size: int | None = 1000, test_size: int | None = 200, ood_size: int | None = 200,
                 prompt_template: str = "{question} ", timeout_s: float = 0.5, max_response_chars: int = 4000,
                 max_answer_chars: int = 100):
        if source not in SOURCES:
            raise ValueError(f"task.source={source!r} is not known; choose one of {list(SOURCES)}")
        if source != "embedded" and not path:
            raise ValueError(f"task.source={source} needs task.path: a folder holding train.jsonl and test.jsonl "
                             "(or .json, .parquet)")
        for key, value in (("train_size", train_size), ("test_size", test_size), ("ood_size", ood_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"task.{key}={value!r} must be a non-negative integer or null (all)")
            if value is None and source == "embedded":
                raise ValueError(f"task.{key}=null (all) is for real data; task.source=embedded needs an integer")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"task.timeout_s={timeout_s!r} must be a number of seconds > 0")
        for key, value in (("max_response_chars", max_response_chars), ("max_answer_chars", max_answer_chars)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"task.{key}={value!r} must be an integer >= 1")
        try:
            prompt_template.format(question="1+1?")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(f"task.prompt_template={prompt_template!r} may only use the field {{question}} "
                             f"({e!r})") from None
        self.source, self.path, self.seed = source, path, seed
        self.sizes = {"train": train_size, "test": test_size, "ood": ood_size}
        self.prompt_template = prompt_template
        self.timeout_s = float(timeout_s)
        self.max_response_chars, self.max_answer_chars = max_response_chars, max_answer_chars
        self.status_counts: Counter[str] = Counter()  # the verdict of every score() call
        self.verifier_counts: Counter[str] = Counter()  # where each verdict came from (see _verdict)
        self.worker = MathVerifyWorker()  # started on the first answer the exact tier cannot decide
        self._lock = threading.Lock()
        self._splits: dict[str, list[Problem]] = {}
        self._examples, self._files = load_data(source, path) if source != "embedded" else ({}, {})
        for split in self.split_names:  # now, so that a bad file or an impossible size fails before any work
            self.problems(split)

    @property
    def split_names(self) -> tuple[str, ...]:
        return SPLITS if self.source == "embedded" else tuple(self._examples)

    def _rng(self, purpose: str, seed: int | None = None) -> random.Random:
        return random.Random(f"dph-math/{self.seed if seed is None else seed}/{purpose}")

    # --- problems -----------------------------------------------------------------------------

    def problems(self, split: str) -> list[Problem]:
        self.check_split(split)
        if split not in self._splits:
            self._splits[split] = self._real_split(split) if self.source != "embedded" else self._embedded_split(split)
        return self._splits[split]

    def _embedded_split(self, split: str) -> list[Problem]:
        """test and ood come from their own streams; train skips the test problems (ood's templates
        are others), so the held-out splits do not depend on train's size."""
        if split == "ood":
            return self._draw("ood", OOD_TEMPLATES, self.sizes["ood"], self._rng("ood"), set())
        excluded = self._keys("test") if split == "train" else set()
        return self._draw(split, TRAIN_TEMPLATES, self.sizes[split], self._rng(split), excluded)

    def _keys(self, split: str) -> set[tuple]:
        return {_problem_key(p.data["template"], p.data["params"]) for p in self.problems(split)}

    def _draw(self, prefix: str, templates: Sequence[Template], count: int, rng: random.Random,
              excluded: set[tuple], distinct: bool = True) -> list[Problem]:
        """`count` problems, each of a template chosen at random, none in `excluded` (nor twice when distinct)."""
        out: list[Problem] = []
        seen = set(excluded)
        misses = 0
        while len(out) < count:
            template = rng.choice(templates)
            params = template.sample(rng)
            key = _problem_key(template.name, params)
            if key in seen:
                misses += 1
                if misses == ATTEMPTS_IN_A_ROW:
                    key_name = "model.warmup.problems" if prefix == "warmup" else f"task.{prefix}_size"
                    raise ValueError(f"{key_name}={count}: math found only {len(out)} distinct problems "
                                     f"({ATTEMPTS_IN_A_ROW} draws in a row gave no new one); ask for fewer")
                continue
            misses = 0
            if distinct:
                seen.add(key)
            prompt = self.prompt_template.format(question=template.question.format(**params))
            gold = number_text(template_trees(template.name, params)[0].value)
            out.append(Problem(f"{prefix}/{len(out)}", prompt, {"answer": gold, "template": template.name,
                                                                 "params": params}))
        return out

    def _real_split(self, split: str) -> list[Problem]:
        examples = list(enumerate(self._examples[split]))
        size = self.sizes[split]
        if size is not None and size < len(examples):  # a seeded subset, in file order
            keep = sorted(self._rng(f"{self.source}/{split}").sample(range(len(examples)), size))
            examples = [examples[i] for i in keep]
        return [Problem(f"{split}/{i}", self.prompt_template.format(question=ex.question),
                        {"answer": ex.answer, "solution": ex.solution}) for i, ex in examples]

    def warmup_problems(self, n: int, seed: int) -> list[Problem]:
        """Embedded: problems of the training templates, none of them a test problem (ood's templates
        are others), drawn with repeats. Real data: drawn from train (none without a train split)."""
        if self.source == "embedded":
            return self._draw("warmup", TRAIN_TEMPLATES, n, self._rng("warmup", seed), self._keys("test"), False)
        train = self.problems("train") if "train" in self._examples else []
        rng = self._rng("warmup", seed)
        return [train[rng.randrange(len(train))] for _ in range(n)] if train else []

    def solutions(self, problem: Problem) -> list[str]:
        """Every demonstrable solution: embedded, all paths and final-answer forms (`solutions_of`);
        real data, the record's own solution when it fits in max_response_chars."""
        if "template" in problem.data:
            return list(_embedded_solutions(*_problem_key(problem.data["template"], problem.data["params"])))
        solution = problem.data["solution"]
        return [solution] if len(solution) <= self.max_response_chars else []

    def demonstrations(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        found = self.solutions(problem)
        return rng.sample(found, min(n, len(found)))

    def fingerprint(self) -> dict[str, Any]:
        """What determines the problems and demonstrations (not the verifier's time limit)."""
        out: dict[str, Any] = {"version": VERSION, "source": self.source, "seed": self.seed, "sizes": dict(self.sizes),
                               "prompt_template": self.prompt_template, "max_response_chars": self.max_response_chars}
        if self.source != "embedded":
            out["files"] = self._files  # names, sizes and SHA-256 of the data files
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the math-verify worker (a later score() starts a new one)."""
        self.worker.close()

    # --- verifier -----------------------------------------------------------------------------

    def score(self, problem: Problem, response: str) -> Score:
        if not isinstance(response, str):
            raise VerifierError(f"math problem {problem.id}: the response is a {type(response).__name__}, not a str")
        gold = problem.data["answer"]
        if len(response) > self.max_response_chars:
            return self._verdict("invalid", None, "too_long")
        final = extract_final_answer(response)
        if final is None:
            return self._verdict("invalid", None, "no_answer")
        answer = " ".join(response.split())
        if len(final) > self.max_answer_chars:
            return self._verdict("invalid", answer, "too_long")
        exact = _exact_match(gold, final)
        if exact is not None:
            return self._verdict("correct" if exact else "wrong", answer, "exact")
        status, detail = self.worker.compare(gold, final, self.timeout_s)
        if status.startswith("gold_"):
            fix = "; raise task.timeout_s" if status == "gold_timeout" else ""
            raise VerifierError(f"math problem {problem.id}: math-verify cannot read the gold answer {gold!r} "
                                f"({status}: {detail}){fix}")
        if status in ("error", "crash", "killed"):
            log.debug("math-verify %s on %r: %s", status, final[:100], detail)
        return self._verdict(MATH_VERIFY_STATUS[status], answer, f"math_verify/{status}")

    def _verdict(self, status: str, answer: str | None, source: str) -> Score:
        """Count the verdict and its source: too_long, no_answer, exact or math_verify/<worker status>."""
        with self._lock:
            self.status_counts[status] += 1
            self.verifier_counts[source] += 1
        return Score(1.0 if status == "correct" else 0.0, answer, status)


def _exact_match(gold: str, answer: str) -> bool | None:
    """Whether two plain rationals are equal; None when either is not one (or has >= FLOAT_DIGITS decimals)."""
    if max(_decimal_places(gold), _decimal_places(answer)) >= FLOAT_DIGITS:
        return None
    gold_value, value = as_rational(gold), as_rational(answer)
    if gold_value is None or value is None:
        return None
    return gold_value == value
