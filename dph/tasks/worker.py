"""A worker process for untrusted verification work (SQL queries, math-verify comparisons).

Requests and replies are marshal-encoded messages framed by a 4-byte length on the worker's stdin
and stdout. A worker answers the ping `None` with a tuple whose first item is "pong" and serves one
request at a time. `WorkerProcess.request` kills a worker that overruns its deadline (a query stuck
in C code cannot be interrupted otherwise) and starts a new one on the next request; a worker that
dies is replaced the same way. Usable from any thread; a forked child starts its own worker.
"""

from __future__ import annotations

import marshal
import os
import select
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

_HEADER = struct.Struct("<I")


class WorkerUnavailable(RuntimeError):
    """The worker process did not start or did not answer its ping."""


class WorkerTimedOut(Exception):
    """The request ran past its deadline; the worker was killed."""


class WorkerCrashed(Exception):
    """The worker died (or closed its pipe) while serving the request."""


def send(fd: int, message: Any) -> None:
    """Write one message (marshal raises ValueError for a value it cannot encode, before writing)."""
    payload = marshal.dumps(message)
    data = _HEADER.pack(len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def receive(fd: int, deadline: float = float("inf")) -> Any:
    """One message; TimeoutError when `deadline` (time.perf_counter) passes first, EOFError when the
    pipe closes."""
    buf, need, have_header = bytearray(), _HEADER.size, False
    while True:
        while len(buf) < need:
            wait = deadline - time.perf_counter()
            if wait <= 0 or (wait != float("inf") and not select.select([fd], [], [], wait)[0]):
                raise TimeoutError
            chunk = os.read(fd, need - len(buf))
            if not chunk:
                raise EOFError("the other end of the pipe closed")
            buf += chunk
        if have_header:
            return marshal.loads(bytes(buf[_HEADER.size:]))
        need, have_header = _HEADER.size + _HEADER.unpack(buf[: _HEADER.size])[0], True


def python_command(module: str, function: str) -> list[str]:
    """The command running `module.function()` in an isolated interpreter (the checkout holding dph/
    on its path, so that it works without an install too)."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {root!r}); from {module} import {function}; {function}()"
    return [sys.executable, "-I", "-c", code]


class WorkerProcess:
    """One worker process serving requests in turn. `kills` counts workers killed for overrunning a
    deadline, `crashes` those that died on a request."""

    def __init__(self, command: Sequence[str], name: str, start_s: float = 30.0):
        self.command, self.name, self.start_s = list(command), name, start_s
        self.kills = 0
        self.crashes = 0
        self._reset()

    def _reset(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_pid", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def request(self, message: Any, wait_s: float) -> Any:
        """The worker's reply to `message`; WorkerTimedOut when none came within `wait_s` seconds,
        WorkerCrashed when the worker died, WorkerUnavailable when none could be started."""
        with self._lock:
            if self._proc is None or self._pid != os.getpid():
                self._proc, self._pid = self._start(), os.getpid()
            proc = self._proc
            try:
                send(proc.stdin.fileno(), message)
                return receive(proc.stdout.fileno(), time.perf_counter() + wait_s)
            except TimeoutError:
                self._discard(proc)
                self.kills += 1
                raise WorkerTimedOut from None
            except (OSError, EOFError):
                self._discard(proc)
                self.crashes += 1
                raise WorkerCrashed from None

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        try:
            send(proc.stdin.fileno(), None)
            reply = receive(proc.stdout.fileno(), time.perf_counter() + self.start_s)
        except (OSError, EOFError, TimeoutError):
            reply = None
        if not (isinstance(reply, tuple) and reply and reply[0] == "pong"):
            self._stop(proc)
            raise WorkerUnavailable(f"the {self.name} worker did not start ({self.command[0]})")
        return proc

    def _discard(self, proc: subprocess.Popen) -> None:
        self._stop(proc)
        self._proc = None

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            pipe.close()

    def close(self) -> None:
        """Stop the worker (a later request starts a new one)."""
        with self._lock:
            if self._proc is not None and self._pid == os.getpid():
                self._stop(self._proc)
            self._proc = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean up
            pass
