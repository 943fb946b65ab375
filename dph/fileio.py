"""Files that are never seen half-written: atomic writes, built directories, checksums, locks.

- ``write_text_atomic(path, text)``: a temporary file in the same directory, fsynced, then
  ``os.replace``: readers see the old file or the new one, never a torn one.
- ``building(target, what)`` + ``new_dir(target)``: build a directory under a file lock into
  ``<name>.tmp-*`` beside it and rename it into place; a process killed mid-build leaves only the
  temporary directory, which the next build removes (``remove_stale_tmp``). A second process that
  finds the lock held says what it is waiting for.
- ``checksums(directory)`` / ``checksum_problem(directory, expected)``: sha256 of a directory's
  files, written into a manifest when a cache is built and checked when it is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"  # <name>.tmp-<random>: a directory being built


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(directory: str | Path, exclude: Iterable[str] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under ``directory`` (sorted), minus ``exclude`` names."""
    directory, skip = Path(directory), set(exclude)
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in skip}


def checksum_problem(directory: str | Path, expected: dict[str, str]) -> str | None:
    """None when every file of ``expected`` is there with its sha256; else what is wrong (one line)."""
    directory = Path(directory)
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its checksum (truncated or changed)"
    return None


@contextlib.contextmanager
def building(target: Path, what: str) -> Iterator[None]:
    """Hold the lock that guards building ``target`` (saying so when another process holds it and this
    one waits), with the temporaries of killed builds beside it removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(target)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for another process that is building %s (lock %s)", what, lock_path(target))
        lock.acquire()
    try:
        remove_stale_tmp(target.parent, held=target.name)
        yield
    finally:
        lock.release()


def lock_path(target: Path) -> Path:
    """The lock file that guards building ``target``."""
    return target.with_name(target.name + ".lock")


def remove_stale_tmp(parent: Path, held: str) -> None:
    """Remove ``*.tmp-*`` directories in ``parent`` that no running build owns. A build holds its
    target's lock while its temporary directory exists: the caller holds the lock of ``held`` (so
    that name's temporaries are stale), and another name's temporary whose lock can be taken at
    once was left by a build that was killed."""
    for tmp in parent.glob(f"*{TMP_MARK}*"):
        name = tmp.name.split(TMP_MARK)[0]
        if not tmp.is_dir():
            continue
        if name != held:
            lock = FileLock(str(lock_path(parent / name)))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # its build is running
            lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("Removed %s, left by a build that did not finish", tmp)


@contextlib.contextmanager
def new_dir(target: Path) -> Iterator[Path]:
    """A temporary directory beside ``target`` that replaces it when the block ends without an error
    (removed otherwise). The caller holds ``target``'s lock (see ``building``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + TMP_MARK, dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
