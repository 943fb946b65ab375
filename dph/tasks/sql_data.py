"""Loaders of the real text-to-SQL data sets (BIRD, Spider) from a local copy in their own formats.

BIRD  (`task.path` = the folder holding `train/` and `dev/`):
    train/train.json, dev/dev.json: [{"question", "SQL", "db_id", "evidence"?}, ...]
    <split>/<split>_databases/<db_id>/<db_id>.sqlite
Spider (`task.path` = the folder holding the json files and `database/`):
    train_spider.json, dev.json: [{"question", "query", "db_id"}, ...]
    database/<db_id>/<db_id>.sqlite
The data sets' training files become the `train` split and their dev files the `test` split.
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
    question: str  # the question, with BIRD's evidence appended when present
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
        hint = str(entry.get("evidence") or "").strip()
        if evidence and hint:
            question = f"{question} (evidence: {hint})"
        db_path = root / db_dir / db_id / f"{db_id}.sqlite"
        if not db_path.is_file():
            raise _missing(source, root, db_path)
        out.append(Example(i, question, gold, db_id, str(db_path)))
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
