"""The config sections of where and how a run computes: the Dask cluster (local, an address, SLURM,
Kubernetes) and MLflow tracking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .setting import setting


@dataclass
class SlurmConfig:
    """dask-jobqueue `SLURMCluster` settings (cluster.kind=slurm): one worker process per job."""

    queue: str = setting("", 'Partition (`-p`); "" = the site default.')
    account: str = setting("", 'Account to charge (`-A`); "" = none.')
    walltime: str = setting("02:00:00", "Job wall time.")
    job_extra_directives: list[str] = setting(
        [], 'Extra `#SBATCH` lines, e.g. ["--constraint=a100"]. GPUs are added from cluster.gpus_per_worker.'
    )
    job_script_prologue: list[str] = setting(
        [], 'Shell lines run before the worker starts, e.g. ["source /opt/venv/bin/activate"].'
    )
    interface: str = setting("", 'Network interface workers and scheduler bind to (e.g. "ib0"); "" = default.')
    log_directory: str = setting("slurm-logs", "Directory for SLURM job logs.")


@dataclass
class KubernetesConfig:
    """dask-kubernetes operator `KubeCluster` settings (cluster.kind=kubernetes)."""

    name: str = setting("noisystudent-label", "DaskCluster resource name.")
    namespace: str = setting("", 'Namespace; "" = the current context\'s.')
    image: str = setting(
        "noisystudent:cpu", "Worker/scheduler image; must contain noisystudent (see infra/Dockerfile)."
    )
    env: dict = setting({}, "Environment variables set on scheduler and workers (never logged to MLflow).")
    pvc: str = setting(
        "",
        "PersistentVolumeClaim (ReadWriteMany) holding shards, checkpoints and outputs, mounted in "
        'every worker at mount_path; "" = none (the paths must then exist in the image).',
    )
    mount_path: str = setting("/data", "Where workers see the PVC; config paths must point inside it.")


@dataclass
class ClusterConfig:
    """Dask cluster used for pseudo-labeling (and feature extraction)."""

    kind: Literal["local", "address", "slurm", "kubernetes"] = setting(
        "local",
        "local = start a LocalCluster; address = connect to a running scheduler; slurm = dask-jobqueue "
        "SLURMCluster; kubernetes = dask-kubernetes operator KubeCluster.",
    )
    address: str = setting("", "Scheduler address for kind=address, e.g. tcp://10.0.0.5:8786.")
    n_workers: int = setting(2, "Worker processes (local, slurm: one job each, kubernetes: pods).")
    threads_per_worker: int = setting(1, "Threads per worker (keep 1 for GPU workers).")
    memory_limit: str = setting("4GiB", "Per-worker memory limit (Dask syntax).")
    torch_threads: int = setting(0, "Torch threads per worker (0 = threads_per_worker).")
    gpus_per_worker: int = setting(
        0,
        "GPUs each worker owns (0 = CPU workers). >0 advertises the Dask resource GPU=n on each "
        "worker and every labeling task asks for GPU=1 and labels on a free one of its worker's "
        "own GPUs (cuda:0..n-1 as the worker sees them), so tasks never share a GPU. local: one "
        "worker per n GPUs of cluster.gpu_ids (n_workers is then the most it starts), each with "
        "its own GPUs first in CUDA_VISIBLE_DEVICES, as dask-cuda does; slurm adds --gres=gpu:n "
        "and kubernetes the nvidia.com/gpu limit n, and the batch system shows each worker only "
        "its own GPUs; address: start each worker with its own GPUs (e.g. `dask cuda worker`).",
    )
    gpu_ids: list[int] = setting(
        [],
        "GPUs a local cluster (kind=local, gpus_per_worker > 0) shares out, by the numbers "
        "CUDA_VISIBLE_DEVICES takes: worker i gets ids[i*n:(i+1)*n]. [] = every GPU "
        "visible here (CUDA_VISIBLE_DEVICES if set, else all torch sees). Ignored by other kinds.",
    )
    dashboard_address: str = setting(
        "127.0.0.1:0", "Dashboard address (bound to loopback by default; use 0.0.0.0:8787 to expose it)."
    )
    task_retries: int = setting(
        3,
        "Reruns of a labeling task whose worker died or that raised a transient error (a storage "
        "hiccup); a shard that is not a tar file is never retried. A scheduler this command "
        "starts (local, slurm) takes it as distributed.scheduler.allowed-failures; one at "
        "cluster.address keeps its own.",
    )
    wait_for_workers_s: int = setting(600, "Seconds to wait for workers of a slurm/kubernetes cluster to come up.")
    reuse: bool = setting(
        False,
        "Keep one cluster for a whole iterate run (started at the first labeling, closed at the "
        "end), so later passes skip the cluster start-up and the workers' torch import. Pays "
        "off only when stages are seconds long (tests, smoke runs): a kept LocalCluster runs its "
        "scheduler and dashboard inside the training process and its idle workers poll, which "
        "slows training on a small CPU machine, and GPU workers would keep holding the teacher "
        "in GPU memory. false = a fresh cluster per labeling stage, released while students "
        "train.",
    )
    slurm: SlurmConfig = setting(SlurmConfig(), "SLURM settings (cluster.kind=slurm).")
    kubernetes: KubernetesConfig = setting(KubernetesConfig(), "Kubernetes settings (cluster.kind=kubernetes).")


@dataclass
class TrackingConfig:
    """MLflow: where runs, metrics, artifacts and registered models go."""

    tracking_uri: str = setting(
        "", 'MLflow tracking URI; "" = sqlite store inside the run directory. MLFLOW_TRACKING_URI wins over "".'
    )
    experiment: str = setting("noisystudent", "MLflow experiment name.")
    artifact_location: str = setting(
        "",
        "Where a new experiment keeps its artifacts, e.g. `s3://bucket/mlflow` (credentials, "
        'AWS_ENDPOINT_URL from the environment); "" = `mlartifacts/` in the run directory '
        "for the default local store, else the server's choice.",
    )
    enabled: bool = setting(True, "false disables MLflow entirely.")
    log_models: bool = setting(True, "Log and register every generation's model as a servable MLflow pyfunc model.")
    registered_model: str = setting(
        "noisystudent",
        "Register logged models under this name (a new version per "
        "generation, aliases gen-<g>, best = highest validation top-1); "
        '"" = log without registering.',
    )
