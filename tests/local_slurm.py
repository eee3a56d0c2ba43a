"""A real single-node SLURM for the tests, from Debian's packages (``slurm-wlm``, ``munge``).

:func:`start` installs the packages if they are missing, writes a ``slurm.conf`` for this one
machine (from ``slurmd -C``; no cgroups, ``proctrack/linuxproc``; ``KillWait=5`` and
``OverTimeLimit=0`` so jobs past their walltime end at once), starts ``munged``, ``slurmctld``
and ``slurmd``, and waits for the node to be idle. Where that cannot be done (not root, no
apt-get, a SLURM configuration of someone else's already here) it returns the reason, and the
tests skip with it. :func:`stop` ends what :func:`start` started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by noisystudent's tests/local_slurm.py"
PARTITION = "debug"
STATE = Path("/var/lib/noisystudent-slurm")
DAEMONS = ("slurmd", "slurmctld", "munged")


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _install() -> str | None:
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and this is not root on Debian (apt-get install slurm-wlm munge)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]
    r = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:  # a fresh machine may need its package lists first
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=env)
        r = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return None


def _config() -> str:
    node = _run("slurmd", "-C").stdout.splitlines()[0]
    host = node.split()[0].split("=", 1)[1]
    return "\n".join(
        [
            MARK,
            "ClusterName=noisystudent-test",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "OverTimeLimit=0",
            "InactiveLimit=0",
            f"StateSaveLocation={STATE}/ctld",
            f"SlurmdSpoolDir={STATE}/d",
            f"SlurmctldPidFile={STATE}/slurmctld.pid",
            f"SlurmdPidFile={STATE}/slurmd.pid",
            f"SlurmctldLogFile={STATE}/slurmctld.log",
            f"SlurmdLogFile={STATE}/slurmd.log",
            f"{node} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _idle() -> bool:
    r = _run("sinfo", "-h", "-o", "%T", timeout=10)
    return r.returncode == 0 and "idle" in r.stdout


def start() -> tuple[bool, str | None]:
    """Start SLURM on this machine: (whether this call started its daemons, why it cannot run)."""
    reason = _install()
    if reason:
        return False, reason
    if CONF.exists() and MARK not in CONF.read_text():
        return False, f"{CONF} is another SLURM's configuration; the tests do not touch it"
    if CONF.exists() and _idle():
        return False, None  # already running (an earlier test session)
    if os.geteuid() != 0:
        return False, "starting SLURM's daemons needs root"
    for d in (STATE / "ctld", STATE / "d"):
        d.mkdir(parents=True, exist_ok=True)
    CONF.write_text(_config())
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        _run("runuser", "-u", "munge", "--", "mungekey", "--create")
    if _run("pgrep", "-x", "munged").returncode != 0:
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
    _run("slurmctld")
    _run("slurmd")
    deadline = time.time() + 60
    while time.time() < deadline:
        if _idle():
            return True, None
        time.sleep(0.5)
    log = (STATE / "slurmctld.log").read_text()[-500:] if (STATE / "slurmctld.log").exists() else ""
    return True, f"SLURM's node did not become idle within 60 s: {log}"


def stop() -> None:
    """End every job and the daemons :func:`start` started."""
    _run("scancel", "--full", "--partition", PARTITION)
    for daemon in DAEMONS:
        _run("pkill", "-x", daemon)


def jobs(name: str = "") -> list[str]:
    """Job ids in the queue (pending or running), of jobs called ``name`` if given."""
    cmd = ["squeue", "-h", "-o", "%i"] + (["--name", name] if name else [])
    return _run(*cmd, timeout=10).stdout.split()


def job_state(job_id: str) -> str:
    """A job's state (RUNNING, COMPLETED, TIMEOUT, CANCELLED, ...) while slurmctld remembers it."""
    out = _run("scontrol", "show", "job", job_id, timeout=10).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "UNKNOWN")


def job_pids(job_id: str) -> list[int]:
    """The processes of a running job on this node (the batch script and what it started)."""
    host = _run("hostname", "-s").stdout.strip()
    lines = _run("scontrol", "listpids", job_id, host, timeout=10).stdout.splitlines()[1:]
    return [int(line.split()[0]) for line in lines if line.split() and line.split()[0].isdigit()]


def known_jobs() -> list[str]:
    """Every job slurmctld still remembers (finished ones for MinJobAge, 300 s by default)."""
    out = _run("scontrol", "show", "job", "-o", timeout=10).stdout
    return [f.split("=", 1)[1] for line in out.splitlines() for f in line.split()[:1] if f.startswith("JobId=")]
