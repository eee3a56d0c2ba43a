"""The Dask cluster factory: where pseudo-labeling (and feature extraction) runs.

``cluster.kind`` picks the engine; everything else is plain ``distributed``:

* ``local``: a ``LocalCluster`` of worker processes on this machine (the laptop default);
* ``address``: a scheduler someone already runs (``dask scheduler`` + ``dask worker``s, the
  compose stack in ``infra/``), by ``cluster.address``;
* ``slurm``: dask-jobqueue ``SLURMCluster``, one worker per batch job (``pip install .[slurm]``);
* ``kubernetes``: the dask-kubernetes operator's ``KubeCluster`` (``pip install .[kubernetes]``).

With ``cluster.gpus_per_worker > 0`` each worker advertises the Dask resource ``GPU`` and every
labeling task asks for ``GPU=1`` (:func:`task_resources`) and takes a free one of its worker's own
GPUs, so tasks never share a device; a local cluster starts one worker per ``gpus_per_worker`` GPUs,
each seeing its own first, as dask-cuda does (:mod:`.gpus`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator

from ..config import ClusterConfig
from ..errors import ClusterError


def task_resources(cfg: ClusterConfig) -> dict | None:
    """Resources each labeling task requests (None = any worker)."""
    return {"GPU": 1} if cfg.gpus_per_worker > 0 else None


def worker_resources(cfg: ClusterConfig) -> dict | None:
    return {"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker > 0 else None


def worker_resource_args(cfg: ClusterConfig) -> list[str]:
    """``dask worker`` arguments advertising the worker's GPUs (none for CPU workers)."""
    return ["--resources", f"GPU={cfg.gpus_per_worker}"] if cfg.gpus_per_worker > 0 else []


def slurm_cluster(cfg: ClusterConfig):
    """A dask-jobqueue SLURMCluster (not yet scaled): one worker process per job."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ClusterError("cluster.kind=slurm needs dask-jobqueue: pip install '.[slurm]'") from exc
    s = cfg.slurm
    directives = list(s.job_extra_directives)
    if cfg.gpus_per_worker > 0:
        directives.append(f"--gres=gpu:{cfg.gpus_per_worker}")
    kwargs = {
        "cores": cfg.threads_per_worker,
        "processes": 1,
        "memory": cfg.memory_limit,
        "walltime": s.walltime,
        "job_extra_directives": directives,
        "worker_extra_args": worker_resource_args(cfg),
        "job_script_prologue": list(s.job_script_prologue),
        "log_directory": s.log_directory,
        "scheduler_options": {"dashboard_address": cfg.dashboard_address},
    }
    if s.queue:
        kwargs["queue"] = s.queue
    if s.account:
        kwargs["account"] = s.account
    if s.interface:
        kwargs["interface"] = s.interface
    return SLURMCluster(**kwargs)


def check_slurm_submission(job_script: str, cfg: ClusterConfig) -> None:
    """``sbatch --test-only`` on the worker job: SLURM refuses an unknown partition, account or
    gres at once (about 0.1 s, nothing submitted), where a submitted job would fail in the
    background while the run waited ``cluster.wait_for_workers_s`` for workers that never come."""
    if shutil.which("sbatch") is None:
        raise ClusterError("cluster.kind=slurm needs SLURM's sbatch on this machine's PATH (run from a login node)")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="dask-worker-") as script:
        script.write(job_script)
        script.flush()
        r = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        said = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
        raise ClusterError(
            f"SLURM refuses the worker job ({said}); check cluster.slurm.queue={cfg.slurm.queue!r}, "
            f"cluster.slurm.account={cfg.slurm.account!r} and cluster.slurm.job_extra_directives"
        )


def kubernetes_quantity(memory: str) -> str:
    """A Dask memory size (``4GiB``, ``6GB``, ``1.5 GB``) as a Kubernetes quantity (``4Gi``, ``6G``):
    Kubernetes refuses ``6GB`` itself, and the pod would never be created."""
    from dask.utils import parse_bytes

    n = parse_bytes(memory)
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("T", 10**12), ("G", 10**9), ("M", 10**6)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def kubernetes_cluster_spec(cfg: ClusterConfig) -> dict:
    """The ``DaskCluster`` custom resource the operator would create (also usable with kubectl)."""
    try:
        from dask_kubernetes.operator import make_cluster_spec
    except ImportError as exc:
        raise ClusterError("cluster.kind=kubernetes needs dask-kubernetes: pip install '.[kubernetes]'") from exc
    k = cfg.kubernetes
    limits = {"memory": kubernetes_quantity(cfg.memory_limit), "cpu": str(cfg.threads_per_worker)}
    if cfg.gpus_per_worker > 0:
        limits["nvidia.com/gpu"] = str(cfg.gpus_per_worker)
    command = [
        "dask",
        "worker",
        "--nthreads",
        str(cfg.threads_per_worker),
        "--memory-limit",
        cfg.memory_limit,
        *worker_resource_args(cfg),
    ]
    spec = make_cluster_spec(
        name=k.name,
        image=k.image,
        n_workers=cfg.n_workers,
        resources={"limits": limits},
        env=dict(k.env),
        worker_command=command,
    )
    # make_cluster_spec gives the scheduler the workers' limits; it needs neither a GPU nor their memory
    for container in spec["spec"]["scheduler"]["spec"]["containers"]:
        container["resources"] = {"limits": {"cpu": "1", "memory": "4Gi"}}
    if k.namespace:
        spec["metadata"]["namespace"] = k.namespace
    if k.pvc:  # workers read input shards and the teacher and write labeled shards on shared storage
        pod = spec["spec"]["worker"]["spec"]
        pod["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": k.pvc}}]
        for container in pod["containers"]:
            container["volumeMounts"] = [{"name": "data", "mountPath": k.mount_path}]
    return spec


def _kubernetes_cluster(cfg: ClusterConfig):
    from dask_kubernetes.operator import KubeCluster

    spec = kubernetes_cluster_spec(cfg)
    kwargs = {"custom_cluster_spec": spec}
    if cfg.kubernetes.namespace:
        kwargs["namespace"] = cfg.kubernetes.namespace
    return KubeCluster(**kwargs)


def dashboard_link(client, cfg: ClusterConfig) -> str:
    """The dashboard's address where it listens. Dask names the scheduler's host (on SLURM its
    network interface), but a dashboard bound to one address (``cluster.dashboard_address``,
    127.0.0.1 by default) answers only there; a wildcard bind answers on the scheduler's host."""
    link = client.dashboard_link or ""
    if not link or cfg.kind not in ("local", "slurm"):  # a scheduler elsewhere: its own link is right
        return link
    host = cfg.dashboard_address.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        return link
    parts = urllib.parse.urlsplit(link)
    return parts._replace(netloc=f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}").geturl()


class ClusterSession:
    """Where one command's labeling passes and corpus scans run, passed to each of them.

    With ``cluster.reuse`` the first pass starts the cluster and later passes share it until the
    session closes: starting a LocalCluster and importing torch in each worker costs seconds every
    generation, and a slurm/kubernetes cluster has to queue again. Without it, each pass starts
    and closes its own (idle workers beside training cost the students throughput)."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self._stack = contextlib.ExitStack()
        self._shared = None

    def __enter__(self) -> ClusterSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._shared = None
        self._stack.close()

    @contextlib.contextmanager
    def client(self) -> Iterator[distributed.Client]:  # noqa: F821
        """A connected ``distributed.Client`` for one pass."""
        if not self.cfg.reuse:
            with _new_client(self.cfg) as client:
                yield client
            return
        if self._shared is None:
            self._shared = self._stack.enter_context(_new_client(self.cfg))
        yield self._shared


def local_cluster(cfg: ClusterConfig):
    """A LocalCluster of worker processes on this machine; with GPUs, one worker per
    ``gpus_per_worker`` of them (at most ``n_workers``), each with its own ``CUDA_VISIBLE_DEVICES``."""
    from distributed import LocalCluster

    kwargs = {
        "threads_per_worker": cfg.threads_per_worker,
        "processes": True,
        "memory_limit": cfg.memory_limit,
        "dashboard_address": cfg.dashboard_address,
        "host": "127.0.0.1",
        "resources": worker_resources(cfg),
    }
    if cfg.gpus_per_worker == 0:
        return LocalCluster(n_workers=cfg.n_workers, **kwargs)
    from .gpus import GPULocalCluster, worker_gpu_envs

    return GPULocalCluster(worker_gpu_envs(cfg), **kwargs)  # the GPUs are checked before any process starts


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Ctrl-C reaches the whole process group, and each local worker process died of it with two
    tracebacks (about 65 lines before "interrupted; rerun"). A worker spawned while SIGINT is
    ignored keeps ignoring it (an ignored disposition survives exec, and Python then installs no
    handler of its own); the driver alone stops and closes them. A Ctrl-C during these seconds of
    start-up is lost (press it again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_cluster(cfg: ClusterConfig):
    if cfg.kind == "local":
        with _workers_ignore_ctrl_c():
            return local_cluster(cfg)
    if cfg.kind == "slurm":
        cluster = slurm_cluster(cfg)
        try:
            check_slurm_submission(cluster.job_script(), cfg)
            # adapt, not scale: scale(jobs=n) never replaces a job that ended (walltime, preemption,
            # a node lost); adapt keeps n jobs queued or running until the cluster closes
            cluster.adapt(minimum_jobs=cfg.n_workers, maximum_jobs=cfg.n_workers)
        except BaseException:
            cluster.close()
            raise
        return cluster
    if cfg.kind == "kubernetes":
        return _kubernetes_cluster(cfg)
    # validate() refuses other kinds; keep the error explicit anyway
    raise ClusterError(f"config key 'cluster.kind' has unknown value {cfg.kind!r}")


# Where to look when workers are missing, at start-up or in the middle of a pass, per backend
_NO_WORKER_HINTS = {
    "local": "check the worker logs above (a worker over cluster.memory_limit is killed)",
    "address": "check the workers started against cluster.address",
    "slurm": "check squeue and the job logs in cluster.slurm.log_directory "
    "(still queued, walltime, preemption, a lost node)",
    "kubernetes": "check the worker pods (kubectl get pods: pending, evicted, OOMKilled)",
}


def _wait_for_workers(client, cluster, cfg: ClusterConfig) -> None:
    """Batch queues can be slow: wait for the first worker, failing with a clear line rather than
    hanging. A local cluster waits for all its workers (a GPU one scales up after it starts)."""
    wanted = len(cluster.worker_spec) if cfg.kind == "local" else 1
    try:
        client.wait_for_workers(wanted, timeout=cfg.wait_for_workers_s)
    except TimeoutError as exc:
        raise ClusterError(
            f"fewer than {wanted} Dask worker(s) joined within {cfg.wait_for_workers_s}s "
            f"(cluster.kind={cfg.kind}); {_NO_WORKER_HINTS[cfg.kind]}, and cluster.wait_for_workers_s"
        ) from exc


class WorkerWatchdog:
    """Stops a pass that has had no worker for ``cluster.wait_for_workers_s``. Start-up waits for
    workers with the same limit; later, a batch system can end every worker (walltime,
    preemption) and not start another, and the pass would wait for them forever, silently."""

    def __init__(self, client, cfg: ClusterConfig, check_every_s: float = 1.0):
        self.client, self.cfg, self.check_every_s = client, cfg, check_every_s
        self.last_seen = self.last_check = time.monotonic()

    def check(self) -> None:
        """Raise :class:`ClusterError` once no worker has been seen for the limit. Every shard
        stored so far stays (its summary is beside it), so a rerun labels only the rest."""
        now = time.monotonic()
        if now - self.last_check < self.check_every_s:
            return
        self.last_check = now
        if self.client.scheduler_info(n_workers=1)["workers"]:
            self.last_seen = now
        elif now - self.last_seen > self.cfg.wait_for_workers_s:
            raise ClusterError(
                f"no Dask worker for {self.cfg.wait_for_workers_s}s in the middle of labeling "
                f"(cluster.kind={self.cfg.kind}): {_NO_WORKER_HINTS[self.cfg.kind]}; "
                "every shard finished so far is kept and a rerun labels only the rest "
                "(cluster.wait_for_workers_s sets the limit)"
            )


@contextlib.contextmanager
def _new_client(cfg: ClusterConfig) -> Iterator[distributed.Client]:  # noqa: F821
    import dask
    from distributed import Client

    if cfg.kind == "address":
        try:
            client = Client(cfg.address, timeout="15s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach Dask scheduler at {cfg.address} (config key 'cluster.address'): {exc}"
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    # a worker's death counts against allowed-failures, not a task's retries: both are task_retries
    with dask.config.set({"distributed.scheduler.allowed-failures": cfg.task_retries}):
        cluster = _start_cluster(cfg)
    client = Client(cluster)
    try:
        _wait_for_workers(client, cluster, cfg)
        yield client
    finally:
        client.close()
        cluster.close()
