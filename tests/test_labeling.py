"""Pseudo-labeling at corpus scale through real Dask processes: worker death, job kill -9, label cache."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, dask_processes, script_command

from noisystudent.data.label_manifest import LabelManifest
from noisystudent.data.shard_io import iter_samples, write_shard
from noisystudent.labeling.cluster import ClusterSession
from noisystudent.labeling.corpus import label_corpus
from noisystudent.labeling.job import LabelingJob
from noisystudent.models import ModelSpec, create_model, save_model

ENV = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
# Big enough inputs that one shard takes about a second per worker, so there is a "mid-job".
SLOW = ["data.image_size=96", "pseudo_label.batch_size=32"]


def make_corpus(root: Path, smoke_data: Path, shards: int, per_shard: int, image_size: int) -> list[str]:
    """``shards`` x ``per_shard`` real Fashion-MNIST/OOD images (the smoke corpus re-sharded, unique
    keys) in ``root/in``, and a random-weight resnet18 teacher at ``image_size`` in ``root``."""
    samples = [s for p in sorted((smoke_data / "unlabeled").glob("shard-*.tar")) for s in iter_samples(str(p))]
    keys = []
    for shard in range(shards):
        batch = []
        for i in range(per_shard):
            key = f"s{shard:02d}-{i:03d}"
            keys.append(key)
            batch.append({"__key__": key, "png": samples[(shard * per_shard + i) % len(samples)]["png"]})
        write_shard(root / "in" / f"part-{shard:03d}.tar", batch)
    spec = ModelSpec("resnet18", 10, 1, image_size, [str(c) for c in range(10)], [0.286], [0.353])
    save_model(root / "teacher.pt", create_model(spec).eval(), spec)
    return keys


@pytest.fixture(scope="module")
def corpus(smoke_data, tmp_path_factory):
    """12 shards x 60 images, labeled at 96 px."""
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root, smoke_data, 12, 60, 96)


def _label_cmd(root: Path, out: Path, *overrides: str) -> list[str]:
    cmd = script_command(
        "pseudo_label.py",
        "--teacher",
        str(root / "teacher.pt"),
        "--shards",
        str(root / "in" / "part-*.tar"),
        "--out",
        str(out),
        overrides=["tracking.enabled=false", *SLOW, *overrides],
    )
    return cmd


def _output_keys(manifest: LabelManifest) -> Counter:
    return Counter(s["__key__"] for shard in manifest.shards for s in iter_samples(shard.output))


def _wait(cond, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def _shard_writes(out: Path):
    """Counts how often each label shard in ``out`` is written while the block runs: a shard is
    published by an atomic rename, so every write shows as a new inode under the same name."""
    seen: dict[str, set] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for p in out.glob("*.tar") if out.exists() else []:
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                seen.setdefault(p.name, set()).add((st.st_ino, st.st_mtime_ns))
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    writes = Counter()
    try:
        yield writes
    finally:
        stop.set()
        watcher.join()
        poll_once = [(p.name, p.stat()) for p in out.glob("*.tar")] if out.exists() else []
        for name, st in poll_once:
            seen.setdefault(name, set()).add((st.st_ino, st.st_mtime_ns))
        writes.update({name: len(versions) for name, versions in seen.items()})


def test_two_runs_sharing_one_label_cache_label_the_same_shards_at_once_and_both_stay_whole(corpus, tmp_path):
    """Two pseudo-label commands, each with its own cluster and output directory, one label cache,
    started together on the same corpus: both write every shard (atomic renames of the same
    content), and the first to finish sweeps temporaries while the other still writes. With no
    task retries, a temporary swept from under a live writer would fail its run."""
    root, keys = corpus
    cache = tmp_path / "cache"
    cmds = [
        _label_cmd(
            root,
            tmp_path / name,
            f"pseudo_label.cache_dir={cache}",
            "cluster.n_workers=1",
            "cluster.torch_threads=1",
            "cluster.task_retries=0",
        )
        for name in ("run-a", "run-b")
    ]
    jobs = [
        subprocess.Popen(c, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds
    ]
    results = [job.communicate(timeout=600) for job in jobs]
    for job, (_, stderr) in zip(jobs, results):
        assert job.returncode == 0, stderr[-3000:]
    manifests = [LabelManifest.load(tmp_path / name) for name in ("run-a", "run-b")]
    assert [s.output for s in manifests[0].shards] == [s.output for s in manifests[1].shards]
    for manifest in manifests:
        counts = _output_keys(manifest)
        assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}
        assert manifest.total_samples == len(keys) and manifest.skipped.total == 0
    both = sum(m.shards_labeled for m in manifests)
    print(f"\nshards labeled by the two runs: {[m.shards_labeled for m in manifests]} of {len(manifests[0].shards)}")
    assert both > len(manifests[0].shards)  # they really labeled shards at the same time
    assert not list(cache.rglob("*.tmp"))


def test_ctrl_c_mid_labeling_prints_one_line_and_the_rerun_resumes(corpus, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, the local workers included:
    each of them used to die of it with two tracebacks (about 65 lines) before the driver's line."""
    root, keys = corpus
    out = tmp_path / "labels"
    cmd = _label_cmd(root, out, "cluster.n_workers=2", "cluster.torch_threads=1")
    job = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait(lambda: list(out.glob("*.summary.json")) if out.exists() else None, 240, "a finished shard")
        os.killpg(job.pid, signal.SIGINT)
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    finished = len(list(out.glob("*.summary.json")))
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = LabelManifest.load(out)
    assert manifest.shards_reused == finished and sorted(_output_keys(manifest)) == sorted(keys)


def test_killed_worker_task_is_retried_and_no_sample_is_lost_or_duplicated(corpus, tmp_path):
    """Real `dask scheduler` + two `dask worker` processes; SIGKILL one while it holds a task,
    after shards are finished: each finished shard is written once (the dead worker's finished
    results are not recomputed) and the survivor labels the rest."""
    from distributed import Client

    root, keys = corpus
    out = tmp_path / "labels"
    with (
        _shard_writes(out) as writes,
        dask_processes(tmp_path, ("victim", "survivor"), ENV, nanny=False) as (
            address,
            procs,
        ),
    ):
        with Client(address, timeout="30s") as monitor:
            monitor.wait_for_workers(2, timeout=120)
            victim = next(addr for addr, w in monitor.scheduler_info()["workers"].items() if w["name"] == "victim")
            job = subprocess.Popen(
                _label_cmd(root, out, "cluster.task_retries=3", "cluster.torch_threads=1") + ["--scheduler", address],
                cwd=REPO,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

            # kill the victim once 4 shards are finished (2 workers share them: some are the victim's)
            # and it is busy with a labeling task
            def victim_busy():
                done = list(out.rglob("*.summary.json")) if out.exists() else []
                busy = [k for k in monitor.processing().get(victim, []) if "label_task" in str(k)]
                return busy if len(done) >= 4 and busy else None

            killed_while = _wait(victim_busy, 240, "victim worker to be mid-task")
            os.kill(procs[1].pid, signal.SIGKILL)
            stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stderr[-3000:]
    assert killed_while
    manifest = LabelManifest.load(out)
    counts = _output_keys(manifest)
    assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}  # every sample exactly once
    assert manifest.total_samples == len(keys) and manifest.skipped.total == 0
    workers = Counter(s.worker for s in manifest.shards)
    assert any(w != victim for w in workers)  # the survivor finished the victim's work
    assert not list(out.rglob("*.tmp"))  # no half-written shard left behind
    assert sorted(writes) == sorted(Path(s.output).name for s in manifest.shards)
    assert set(writes.values()) == {1}, f"shards written more than once: {writes}"


def test_a_local_cluster_worker_killed_mid_run_costs_no_finished_shard(corpus, tmp_path):
    """The laptop default, cluster.kind=local with 2 workers: one worker process (a child the
    nanny spawned) is SIGKILLed once 4 shards are done. Its nanny starts a new one; the dead
    worker's finished shards are not labeled again, and every shard is written once."""
    import psutil

    root, keys = corpus
    out = tmp_path / "labels"
    cmd = _label_cmd(root, out, "cluster.kind=local", "cluster.n_workers=2", "cluster.torch_threads=1")
    with _shard_writes(out) as writes:
        job = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait(lambda: len(list(out.glob("*.summary.json"))) >= 4 if out.exists() else False, 240, "4 shards")
            workers = [c for c in psutil.Process(job.pid).children() if "spawn_main" in " ".join(c.cmdline())]
            assert len(workers) == 2, workers
            workers[0].kill()
            _, stderr = job.communicate(timeout=600)
        finally:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    manifest = LabelManifest.load(out)
    counts = _output_keys(manifest)
    assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}
    assert len(writes) == len(manifest.shards) and set(writes.values()) == {1}, writes
    assert len({s.worker for s in manifest.shards}) >= 2  # both first workers labeled shards


def test_a_pass_that_loses_every_worker_stops_with_one_line_and_keeps_its_shards(corpus, tmp_path):
    """The only worker is SIGKILLed mid-corpus and none comes back: the pass stops after
    cluster.wait_for_workers_s with one line naming the backend, instead of waiting forever."""
    from distributed import Client

    root, _ = corpus
    out = tmp_path / "labels"
    with dask_processes(tmp_path, ("only",), ENV, nanny=False) as (address, procs):
        with Client(address, timeout="30s") as monitor:
            monitor.wait_for_workers(1, timeout=120)
        cmd = _label_cmd(root, out, "cluster.wait_for_workers_s=5", "cluster.torch_threads=1")
        job = subprocess.Popen(
            [*cmd, "--scheduler", address], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            _wait(lambda: len(list(out.glob("*.summary.json"))) >= 2 if out.exists() else False, 240, "2 shards")
            os.kill(procs[1].pid, signal.SIGKILL)
            killed_at = time.time()
            _, stderr = job.communicate(timeout=120)  # the old code waited here forever
        finally:
            job.kill()
    waited = time.time() - killed_at
    assert job.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert "no Dask worker for 5s" in line and "cluster.kind=address" in line and "cluster.address" in line
    assert "every shard finished so far is kept" in line
    kept = len(list(out.glob("*.summary.json")))
    assert 2 <= kept < 12  # (a killed writer leaves a .tmp: the rerun removes it)
    assert 5 <= waited < 60
    print(f"\nstopped {waited:.1f} s after the last worker died, {kept} shards kept")


def test_kill_9_of_whole_job_then_rerun_labels_only_unfinished_shards(corpus, tmp_path):
    root, keys = corpus
    out = tmp_path / "labels"
    cmd = _label_cmd(root, out, "cluster.n_workers=2")
    job = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    _wait(lambda: len(list(out.glob("*.summary.json"))) >= 3 if out.exists() else False, 300, "3 finished shards")
    os.killpg(job.pid, signal.SIGKILL)  # the job and its LocalCluster workers, mid-shard
    job.wait(timeout=60)
    finished_before = {
        p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.with_suffix(".summary.json").exists()
    }
    assert 3 <= len(finished_before) < 12
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = LabelManifest.load(out)
    assert manifest.shards_reused == len(finished_before)
    assert manifest.shards_labeled == 12 - len(finished_before)
    # the workers that labeled this pass's shards (by the summaries' worker addresses), of the 2 started
    assert 1 <= manifest.cluster.workers_used <= 2 and manifest.cluster.n_workers == 2
    assert {n: (out / n).stat().st_mtime_ns for n in finished_before} == finished_before  # not rewritten
    counts = _output_keys(manifest)
    assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_label_cache_is_shared_by_teacher_and_preprocessing_and_follows_input_changes(corpus, tmp_path, monkeypatch):
    from noisystudent.config import ClusterConfig, DataConfig
    from noisystudent.data import pseudo_labels as shards

    root, keys = corpus
    inputs = sorted(str(p) for p in (root / "in").glob("part-*.tar"))[:3]
    copies = tmp_path / "in"
    copies.mkdir()
    for p in inputs:  # private copies: this test touches one
        (copies / Path(p).name).write_bytes(Path(p).read_bytes())
    inputs = sorted(str(p) for p in copies.glob("*.tar"))
    data = DataConfig(image_size=32, channels=1, mean=[0.286], std=[0.353])
    spec = ModelSpec("test_resnet", 10, 1, 32, [str(c) for c in range(10)], [0.286], [0.353])
    save_model(tmp_path / "t.pt", create_model(spec).eval(), spec)
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)  # a relative cache_dir still yields a manifest usable from anywhere

    def run(out, **kw):
        job = LabelingJob.for_checkpoint(tmp_path / "t.pt", data, batch_size=64, cache_dir="cache", **kw)
        with ClusterSession(ClusterConfig(n_workers=1)) as cluster:
            return label_corpus(job, inputs, out, cluster, show_progress=False)

    first = run("exp-a")
    assert first.shards_labeled == 3 and first.shard_dir.startswith(str(cache))
    assert all(os.path.isabs(s.output) and os.path.isfile(s.output) for s in first.shards)
    other = run("exp-b")  # another experiment, same teacher + preprocessing: nothing recomputed
    assert other.shards_reused == 3 and other.shards_labeled == 0
    assert other.outputs == first.outputs
    os.utime(inputs[1], ns=(time.time_ns(), time.time_ns()))  # the input changed: only it is relabeled
    changed = run("exp-c")
    assert changed.shards_reused == 2 and changed.shards_labeled == 1
    assert changed.shards[1].input_identity["mtime_ns"] == os.stat(inputs[1]).st_mtime_ns
    tta = run("exp-d", tta_hflip=True)  # different preprocessing: a different cache entry
    assert tta.shards_labeled == 3 and tta.shard_dir != first.shard_dir

    # provenance and the public reader API
    assert first.teacher.sha256 and first.preprocessing["image_size"] == 32
    assert sum(first.class_counts) == first.total_samples == sum(first.confidence_hist) == 180
    table = shards.load_table(tmp_path / "exp-a")
    assert len(table) == 180 and table.probs.shape == (180, 10)
    np.testing.assert_allclose(table.probs.astype(np.float32).sum(1), 1.0, atol=1e-2)
    # the label is the argmax of full-precision probs; stored probs are float16, so near-ties of this
    # untrained teacher may round either way: the label's prob is the max up to float16 rounding
    p16 = table.probs.astype(np.float32)
    assert (p16[np.arange(len(table)), table.label] >= p16.max(1) - 1e-3).all()
    recs = list(
        shards.read_pseudo_labels(
            tmp_path / "exp-a" / "manifest.json",
            threshold=float(np.median(table.confidence)),
            with_images=True,
            channels=1,
        )
    )
    assert 0 < len(recs) < 180 and all(r.image.shape == (28, 28) for r in recs)
    assert len(recs) == int((table.confidence >= float(np.median(table.confidence))).sum())


def _slurm_job_script(config: str, overlay: str):
    """The config of ``config`` + ``overlay``, and the worker job script its SLURMCluster renders."""
    from noisystudent.config import load_config
    from noisystudent.labeling.cluster import slurm_cluster

    cfg = load_config(
        REPO / "configs" / config,
        overlays=[REPO / "configs" / "cluster" / overlay],
        overrides=["cluster.dashboard_address=127.0.0.1:0"],
    )
    cluster = slurm_cluster(cfg.cluster)
    try:
        return cfg, cluster.job_script()
    finally:
        cluster.close()


def test_slurm_job_script_requests_gpus_and_dask_resources():
    from noisystudent.labeling.cluster import task_resources

    cfg, script = _slurm_job_script("imagenet.yaml", "slurm-gpu.yaml")
    assert f"#SBATCH --gres=gpu:{cfg.cluster.gpus_per_worker}" in script
    assert f"--resources GPU={cfg.cluster.gpus_per_worker}" in script
    assert f"#SBATCH -p {cfg.cluster.slurm.queue}" in script
    assert task_resources(cfg.cluster) == {"GPU": 1}


def test_the_cpu_slurm_overlay_named_in_the_help_exists_and_its_workers_run_this_python():
    import sys

    from noisystudent.labeling.cluster import task_resources

    cfg, script = _slurm_job_script("default.yaml", "slurm.yaml")
    # no GPU asked for, and no venv to activate: the worker runs the driver's own interpreter
    assert "--gres" not in script and "activate" not in script and task_resources(cfg.cluster) is None
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert f"#SBATCH --cpus-per-task={cfg.cluster.threads_per_worker}" in script


@pytest.mark.parametrize("bind", ["127.0.0.1:0", "0.0.0.0:0"])
def test_the_printed_dashboard_link_answers_for_a_slurm_cluster(bind):
    """A SLURM cluster's scheduler runs here, on the host's network interface (which Dask's own
    link names); its dashboard binds where cluster.dashboard_address says (loopback by default)."""
    import urllib.request

    from distributed import Client

    from noisystudent.config import ClusterConfig
    from noisystudent.labeling.cluster import dashboard_link, slurm_cluster

    cfg = ClusterConfig(kind="slurm", dashboard_address=bind)
    with slurm_cluster(cfg) as cluster, Client(cluster) as client:  # no job submitted: no SLURM needed
        link = dashboard_link(client, cfg)
        with urllib.request.urlopen(link, timeout=10) as reply:
            assert reply.status == 200, link


def test_labeling_passes_of_one_cluster_session_reuse_its_workers(corpus, tmp_path):
    """iterate runs its generations in one ClusterSession: with cluster.reuse=true two labeling
    passes run on the same worker processes (one start-up, torch imported once); in another
    session, or with cluster.reuse=false (the default), each pass starts its own cluster, and the
    shared one is closed when its session ends."""
    from dataclasses import replace

    import torch

    from noisystudent.config import ClusterConfig, DataConfig

    root, _ = corpus
    inputs = sorted(str(p) for p in (root / "in").glob("part-*.tar"))[:2]
    data = DataConfig(image_size=32, channels=1, mean=[0.286], std=[0.353])
    spec = ModelSpec("test_resnet", 10, 1, 32, [str(c) for c in range(10)], [0.286], [0.353])
    teachers = []
    for seed in (0, 1):  # two teachers: the second pass cannot reuse the first one's shards
        torch.manual_seed(seed)
        save_model(tmp_path / f"t{seed}.pt", create_model(spec).eval(), spec)
        teachers.append(tmp_path / f"t{seed}.pt")
    cluster = ClusterConfig(n_workers=1, reuse=True)

    def workers(manifest: LabelManifest) -> set[str]:
        assert manifest.shards_labeled == len(inputs)
        return {s.worker for s in manifest.shards}

    def label(session: ClusterSession, teacher: Path, out: str) -> LabelManifest:
        job = LabelingJob.for_checkpoint(teacher, data, batch_size=64)
        return label_corpus(job, inputs, tmp_path / out, session, show_progress=False)

    with ClusterSession(cluster) as session:
        a, b = label(session, teachers[0], "a"), label(session, teachers[1], "b")
    assert workers(a) == workers(b) and a.dashboard == b.dashboard
    # that session is closed: a pass in a new one gets a new worker (ports are random: a new cluster
    # repeating both the worker's and the dashboard's port is a one-in-a-billion event)
    with ClusterSession(cluster) as session:
        c = label(session, teachers[0], "c")
    assert (workers(c), c.dashboard) != (workers(a), a.dashboard)
    with ClusterSession(replace(cluster, reuse=False)) as session:
        d, e = label(session, teachers[0], "d"), label(session, teachers[1], "e")
    assert (workers(d), d.dashboard) != (workers(e), e.dashboard)


def test_a_local_gpu_cluster_gives_every_worker_its_own_gpu_first():
    """cluster.kind=local with gpus_per_worker=1 over GPUs 0, 1, 2: one worker process per GPU (n_workers
    is only the most), each with its own GPU first in CUDA_VISIBLE_DEVICES as dask-cuda rotates them,
    advertising GPU=1, and a labeling task there takes cuda:0, its own. Only environment: no GPU needed."""
    from noisystudent.config import ClusterConfig
    from noisystudent.labeling.gpus import task_device

    def where_am_i() -> tuple[str, str]:
        with task_device("cuda") as device:
            return os.environ["CUDA_VISIBLE_DEVICES"], device

    cfg = ClusterConfig(n_workers=8, gpus_per_worker=1, gpu_ids=[0, 1, 2], memory_limit="1GiB")
    with ClusterSession(cfg) as session, session.client() as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        futures = [
            client.submit(where_am_i, workers=[a], allow_other_workers=False, resources={"GPU": 1}, pure=False)
            for a in workers
        ]
        seen = client.gather(futures)
    assert [w["resources"] for w in workers.values()] == [{"GPU": 1}] * 3
    assert sorted(seen) == [("0,1,2", "cuda:0"), ("1,2,0", "cuda:0"), ("2,0,1", "cuda:0")]


def test_two_tasks_on_a_worker_owning_two_gpus_label_on_different_devices():
    """A worker owning two GPUs (GPU=2, two threads) runs two labeling tasks at once: each holds a
    different one of its devices until it ends. The selection gives device strings only, so no GPU
    is touched; the tasks wait for each other so both hold theirs at the same time."""
    from distributed import Event

    from noisystudent.config import ClusterConfig
    from noisystudent.labeling.cluster import task_resources
    from noisystudent.labeling.gpus import task_device

    def hold_a_device() -> tuple[str, str]:
        with task_device("cuda") as device:
            Event(f"holding-{device}").set()
            Event("release").wait(120)
            return os.environ["CUDA_VISIBLE_DEVICES"], device

    cfg = ClusterConfig(n_workers=1, threads_per_worker=2, gpus_per_worker=2, gpu_ids=[0, 1], memory_limit="1GiB")
    with ClusterSession(cfg) as session, session.client() as client:
        futures = [client.submit(hold_a_device, resources=task_resources(cfg), pure=False) for _ in range(2)]
        try:
            held = [Event(f"holding-cuda:{i}", client=client).wait(120) for i in (0, 1)]
        finally:
            Event("release", client=client).set()
        seen = client.gather(futures)
        after = client.submit(hold_a_device, resources=task_resources(cfg), pure=False).result()
    assert held == [True, True]  # both devices held at once
    assert sorted(seen) == [("0,1", "cuda:0"), ("0,1", "cuda:1")]
    assert after == ("0,1", "cuda:0")  # given back when the tasks ended


def test_gpu_workers_without_a_visible_gpu_fail_with_one_line_naming_the_keys(monkeypatch):
    from noisystudent.config import ClusterConfig
    from noisystudent.errors import ClusterError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for cfg, found in (
        (ClusterConfig(gpus_per_worker=1), "no GPU is visible here (CUDA_VISIBLE_DEVICES='')"),
        (ClusterConfig(gpus_per_worker=2, gpu_ids=[3]), "only 1 GPU(s) (3) are visible here (cluster.gpu_ids=[3])"),
    ):
        with ClusterSession(cfg) as session, pytest.raises(ClusterError) as err:
            with session.client():
                pass
        message = str(err.value)
        assert f"cluster.gpus_per_worker={cfg.gpus_per_worker} but {found}" in message
        assert "cluster.gpu_ids" in message and "\n" not in message


def test_visible_gpus_follow_gpu_ids_then_cuda_visible_devices():
    from noisystudent.config import ClusterConfig
    from noisystudent.labeling.gpus import visible_gpus, worker_gpu_envs

    two = ClusterConfig(n_workers=8, gpus_per_worker=2)
    assert visible_gpus(ClusterConfig(gpu_ids=[4, 6]), {"CUDA_VISIBLE_DEVICES": "0"}) == ["4", "6"]
    assert visible_gpus(two, {"CUDA_VISIBLE_DEVICES": " 3, 1,GPU-8f2a "}) == ["3", "1", "GPU-8f2a"]
    assert visible_gpus(two, {"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]  # CUDA stops at an invalid entry
    assert visible_gpus(two, {"CUDA_VISIBLE_DEVICES": "-1"}) == []
    # two GPUs per worker: its own pair first; a fifth GPU left over stays unused; n_workers caps the count
    envs = worker_gpu_envs(two, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1,2,3,4", "2,3,4,0,1"]
    capped = ClusterConfig(n_workers=1, gpus_per_worker=1)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_gpu_envs(capped, {"CUDA_VISIBLE_DEVICES": "5,7"})] == ["5,7"]


def test_a_slurm_or_kubernetes_driver_needs_no_gpu_of_its_own(tmp_path):
    """infra/slurm/pseudo_label.sbatch and infra/kubernetes/label-job.yaml run the driver without a
    GPU: the job passes `device` on for each worker to resolve. A local cluster resolves it at once."""
    from noisystudent.config import load_config
    from noisystudent.stages.pseudo_label import labeling_job

    (tmp_path / "model.pt").write_bytes(b"any teacher: only hashed here")
    for overlay in ("slurm-gpu.yaml", "kubernetes-gpu.yaml"):
        cfg = load_config(REPO / "configs" / "imagenet.yaml", overlays=[REPO / "configs" / "cluster" / overlay])
        assert labeling_job(cfg, tmp_path / "model.pt").device == "cuda"  # no RuntimeError on a CPU driver
    local = load_config(REPO / "configs" / "default.yaml", overrides=["device=auto", "cluster.kind=local"])
    assert labeling_job(local, tmp_path / "model.pt").device in ("cpu", "cuda")
