"""The typed configuration tree: every knob, its type, its default and its documentation.

Each field is declared with :func:`setting`, which keeps the help text in the field's metadata
(``docs/config.md`` is generated from it). Choices are ``Literal`` types and list fields name
their element type; :mod:`.loading` checks both when a YAML file or ``--set`` is read.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .fields import ConfigError, build, set_dotted, to_dict

#: OOD scores computed by the analysis stage, all oriented "higher = more out-of-distribution".
OODScore = Literal["msp", "entropy", "energy", "mahalanobis", "knn"]
OOD_SCORES: tuple[str, ...] = get_args(OODScore)


def setting(default: Any, help: str, *, results: bool = True) -> Any:
    """A config field with its documentation. Mutable defaults (lists, dicts, sections) are
    copied for every instance, so two configs never share one list.

    ``results=False`` marks a knob that says where or how fast a run computes, not what it
    computes (device, workers, tracking, ...): a resumed run may change it freely, while a change
    to any other key is refused unless asked for (:mod:`.compare`). On a section it covers every
    key inside."""
    metadata = {"help": help, "results": results}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def changes_results(f: dataclasses.Field) -> bool:
    return f.metadata.get("results", True)


@dataclass
class DataConfig:
    """Where the labeled and unlabeled data live, and how images are decoded."""

    labeled_dir: str = setting(
        "data/default/labeled/train", "Labeled training images, ImageFolder layout `root/<class>/<image>`."
    )
    val_dir: str = setting(
        "data/default/labeled/val", "Labeled validation images (ImageFolder): per-epoch metrics, early stopping."
    )
    test_dir: str = setting(
        "data/default/labeled/test",
        'Held-out test images (ImageFolder); reported per generation, never pseudo-labeled. "" = none.',
    )
    unlabeled_shards: str | list[str] = setting(
        "data/default/unlabeled/shard-*.tar",
        "Unlabeled webdataset shards: brace pattern, glob, or list; paths or s3://, gs://, http(s):// URLs.",
    )
    image_size: int = setting(
        224, "Square input resolution images are resized to (timm's usual 224; the embedded demo sets 32)."
    )
    channels: Literal[1, 3] = setting(
        3,
        "3 = RGB (timm's models and pretrained weights), 1 = grayscale. Images are "
        "converted on decode; a value that contradicts the labeled files is an error.",
    )
    mean: list[float] = setting(
        [0.485, 0.456, 0.406], "Per-channel normalisation mean (length 1 or `channels`); ImageNet's, as in timm."
    )
    std: list[float] = setting(
        [0.229, 0.224, 0.225], "Per-channel normalisation std (length 1 or `channels`); ImageNet's, as in timm."
    )
    crop_pct: float = setting(
        0.875,
        "Above 64 px, evaluation and labeling resize the short side to image_size / crop_pct "
        "and take the center square (timm's crop_pct); at 64 px and below images are resized "
        "to the square, as small images always were.",
    )
    cache: Literal["auto", "none", "memory"] = setting(
        "auto",
        "Labeled images: none = decode each image when a loader worker draws it (start-up lists the files, "
        "memory stays flat); memory = decode every split once at start into uint8 at data.image_size; auto = "
        "memory when that takes at most data.cache_mb, else none.",
        results=False,
    )
    cache_mb: int = setting(
        1024,
        "The largest labeled cache auto chooses, in MB of uint8 pixels per process "
        "(train + val + test each count alone; loader workers share it copy-on-write). "
        "1024 MB holds 1M images at 32 px grayscale, or about 4,000 photos for 224 px RGB (cached "
        "at their 256 px short side).",
        results=False,
    )
    num_workers: int = setting(
        -1,
        "DataLoader worker processes for training (and, on a GPU, for evaluation); 0 = augment "
        "in the main process, -1 = auto: one per CPU core that torch's threads leave free (with "
        "a GPU: cores - 1, at most 8). On a CPU machine a worker takes a core from the train "
        "step, so auto is 0 on 2 cores.",
        results=False,
    )


@dataclass
class AugmentConfig:
    """Input noise: RandAugment on albumentations plus flip, translation and cutout."""

    num_ops: int = setting(2, "RandAugment ops applied per image (0 disables RandAugment).")
    magnitude: float = setting(
        9.0,
        "RandAugment magnitude on timm's 0..10 scale (10 = strongest). Each op samples its "
        'strength uniformly in [0, magnitude] with a random sign (timm\'s "mmax").',
    )
    hflip: float = setting(0.5, "Random horizontal flip probability.")
    crop_pad: float = setting(0.125, "Random translation by padding then cropping, as a fraction of image size.")
    cutout: float = setting(0.5, "Cutout probability (one square hole of `cutout_size` x image size).")
    cutout_size: float = setting(0.35, "Cutout hole side as a fraction of the image side.")
    rrc_scale: list[float] = setting(
        [0.08, 1.0],
        "Above 64 px: RandomResizedCrop's range of crop areas, as fractions of "
        "the image (timm's scale). Replaces crop_pad there.",
    )
    rrc_ratio: list[float] = setting(
        [0.75, 4 / 3], "Above 64 px: RandomResizedCrop's range of crop aspect ratios (timm's ratio)."
    )


@dataclass
class TrainConfig:
    """One training stage. Model noise (dropout, stochastic depth) lives here too."""

    epochs: int = setting(
        10, "Passes over the data: the labeled set for a teacher, the selected pseudo-labels for a student."
    )
    batch_size: int = setting(128, "Labeled images per step.")
    optimizer: Literal["adamw", "sgd"] = setting("adamw", "Optimizer: adamw, or sgd (Nesterov).")
    lr: float = setting(2e-3, "Peak learning rate of the cosine schedule.")
    weight_decay: float = setting(0.05, "Weight decay (not applied to norms and biases).")
    momentum: float = setting(0.9, "SGD momentum.")
    warmup_epochs: float = setting(1.0, "Linear warmup length in epochs (fractions allowed).")
    label_smoothing: float = setting(0.0, "Label smoothing of the labeled cross-entropy.")
    grad_clip: float = setting(0.0, "Clip gradient L2 norm (0 = off).")
    drop_rate: float = setting(0.0, "Dropout before the classifier (timm `drop_rate`).")
    drop_path_rate: float = setting(0.0, "Stochastic depth (timm `drop_path_rate`), linear decay with depth.")
    augment: AugmentConfig = setting(AugmentConfig(num_ops=0, cutout=0.0), "Input noise of this stage.")
    early_stop_patience: int = setting(
        0,
        "Stop after this many epochs without validation improvement and keep the best "
        "epoch's weights (0 = train all epochs, keep the last).",
    )
    steps_per_epoch: int = setting(
        0,
        "Optimizer steps per epoch; 0 = one pass over the data (labeled set for a teacher, "
        "selected pseudo-labels for a student). Fixing it gives runs with different data "
        "the same budget.",
    )
    ema_decay: float = setting(
        0.0,
        "Exponential moving average of the weights (0 = off, e.g. 0.999). When on, the EMA "
        "model is the one validated, checkpointed as the result and handed to the next stage.",
    )
    eval_every: int = setting(
        1,
        "Validate every N epochs (and always after the last). Raise it when epochs are tiny "
        "(a teacher on a few thousand labels) and validation would cost more than training.",
    )
    pretrained: bool = setting(
        False,
        "Start from timm's pretrained weights of this model (fetched from the Hugging Face "
        "hub, so the machine must reach it). As in timm, the classifier is new when the "
        "class count differs and the stem is adapted to data.channels.",
    )
    pretrained_file: str = setting(
        "",
        "Start from local weights instead: a .safetensors, .pth or .bin state dict of the "
        "same architecture (a noisystudent model.pt works too), loaded through timm's "
        "loader with the same adaptations. Wins over pretrained. A file of another "
        "architecture is an error naming keys that do not fit.",
    )


@dataclass
class StudentConfig(TrainConfig):
    """A student: labeled plus pseudo-labeled data, noised."""

    unlabeled_ratio: float = setting(3.0, "Pseudo-labeled images per step = ratio x batch_size (paper: 1 to 3).")
    unlabeled_weight: float = setting(1.0, "Weight of the pseudo-label loss.")
    init: Literal["scratch", "teacher"] = setting(
        "scratch", '"scratch" (paper default) or "teacher" (copy the teacher\'s weights; same model only).'
    )
    finetune_epochs: int = setting(
        0,
        "Epochs of a final fine-tune on the labeled data alone (0 = none), at finetune_lr, "
        "without model noise. The paper found it helps a little on ImageNet.",
    )
    finetune_lr: float = setting(1e-4, "Peak learning rate of the labeled-only fine-tune.")

    @property
    def unlabeled_batch_size(self) -> int:
        """Pseudo-labeled images per step."""
        return max(1, int(round(self.batch_size * self.unlabeled_ratio)))


@dataclass
class PseudoLabelConfig:
    """How the teacher labels the corpus, and read-time selection of what the student sees."""

    batch_size: int = setting(512, "Inference batch size.", results=False)
    cache_dir: str = setting(
        "",
        results=False,
        help="Shared cache of labeled shards (a directory, or an s3:// or gs:// prefix), "
        "keyed by teacher sha256 + preprocessing; each shard is checked against its input's "
        'identity. "" = no sharing (shards live in the stage\'s output directory).',
    )
    tta_hflip: bool = setting(
        False,
        "Average the teacher's prediction with its prediction on the mirrored image (clean "
        "views only; the teacher is still never noised). Doubles labeling compute.",
    )
    soft: bool = setting(True, "Soft targets (teacher probabilities, paper default) or hard argmax labels.")
    threshold: float = setting(0.3, "Keep images whose confidence >= threshold (paper: 0.3).")
    balance: bool = setting(True, "Per-class balancing: duplicate or drop images so each class has the same count.")
    per_class: int = setting(0, "Images per class after balancing; 0 = mean kept count per class.")
    temperature: float = setting(1.0, "Sharpen soft labels: p ** (1/T) renormalised (1.0 = as is).")
    shuffle_buffer: int = setting(
        4096,
        "Samples in the student's shuffle buffer over the pseudo-labeled stream, per loader "
        "worker. They are held as encoded bytes and decoded as they leave it: memory is "
        "this x the encoded image size (about 1 KB for the embedded demo's PNGs, 450 MB "
        "for ImageNet-size JPEGs at 4096).",
    )
    save_features: bool = setting(
        True,
        "Also write the teacher's pooled penultimate features beside each labeled shard "
        "(`.features.npy`, float16): the analysis stage reads them instead of a second pass.",
        results=False,
    )
    ood_score: Literal["", OODScore] = setting(
        "",
        "Drop images by an OOD score of the analysis stage before thresholding: "
        'one of msp, entropy, energy, mahalanobis, knn ("" = keep all, the '
        "paper's choice). Needs the teacher's analysis (`<shard>.ood.npz`, "
        "written by analysis of the previous generation).",
    )
    ood_drop_fraction: float = setting(
        0.0, "Share of the corpus with the highest `ood_score` to drop (0.05 = the most OOD-looking 5%)."
    )


@dataclass
class AnalysisConfig:
    """Hidden-state analysis of each generation: OOD scores, probes, embeddings, report."""

    enabled: bool = setting(
        True, "Run the analysis after every generation of iterate (`noisystudent analyze` runs it alone)."
    )
    knn_k: int = setting(5, "Neighbours for the kNN score (distance to the k-th nearest labeled feature, cosine).")
    knn_bank_size: int = setting(
        20000,
        "Most labeled features in the kNN score's bank (a seeded random subsample of the "
        "labeled train split above it; Sun et al. 2022 use 1% of ImageNet). The bank "
        "goes to every Dask worker: rows x feature width x 4 bytes (40 MB at 512-d).",
    )
    embedding_points: int = setting(
        1500, "Points in the embedding plots (a stratified random subsample of the corpus)."
    )
    tsne: bool = setting(True, "Also draw a t-SNE embedding beside the PCA one (seconds for a few thousand points).")
    consistency_samples: int = setting(
        500,
        "Unlabeled images per confidence group (lowest / highest confidence) for the "
        "consistency probe: cosine similarity of hidden states between two noised "
        "views of the same image.",
    )
    gallery_size: int = setting(24, "Images per gallery (lowest confidence, highest OOD score, confident but wrong).")
    confident_wrong_threshold: float = setting(
        0.9, 'Confidence at or above which a wrong pseudo-label counts as "confident but wrong".'
    )
    probe_blocks: bool = setting(
        False, "Linear probes also on earlier blocks (timm `forward_intermediates`, globally pooled)."
    )
    high_threshold: float = setting(
        0.8,
        "The with/without experiment: students trained on all pseudo-labels (threshold 0) "
        "versus only those at or above this confidence.",
    )


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
        "GPUs per worker. >0 advertises the Dask resource GPU=n on each worker and every "
        "labeling task asks for GPU=1, so tasks never share a GPU (local: "
        "CUDA_VISIBLE_DEVICES per worker is up to you; slurm adds --gres=gpu:n; kubernetes "
        "sets nvidia.com/gpu limits).",
    )
    dashboard_address: str = setting(
        "127.0.0.1:0", "Dashboard address (bound to loopback by default; use 0.0.0.0:8787 to expose it)."
    )
    task_retries: int = setting(3, "Retries of a labeling task whose worker died (the scheduler reruns it elsewhere).")
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


@dataclass
class Config:
    """The whole run."""

    run_dir: str = setting(
        "runs/default", "Run directory; everything a run produces lives here and makes it resumable.", results=False
    )
    generations: int = setting(
        3,
        "Number of student generations after the teacher (a finished run can be extended by rerunning it with more).",
        results=False,
    )
    ladder: list[str] = setting(
        ["resnet10t"], "timm model per generation; index 0 is the teacher, the last entry repeats."
    )
    require_equal_or_larger: bool = setting(
        True, "Check every student has at least as many parameters as its teacher.", results=False
    )
    device: str = setting("auto", "auto (cuda if visible, else cpu), cpu, cuda or cuda:N.", results=False)
    amp: Literal["auto", "off", "bf16", "fp16"] = setting(
        "auto",
        "Mixed precision for training: auto, off, bf16 or fp16 (fp16 with a GradScaler, CUDA only). auto = bf16 "
        "on CUDA (fp16 if unsupported) and on CPUs with native bf16 (AVX512-BF16/AMX, where it trains faster "
        "than fp32), else off. Inference on CPU always runs in fp32. fp16 with device=cpu is refused.",
        results=False,
    )
    channels_last: bool = setting(
        True, "NHWC memory format for model and batches (faster convolutions on GPUs and recent CPUs).", results=False
    )
    threads: int = setting(0, "Torch intra-op threads in the training process (0 = torch default).", results=False)
    compile: bool = setting(
        False, "torch.compile the training model (faster steps on GPUs after a compile warm-up).", results=False
    )
    log_every_steps: int = setting(
        50,
        "Steps between progress-bar refreshes. The step losses stay on the device and are "
        "read back only then and at the end of the epoch: each read waits for the GPU.",
        results=False,
    )
    max_nonfinite_steps: int = setting(
        20,
        "A step whose loss or gradient is not finite is skipped (no update) and counted "
        "(the skipped_steps metric). After this many in a row training stops with an "
        "error naming the epoch and step; the last epoch's checkpoint is kept. "
        "1 = stop at the first.",
        results=False,
    )
    seed: int = setting(
        0,
        "Seed for model init, data order and augmentation (>= 0; every stream is derived from it and the generation).",
    )
    generation_overrides: dict = setting(
        {},
        'Per-generation changes, e.g. `{2: {"student.init": "teacher", '
        '"student.lr": 0.001}}`: generation number -> dotted keys applied on top '
        "of the config for that generation only.",
    )
    data: DataConfig = setting(DataConfig(), "Labeled and unlabeled data.")
    teacher: TrainConfig = setting(
        TrainConfig(
            epochs=100,
            batch_size=64,
            warmup_epochs=2.0,
            drop_rate=0.2,
            drop_path_rate=0.1,
            augment=AugmentConfig(num_ops=2, magnitude=9.0, cutout=0.5),
        ),
        "The generation-0 teacher: trained on labeled data only (regularised: a small labeled set overfits fast).",
    )
    student: StudentConfig = setting(
        StudentConfig(
            epochs=3,
            batch_size=64,
            lr=3e-3,
            warmup_epochs=0.2,
            drop_rate=0.2,
            drop_path_rate=0.05,
            augment=AugmentConfig(num_ops=1, magnitude=4.0, cutout=0.25),
        ),
        "Every student: labeled + pseudo-labeled data, noised.",
    )
    pseudo_label: PseudoLabelConfig = setting(PseudoLabelConfig(), "Labeling and read-time selection.")
    cluster: ClusterConfig = setting(ClusterConfig(), "The Dask cluster that labels the corpus.", results=False)
    tracking: TrackingConfig = setting(TrackingConfig(), "MLflow tracking.", results=False)
    analysis: AnalysisConfig = setting(
        AnalysisConfig(), "Hidden-state analysis (it reads the models; it never changes them).", results=False
    )

    def model_for_generation(self, generation: int) -> str:
        return self.ladder[min(generation, len(self.ladder) - 1)]

    def for_generation(self, generation: int) -> Config:
        """This config with ``generation_overrides[generation]`` applied (validated like ``--set``)."""
        changes = self.generation_overrides.get(generation) or self.generation_overrides.get(str(generation))
        if not changes:
            return self
        try:
            return self.with_overrides(changes)
        except ConfigError as exc:
            raise ConfigError(f"generation_overrides[{generation}]: {exc}") from exc

    def with_overrides(self, changes: dict) -> Config:
        """A derived config with dotted ``changes`` merged in (validated like ``--set``). It is final:
        it carries no ``generation_overrides`` of its own."""
        raw = to_dict(self)
        raw["generation_overrides"] = {}
        for key, value in changes.items():
            raw = set_dotted(raw, key.split("."), value)
        cfg = build(Config, raw)
        validate(cfg)
        return cfg


def validate(cfg: Config) -> None:
    """Checks across fields, and ranges the types cannot express; the error names the key."""
    _check_run(cfg)
    _check_data(cfg.data)
    for stage in ("teacher", "student"):
        _check_stage(stage, getattr(cfg, stage))
    _need(cfg.student.finetune_epochs >= 0, "student.finetune_epochs", "must be >= 0")
    _check_pseudo_label(cfg.pseudo_label)
    _check_analysis(cfg.analysis)
    _check_cluster_workers(cfg.cluster)
    _check_generation_overrides(cfg)
    _need(
        cfg.cluster.kind != "address" or bool(cfg.cluster.address),
        "cluster.address",
        "is required when cluster.kind=address",
    )


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' {msg}")


def _check_run(cfg: Config) -> None:
    """The top-level keys: generations, seed, ladder, device, amp, step counters."""
    _need(cfg.generations >= 0, "generations", "must be >= 0")
    _need(cfg.seed >= 0, "seed", "must be >= 0 (every random stream is derived from it: noisystudent.seeds)")
    _need(len(cfg.ladder) >= 1, "ladder", "must be a non-empty list of timm model names")
    _need(
        cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "device", "must be auto, cpu or cuda"
    )
    _need(
        not (cfg.amp == "fp16" and cfg.device == "cpu"),
        "amp",
        "is fp16, which needs a GPU (its GradScaler runs on CUDA); on CPU use amp=bf16 or amp=off",
    )
    _need(cfg.log_every_steps >= 1, "log_every_steps", "must be >= 1")
    _need(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")


def _check_data(data: DataConfig) -> None:
    _need(len(data.mean) in (1, data.channels), "data.mean", "must have 1 or data.channels entries")
    _need(len(data.std) in (1, data.channels), "data.std", "must have 1 or data.channels entries")
    _need(data.image_size >= 8, "data.image_size", "must be >= 8")
    _need(data.num_workers >= -1, "data.num_workers", "must be >= 0, or -1 for auto")
    _need(data.cache_mb >= 0, "data.cache_mb", "must be >= 0")
    _need(0.0 < data.crop_pct <= 1.0, "data.crop_pct", "must be in (0, 1]")


def _check_stage(stage: str, t: TrainConfig) -> None:
    """One training stage (``teacher`` or ``student``), its augmentation included."""
    _need(t.steps_per_epoch >= 0, f"{stage}.steps_per_epoch", "must be >= 0")
    _need(t.epochs >= 1, f"{stage}.epochs", "must be >= 1")
    _need(t.batch_size >= 1, f"{stage}.batch_size", "must be >= 1")
    _need(t.eval_every >= 1, f"{stage}.eval_every", "must be >= 1")
    _need(0.0 <= t.ema_decay < 1.0, f"{stage}.ema_decay", "must be in [0, 1)")
    _need(0.0 <= t.drop_rate < 1.0, f"{stage}.drop_rate", "must be in [0, 1)")
    _need(0.0 <= t.drop_path_rate < 1.0, f"{stage}.drop_path_rate", "must be in [0, 1)")
    _need(0.0 <= t.augment.magnitude <= 10.0, f"{stage}.augment.magnitude", "must be in [0, 10]")
    for key in ("rrc_scale", "rrc_ratio"):
        pair = getattr(t.augment, key)
        _need(
            len(pair) == 2 and 0 < pair[0] <= pair[1],
            f"{stage}.augment.{key}",
            "must be [low, high] with 0 < low <= high",
        )
    _need(t.augment.rrc_scale[1] <= 1.0, f"{stage}.augment.rrc_scale", "cannot exceed 1.0 (the whole image)")


def _check_pseudo_label(pl: PseudoLabelConfig) -> None:
    _need(0.0 <= pl.threshold < 1.0, "pseudo_label.threshold", "must be in [0, 1)")
    _need(pl.temperature > 0, "pseudo_label.temperature", "must be > 0")
    _need(pl.shuffle_buffer >= 1, "pseudo_label.shuffle_buffer", "must be >= 1")
    _need(0.0 <= pl.ood_drop_fraction < 1.0, "pseudo_label.ood_drop_fraction", "must be in [0, 1)")
    _need(
        pl.ood_drop_fraction == 0.0 or bool(pl.ood_score),
        "pseudo_label.ood_score",
        "must name a score when pseudo_label.ood_drop_fraction > 0",
    )


def _check_analysis(a: AnalysisConfig) -> None:
    _need(a.knn_k >= 1, "analysis.knn_k", "must be >= 1")
    _need(a.knn_bank_size >= a.knn_k, "analysis.knn_bank_size", "must be >= analysis.knn_k")
    _need(0.0 < a.high_threshold < 1.0, "analysis.high_threshold", "must be in (0, 1)")


def _check_cluster_workers(c: ClusterConfig) -> None:
    """Worker counts; ``cluster.address`` is checked last, after the generation overrides."""
    _need(c.n_workers >= 1, "cluster.n_workers", "must be >= 1")
    _need(c.threads_per_worker >= 1, "cluster.threads_per_worker", "must be >= 1")
    _need(c.gpus_per_worker >= 0, "cluster.gpus_per_worker", "must be >= 0")


def _check_generation_overrides(cfg: Config) -> None:
    """Keys are generation numbers, values dotted-key maps; each generation's config must build."""
    for gen, changes in cfg.generation_overrides.items():
        _need(
            str(gen).isdigit() and int(gen) >= 0,
            "generation_overrides",
            f"keys must be generation numbers, got {gen!r}",
        )
        _need(isinstance(changes, dict), f"generation_overrides.{gen}", "must map dotted keys to values")
        _need(
            not any(k.split(".")[0] in ("generation_overrides", "generations", "run_dir") for k in changes),
            f"generation_overrides.{gen}",
            "cannot change generation_overrides, generations or run_dir",
        )
    for gen in cfg.generation_overrides:
        cfg.for_generation(int(gen))  # unknown keys / wrong types fail now, not mid-run
