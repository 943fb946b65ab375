"""Sandboxed execution of untrusted SQL on SQLite files, and execution-accuracy comparison.

A query (the model's or the gold one) runs under six independent guards:
  1. the text must be one statement that starts with SELECT, WITH or VALUES (comments skipped);
  2. the connection is read-only twice over: `mode=ro` URI and `PRAGMA query_only=ON`;
  3. an authorizer allows only reads (SELECT, READ, RECURSIVE, FUNCTION but load_extension and
     file functions): ATTACH (hence VACUUM INTO), PRAGMA, DDL, DML and transactions are denied;
  4. SQLite limits cap every value (1 MB: randomblob/zeroblob/printf bombs fail at once), result
     width, the SQL text, LIKE patterns and expression depth, and forbid attached databases;
  5. a progress handler interrupts the query INSIDE SQLite at its deadline (recursive CTEs, cross
     joins), and rows are fetched one at a time up to `max_rows + 1` rows and a byte budget;
  6. `SandboxProcess` runs all of the above in a separate worker process with a memory limit and
     kills it when a query overruns its deadline inside a single SQL function call (where SQLite
     never reaches the progress handler: `printf('%.*c', 2e9, 'x')`, quadratic `instr`), then
     starts a fresh one.
Connections are opened lazily and cached per (process, thread, file); a typical query costs well
under a millisecond, worker round trip included. The worker process is `dph.tasks.worker`'s, running
`serve` of this module.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dph.tasks.base import final_section
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

PROGRESS_OPS = 100  # SQLite VM instructions between deadline checks
MAX_VALUE_BYTES = 1_000_000  # SQLITE_LIMIT_LENGTH: largest string or blob a query may build
MAX_RESULT_BYTES = 32_000_000  # total size of a fetched result before it counts as too large
FLOAT_DIGITS = 6  # floats are compared after rounding to this many decimals (AVG in another order)
LIMITS = {
    sqlite3.SQLITE_LIMIT_LENGTH: MAX_VALUE_BYTES,
    sqlite3.SQLITE_LIMIT_SQL_LENGTH: 50_000,
    sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: 1_000,
    sqlite3.SQLITE_LIMIT_EXPR_DEPTH: 200,
    sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: 100,
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
    sqlite3.SQLITE_LIMIT_VDBE_OP: 1_000_000,
    sqlite3.SQLITE_LIMIT_COLUMN: 100,  # set after the schema is loaded: caps result width, not tables
}
ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
DENIED_FUNCTIONS = {"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"}
READ_KEYWORDS = {"select", "with", "values"}
# errors that say the database file (not the query) is broken: the verifier's problem
ENVIRONMENT_ERRORS = ("SQLITE_CANTOPEN", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR")


@dataclass(frozen=True)
class QueryResult:
    """Outcome of one sandboxed query.

    status: "ok", "invalid" (rejected, error, too many rows or bytes) or "timeout".
    rows: the result rows (tuples) when status is "ok", else None.
    error: a short reason when status is not "ok".
    """

    status: str
    rows: list[tuple] | None = None
    error: str = ""


class DatabaseUnavailable(RuntimeError):
    """The database file cannot be opened or read (missing, corrupt): not the query's fault."""


def _authorize(action: int, arg1: Any, arg2: Any, db_name: Any, source: Any) -> int:
    if action not in ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class _Sandbox:
    """One read-only connection with its deadline; used by one thread of one process."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise DatabaseUnavailable(f"database file not found: {path}")
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA trusted_schema=OFF")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # loads the schema, checks the file
        except sqlite3.Error as e:
            raise DatabaseUnavailable(f"cannot open database {path}: {e}") from e
        if hasattr(conn, "enable_load_extension"):
            conn.enable_load_extension(False)
        for limit, value in LIMITS.items():
            conn.setlimit(limit, value)
        conn.text_factory = _decode_text
        conn.set_authorizer(_authorize)
        self.deadline = float("inf")
        conn.set_progress_handler(self._past_deadline, PROGRESS_OPS)
        self.conn = conn

    def _past_deadline(self) -> int:
        return time.perf_counter() > self.deadline

    def run(self, sql: str, timeout_s: float, max_rows: int) -> QueryResult:
        reason = reject_statement(sql)
        if reason:
            return QueryResult("invalid", error=reason)
        self.deadline = time.perf_counter() + timeout_s
        cur = self.conn.cursor()
        try:
            cur.execute(sql)
            if cur.description is None:
                return QueryResult("invalid", error="the statement returns no rows")
            rows: list[tuple] = []
            size = 0
            for row in cur:  # one row at a time: memory stays within the byte budget plus one row
                rows.append(row)
                if len(rows) > max_rows:
                    return QueryResult("invalid", error=f"more than max_rows={max_rows} rows")
                size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
                if size > MAX_RESULT_BYTES:
                    return QueryResult("invalid", error=f"result larger than {MAX_RESULT_BYTES} bytes")
            return QueryResult("ok", rows=rows)
        except sqlite3.Error as e:
            name = getattr(e, "sqlite_errorname", None) or ""
            if name == "SQLITE_INTERRUPT" or time.perf_counter() > self.deadline:
                return QueryResult("timeout", error=f"over {timeout_s:g} s")
            if name.startswith(ENVIRONMENT_ERRORS):
                raise DatabaseUnavailable(f"{name}: {e}") from e
            return QueryResult("invalid", error=f"{type(e).__name__}: {e}")
        except (sqlite3.Warning, ValueError, OverflowError, MemoryError, UnicodeError) as e:
            return QueryResult("invalid", error=f"{type(e).__name__}: {e}")
        finally:
            self.deadline = float("inf")
            cur.close()


_local = threading.local()


def _sandbox(path: str) -> _Sandbox:
    """The cached sandbox of `path` for this process and thread (opened on first use)."""
    cache = getattr(_local, "sandboxes", None)
    if cache is None or getattr(_local, "pid", None) != os.getpid():  # a forked child opens its own
        cache = _local.sandboxes = {}
        _local.pid = os.getpid()
    box = cache.get(path)
    if box is None:
        box = cache[path] = _Sandbox(path)
    return box


def run_query(db_path: str, sql: str, timeout_s: float = 1.0, max_rows: int = 10_000) -> QueryResult:
    """Run one untrusted statement read-only on `db_path`; raises DatabaseUnavailable for a bad file."""
    return _sandbox(str(db_path)).run(sql, timeout_s, max_rows)


def close_connections() -> None:
    """Close this thread's cached connections (e.g. before a database file is replaced)."""
    for box in getattr(_local, "sandboxes", {}).values():
        box.conn.close()
    _local.sandboxes = {}


# --- worker process ----------------------------------------------------------------------------

WORKER_MEMORY_BYTES = 1 << 30  # address-space limit of the worker process (RLIMIT_AS)
WORKER_START_S = 30.0  # how long a fresh worker may take to answer its first ping
KILL_GRACE_S = 0.5  # a query is killed this long after its deadline (plus half the time limit)


def serve(fd_in: int = 0, fd_out: int = 1) -> None:
    """Worker loop: (db_path, sql, timeout_s, max_rows) in, (status, rows, error) out, until EOF."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # no address-space limit on this platform; the other guards still apply
    while True:
        try:
            request = receive(fd_in)
        except EOFError:
            return
        if request is None:  # ping
            send(fd_out, ("pong", None, ""))
            continue
        db_path, sql, timeout_s, max_rows = request
        try:
            result = run_query(db_path, sql, timeout_s, max_rows)
            reply = (result.status, result.rows, result.error)
        except DatabaseUnavailable as e:
            reply = ("unavailable", None, str(e))
        except MemoryError:
            reply = ("invalid", None, "out of memory")
        try:
            send(fd_out, reply)
        except ValueError:  # a value marshal cannot carry (none expected from sqlite3)
            send(fd_out, ("invalid", None, "unsupported result value"))


class SandboxProcess(WorkerProcess):
    """Runs queries in a worker process (dph.tasks.worker); a query that overruns is killed with its
    worker."""

    def __init__(self):
        super().__init__(python_command("dph.tasks.sql_sandbox", "serve"), "SQL sandbox", WORKER_START_S)

    def run(self, db_path: str, sql: str, timeout_s: float = 1.0, max_rows: int = 10_000) -> QueryResult:
        """Like `run_query`, in the worker; raises DatabaseUnavailable for a bad file or worker."""
        if len(sql) > LIMITS[sqlite3.SQLITE_LIMIT_SQL_LENGTH]:
            return QueryResult("invalid", error="SQL text too long")
        try:
            status, rows, error = self.request((str(db_path), sql, float(timeout_s), int(max_rows)),
                                               timeout_s * 1.5 + KILL_GRACE_S)
        except WorkerUnavailable as e:
            raise DatabaseUnavailable(str(e)) from None
        except WorkerTimedOut:
            log.warning("SQL sandbox worker killed: a query ran past %.1f s", timeout_s)
            return QueryResult("timeout", error=f"killed after {timeout_s:g} s")
        except WorkerCrashed:
            log.warning("SQL sandbox worker died on a query; starting a new one")
            return QueryResult("invalid", error="the query crashed the sandbox worker")
        if status == "unavailable":
            raise DatabaseUnavailable(error)
        return QueryResult(status, rows, error)


# --- statement text ---------------------------------------------------------------------------

_SKIP = re.compile(r"(\s+|--[^\n]*(\n|$)|/\*.*?(\*/|$)|\()", re.S)
_TOKENS = re.compile(  # strings, quoted identifiers, comments, parentheses, words, other characters
    r"'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?|`[^`]*`?|\[[^\]]*\]?|--[^\n]*|/\*.*?(?:\*/|$)|[()]|\w+|[^\w\s]", re.S)


def reject_statement(sql: str) -> str:
    """Why `sql` is not a plain read statement ('' when it is); multiple statements fail later."""
    pos = 0
    while m := _SKIP.match(sql, pos):
        pos = m.end()
    word = re.match(r"[A-Za-z]+", sql[pos:])
    if word is None or word.group(0).lower() not in READ_KEYWORDS:
        return "not a SELECT, WITH or VALUES statement"
    return ""


def has_top_level_order_by(sql: str) -> bool:
    """Whether ORDER BY applies to the whole result (not inside parentheses, strings or comments)."""
    depth, previous = 0, ""
    for token in _TOKENS.findall(sql):
        if token in "()":
            depth = depth + 1 if token == "(" else max(0, depth - 1)
            previous = ""
        elif token.startswith(("--", "/*")):
            continue
        elif depth == 0:
            word = token.lower()
            if previous == "order" and word == "by":
                return True
            previous = word
    return False


def normalise_sql(sql: str) -> str:
    """Whitespace collapsed to single spaces and trailing semicolons removed."""
    return " ".join(sql.split()).rstrip("; ").strip()


# Fenced blocks and <answer> tags, each to its closing mark or the end of the text (group 3 empty then).
_FENCE = re.compile(r"```([\w+.-]*)(.*?)(```|\Z)", re.S)
_ANSWER = re.compile(r"<answer>(.*?)(</answer>|\Z)", re.S | re.I)
SQL_FENCE_TAGS = ("sql", "sqlite")  # fence language tags read as SQL (case-insensitive)


def _last_block(pattern: re.Pattern, text: str, finished: bool, tags: tuple[str, ...] | None = None) -> str | None:
    """The inside of the last match of a block pattern (with one of `tags` when given); one left
    open at the end of the text counts only when the response finished."""
    found = None
    for m in pattern.finditer(text):
        closed = bool(m.group(m.lastindex))
        if (closed or finished) and (tags is None or m.group(1).lower() in tags):
            found = m.group(m.lastindex - 1)
    return found


def extract_sql(response: str, finished: bool = True) -> tuple[str, bool]:
    """(the SQL of a response, whether a ```sql fence or an <answer> tag marked it), read after the
    last `</think>` (`final_section`):
      1. the inside of the LAST fenced block tagged sql or sqlite (DPH-RL/OmniSQL); a block of
         another language (```python) or none is never read;
      2. else the inside of the last <answer>...</answer>;
      3. else its first line (the embedded format), only when `finished`.
    A fence or tag left open at the end counts only when `finished` (the model ended its turn
    there, not max_new_tokens). Trailing semicolons are dropped; '' when nothing is found."""
    text = final_section(response)
    block = _last_block(_FENCE, text, finished, SQL_FENCE_TAGS)
    if block is None:
        block = _last_block(_ANSWER, text, finished)
    if block is not None:
        return block.strip().rstrip(";").strip(), True
    if not finished:
        return "", False
    return text.strip().split("\n", 1)[0].strip().rstrip(";").strip(), False


# --- comparison --------------------------------------------------------------------------------


# task.compare: how a predicted result is compared with the gold one (floats rounded to FLOAT_DIGITS
# decimals in every rule; the benchmarks' scripts compare them exactly).
COMPARE_RULES = {
    "multiset": "rows equal as multisets, as lists when the gold query has a top-level ORDER BY; "
                "column order matters (dph's default)",
    "set": "set(predicted rows) == set(gold rows): BIRD's official EX (row order and duplicates ignored)",
    "column_permutation": "like multiset, up to a permutation of the columns: the Spider test-suite "
                          "evaluation's rule",
}
PERMUTATION_ROWS = 1_000_000  # column_permutation: rows its search may project before it gives up (None)


def _canonical(row: tuple) -> tuple:
    return tuple(round(v, FLOAT_DIGITS) if type(v) is float else v for v in row)


def _same_rows(pred: list[tuple], ref: list[tuple], ordered: bool) -> bool:
    return pred == ref if ordered else Counter(pred) == Counter(ref)


def results_match(predicted: list[tuple], gold: list[tuple], ordered: bool, compare: str = "multiset") -> bool | None:
    """Execution accuracy under a COMPARE_RULES rule; None when column_permutation's search gave up."""
    pred = [_canonical(r) for r in predicted]
    ref = [_canonical(r) for r in gold]
    if compare == "set":
        return set(pred) == set(ref)
    if len(pred) != len(ref):
        return False
    if _same_rows(pred, ref, ordered):
        return True
    if compare == "multiset" or not ref or len(pred[0]) != len(ref[0]):
        return False
    return _permuted_match(pred, ref, ordered)


def _column_key(column: tuple, ordered: bool) -> Any:
    return column if ordered else frozenset(Counter(column).items())


def _permuted_match(pred: list[tuple], ref: list[tuple], ordered: bool) -> bool | None:
    """Whether some order of pred's columns makes the rows equal (multisets, or lists when ordered).

    Gold columns are matched one at a time to unused predicted columns with the same values
    (multiset of values, or sequence when ordered); each partial assignment must keep the projected
    rows equal, and of identical predicted columns only the first unused one is tried."""
    pred_cols, ref_cols = list(zip(*pred)), list(zip(*ref))
    keys = [_column_key(c, ordered) for c in pred_cols]
    candidates = [[i for i, key in enumerate(keys) if key == _column_key(c, ordered)] for c in ref_cols]
    if any(not c for c in candidates):
        return False
    work = 0

    def extend(chosen: list[int]) -> bool | None:
        nonlocal work
        depth = len(chosen)
        if depth == len(ref_cols):
            return True
        tried: set[tuple] = set()
        for i in candidates[depth]:
            if i in chosen or pred_cols[i] in tried:
                continue
            tried.add(pred_cols[i])
            work += len(pred)
            if work > PERMUTATION_ROWS:
                return None
            cols = chosen + [i]
            projected = [tuple(row[c] for c in cols) for row in pred]
            if _same_rows(projected, [row[: depth + 1] for row in ref], ordered):
                found = extend(cols)
                if found is not False:
                    return found
        return False

    return extend([])
