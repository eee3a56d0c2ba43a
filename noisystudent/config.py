"""The one typed configuration tree.

Loaded from YAML (``--config``) with dotted overrides (``--set student.drop_path_rate=0.2``).
Unknown keys and wrong types are errors naming the key. Every field's default is documented
here and in README's config reference; ``python pipelines/iterate.py --print-config`` dumps the
resolved tree.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans, so ``amp: off`` or
    ``--set amp=off`` stays the string "off" instead of YAML 1.1's False."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    #: Labeled training images, ImageFolder layout ``root/<class>/<image>``.
    labeled_dir: str = "data/default/labeled/train"
    #: Labeled validation images (ImageFolder); used for per-epoch metrics and early stopping.
    val_dir: str = "data/default/labeled/val"
    #: Held-out test images (ImageFolder); reported per generation, never pseudo-labeled. "" = none.
    test_dir: str = "data/default/labeled/test"
    #: Unlabeled webdataset shards: brace pattern, glob, or list.
    unlabeled_shards: Any = "data/default/unlabeled/shard-*.tar"
    #: Square input resolution images are resized to.
    image_size: int = 32
    #: 1 = grayscale, 3 = RGB. Images are converted on decode.
    channels: int = 1
    #: Per-channel normalisation (length 1 or ``channels``).
    mean: list = field(default_factory=lambda: [0.286])
    #: Per-channel normalisation std (length 1 or ``channels``).
    std: list = field(default_factory=lambda: [0.353])
    #: DataLoader worker processes for training; 0 = augment in the main process, -1 = auto: one
    #: per CPU core that torch's threads leave free (with a GPU: cores - 1, at most 8). On a
    #: 2-core CPU machine auto is 0: a worker only takes a core from the train step
    #: (benchmarks/train_throughput.py: 0.87 of the bare loop with 0 workers, 0.82 with 1).
    num_workers: int = -1


@dataclass
class AugmentConfig:
    """Input noise. RandAugment on albumentations plus flip/crop and cutout."""

    #: RandAugment ops applied per image (0 disables RandAugment).
    num_ops: int = 2
    #: RandAugment magnitude on timm's 0..10 scale (10 = strongest). Each op samples its
    #: strength uniformly in [0, magnitude] with a random sign (magnitude noise, timm "mmax").
    magnitude: float = 9.0
    #: Random horizontal flip probability.
    hflip: float = 0.5
    #: Random translation by padding then cropping, as a fraction of image size.
    crop_pad: float = 0.125
    #: Cutout probability (one square hole of ``cutout_size`` x image size).
    cutout: float = 0.5
    #: Cutout hole side as a fraction of the image side.
    cutout_size: float = 0.35


@dataclass
class TrainConfig:
    """One training stage (teacher or student). Model noise lives here too."""

    #: Passes over the data: the labeled set for a teacher, the selected pseudo-labels for a student.
    epochs: int = 10
    #: Labeled images per step.
    batch_size: int = 128
    #: Optimizer: adamw or sgd (Nesterov).
    optimizer: str = "adamw"
    #: Peak learning rate of the cosine schedule.
    lr: float = 2e-3
    #: Weight decay (not applied to norms and biases).
    weight_decay: float = 0.05
    #: SGD momentum.
    momentum: float = 0.9
    #: Linear warmup length in epochs (fractions allowed).
    warmup_epochs: float = 1.0
    #: Label smoothing of the labeled cross-entropy.
    label_smoothing: float = 0.0
    #: Clip gradient L2 norm (0 = off).
    grad_clip: float = 0.0
    #: Dropout before the classifier (timm ``drop_rate``).
    drop_rate: float = 0.0
    #: Stochastic depth (timm ``drop_path_rate``), linear decay with depth.
    drop_path_rate: float = 0.0
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(num_ops=0, cutout=0.0))
    #: Student only: pseudo-labeled images per step = ratio x batch_size (paper: 1 to 3).
    unlabeled_ratio: float = 3.0
    #: Student only: weight of the pseudo-label loss.
    unlabeled_weight: float = 1.0
    #: Student only: "scratch" (paper default) or "teacher" (copy teacher weights; same model only).
    init: str = "scratch"
    #: Student only: epochs of a final fine-tune on the labeled data alone (0 = none), at
    #: finetune_lr, without model noise. The paper found it helps a little on ImageNet.
    finetune_epochs: int = 0
    #: Student only: peak learning rate of the labeled-only fine-tune.
    finetune_lr: float = 1e-4
    #: Stop after this many epochs without validation improvement and keep the best epoch's
    #: weights (0 = train all epochs, keep the last).
    early_stop_patience: int = 0
    #: Optimizer steps per epoch; 0 = one pass over the data (labeled set for a teacher, selected
    #: pseudo-labels for a student). Fixing it gives runs with different data the same budget.
    steps_per_epoch: int = 0
    #: Exponential moving average of the weights (0 = off, e.g. 0.999). When on, the EMA model is
    #: the one validated, checkpointed as the result and handed to the next stage.
    ema_decay: float = 0.0
    @property
    def unlabeled_batch_size(self) -> int:
        """Student only: pseudo-labeled images per step."""
        return max(1, int(round(self.batch_size * self.unlabeled_ratio)))

    #: Validate every N epochs (and always after the last). Raise it when epochs are tiny (a
    #: teacher on a few thousand labels) and validation would cost more than training.
    eval_every: int = 1


@dataclass
class PseudoLabelConfig:
    """How the teacher labels the corpus, and read-time selection of what the student sees."""

    #: Inference batch size.
    batch_size: int = 512
    #: Shared cache of labeled shards, keyed by teacher checkpoint sha256 + preprocessing, each
    #: shard checked against its input's path/size/mtime: any run or experiment with the same
    #: teacher reuses them. "" = no sharing (shards live in the stage's output directory).
    cache_dir: str = ""
    #: Average the teacher's prediction with its prediction on the mirrored image (clean views
    #: only; the teacher is still never noised). Doubles labeling compute.
    tta_hflip: bool = False
    #: Soft targets (teacher probabilities, paper default) or hard argmax labels.
    soft: bool = True
    #: Keep images whose confidence >= threshold (paper: 0.3).
    threshold: float = 0.3
    #: Per-class balancing: duplicate or drop images so each class has the same count.
    balance: bool = True
    #: Images per class after balancing; 0 = mean kept count per class.
    per_class: int = 0
    #: Sharpen soft labels: p ** (1/T) renormalised (1.0 = as is).
    temperature: float = 1.0
    #: Also write the teacher's pooled penultimate features beside each labeled shard
    #: (``.features.npy``, float16): the analysis stage reads them instead of a second pass.
    save_features: bool = True
    #: Drop images by an OOD score of the analysis stage before thresholding: one of msp,
    #: entropy, energy, mahalanobis, knn ("" = keep all, the paper's choice). Needs the
    #: teacher's analysis (``<shard>.ood.npz``, written by analysis of the previous generation).
    ood_score: str = ""
    #: Share of the corpus with the highest ``ood_score`` to drop (0.05 = the most OOD-looking 5%).
    ood_drop_fraction: float = 0.0


#: OOD scores computed by the analysis stage, all oriented "higher = more out-of-distribution".
OOD_SCORES = ("msp", "entropy", "energy", "mahalanobis", "knn")


@dataclass
class AnalysisConfig:
    """Hidden-state analysis of each generation: OOD scores, probes, embeddings, report."""

    #: Run the analysis after every generation of iterate.py (pipelines/analyze.py runs it alone).
    enabled: bool = True
    #: Neighbours for the kNN score (distance to the k-th nearest labeled feature, cosine).
    knn_k: int = 5
    #: Points in the PCA / t-SNE embedding plots (a stratified random subsample of the corpus).
    embedding_points: int = 1500
    #: Also compute a t-SNE embedding (PCA is always drawn); ~10 s for 1,500 points on 2 cores.
    tsne: bool = True
    #: Unlabeled images per confidence group (lowest / highest confidence) for the consistency
    #: probe: cosine similarity of hidden states between two noised views of the same image.
    consistency_samples: int = 500
    #: Images per gallery (lowest confidence, highest OOD score, confident but wrong).
    gallery_size: int = 24
    #: Confidence at or above which a wrong pseudo-label counts as "confident but wrong".
    confident_wrong_threshold: float = 0.9
    #: Linear probes also on earlier blocks (timm ``forward_intermediates``, globally pooled).
    probe_blocks: bool = False
    #: The with/without experiment: students trained on all pseudo-labels (threshold 0) versus
    #: only those at or above this confidence.
    high_threshold: float = 0.8


@dataclass
class SlurmConfig:
    """dask-jobqueue ``SLURMCluster`` settings (cluster.kind=slurm): one worker process per job."""

    #: Partition (``-p``); "" = the site default.
    queue: str = ""
    #: Account to charge (``-A``); "" = none.
    account: str = ""
    #: Job wall time.
    walltime: str = "02:00:00"
    #: Extra ``#SBATCH`` lines, e.g. ["--constraint=a100"]. GPUs are added from cluster.gpus_per_worker.
    job_extra_directives: list = field(default_factory=list)
    #: Shell lines run before the worker starts, e.g. ["source /opt/venv/bin/activate"].
    job_script_prologue: list = field(default_factory=list)
    #: Network interface workers and scheduler bind to (e.g. "ib0"); "" = default.
    interface: str = ""
    #: Directory for SLURM job logs.
    log_directory: str = "slurm-logs"


@dataclass
class KubernetesConfig:
    """dask-kubernetes operator ``KubeCluster`` settings (cluster.kind=kubernetes)."""

    #: DaskCluster resource name.
    name: str = "noisystudent-label"
    #: Namespace; "" = the current context's.
    namespace: str = ""
    #: Worker/scheduler image; must contain noisystudent (see infra/Dockerfile).
    image: str = "noisystudent:cpu"
    #: Environment variables set on scheduler and workers.
    env: dict = field(default_factory=dict)
    #: PersistentVolumeClaim (ReadWriteMany) holding shards, checkpoints and outputs, mounted in
    #: every worker at mount_path; "" = none (the paths must then exist in the image).
    pvc: str = ""
    #: Where workers see the PVC; config paths must point inside it.
    mount_path: str = "/data"


@dataclass
class ClusterConfig:
    """Dask cluster used for pseudo-labeling (and feature extraction)."""

    #: local = start a LocalCluster; address = connect to a running scheduler;
    #: slurm = dask-jobqueue SLURMCluster; kubernetes = dask-kubernetes operator KubeCluster.
    kind: str = "local"
    #: Scheduler address for kind=address, e.g. tcp://10.0.0.5:8786.
    address: str = ""
    #: Worker processes (local, slurm: one job each, kubernetes: pods).
    n_workers: int = 2
    #: Threads per worker (keep 1 for GPU workers).
    threads_per_worker: int = 1
    #: Per-worker memory limit (Dask syntax).
    memory_limit: str = "4GiB"
    #: Torch threads per worker (0 = threads_per_worker).
    torch_threads: int = 0
    #: GPUs per worker. >0 advertises the Dask resource GPU=n on each worker and every labeling
    #: task asks for GPU=1, so tasks never share a GPU (local: CUDA_VISIBLE_DEVICES per worker
    #: is up to you; slurm adds --gres=gpu:n; kubernetes sets nvidia.com/gpu limits).
    gpus_per_worker: int = 0
    #: Dashboard address (bound to loopback by default; use 0.0.0.0:8787 to expose it).
    dashboard_address: str = "127.0.0.1:0"
    #: Retries of a labeling task whose worker died (the scheduler reruns it elsewhere).
    task_retries: int = 3
    #: Seconds to wait for workers of a slurm/kubernetes cluster to come up.
    wait_for_workers_s: int = 600
    #: Keep one cluster for a whole iterate run (started at the first labeling, closed at the end),
    #: so later passes skip the ~10 s start-up and the workers' torch import. Pays off only when
    #: stages are seconds long (tests, smoke runs): a kept LocalCluster runs its scheduler and
    #: dashboard inside the training process and its idle workers poll, which cost students 23% of
    #: their throughput on 2 CPU cores (838 vs 1,085 img/s), and GPU workers would keep holding the
    #: teacher in GPU memory. false = a fresh cluster per labeling stage, released while students train.
    reuse: bool = False
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)


@dataclass
class TrackingConfig:
    #: MLflow tracking URI; "" = sqlite store inside the run directory. MLFLOW_TRACKING_URI wins over "".
    tracking_uri: str = ""
    #: MLflow experiment name.
    experiment: str = "noisystudent"
    #: false disables MLflow entirely.
    enabled: bool = True
    #: Log every generation's model with mlflow.pytorch (signature + input example).
    log_models: bool = True
    #: Register logged models under this name (a new version per generation, aliases gen-<g>,
    #: best = highest validation top-1); "" = log without registering.
    registered_model: str = "noisystudent"


@dataclass
class Config:
    #: Run directory; everything a run produces lives here and makes it resumable.
    run_dir: str = "runs/default"
    #: Number of student generations after the teacher.
    generations: int = 3
    #: timm model per generation; index 0 is the teacher, the last entry repeats.
    ladder: list = field(default_factory=lambda: ["resnet10t"])
    #: Check every student has at least as many parameters as its teacher.
    require_equal_or_larger: bool = True
    #: auto (cuda if visible, else cpu), cpu, cuda or cuda:N.
    device: str = "auto"
    #: Mixed precision for training: auto, off, bf16 or fp16 (fp16 with a GradScaler, CUDA only).
    #: auto = bf16 on CUDA (fp16 if unsupported) and on CPUs with native bf16 (AVX512-BF16/AMX:
    #: ~1.3x faster training there), else off. Inference on CPU always runs in fp32.
    amp: str = "auto"
    #: NHWC memory format for model and batches (faster convolutions on GPUs and recent CPUs).
    channels_last: bool = True
    #: Torch intra-op threads in the training process (0 = torch default).
    threads: int = 0
    #: torch.compile the training model (faster steps on GPUs after a compile warm-up).
    compile: bool = False
    #: Seed for model init, data order and augmentation.
    seed: int = 0
    #: Per-generation changes, e.g. ``{2: {"student.init": "teacher", "student.lr": 0.001}}``:
    #: generation number -> dotted keys applied on top of the config for that generation only.
    generation_overrides: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    #: The generation-0 teacher: trained on labeled data only (regularised: 1,000 labels overfit fast).
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=100, batch_size=64, warmup_epochs=2.0, drop_rate=0.2, drop_path_rate=0.1,
        augment=AugmentConfig(num_ops=2, magnitude=9.0, cutout=0.5)))
    #: Every student: labeled + pseudo-labeled data, noised.
    student: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=3, batch_size=64, lr=3e-3, warmup_epochs=0.2, drop_rate=0.2, drop_path_rate=0.05,
        augment=AugmentConfig(num_ops=1, magnitude=4.0, cutout=0.25)))
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def model_for_generation(self, generation: int) -> str:
        return self.ladder[min(generation, len(self.ladder) - 1)]

    def for_generation(self, generation: int) -> "Config":
        """This config with ``generation_overrides[generation]`` applied (validated like ``--set``)."""
        changes = self.generation_overrides.get(generation) or self.generation_overrides.get(str(generation))
        if not changes:
            return self
        try:
            return self.with_overrides(changes)
        except ConfigError as exc:
            raise ConfigError(f"generation_overrides[{generation}]: {exc}") from exc

    def with_overrides(self, changes: dict) -> "Config":
        """A derived config with dotted ``changes`` merged in (validated like ``--set``). It is final:
        it carries no ``generation_overrides`` of its own."""
        raw = to_dict(self)
        raw["generation_overrides"] = {}
        for key, value in changes.items():
            raw = _set_dotted(raw, key.split("."), value)
        cfg = _build(Config, raw)
        validate(cfg)
        return cfg


# ---------------------------------------------------------------- building from dicts

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys under '{prefix or '<top>'}': {', '.join(sorted(names))})"
        )
    base = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            tp = hints[f.name]
            current = getattr(base, f.name)
            if dataclasses.is_dataclass(current) and isinstance(values[f.name], dict):
                # merge onto the field's own default (e.g. student's noisier AugmentConfig)
                merged = _deep_merge(to_dict(current), values[f.name])
                kwargs[f.name] = _coerce(merged, type(current), prefix + f.name)
            else:
                kwargs[f.name] = _coerce(values[f.name], tp, prefix + f.name)
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(raw: dict, keys: list[str], value: Any) -> dict:
    """``raw`` with ``value`` merged in at the nested path ``keys`` (siblings kept)."""
    nested: Any = value
    for k in reversed(keys):
        nested = {k: nested}
    return _deep_merge(raw, nested)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key!r}: cannot parse value {raw!r}: {exc}") from exc
    return key.strip().split("."), value


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                overlays: list[str | Path] | None = None) -> Config:
    """Defaults <- YAML file <- overlay YAMLs (e.g. configs/cluster/slurm.yaml) <- ``--set`` overrides."""
    raw: dict = _read_yaml(path) if path else {}
    for overlay in overlays or []:
        raw = _deep_merge(raw, _read_yaml(overlay))
    for item in overrides or []:
        raw = _set_dotted(raw, *parse_override(item))
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}' {msg}")

    need(cfg.generations >= 0, "generations", "must be >= 0")
    need(len(cfg.ladder) >= 1 and all(isinstance(m, str) for m in cfg.ladder), "ladder", "must be a non-empty list of timm model names")
    need(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "device", "must be auto, cpu or cuda")
    need(cfg.amp in ("auto", "off", "bf16", "fp16"), "amp", "must be auto, off, bf16 or fp16")
    need(cfg.data.channels in (1, 3), "data.channels", "must be 1 or 3")
    need(len(cfg.data.mean) in (1, cfg.data.channels), "data.mean", "must have 1 or data.channels entries")
    need(len(cfg.data.std) in (1, cfg.data.channels), "data.std", "must have 1 or data.channels entries")
    need(cfg.data.image_size >= 8, "data.image_size", "must be >= 8")
    need(cfg.data.num_workers >= -1, "data.num_workers", "must be >= 0, or -1 for auto")
    for stage in ("teacher", "student"):
        t: TrainConfig = getattr(cfg, stage)
        need(t.optimizer in ("adamw", "sgd"), f"{stage}.optimizer", "must be adamw or sgd")
        need(t.init in ("scratch", "teacher"), f"{stage}.init", "must be scratch or teacher")
        need(t.finetune_epochs >= 0, f"{stage}.finetune_epochs", "must be >= 0")
        need(t.steps_per_epoch >= 0, f"{stage}.steps_per_epoch", "must be >= 0")
        need(t.epochs >= 1, f"{stage}.epochs", "must be >= 1")
        need(t.batch_size >= 1, f"{stage}.batch_size", "must be >= 1")
        need(t.eval_every >= 1, f"{stage}.eval_every", "must be >= 1")
        need(0.0 <= t.ema_decay < 1.0, f"{stage}.ema_decay", "must be in [0, 1)")
        need(0.0 <= t.drop_rate < 1.0, f"{stage}.drop_rate", "must be in [0, 1)")
        need(0.0 <= t.drop_path_rate < 1.0, f"{stage}.drop_path_rate", "must be in [0, 1)")
        need(0.0 <= t.augment.magnitude <= 10.0, f"{stage}.augment.magnitude", "must be in [0, 10]")
    need(0.0 <= cfg.pseudo_label.threshold < 1.0, "pseudo_label.threshold", "must be in [0, 1)")
    need(cfg.pseudo_label.temperature > 0, "pseudo_label.temperature", "must be > 0")
    need(cfg.pseudo_label.ood_score in ("",) + OOD_SCORES, "pseudo_label.ood_score", f"must be '' or one of {OOD_SCORES}")
    need(0.0 <= cfg.pseudo_label.ood_drop_fraction < 1.0, "pseudo_label.ood_drop_fraction", "must be in [0, 1)")
    need(cfg.pseudo_label.ood_drop_fraction == 0.0 or bool(cfg.pseudo_label.ood_score), "pseudo_label.ood_score",
         "must name a score when pseudo_label.ood_drop_fraction > 0")
    need(cfg.analysis.knn_k >= 1, "analysis.knn_k", "must be >= 1")
    need(0.0 < cfg.analysis.high_threshold < 1.0, "analysis.high_threshold", "must be in (0, 1)")
    need(cfg.cluster.kind in ("local", "address", "slurm", "kubernetes"), "cluster.kind",
         "must be local, address, slurm or kubernetes")
    need(cfg.cluster.n_workers >= 1, "cluster.n_workers", "must be >= 1")
    need(cfg.cluster.threads_per_worker >= 1, "cluster.threads_per_worker", "must be >= 1")
    need(cfg.cluster.gpus_per_worker >= 0, "cluster.gpus_per_worker", "must be >= 0")
    for gen, changes in cfg.generation_overrides.items():
        need(str(gen).isdigit() and int(gen) >= 0, "generation_overrides", f"keys must be generation numbers, got {gen!r}")
        need(isinstance(changes, dict), f"generation_overrides.{gen}", "must map dotted keys to values")
        need(not any(k.split(".")[0] in ("generation_overrides", "generations", "run_dir") for k in changes),
             f"generation_overrides.{gen}", "cannot change generation_overrides, generations or run_dir")
    if cfg.generation_overrides:
        for gen in cfg.generation_overrides:
            cfg.for_generation(int(gen))  # unknown keys / wrong types fail now, not mid-run
    need(cfg.cluster.kind != "address" or bool(cfg.cluster.address), "cluster.address", "is required when cluster.kind=address")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def add_config_args(parser) -> None:
    """The ``--config`` / ``--set`` arguments every pipeline script takes."""
    parser.add_argument("--config", default=None, help="YAML config file (default: configs/default.yaml in a checkout)")
    parser.add_argument(
        "--overlay", dest="overlays", action="append", default=[], metavar="YAML",
        help="partial YAML merged over --config, e.g. configs/cluster/slurm.yaml (repeatable)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set student.drop_path_rate=0.2 (repeatable)",
    )


def config_reference() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every config field, docs taken from the ``#:`` comments above."""
    import inspect

    rows: list[tuple[str, Any, str]] = []

    def docs_of(cls: type) -> dict[str, str]:
        lines = inspect.getsource(cls).splitlines()
        out, pending = {}, []
        for line in lines:
            s = line.strip()
            if s.startswith("#:"):
                pending.append(s[2:].strip())
            elif ":" in s and not s.startswith(("#", "def", "class", '"""', "return", "@")) and pending is not None:
                name = s.split(":", 1)[0].strip()
                if name.isidentifier():
                    out[name] = " ".join(pending)
                pending = []
            elif not s:
                pending = []
        return out

    def walk(obj: Any, prefix: str) -> None:
        docs = docs_of(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                rows.append((prefix + f.name, value, docs.get(f.name, "")))

    walk(Config(), "")
    return rows


def config_reference_markdown() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, doc in config_reference():
        lines.append(f"| `{key}` | `{default!r}` | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m noisystudent.config  -> the README's config reference table
    print(config_reference_markdown())
