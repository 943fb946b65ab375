"""Loaders of the real text-to-SQL data sets (BIRD, Spider) from a local copy in their own formats.

BIRD  (`task.path` = the folder holding `train/` and `dev/`):
    train/train.json, dev/dev.json: [{"question", "SQL", "db_id", "evidence"?}, ...]
    <split>/<split>_databases/<db_id>/<db_id>.sqlite
Spider (`task.path` = the folder holding the json files and `database/`):
    train_spider.json, dev.json: [{"question", "query", "db_id"}, ...]
    database/<db_id>/<db_id>.sqlite
The data sets' training files become the `train` split and their dev files the `test` split.

Schemas for prompts, read from the database file: `schema_hint` (compact, names only) and
`create_tables` (CREATE TABLE statements with types, keys and example values, as OmniSQL's prompts).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

LAYOUTS = {
    # source -> split -> (questions file, database folder, gold SQL key), relative to task.path
    "bird": {"train": ("train/train.json", "train/train_databases", "SQL"),
             "test": ("dev/dev.json", "dev/dev_databases", "SQL")},
    "spider": {"train": ("train_spider.json", "database", "query"),
               "test": ("dev.json", "database", "query")},
}


@dataclass(frozen=True)
class Example:
    """One question of a real data set, ready to become a Problem."""

    index: int  # position in the questions file
    question: str  # the question
    evidence: str  # BIRD's evidence ("" when absent or not asked for)
    gold: str
    db_id: str
    db_path: str


def _missing(source: str, root: Path, expected: Path) -> FileNotFoundError:
    return FileNotFoundError(f"task.path={root}: expected the {source} file {expected} (task.source={source})")


def load_split(source: str, root: str | Path, split: str, evidence: bool = True) -> list[Example]:
    """The examples of one split; FileNotFoundError (one line, naming task.path) for a missing file."""
    root = Path(root)
    questions_file, db_dir, gold_key = LAYOUTS[source][split]
    file = root / questions_file
    if not file.is_file():
        raise _missing(source, root, file)
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"task.path={root}: {file} is not valid JSON ({e})") from None
    out = []
    for i, entry in enumerate(entries):
        try:
            question, gold, db_id = entry["question"].strip(), entry[gold_key].strip(), entry["db_id"]
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"task.path={root}: entry {i} of {file} lacks 'question', {gold_key!r} "
                             "or 'db_id'") from None
        hint = str(entry.get("evidence") or "").strip() if evidence else ""
        db_path = root / db_dir / db_id / f"{db_id}.sqlite"
        if not db_path.is_file():
            raise _missing(source, root, db_path)
        out.append(Example(i, question, hint, gold, db_id, str(db_path)))
    return out


def questions_files(source: str, root: str | Path) -> dict[str, Any]:
    """Size and SHA-256 of each split's questions file, for the task fingerprint."""
    out = {}
    for split, (questions_file, _, _) in LAYOUTS[source].items():
        file = Path(root) / questions_file
        if not file.is_file():
            raise _missing(source, Path(root), file)
        blob = file.read_bytes()
        out[split] = {"file": questions_file, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    return out


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _quote(name: str) -> str:
    return name if _PLAIN.match(name) else "`" + name.replace("`", "``") + "`"


@lru_cache(maxsize=512)
def schema_hint(db_path: str) -> str:
    """Compact schema of a database file: "table(col,col,...) table2(...)" in file order."""
    conn = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
        parts = []
        for table in tables:
            cols = [row[1] for row in conn.execute("SELECT * FROM pragma_table_info(?)", (table,))]
            parts.append(f"{_quote(table)}({','.join(_quote(c) for c in cols)})")
        return " ".join(parts)
    finally:
        conn.close()


EXAMPLE_VALUES = 3  # distinct example values shown per column by create_tables
EXAMPLE_CHARS = 40  # longer text example values are cut to this many characters
EXAMPLE_SCAN_ROWS = 1000  # example values are looked for among a table's first rows only


def _example(value: Any) -> str:
    if isinstance(value, str):
        text = value if len(value) <= EXAMPLE_CHARS else value[:EXAMPLE_CHARS] + "..."
        return "'" + text.replace("'", "''") + "'"
    return repr(value)


@lru_cache(maxsize=512)
def create_tables(db_path: str) -> str:
    """The schema of a database file as CREATE TABLE statements, in file order, in OmniSQL's form:
    each column with its declared type and up to EXAMPLE_VALUES distinct example values (among the
    first EXAMPLE_SCAN_ROWS rows), then the primary key and the foreign keys, e.g.

        CREATE TABLE emp (
            id INTEGER, -- example: [1, 2, 3]
            name TEXT, -- example: ['Ada', 'Ben', 'Cal']
            dept INTEGER, -- example: [3, 1, 5]
            PRIMARY KEY (id),
            FOREIGN KEY (dept) REFERENCES dept (id)
        );
    """
    conn = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)
    conn.text_factory = lambda raw: raw.decode("utf-8", errors="replace")
    try:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
        return "\n\n".join(_create_table(conn, table) for table in tables)
    finally:
        conn.close()


def _create_table(conn: sqlite3.Connection, table: str) -> str:
    items: list[tuple[str, str]] = []  # (definition, comment)
    columns = conn.execute("SELECT name, type, pk FROM pragma_table_info(?)", (table,)).fetchall()
    for name, kind, _ in columns:
        column, source = _sql_name(name), _sql_name(table)
        values = [v for (v,) in conn.execute(
            f"SELECT DISTINCT {column} FROM (SELECT {column} FROM {source} LIMIT {EXAMPLE_SCAN_ROWS}) "
            f"WHERE {column} IS NOT NULL AND typeof({column}) != 'blob' LIMIT {EXAMPLE_VALUES}")]
        comment = f" -- example: [{', '.join(map(_example, values))}]" if values else ""
        items.append((f"{_quote(name)} {kind}".rstrip(), comment))
    keys = [_quote(name) for name, _, pk in sorted(columns, key=lambda c: c[2]) if pk]
    if keys:
        items.append((f"PRIMARY KEY ({', '.join(keys)})", ""))
    foreign: dict[int, list[tuple]] = {}
    for key_id, seq, target, source, to in conn.execute(
            'SELECT id, seq, "table", "from", "to" FROM pragma_foreign_key_list(?)', (table,)):
        foreign.setdefault(key_id, []).append((seq, target, source, to))
    for _, parts in sorted(foreign.items()):
        parts.sort()
        refs = [p[3] for p in parts if p[3] is not None]
        ref_text = f" ({', '.join(map(_quote, refs))})" if refs else ""
        items.append((f"FOREIGN KEY ({', '.join(_quote(p[2]) for p in parts)}) REFERENCES {_quote(parts[0][1])}"
                      f"{ref_text}", ""))
    lines = [f"    {text}{',' if i < len(items) - 1 else ''}{comment}" for i, (text, comment) in enumerate(items)]
    return f"CREATE TABLE {_quote(table)} (\n" + "\n".join(lines) + "\n);"


def _sql_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
