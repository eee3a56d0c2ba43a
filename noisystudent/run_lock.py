"""One writer per run directory: every command that writes one holds an advisory lock on it.

Two processes on one directory used to race: with tracking on the second failed with a wrong
diagnosis (an "unreachable" MLflow server, from sqlite's migration clash), with it off both did
all the work and one failed on a temporary file the other had removed. The lock is ``flock`` on
``<dir>/.noisystudent.lock``, which holds who has it (host, PID, since when) for the one-line
refusal. The kernel releases it when its process ends in any way, so a lock left by ``kill -9``
is simply taken over (the next holder says so). ``flock`` is per machine on most network file
systems: it keeps two commands on one node apart, not two nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".noisystudent.lock"


class RunDirectoryInUse(UserError, RuntimeError):
    """Another process writes this run directory."""


@contextlib.contextmanager
def run_directory_lock(directory: str | Path, command: str) -> Iterator[None]:
    """Hold the run directory's lock for the block; refuse with one line if another process has it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fh = open(directory / LOCK_NAME, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fh)
        fh.close()
        raise RunDirectoryInUse(
            f"run directory {directory} is in use by {holder.get('command', 'another command')} "
            f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}); "
            "wait for it to end, or use another directory"
        ) from None
    left = _holder(fh)
    if left:  # its holder ended without releasing it (killed): the kernel freed the lock
        print(f"note: taking over the lock of {directory} left by pid {left.get('pid')} on {left.get('host')}")
    fh.seek(0)
    fh.truncate()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": command}
    fh.write(json.dumps({**me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    fh.flush()
    try:
        yield
    finally:
        fh.seek(0)
        fh.truncate()  # empty: released cleanly
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _holder(fh) -> dict:
    fh.seek(0)
    try:
        return json.loads(fh.read() or "{}")
    except ValueError:
        return {}
