"""The embedded text-to-SQL data: seeded SQLite databases, template questions, equivalent SQL forms.

Four schemas share one shape, a main table `T(id,name,<side>,<num0>,<num1>)` whose `<side>` column
references `S(id,name,<attr>)`. Three schemas (company, school, shop) are the training schemas of the
`train`/`test` splits; `ship` appears only in the `ood` split. Numeric columns hold distinct values,
so ORDER BY and LIMIT are deterministic, and thresholds are drawn among stored values, so `x > v` and
`x >= v` differ. Every question of the 16 templates has many equivalent correct queries (`forms`:
flipped or negated conditions, BETWEEN vs two bounds, JOIN vs IN-subquery vs EXISTS, aliases,
COUNT(*) vs COUNT(id) vs COUNT(1), MAX vs ORDER BY ... LIMIT 1, keyword case); the first is the gold.

A question has a compact schema hint (only the tables it needs) and words; its `prompt` is the
`plain` prompt, which also keys the train/test partition (so other templates keep the splits):
    "emp(id,name,dept,salary,age) | names of emp with salary > 52: "
    -> "SELECT name FROM emp WHERE salary > 52", "select e.name from emp e where NOT e.salary <= 52", ...
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPS = (">", "<", ">=", "<=", "=", "!=")


@dataclass(frozen=True)
class Schema:
    """One database: main table (id, name, side, nums[0], nums[1]) and side table (id, name, attr)."""

    db: str  # database id and file stem
    table: str  # main table
    nums: tuple[tuple[str, int, int], tuple[str, int, int]]  # numeric columns: (name, low, high), distinct values
    names: tuple[str, ...]  # pool of main.name values (distinct per row)
    side: str  # side table; also the name of the main table's foreign-key column
    side_names: tuple[str, ...]  # side.name values (5 are used)
    attr: str  # side table's text attribute
    attr_values: tuple[str, ...]  # pool of side.attr values (drawn with repetition)

    def hint(self, tables: str) -> str:
        """Compact schema of the tables a question uses: "m" main, "s" side, "ms" both."""
        main = f"{self.table}(id,name,{self.side},{self.nums[0][0]},{self.nums[1][0]})"
        side = f"{self.side}(id,name,{self.attr})"
        return " ".join(text for key, text in (("m", main), ("s", side)) if key in tables)


PEOPLE = ("Ada", "Ben", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jay", "Kim", "Lee", "Max", "Ned",
          "Oli", "Pam", "Ray", "Sam", "Tom", "Uma", "Val", "Wes", "Zoe", "Amy", "Bob", "Eli", "Kai", "Mia")
SCHEMAS: dict[str, Schema] = {
    s.db: s
    for s in (
        Schema("company", "emp", (("salary", 30, 150), ("age", 20, 65)), PEOPLE,
               "dept", ("Sales", "HR", "IT", "Ops", "Legal", "Admin"), "city", ("Paris", "Oslo", "Rome", "Lima")),
        Schema("school", "stu", (("score", 0, 100), ("height", 140, 199)), PEOPLE,
               "club", ("Chess", "Drama", "Choir", "Art", "Robots", "Film"), "day", ("Mon", "Tue", "Wed", "Fri")),
        Schema("shop", "item", (("price", 1, 99), ("qty", 0, 80)),
               ("Pen", "Cup", "Lamp", "Mug", "Bag", "Hat", "Fan", "Key", "Jar", "Pot", "Rug", "Saw", "Tape",
                "Vase", "Wok", "Box", "Dice", "Glue", "Nut", "Oar", "Bell", "Comb"),
               "cat", ("Food", "Toys", "Tools", "Books", "Garden", "Music"),
               "aisle", ("North", "South", "East", "West")),
        Schema("ship", "ship", (("tons", 100, 999), ("crew", 5, 80)),
               ("Argo", "Brig", "Comet", "Dove", "Echo", "Finch", "Gull", "Heron", "Ibis", "Jade", "Kite", "Lark",
                "Mako", "Nova", "Orca", "Pike", "Quest", "Raven", "Swan", "Tern"),
               "port", ("Hull", "Cork", "Bari", "Split", "Tromso", "Gdansk"),
               "country", ("UK", "Italy", "Norway", "Poland")),
    )
}
TRAIN_SCHEMAS = ("company", "school", "shop")
OOD_SCHEMAS = ("ship",)


# --- databases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What the question sampler needs to know about one generated database."""

    values: tuple[tuple[int, ...], tuple[int, ...]]  # sorted values of nums[0], nums[1]
    attrs: tuple[str, ...]  # side.attr values present (sorted, distinct)
    side_ids: tuple[int, ...]  # side ids that have at least one main row
    letters: tuple[str, ...]  # first letters of main.name (sorted, distinct)


def build_database(schema: Schema, seed: int) -> tuple[bytes, Facts]:
    """The database file of `schema` for `seed` (same bytes for the same seed) and its facts."""
    rng = random.Random(f"dph-sql/{seed}/{schema.db}")
    n = rng.randint(12, 18)
    side_names = rng.sample(schema.side_names, 5)
    side_rows = [(i + 1, name, rng.choice(schema.attr_values)) for i, name in enumerate(side_names)]
    cols = [rng.sample(range(lo, hi + 1), n) for _, lo, hi in schema.nums]
    names = rng.sample(schema.names, n)
    main_rows = [(i + 1, name, rng.randint(1, 5), cols[0][i], cols[1][i]) for i, name in enumerate(names)]
    (c0, _, _), (c1, _, _) = schema.nums
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE {schema.side}(id INTEGER PRIMARY KEY, name TEXT NOT NULL, {schema.attr} TEXT NOT NULL)")
    conn.execute(f"CREATE TABLE {schema.table}(id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 f"{schema.side} INTEGER NOT NULL REFERENCES {schema.side}(id), "
                 f"{c0} INTEGER NOT NULL, {c1} INTEGER NOT NULL)")
    conn.executemany(f"INSERT INTO {schema.side} VALUES (?, ?, ?)", side_rows)
    conn.executemany(f"INSERT INTO {schema.table} VALUES (?, ?, ?, ?, ?)", main_rows)
    conn.commit()
    blob = conn.serialize()
    conn.close()
    facts = Facts(
        values=(tuple(sorted(cols[0])), tuple(sorted(cols[1]))),
        attrs=tuple(sorted({row[2] for row in side_rows})),
        side_ids=tuple(sorted({row[2] for row in main_rows})),
        letters=tuple(sorted({row[1][0] for row in main_rows})),
    )
    return blob, facts


def write_databases(cache_dir: str | Path, seed: int, version: int) -> tuple[dict[str, str], dict[str, Facts]]:
    """Write every schema's database under `cache_dir` (atomically, only when missing or different)."""
    folder = Path(cache_dir) / f"sql-embedded-v{version}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths, facts = {}, {}
    for db, schema in SCHEMAS.items():
        blob, facts[db] = build_database(schema, seed)
        path = folder / f"{db}.sqlite"
        if not path.is_file() or path.read_bytes() != blob:
            fd, tmp = tempfile.mkstemp(prefix=f".{db}.", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        paths[db] = str(path)
    return paths, facts


# --- questions and their equivalent forms ------------------------------------------------------


def cond_forms(col: str, op: str, v: Any) -> list[str]:
    """Equivalent spellings of `col op v` (no NULLs in the data, so NOT is exact)."""
    flip = {">": "<", "<": ">", ">=": "<=", "<=": ">=", "=": "=", "!=": "!="}[op]
    negated = {">": "<=", "<": ">=", ">=": "<", "<=": ">", "=": "!=", "!=": "="}[op]
    third = f"{col} IN ({v})" if op == "=" else f"{col} <> {v}" if op == "!=" else f"NOT {col} {negated} {v}"
    return [f"{col} {op} {v}", f"{v} {flip} {col}", third]


def aliases(table: str) -> Iterator[tuple[str, Callable[[str], str]]]:
    """(FROM clause, column qualifier) pairs: no alias, `t AS x`, `t x`, table-qualified."""
    a = table[0]
    yield table, lambda c: c
    yield f"{table} AS {a}", lambda c: f"{a}.{c}"
    yield f"{table} {a}", lambda c: f"{a}.{c}"
    yield table, lambda c: f"{table}.{c}"


COUNTS = ("COUNT(*)", "COUNT({id})", "COUNT(1)")


def _forms_single(s: Schema, p: dict[str, Any]) -> Iterator[str]:
    t, kind = s.table, p["t"]
    col = s.nums[p["c"]][0] if "c" in p else ""
    for frm, q in aliases(t):
        name, c = q("name"), q(col)
        if kind == "where":
            for cond in cond_forms(c, p["op"], p["v"]):
                yield f"SELECT {name} FROM {frm} WHERE {cond}"
        elif kind == "count":
            for cnt, cond in itertools.product(COUNTS, cond_forms(c, p["op"], p["v"])):
                yield f"SELECT {cnt.format(id=q('id'))} FROM {frm} WHERE {cond}"
        elif kind == "and":
            c2 = q(s.nums[1 - p["c"]][0])
            for a, b in itertools.product(cond_forms(c, p["op"], p["v"]), cond_forms(c2, p["op2"], p["v2"])):
                yield f"SELECT {name} FROM {frm} WHERE {a} AND {b}"
                yield f"SELECT {name} FROM {frm} WHERE {b} AND {a}"
        elif kind == "between":
            lo, hi = p["lo"], p["hi"]
            for cond in (f"{c} BETWEEN {lo} AND {hi}", f"{c} >= {lo} AND {c} <= {hi}",
                         f"{lo} <= {c} AND {c} <= {hi}", f"NOT ({c} < {lo} OR {c} > {hi})"):
                yield f"SELECT {name} FROM {frm} WHERE {cond}"
        elif kind == "agg":
            fn = p["fn"]
            exprs = {"MAX": [f"MAX({c})"], "MIN": [f"MIN({c})"], "SUM": [f"SUM({c})", f"TOTAL({c})"],
                     "AVG": [f"AVG({c})", f"SUM({c}) * 1.0 / COUNT(*)", f"TOTAL({c}) / COUNT(*)"]}[fn]
            yield from (f"SELECT {e} FROM {frm}" for e in exprs)
            if fn in ("MAX", "MIN"):
                orders = [f"{c} DESC", f"-{c}"] if fn == "MAX" else [c, f"{c} ASC", f"-{c} DESC"]
                yield from (f"SELECT {c} FROM {frm} ORDER BY {o} LIMIT 1" for o in orders)
        elif kind in ("top", "sorted", "argmax"):
            orders = [f"{c} DESC", f"-{c}", f"-{c} ASC"] if p["desc"] else [c, f"{c} ASC", f"-{c} DESC"]
            limit = {"top": f" LIMIT {p.get('k')}", "sorted": "", "argmax": " LIMIT 1"}[kind]
            yield from (f"SELECT {name} FROM {frm} ORDER BY {o}{limit}" for o in orders)
            if kind == "argmax":
                yield f"SELECT {name} FROM {frm} WHERE {c} = (SELECT {'MAX' if p['desc'] else 'MIN'}({col}) FROM {t})"
        elif kind == "prefix":
            letter = p["l"]
            for cond in (f"{name} LIKE '{letter}%'", f"{name} GLOB '{letter}*'", f"substr({name}, 1, 1) = '{letter}'"):
                yield f"SELECT {name} FROM {frm} WHERE {cond}"
        elif kind == "group":
            for cnt in COUNTS:
                yield f"SELECT {q(s.side)}, {cnt.format(id=q('id'))} FROM {frm} GROUP BY {q(s.side)}"
        elif kind == "having":
            k = p["k"]
            for cnt in COUNTS:
                cnt = cnt.format(id=q("id"))
                for cond in (f"{cnt} > {k}", f"{k} < {cnt}", f"{cnt} >= {k + 1}"):
                    yield f"SELECT {q(s.side)} FROM {frm} GROUP BY {q(s.side)} HAVING {cond}"
        elif kind == "group_avg":
            averages = (f"AVG({c})", f"SUM({c}) * 1.0 / COUNT(*)")
            for cond, e in itertools.product(cond_forms(q(s.side), "=", p["sid"]), averages):
                yield f"SELECT {e} FROM {frm} WHERE {cond}"


def _forms_side(s: Schema, p: dict[str, Any]) -> Iterator[str]:
    for frm, q in aliases(s.side):
        a = q(s.attr)
        if p["t"] == "distinct":
            yield f"SELECT DISTINCT {a} FROM {frm}"
            yield f"SELECT {a} FROM {frm} GROUP BY {a}"
        else:  # count_distinct
            yield f"SELECT COUNT(DISTINCT {a}) FROM {frm}"
            yield f"SELECT COUNT(*) FROM (SELECT DISTINCT {a} FROM {frm})"


def _forms_join(s: Schema, p: dict[str, Any]) -> Iterator[str]:
    t, side, attr, val = s.table, s.side, s.attr, p["val"]
    a, b = t[0], side[0]
    select = {"join": f"{a}.name", "count_join": "COUNT(*)"}[p["t"]]
    plain = {"join": "name", "count_join": "COUNT(*)"}[p["t"]]
    ons = (f"{a}.{side} = {b}.id", f"{b}.id = {a}.{side}")
    for join, on, alias in itertools.product(("JOIN", "INNER JOIN"), ons, ("", "AS ")):
        yield f"SELECT {select} FROM {t} {alias}{a} {join} {side} {alias}{b} ON {on} WHERE {b}.{attr} = '{val}'"
    yield f"SELECT {select} FROM {t} {a}, {side} {b} WHERE {a}.{side} = {b}.id AND {b}.{attr} = '{val}'"
    yield f"SELECT {plain} FROM {t} WHERE {side} IN (SELECT id FROM {side} WHERE {attr} = '{val}')"
    yield (f"SELECT {plain} FROM {t} {a} WHERE EXISTS "
           f"(SELECT 1 FROM {side} {b} WHERE {b}.id = {a}.{side} AND {b}.{attr} = '{val}')")


def lower_keywords(sql: str) -> str:
    """Lower-case everything outside string literals (identifiers are lower case already)."""
    return "".join(part if part.startswith("'") else part.lower() for part in re.split(r"('[^']*')", sql))


def forms(schema: Schema, params: dict[str, Any]) -> list[str]:
    """All equivalent correct queries of a question, gold first, each also with lower-case keywords."""
    kind = params["t"]
    if kind in ("join", "count_join"):
        gen = _forms_join
    elif kind in ("distinct", "count_distinct"):
        gen = _forms_side
    else:
        gen = _forms_single
    upper = list(dict.fromkeys(gen(schema, params)))
    return upper + [lower_keywords(sql) for sql in upper]


def question(schema: Schema, params: dict[str, Any]) -> tuple[str, str]:
    """(the question in words, which tables its hint shows) for a template's parameters."""
    s, p = schema, params
    t, kind = s.table, p["t"]
    col = s.nums[p["c"]][0] if "c" in p else ""
    text = {
        "where": lambda: f"names of {t} with {col} {p['op']} {p['v']}",
        "count": lambda: f"how many {t} with {col} {p['op']} {p['v']}",
        "and": lambda: f"names of {t} with {col} {p['op']} {p['v']} and {s.nums[1 - p['c']][0]} {p['op2']} {p['v2']}",
        "between": lambda: f"names of {t} with {col} between {p['lo']} and {p['hi']}",
        "agg": lambda: f"{dict(MAX='max', MIN='min', SUM='total', AVG='average')[p['fn']]} {col} of {t}",
        "top": lambda: f"{'top' if p['desc'] else 'bottom'} {p['k']} {t} names by {col}",
        "sorted": lambda: f"names of {t} sorted by {col}{' desc' if p['desc'] else ''}",
        "argmax": lambda: f"name of {t} with the {'highest' if p['desc'] else 'lowest'} {col}",
        "prefix": lambda: f"names of {t} starting with {p['l']}",
        "group": lambda: f"count of {t} per {s.side}",
        "having": lambda: f"{s.side} with more than {p['k']} {t}",
        "group_avg": lambda: f"average {col} of {t} in {s.side} {p['sid']}",
        "distinct": lambda: f"distinct {s.attr} of {s.side}",
        "count_distinct": lambda: f"how many distinct {s.attr} of {s.side}",
        "join": lambda: f"names of {t} in a {s.side} with {s.attr} {p['val']}",
        "count_join": lambda: f"how many {t} in a {s.side} with {s.attr} {p['val']}",
    }[kind]()
    tables = "ms" if kind in ("join", "count_join") else "s" if kind in ("distinct", "count_distinct") else "m"
    return text, tables


def sample_params(facts: Facts, rng: random.Random) -> dict[str, Any]:
    """Random parameters of a random template (templates equally likely)."""
    kind = rng.choice(TEMPLATES)
    c = rng.randrange(2)
    if kind in ("where", "count"):
        return {"t": kind, "c": c, "op": rng.choice(OPS), "v": rng.choice(facts.values[c])}
    if kind == "and":
        return {"t": kind, "c": c, "op": rng.choice(OPS[:4]), "v": rng.choice(facts.values[c]),
                "op2": rng.choice(OPS[:4]), "v2": rng.choice(facts.values[1 - c])}
    if kind == "between":
        lo, hi = sorted(rng.sample(facts.values[c], 2))
        return {"t": kind, "c": c, "lo": lo, "hi": hi}
    if kind == "agg":
        return {"t": kind, "c": c, "fn": rng.choice(("MAX", "MIN", "SUM", "AVG"))}
    if kind == "top":
        return {"t": kind, "c": c, "k": rng.randint(2, 5), "desc": rng.random() < 0.5}
    if kind in ("sorted", "argmax"):
        return {"t": kind, "c": c, "desc": rng.random() < 0.5}
    if kind == "prefix":
        return {"t": kind, "l": rng.choice(facts.letters)}
    if kind == "having":
        return {"t": kind, "k": rng.randint(1, 3)}
    if kind == "group_avg":
        return {"t": kind, "c": c, "sid": rng.choice(facts.side_ids)}
    if kind in ("join", "count_join"):
        return {"t": kind, "val": rng.choice(facts.attrs)}
    return {"t": kind}  # group, distinct, count_distinct


TEMPLATES = ("where", "count", "and", "between", "agg", "top", "sorted", "argmax", "prefix", "group", "having",
             "group_avg", "distinct", "count_distinct", "join", "count_join")


@dataclass(frozen=True)
class Question:
    db: str
    prompt: str  # the plain prompt "<hint> | <text>: " (identifies the question)
    gold: str
    params: dict[str, Any]
    hint: str = ""  # compact schema of the tables the question needs
    text: str = ""  # the question in words


def make_question(db: str, params: dict[str, Any]) -> Question:
    schema = SCHEMAS[db]
    text, tables = question(schema, params)
    hint = schema.hint(tables)
    return Question(db, f"{hint} | {text}: ", forms(schema, params)[0], params, hint, text)


def is_test_question(prompt: str, seed: int, fraction: float = 0.2) -> bool:
    """Whether a training-schema question belongs to the test side of a fixed (seeded) partition.

    Partitioning by hash keeps test and train/warm-up questions disjoint while every template (even
    one with three possible questions) can still appear on both sides, on different schemas.
    """
    digest = hashlib.sha256(f"{seed}/{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def sample_questions(dbs: tuple[str, ...], facts: dict[str, Facts], rng: random.Random, n: int,
                     keep: Callable[[str], bool], what: str, distinct: bool = True) -> list[Question]:
    """`n` questions for which `keep(prompt)`, templates equally likely until they run out of distinct
    questions (`distinct=False` lets questions repeat so that templates stay equally likely);
    ValueError when there are not enough."""
    seen, out = set(), []
    for _ in range(50 * n + 1000):
        if len(out) >= n:
            break
        db = rng.choice(dbs)
        q = make_question(db, sample_params(facts[db], rng))
        if (not distinct or q.prompt not in seen) and keep(q.prompt):
            seen.add(q.prompt)
            out.append(q)
    if len(out) < n:
        raise ValueError(f"the embedded SQL data has only about {len(out)} distinct questions for {what}; lower it")
    return out
