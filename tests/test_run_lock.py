"""One writer per run directory: a second command on a directory in use is refused with one line
naming who holds it; a lock left behind by kill -9 is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

from conftest import REPO, script_command, smoke_overrides
from test_labeling import ENV, _wait

from noisystudent.run_lock import LOCK_NAME, run_directory_lock


def test_a_second_iterate_on_a_directory_in_use_is_refused_and_a_killed_holder_is_taken_over(
    smoke_data, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    # tracking on, into the run directory's own sqlite store: the second process used to reach the
    # store while the first created it, and fail with a wrong diagnosis
    cmd = script_command("iterate.py", overrides=[*smoke_overrides(smoke_data, run_dir), "tracking.enabled=true"])
    first = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run_dir / LOCK_NAME
        holder = _wait(lambda: lock.exists() and json.loads(lock.read_text() or "{}"), 120, "the lock to be held")
        assert holder["pid"] == first.pid and holder["command"] == "iterate"
        second = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert f"run directory {run_dir} is in use by iterate (pid {first.pid} on {socket.gethostname()}" in line
        assert first.poll() is None  # the holder was not disturbed
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    with run_directory_lock(run_dir, "teacher"):  # the kernel freed the killed holder's lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of {run_dir} left by pid {first.pid}" in capsys.readouterr().out
    assert lock.read_text() == ""  # released cleanly: nothing for the next one to take over
