"""Text-to-SQL verified by execution (`task=sql`): the embedded generator, BIRD or Spider.

Reward is execution accuracy: the predicted and the gold query run on the question's SQLite
database and their results are compared by the rule `compare` (`sql_sandbox.COMPARE_RULES`):
  multiset (default): equal as multisets of rows (as lists when the gold query has a top-level
      ORDER BY), column order significant;
  set: set(pred) == set(gold), BIRD's official EX (row order and duplicates ignored);
  column_permutation: multiset up to a permutation of the columns, the Spider test-suite rule
      (a search that runs out of its budget, PERMUTATION_ROWS, is status timeout).
Floats are compared rounded to 6 decimals in every rule.

The response's SQL (`sql_sandbox.extract_sql`), read after its last `</think>` so that a draft
inside the reasoning never counts: the inside of the LAST fenced block tagged sql (or sqlite;
case-insensitive; a ```python or untagged block is never read), else of the last <answer> tag,
else the first line (the embedded format). A response cut at max_new_tokens (`finished=False`)
gets neither the first line nor a fence or tag left open at its end, except in the embedded
default (embedded data, `plain` template: the tiny model answers on one line), whose responses are
always read as finished. Trailing semicolons are dropped. A wrong query from a fence or tag gets
`format_reward`. `Score.answer` is that SQL with whitespace collapsed, so two spellings of the same
query count as two distinct answers. Statuses: correct, wrong, invalid (nothing extracted, not a
single read statement, SQL error, denied operation, over `max_rows` rows) and timeout (over
`timeout_s`, enforced inside SQLite, or the worker killed). Every query runs in the read-only
sandbox of `dph.tasks.sql_sandbox`, in a worker process; a gold query that fails there raises
VerifierError (a data bug), as does a missing or corrupt database file.

Prompt template fields: {schema} (compact: "emp(id,name,dept) dept(id,name)"; embedded data: only
the tables the question needs), {create_tables} (CREATE TABLE statements of the whole database
with types, keys and example values: `sql_data.create_tables`), {question} and {evidence} (BIRD's,
'' when there is none or `evidence` is false). A template without {evidence} gets it appended to
{question} as " (evidence: ...)". The `plain` preset's template is `PLAIN_TEMPLATE`.

Sources (`source`):
  embedded: seeded databases and template questions (`dph.tasks.sql_embedded`); splits train and
      test over the company, school and shop schemas, ood over the unseen ship schema.
  bird, spider: a local copy at `path` (`dph.tasks.sql_data`); splits train and test (the dev set).
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from dph.tasks.base import (
    Problem,
    Score,
    Task,
    VerifierError,
    check_format_reward,
    check_template,
    template_fields,
    verdict_reward,
)
from dph.tasks.sql_data import LAYOUTS, create_tables, load_split, questions_files, schema_hint
from dph.tasks.sql_embedded import (
    OOD_SCHEMAS,
    SCHEMAS,
    TRAIN_SCHEMAS,
    forms,
    is_test_question,
    sample_questions,
    write_databases,
)
from dph.tasks.sql_sandbox import (
    COMPARE_RULES,
    DatabaseUnavailable,
    SandboxProcess,
    extract_sql,
    has_top_level_order_by,
    normalise_sql,
    results_match,
)

VERSION = 1  # bump when the embedded databases, questions or prompt format change
SOURCES = ("embedded", "bird", "spider")
GOLD_CACHE_SIZE = 4096  # gold results kept per task (LRU)
PLAIN_TEMPLATE = "{schema} | {question}: "  # the embedded default's prompt (the `plain` preset)
DEFAULT_COMPARE = "multiset"
TEMPLATE_SAMPLE = {"schema": "t(a)", "create_tables": "CREATE TABLE t (a INTEGER);", "question": "how many t?",
                   "evidence": ""}  # every template field, for checking a template


def default_cache_dir() -> Path:
    """A per-user folder under the system temp directory."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"dph-{user}" / "cache"


class SQLTask(Task):
    """Execution-verified text-to-SQL; built from the keys of conf/task/sql.yaml."""

    name = "sql"

    def __init__(self, source: str = "embedded", path: str | None = None, seed: int = 0,
                 train_size: int | None = 1000, test_size: int | None = 200, ood_size: int | None = 200,
                 timeout_s: float = 1.0, gold_timeout_s: float = 10.0, max_rows: int = 10_000,
                 evidence: bool = True, cache_dir: str | None = None, prompt_template: str | None = None,
                 compare: str = DEFAULT_COMPARE, format_reward: float = 0.0):
        if source not in SOURCES:
            raise ValueError(f"task.source={source!r} is not known; choose one of {list(SOURCES)}")
        if source != "embedded" and not path:
            raise ValueError(f"task.source={source} needs task.path: the folder of a local copy of the data set")
        if source != "embedded" and not Path(path).is_dir():
            raise FileNotFoundError(f"task.path={path}: no such folder (expected a local copy of {source})")
        for key, value in (("timeout_s", timeout_s), ("gold_timeout_s", gold_timeout_s), ("max_rows", max_rows)):
            if not value or value <= 0:
                raise ValueError(f"task.{key}={value!r} must be > 0")
        for key, value in (("train_size", train_size), ("test_size", test_size), ("ood_size", ood_size)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"task.{key}={value!r} must be a non-negative integer or null (all)")
        if source == "embedded" and None in (train_size, test_size, ood_size):
            raise ValueError("task.source=embedded needs integer train_size, test_size and ood_size "
                             "(null, all, is for real data)")
        if compare not in COMPARE_RULES:
            raise ValueError(f"task.compare={compare!r} is not a rule; choose one of {list(COMPARE_RULES)}")
        self.prompt_template = check_template(
            self.name, PLAIN_TEMPLATE if prompt_template is None else prompt_template, TEMPLATE_SAMPLE)
        self._fields = template_fields(self.prompt_template)
        self.compare = compare
        self.format_reward = check_format_reward(format_reward)
        # the embedded default (tiny model, one-line answers): every response is read as finished
        self.embedded_default = source == "embedded" and self.prompt_template == PLAIN_TEMPLATE
        self.source, self.path, self.seed = source, path, seed
        self.sizes = {"train": train_size, "test": test_size, "ood": ood_size}
        self.timeout_s, self.gold_timeout_s, self.max_rows = float(timeout_s), float(gold_timeout_s), int(max_rows)
        self.evidence = evidence
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.status_counts: Counter[str] = Counter()  # statuses of every score() call, timeouts included
        self._splits: dict[str, list[Problem]] = {}
        self._db_paths: dict[str, str] | None = None
        self._facts: dict[str, Any] = {}
        self._gold: OrderedDict[tuple[str, str], list[tuple]] = OrderedDict()
        self._lock = threading.Lock()
        self.sandbox = SandboxProcess()  # the worker process that runs every query (started on first use)
        if source != "embedded":
            self._data_files = questions_files(source, path)  # also checks that the files exist

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("train", "test", "ood") if self.source == "embedded" else tuple(LAYOUTS[self.source])

    # --- data ---------------------------------------------------------------------------------

    def _embedded(self) -> tuple[dict[str, str], dict[str, Any]]:
        with self._lock:
            if self._db_paths is None:
                self._db_paths, self._facts = write_databases(self.cache_dir, self.seed, VERSION)
        return self._db_paths, self._facts

    def databases(self) -> dict[str, str]:
        """Embedded source: database id -> file path (written under cache_dir on first call)."""
        if self.source != "embedded":
            raise ValueError(f"task.source={self.source}: the databases are those of task.path")
        return dict(self._embedded()[0])

    def prompt(self, hint: str, db_path: str, question: str, evidence: str = "") -> str:
        """The prompt of a question: the template with its fields (module docstring)."""
        fields = dict(TEMPLATE_SAMPLE, schema=hint, question=question, evidence=evidence)
        if evidence and "evidence" not in self._fields:
            fields["question"] = f"{question} (evidence: {evidence})"
        if "create_tables" in self._fields:
            fields["create_tables"] = create_tables(db_path)
        return self.prompt_template.format(**fields)

    def _embedded_problems(self, questions: list, split: str) -> list[Problem]:
        paths, _ = self._embedded()
        return [
            Problem(f"{split}/{i}", self.prompt(q.hint, paths[q.db], q.text),
                    {"db_id": q.db, "db_path": paths[q.db], "gold": q.gold, "ordered": has_top_level_order_by(q.gold),
                     "params": q.params})
            for i, q in enumerate(questions)
        ]

    def _rng(self, purpose: str, seed: int | None = None) -> random.Random:
        return random.Random(f"dph-sql/{self.seed if seed is None else seed}/{purpose}")

    def _keep(self, split: str):
        """Test questions come from one side of a seeded partition, train and warm-up from the other."""
        return lambda prompt: is_test_question(prompt, self.seed) == (split == "test")

    def problems(self, split: str) -> list[Problem]:
        self.check_split(split)
        if split not in self._splits:
            self._splits[split] = self._build_split(split)
        return self._splits[split]

    def _build_split(self, split: str) -> list[Problem]:
        size = self.sizes[split]
        if self.source != "embedded":
            examples = load_split(self.source, self.path, split, self.evidence)
            if size is not None and size < len(examples):
                keep = sorted(self._rng(f"{self.source}/{split}").sample(range(len(examples)), size))
                examples = [examples[i] for i in keep]
            return [
                Problem(f"{split}/{ex.index}",
                        self.prompt(schema_hint(ex.db_path), ex.db_path, ex.question, ex.evidence),
                        {"db_id": ex.db_id, "db_path": ex.db_path, "gold": ex.gold,
                         "ordered": has_top_level_order_by(ex.gold)})
                for ex in examples
            ]
        _, facts = self._embedded()
        if split == "ood":
            questions = sample_questions(OOD_SCHEMAS, facts, self._rng("ood"), size, lambda _: True, "task.ood_size")
        else:
            questions = sample_questions(TRAIN_SCHEMAS, facts, self._rng(split), size, self._keep(split),
                                         f"task.{split}_size")
        return self._embedded_problems(questions, split)

    def warmup_problems(self, n: int, seed: int) -> list[Problem]:
        """Embedded: questions on the training schemas from the train side of the partition (never
        test; ood is another schema), templates equally likely, so questions may repeat.
        Real data: drawn from the train split."""
        if self.source != "embedded":
            train = self.problems("train")
            rng = self._rng("warmup", seed)
            return [train[rng.randrange(len(train))] for _ in range(n)] if train else []
        _, facts = self._embedded()
        questions = sample_questions(TRAIN_SCHEMAS, facts, self._rng("warmup", seed), n, self._keep("warmup"),
                                     "model.warmup.problems", distinct=False)
        return self._embedded_problems(questions, "warmup")

    def solutions(self, problem: Problem) -> list[str]:
        """All known correct queries of a problem, gold first (only the gold one for real data)."""
        params = problem.data.get("params")
        return forms(SCHEMAS[problem.data["db_id"]], params) if params else [problem.data["gold"]]

    def demonstrations(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        candidates = self.solutions(problem)
        return rng.sample(candidates, min(n, len(candidates)))

    def fingerprint(self) -> dict[str, Any]:
        """What determines the problems and demonstrations, and the comparison rule (it decides which
        prompts pre-sampling finds solved); not the verifier's limits or cache_dir. The template and
        rule appear only when they are not the defaults, so the embedded default keeps its caches."""
        out: dict[str, Any] = {"version": VERSION, "source": self.source, "seed": self.seed, "sizes": dict(self.sizes)}
        if self.source != "embedded":
            out.update(evidence=self.evidence, files=self._data_files)  # sizes and hashes of the questions files
        if self.prompt_template != PLAIN_TEMPLATE:
            out["prompt_template"] = self.prompt_template
        if self.compare != DEFAULT_COMPARE:
            out["compare"] = self.compare
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- verifier -----------------------------------------------------------------------------

    def _gold_rows(self, problem: Problem) -> list[tuple]:
        db_path, gold = problem.data["db_path"], problem.data["gold"]
        key = (db_path, gold)
        with self._lock:
            rows = self._gold.get(key)
            if rows is not None:
                self._gold.move_to_end(key)
                return rows
        try:
            result = self.sandbox.run(db_path, gold, self.gold_timeout_s, self.max_rows)
        except DatabaseUnavailable as e:
            raise self._unavailable(problem, e) from e
        if result.status != "ok":
            fix = {"timeout": " (raise task.gold_timeout_s?)"}.get(result.status, "")
            if "max_rows" in result.error:
                fix = " (raise task.max_rows?)"
            raise VerifierError(f"sql problem {problem.id}: the gold query failed on {db_path}: {result.status}, "
                                f"{result.error}{fix}; gold: {gold}")
        with self._lock:
            self._gold[key] = result.rows
            if len(self._gold) > GOLD_CACHE_SIZE:
                self._gold.popitem(last=False)
        return result.rows

    def _unavailable(self, problem: Problem, error: DatabaseUnavailable) -> VerifierError:
        """A database that cannot be read (deleted or damaged after the run started): its file and the fix."""
        if self.source == "embedded":
            fix = (f"dph writes the embedded databases again under task.cache_dir={self.cache_dir} at the next start: "
                   "run the same command again (it resumes from the run's last checkpoint)")
        else:
            fix = (f"restore it from your copy of {self.source} under task.path={self.path}, then run the same "
                   "command again (it resumes from the run's last checkpoint)")
        return VerifierError(f"sql problem {problem.id}: {error}; {fix}")

    def score(self, problem: Problem, response: str, *, finished: bool = True) -> Score:
        gold_rows = self._gold_rows(problem)
        sql, marked = extract_sql(response, finished or self.embedded_default)
        if not sql:
            return self._verdict("invalid", None, marked)
        try:
            result = self.sandbox.run(problem.data["db_path"], sql, self.timeout_s, self.max_rows)
        except DatabaseUnavailable as e:
            raise self._unavailable(problem, e) from e
        if result.status == "ok":
            match = results_match(result.rows, gold_rows, problem.data["ordered"], self.compare)
            status = {True: "correct", False: "wrong", None: "timeout"}[match]
        else:
            status = result.status
        return self._verdict(status, normalise_sql(sql), marked)

    def _verdict(self, status: str, answer: str | None, marked: bool) -> Score:
        with self._lock:
            self.status_counts[status] += 1
        return Score(verdict_reward(status, marked, self.format_reward), answer, status)

    def reasoning_demonstrations(self, problem: Problem, n: int, rng: random.Random) -> list[str]:
        """Up to `n` correct responses as instruction models write them (the `instruct` preset): a few
        lines on the tables and clauses a correct query (drawn at random) needs, then that query in a
        ```sql fence, ending with a semicolon."""
        clauses = (("join", "JOIN links the tables on their key."),
                   ("where", "WHERE keeps the rows the question asks about."),
                   ("group", "GROUP BY makes one row per group."), ("order", "ORDER BY sorts the rows."),
                   ("limit", "LIMIT keeps only the first rows."), ("distinct", "DISTINCT drops repeated values."))
        responses = []
        for sql in self.demonstrations(problem, n, rng):
            words = sql.replace("(", " ( ").replace(")", " ) ").lower().split()
            tables = list(dict.fromkeys(words[i + 1] for i, word in enumerate(words[:-1])
                                        if word in ("from", "join") and words[i + 1] != "("))
            lines = ["Let me think step by step.",
                     f"The data is in the table{'s' if len(tables) > 1 else ''} {' and '.join(tables)}."]
            lines += [text for word, text in clauses if word in words]
            responses.append("\n".join(lines) + f"\n```sql\n{sql};\n```")
        return responses
