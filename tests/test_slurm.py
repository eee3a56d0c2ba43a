"""Labeling on a real single-node SLURM (Debian's slurm-wlm, started by tests/local_slurm.py).

The worker jobs are real SLURM jobs running ``dask worker`` under this interpreter; the driver is
``pipelines/pseudo_label.py`` with ``cluster.kind=slurm``. Where SLURM cannot be started here (not
root, no apt-get) every test skips with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import local_slurm
import pytest
from conftest import REPO
from test_labeling import ENV, _label_cmd, _output_keys, _shard_writes, _wait, make_corpus

from noisystudent.data.label_manifest import LabelManifest

pytestmark = pytest.mark.xdist_group("slurm")  # one SLURM, one test at a time


@pytest.fixture(scope="module")
def slurm():
    started, reason = local_slurm.start()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    yield local_slurm.PARTITION
    if started:
        local_slurm.stop()


@pytest.fixture(scope="module")
def slow_corpus(smoke_data, tmp_path_factory):
    """12 shards x 125 real images, labeled by resnet18 at 224 px (a few seconds a shard)."""
    root = tmp_path_factory.mktemp("slurm-corpus")
    return root, make_corpus(root, smoke_data, 12, 125, 224)


def _slurm_cmd(root, out, tmp_path, *overrides: str) -> list[str]:
    """The pseudo_label command with one single-threaded SLURM worker job (later --set win)."""
    return _label_cmd(
        root,
        out,
        "data.image_size=224",
        "pseudo_label.batch_size=25",
        "cluster.kind=slurm",
        "cluster.n_workers=1",
        "cluster.threads_per_worker=1",
        "cluster.torch_threads=1",
        "cluster.memory_limit=3GiB",
        "cluster.dashboard_address=127.0.0.1:0",
        "cluster.wait_for_workers_s=120",
        f"cluster.slurm.log_directory={tmp_path / 'slurm-logs'}",
        *overrides,
    )


def test_a_worker_job_ended_by_its_walltime_is_replaced_and_every_shard_is_written_once(slurm, slow_corpus, tmp_path):
    """The only worker job has SLURM's shortest walltime (1 minute). Once it has labeled two shards its
    processes are stopped (SIGSTOP), so on a machine of any speed the walltime arrives mid-corpus:
    SLURM ends the job (TIMEOUT), a replacement job is submitted and finishes the corpus."""
    root, keys = slow_corpus
    out = tmp_path / "labels"
    cmd = _slurm_cmd(root, out, tmp_path, f"cluster.slurm.queue={slurm}", "cluster.slurm.walltime=00:01:00")
    start = time.time()
    with _shard_writes(out) as writes:
        job = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait(lambda: len(list(out.glob("*.summary.json"))) >= 2 if out.exists() else False, 240, "2 shards")
            first = local_slurm.jobs()
            assert len(first) == 1, first  # the worker job is in the queue
            for pid in local_slurm.job_pids(first[0]):
                os.kill(pid, signal.SIGSTOP)  # frozen: its walltime still runs
            _, stderr = job.communicate(timeout=600)
        finally:
            job.kill()
    wall = time.time() - start
    assert job.returncode == 0, stderr[-3000:]
    replacements = [j for j in local_slurm.known_jobs() if int(j) > int(first[0])]
    states = {j: local_slurm.job_state(j) for j in [first[0], *replacements]}
    print(f"\nworker jobs {states}; {wall:.0f} s")
    assert states[first[0]] == "TIMEOUT" and replacements  # ended by its walltime, then replaced
    assert local_slurm.jobs() == []  # no job left behind
    manifest = LabelManifest.load(out)
    counts = _output_keys(manifest)
    assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}
    assert manifest.total_samples == len(keys) and manifest.skipped.total == 0
    assert len(writes) == len(manifest.shards) and set(writes.values()) == {1}, writes
    workers = Counter(s.worker for s in manifest.shards)
    assert len(workers) >= 2, workers  # the first job's worker and its replacement's


def test_a_killed_driver_leaves_no_worker_job_and_its_rerun_labels_the_rest(slurm, slow_corpus, tmp_path):
    """The happy path and the driver's death. The worker job appears in squeue; the driver is
    killed (-9, no cleanup) after two shards; its worker job ends on its own once the scheduler
    is gone (no orphan holds the node); the rerun reuses what was finished, labels every other
    sample once and leaves no job behind."""
    root, keys = slow_corpus
    out = tmp_path / "labels"
    cmd = _slurm_cmd(root, out, tmp_path, f"cluster.slurm.queue={slurm}")
    with _shard_writes(out) as writes:
        job = subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            _wait(lambda: len(list(out.glob("*.summary.json"))) >= 2 if out.exists() else False, 240, "2 shards")
            workers = local_slurm.jobs()
            assert len(workers) == 1, workers  # the worker job is in the queue
            os.killpg(job.pid, signal.SIGKILL)
        finally:
            job.kill()
            job.wait()
        killed = time.time()
        _wait(lambda: workers[0] not in local_slurm.jobs(), 180, "the dead driver's worker job to end")
        orphan_s = time.time() - killed
        finished = len(list(out.glob("*.summary.json")))
        start = time.time()
        r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"\norphaned worker job ended {orphan_s:.0f} s after the driver; rerun {time.time() - start:.0f} s")
    manifest = LabelManifest.load(out)
    counts = _output_keys(manifest)
    assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}
    assert manifest.shards_reused == finished >= 2 and manifest.shards_labeled == len(manifest.shards) - finished
    assert len(writes) == len(manifest.shards) and set(writes.values()) == {1}, writes
    assert local_slurm.jobs() == []  # the rerun's worker job was cancelled at its end
    assert not list(out.glob(".*.tmp"))  # what the dead run's worker left mid-write was swept


def test_a_partition_that_does_not_exist_fails_at_once_naming_the_key(slurm, slow_corpus, tmp_path):
    root, _ = slow_corpus
    start = time.time()
    r = subprocess.run(
        _slurm_cmd(root, tmp_path / "labels", tmp_path, "cluster.slurm.queue=no-such-partition"),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.time() - start
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "cluster.slurm.queue='no-such-partition'" in line and "invalid partition" in line.lower()
    assert took < 60 and local_slurm.jobs() == []  # not the 120 s wait for workers; nothing submitted
    print(f"\nfailed in {took:.1f} s: {line}")


def test_the_driver_sbatch_script_runs_as_written_with_extra_arguments(slurm, smoke_data, tmp_path):
    """infra/slurm/pseudo_label.sbatch submitted with sbatch from the checkout: the driver job
    labels a small corpus through its own worker job, with --set arguments passed through."""
    root = tmp_path / "corpus"
    keys = make_corpus(root, smoke_data, 4, 30, 64)
    out = tmp_path / "labels"
    overrides = [
        "tracking.enabled=false",
        "data.image_size=64",
        "cluster.n_workers=1",
        "cluster.threads_per_worker=1",
        "cluster.torch_threads=1",
        "cluster.memory_limit=2GiB",
        "cluster.dashboard_address=127.0.0.1:0",
        f"cluster.slurm.queue={slurm}",
        f"cluster.slurm.log_directory={tmp_path / 'slurm-logs'}",
    ]
    extra = ["--shards", str(root / "in" / "part-*.tar"), *(arg for o in overrides for arg in ("--set", o))]
    env = {**ENV, "NOISYSTUDENT_CONFIG": "configs/smoke.yaml", "NOISYSTUDENT_OVERLAY": "configs/cluster/slurm.yaml"}
    r = subprocess.run(
        ["sbatch", "--parsable", "infra/slurm/pseudo_label.sbatch", str(root / "teacher.pt"), str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    driver = r.stdout.strip().split(";")[0]
    log = REPO / f"noisystudent-label-{driver}.out"
    try:
        deadline = time.time() + 300
        while driver in local_slurm.jobs() and time.time() < deadline:
            time.sleep(1)
        state = local_slurm.job_state(driver)
        assert state == "COMPLETED", f"driver job {state}: {log.read_text()[-3000:] if log.exists() else 'no log'}"
        manifest = LabelManifest.load(out)
        assert sorted(_output_keys(manifest)) == sorted(keys)
        assert local_slurm.jobs() == []  # its worker job was cancelled at the end
    finally:
        log.unlink(missing_ok=True)
