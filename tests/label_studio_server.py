"""A real Label Studio server for the tests, from its own venv (``.venv-label-studio``, made by
``infra/setup.sh``: Label Studio pins its own Django and friends).

:func:`start` runs ``label-studio start`` on 127.0.0.1 at a free port with everything under the
given data directory (sqlite database, media, secret key), an admin user with a known legacy API
token, local-files serving from ``document_root`` and no browser, Sentry, analytics or version
check. It waits for ``/health`` and returns the server, or the reason it cannot run (no venv, not
up in time; with the tail of its log), and the tests skip with it. :meth:`LabelStudio.stop` ends it.
"""

from __future__ import annotations

import json as jsonlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXE = REPO / ".venv-label-studio" / "bin" / "label-studio"
USERNAME = "admin@example.com"  # Label Studio's users are e-mail addresses
PASSWORD = "noisystudent-test"
TOKEN = "noisystudent0test0token0000000000000000"  # set as the admin's legacy API token (> 5 chars)
START_TIMEOUT = 180.0  # the first start migrates a fresh sqlite database (~20 s on 2 cores)


@dataclass
class LabelStudio:
    url: str
    token: str
    process: subprocess.Popen
    log: Path

    def api(self, method: str, path: str, json=None, timeout: float = 60):
        """One API call (``path`` like ``/api/projects/``): the parsed JSON answer (None if empty).

        Raises RuntimeError with the status and the answer's body on an HTTP error.
        """
        body = None if json is None else jsonlib.dumps(json).encode()
        headers = {"Authorization": f"Token {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
        return jsonlib.loads(data) if data.strip() else None

    def get_bytes(self, path: str, timeout: float = 60) -> bytes:
        """The raw body of an authenticated GET (an image under ``/data/local-files/?d=...``)."""
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def stop(self) -> None:
        """End the server and everything it started (its whole process group)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(log: Path, offset: int = 0) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _tail(log: Path, offset: int, n: int = 600) -> str:
    return " | ".join(line for line in _read(log, offset)[-n:].splitlines() if line.strip())


def environment(data_dir: Path, document_root: Path) -> dict[str, str]:
    """The variables Label Studio 1.23.2 reads (its ``get_env`` tries ``LABEL_STUDIO_X``, then
    ``HEARTEX_X``, then plain ``X``; the prefixed names here win over a stray USERNAME or PORT)."""
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV")
    }
    return {
        **inherited,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),  # label_studio.sqlite3, media/, export/, secret key
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        # new organizations accept only JWT personal access tokens unless legacy tokens are enabled
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LABEL_STUDIO_HOST": "",  # empty: synced storages keep relative /data/local-files/ URLs, not this port's
        "LABEL_STUDIO_SENTRY_DSN": "",  # the default reports errors to Label Studio's Sentry
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",  # no request to PyPI
        "PYTHONUNBUFFERED": "1",
    }


def start(data_dir: Path, document_root: Path, timeout: float = START_TIMEOUT) -> tuple[LabelStudio | None, str | None]:
    """Start Label Studio: (the server, None), or (None, why it cannot run)."""
    if not EXE.exists():
        return None, f"{EXE} is missing (infra/setup.sh installs label-studio into .venv-label-studio)"
    data_dir, document_root = Path(data_dir).resolve(), Path(document_root).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = data_dir / "label-studio.log"
    cmd = [str(EXE), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    offset = log.stat().st_size if log.exists() else 0  # the log of this start (a data_dir may be reused)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            cmd,
            env=environment(data_dir, document_root),
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, for stop()
        )
    server = LabelStudio(url=url, token=TOKEN, process=process, log=log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return None, f"label-studio exited with {process.returncode}: {_tail(log, offset)}"
        # label-studio moves on to the next port by itself when ours was taken in the meantime
        moved = re.findall(r"Trying to start at (\d+)", _read(log, offset))
        if moved:
            server.url = f"http://127.0.0.1:{moved[-1]}"
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                if r.status == 200:
                    return server, None
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    server.stop()
    return None, f"label-studio did not answer {server.url}/health within {timeout:.0f} s: {_tail(log, offset)}"
