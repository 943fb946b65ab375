"""Final answers of math responses: extraction, the exact rational tier, and math-verify in a worker.

`extract_final_answer` takes, after the last `</think>`, the last `\\boxed{}`, else the number after
the last `####`, else the last number (linear patterns only); `solution_signature` gives the numbers
a solution writes (its computation path); `exact_match` compares plain rationals as `Fraction`s; and
`MathVerifyWorker` runs math-verify's `parse` + `verify` in a worker process that a SIGALRM timer
stops at the time limit and that is killed when stuck in C code. dph/tasks/math.py says how the
task combines them.
"""

from __future__ import annotations

import logging
import os
import re
from fractions import Fraction

from dph.tasks.base import VerifierError, final_section
from dph.tasks.worker import (
    WorkerCrashed,
    WorkerProcess,
    WorkerTimedOut,
    WorkerUnavailable,
    python_command,
    receive,
    send,
)

log = logging.getLogger(__name__)

MAX_BRACE_DEPTH = 8  # a final answer with deeper {} nesting is invalid (math-verify slows down sharply)
MAX_DIGITS = 40  # longer numbers skip the exact tier
FLOAT_DIGITS = 6  # math-verify rounds decimals to this many places; such decimals go to it

# ---------------------------------------------------------------------------------------------
# Final-answer extraction and the exact tier. Every pattern is linear on any input.
# ---------------------------------------------------------------------------------------------

# ASCII patterns: \d is [0-9] (int() would accept other scripts' digits), \w is [A-Za-z0-9_].
_NUMBER = re.compile(  # \frac{a}{b}, or a number not glued to a word, dot or comma before it
    r"\\[dt]?frac\{\s*-?\d+\s*\}\{\s*-?\d+\s*\}"
    r"|(?:(?<![\w)\]}])-)?(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?!\w)",
    re.ASCII,
)
_UNSIGNED = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w)", re.ASCII)  # 12, 1,000, 2.5
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


def extract_final_answer(response: str, finished: bool = True) -> tuple[str | None, bool]:
    """(the final answer of a response, stripped, or None; whether a box or `####` marked it), read
    from `final_section(response)` (after the last `</think>`):
      1. the inside of the last `\\boxed{}` / `\\fbox{}` (an unclosed last box: None);
      2. else the first number after the last `####` on its line; when not `finished`, only if a
         newline ends that line (a number at the very end may have been cut);
      3. else the last number, only when `finished`."""
    text = final_section(response)
    box = last_box(text)
    if box is not None:
        start, end = box
        return (text[start:end].strip() or None if end is not None else None), True
    hashes = text.rfind("####")
    if hashes >= 0:
        line_end = text.find("\n", hashes)
        if line_end < 0 and not finished:
            return None, True
        match = _NUMBER.search(text, hashes + 4, line_end if line_end >= 0 else len(text))
        return (match.group() if match else None), True
    if not finished:
        return None, False
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return (last.group() if last else None), False


def solution_signature(response: str) -> str:
    """The unsigned numbers the final section of a response writes, each once, in order of first
    appearance, in normal form (`1,000` -> 1000, 0.50 -> 1/2; `48/2` is 48 and 2): its computation
    path, which two wordings of one computation share and another computation does not."""
    seen: dict[str, None] = {}
    for match in _UNSIGNED.finditer(final_section(response)):
        value = as_rational(match.group())
        seen.setdefault(match.group() if value is None else str(value), None)
    return " ".join(seen)


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
            request = receive(fd_in)
        except EOFError:
            return
        if request is None:
            send(fd_out, ("pong", ""))
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
        send(fd_out, reply)


class MathVerifyWorker(WorkerProcess):
    """math-verify comparisons in a worker process (dph.tasks.worker): one stuck in C code is killed
    with its worker."""

    def __init__(self):
        super().__init__(python_command("dph.tasks.math_answers", "serve_worker"), "math-verify", WORKER_START_S)

    def compare(self, gold: str, answer: str, timeout_s: float) -> tuple[str, str]:
        """(status, detail) of math-verify on one answer: `serve_worker`'s statuses, or killed (the
        worker ran past the deadline and was killed) and crash (the worker died)."""
        try:
            return tuple(self.request((gold, answer, float(timeout_s)), timeout_s + KILL_GRACE_S))
        except WorkerUnavailable:
            raise VerifierError(f"the math-verify worker did not start ({self.command[0]}; is math-verify "
                                "installed?)") from None
        except WorkerTimedOut:
            log.warning("math-verify worker killed: a comparison ran past %.1f s", timeout_s)
            return "killed", f"killed after {timeout_s:g} s"
        except WorkerCrashed:
            log.warning("math-verify worker died on an answer; starting a new one")
            return "crash", "the answer crashed the math-verify worker"


def exact_match(gold: str, answer: str) -> bool | None:
    """Whether two plain rationals are equal; None when either is not one (or has >= FLOAT_DIGITS decimals)."""
    if max(_decimal_places(gold), _decimal_places(answer)) >= FLOAT_DIGITS:
        return None
    gold_value, value = as_rational(gold), as_rational(answer)
    if gold_value is None or value is None:
        return None
    return gold_value == value
