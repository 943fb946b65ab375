"""Math word problems verified by their final answer (`task=math`): embedded generator, GSM8K, MATH.

The pieces: `dph.tasks.math_answers` (extraction, the exact tier, the math-verify worker),
`dph.tasks.math_embedded` (templates and solution paths) and `dph.tasks.math_data` (the loaders).

A response's final answer is read after its last `</think>` (drafts inside the reasoning never
count; `dph.tasks.base.final_section`), in this order of precedence:
  1. the inside of its last `\\boxed{...}` (or `\\fbox{...}`); an unclosed last box is invalid;
  2. else the first number after its last `####` (GSM8K style);
  3. else its last number: an integer, decimal, `a/b`, `\\frac{a}{b}` or `1,000`-style integer.
A response cut at max_new_tokens (`score(..., finished=False)`) has no final answer by rule 3 (a
cut-off "Step 1: 48/2 = 24. Step 2: 24 + " is invalid, not 24), and by rule 2 only when a newline
ends the `####` line; a closed box counts. The embedded default (embedded source, `plain`
template: the tiny model's one-line answers) reads every response as finished, as before.
A wrong answer from a box or `####` gets `format_reward`.
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
`Score.answer`, whose distinct values among correct responses are `distinct_correct`, is what tells
two solutions apart: embedded source, the whole response with whitespace collapsed (its short
solutions are their paths: different paths and different spellings of the final answer count as
different answers); real data, `solution_signature`: the numbers the solution writes, in order
(its computation path; the correct final answer is the same in every correct response, and whole
texts of long reasoning are all distinct).

Prompt template field: {question}. The `plain` preset's template is `PLAIN_TEMPLATE` ("{question} ").

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
import logging
import random
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from dph.tasks.base import (
    Problem,
    Score,
    Task,
    VerifierError,
    check_format_reward,
    check_template,
    verdict_reward,
)
from dph.tasks.math_answers import MathVerifyWorker, exact_match, extract_final_answer, solution_signature
from dph.tasks.math_data import load_data
from dph.tasks.math_embedded import (
    OOD_TEMPLATES,
    TRAIN_TEMPLATES,
    Template,
    number_text,
    problem_key,
    solutions_of,
    template_trees,
)

log = logging.getLogger(__name__)

VERSION = 1  # bump whenever problem generation, solutions or the prompt format change
SOURCES = ("embedded", "gsm8k", "math")
SPLITS = ("train", "test", "ood")
ATTEMPTS_IN_A_ROW = 1000  # generator draws in a row that find no new problem before it gives up
PLAIN_TEMPLATE = "{question} "  # the embedded default's prompt (the `plain` preset)

# ---------------------------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------------------------

MATH_VERIFY_STATUS = {"correct": "correct", "wrong": "wrong", "invalid": "invalid", "error": "invalid",
                      "crash": "invalid", "timeout": "timeout", "killed": "timeout"}  # worker status -> verdict


@functools.lru_cache(maxsize=8192)
def _embedded_solutions(template: str, numbers: tuple) -> tuple[str, ...]:
    """`solutions_of` a problem, from its `problem_key` (memoised: warm-up asks for each many times)."""
    return tuple(solutions_of(template_trees(template, dict(numbers))))


class MathTask(Task):
    """Math problems verified by their final answer; built from the keys of conf/task/math.yaml."""

    name = "math"

    def __init__(self, source: str = "embedded", path: str | Mapping[str, Any] | None = None, seed: int = 0,
                 train_size: int | None = 1000, test_size: int | None = 200, ood_size: int | None = 200,
                 prompt_template: str | None = None, timeout_s: float = 0.5, max_response_chars: int = 4000,
                 max_answer_chars: int = 100, format_reward: float = 0.0):
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
        prompt_template = check_template(
            self.name, PLAIN_TEMPLATE if prompt_template is None else prompt_template, {"question": "1+1?"})
        self.source, self.path, self.seed = source, path, seed
        self.sizes = {"train": train_size, "test": test_size, "ood": ood_size}
        self.prompt_template = prompt_template
        self.format_reward = check_format_reward(format_reward)
        # the embedded default (tiny model, one-line answers): every response is read as finished
        self.embedded_default = source == "embedded" and prompt_template == PLAIN_TEMPLATE
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
        return {problem_key(p.data["template"], p.data["params"]) for p in self.problems(split)}

    def _draw(self, prefix: str, templates: Sequence[Template], count: int, rng: random.Random,
              excluded: set[tuple], distinct: bool = True) -> list[Problem]:
        """`count` problems, each of a template chosen at random, none in `excluded` (nor twice when distinct)."""
        out: list[Problem] = []
        seen = set(excluded)
        misses = 0
        while len(out) < count:
            template = rng.choice(templates)
            params = template.sample(rng)
            key = problem_key(template.name, params)
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
            return list(_embedded_solutions(*problem_key(problem.data["template"], problem.data["params"])))
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

    def score(self, problem: Problem, response: str, *, finished: bool = True) -> Score:
        if not isinstance(response, str):
            raise VerifierError(f"math problem {problem.id}: the response is a {type(response).__name__}, not a str")
        gold = problem.data["answer"]
        if len(response) > self.max_response_chars:
            return self._verdict("invalid", None, "too_long")
        final, marked = extract_final_answer(response, finished or self.embedded_default)
        if final is None:
            return self._verdict("invalid", None, "no_answer")
        answer = " ".join(response.split()) if self.source == "embedded" else solution_signature(response)
        if len(final) > self.max_answer_chars:
            return self._verdict("invalid", answer, "too_long")
        exact = exact_match(gold, final)
        if exact is not None:
            return self._verdict("correct" if exact else "wrong", answer, "exact", marked)
        status, detail = self.worker.compare(gold, final, self.timeout_s)
        if status.startswith("gold_"):
            fix = "; raise task.timeout_s" if status == "gold_timeout" else ""
            raise VerifierError(f"math problem {problem.id}: math-verify cannot read the gold answer {gold!r} "
                                f"({status}: {detail}){fix}")
        if status in ("error", "crash", "killed"):
            log.debug("math-verify %s on %r: %s", status, final[:100], detail)
        return self._verdict(MATH_VERIFY_STATUS[status], answer, f"math_verify/{status}", marked)

    def _verdict(self, status: str, answer: str | None, source: str, marked: bool = False) -> Score:
        """Count the verdict and its source: too_long, no_answer, exact or math_verify/<worker status>."""
        with self._lock:
            self.status_counts[status] += 1
            self.verifier_counts[source] += 1
        return Score(verdict_reward(status, marked, self.format_reward), answer, status)

    def reasoning_demonstrations(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """Up to `n` correct responses as instruction models write them (the `instruct` preset): the
        steps of a solution one per line, then `So the answer is $\\boxed{F}$.` (embedded: an opening
        line, then a path that ends in a box, F as written there; real data: the record's solution, a
        `#### N` ending boxed)."""
        if "template" in problem.data:
            boxed = [s.rsplit(". \\boxed{", 1) for s in self.solutions(problem) if ". \\boxed{" in s]
            picked = rng.sample(boxed, min(n, len(boxed)))
            opening = "Let me compute it step by step."
            return ["\n".join([opening, *path.split(", "), f"So the answer is $\\boxed{{{box}$."])
                    for path, box in picked]
        responses = []
        for solution in self.demonstrations(problem, n, rng):
            if "\\boxed" not in solution:
                solution = solution.rpartition("####")[0].rstrip() or solution
                solution += f"\nSo the answer is $\\boxed{{{problem.data['answer']}}}$."
            responses.append(solution)
        return responses
