"""GSM8K- and MATH-style records in local JSONL / JSON / parquet files (layout: dph/tasks/math.py)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dph.tasks.math_answers import last_box

FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}  # (prompt, solution) keys

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
