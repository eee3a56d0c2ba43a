"""The typed configuration tree: the root :class:`Config` (its sections are in :mod:`.sections`
and :mod:`.runtime`) and :func:`validate`, the checks across fields.

Each field is declared with :func:`.setting.setting`, which keeps the help text in the field's
metadata (``docs/config.md`` is generated from them). Choices are ``Literal`` types and list fields
name their element type; :mod:`.loading` checks both when a YAML file or ``--set`` is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .fields import ConfigError, build, set_dotted, to_dict
from .runtime import ClusterConfig, TrackingConfig
from .sections import (
    AnalysisConfig,
    AugmentConfig,
    DataConfig,
    DistillConfig,
    ExportConfig,
    PseudoLabelConfig,
    StudentConfig,
    TrainConfig,
)
from .setting import setting


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
    cudnn_benchmark: bool = setting(
        True,
        "On GPUs: let cuDNN time its convolution algorithms once per input shape and keep the fastest "
        "(training shapes are fixed, so this pays off after the first steps).",
        results=False,
    )
    distributed_timeout_s: int = setting(
        1800,
        "Under torchrun: seconds a collective may wait for the other ranks before the job fails "
        "with an error (instead of hanging on a rank that died or stalled).",
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
    distill: DistillConfig = setting(
        DistillConfig(
            epochs=10,
            batch_size=64,
            lr=3e-3,
            warmup_epochs=0.5,
            augment=AugmentConfig(num_ops=0, cutout=0.0),
        ),
        "Distillation of a finished generation into a smaller model (off until distill.model is set): "
        "dropout, stochastic depth and RandAugment off, flip and translation on.",
    )
    export: ExportConfig = setting(ExportConfig(), "ONNX and int8 export of the distilled model.")
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
    for stage in ("teacher", "student", "distill"):
        _check_stage(stage, getattr(cfg, stage))
    _check_distill(cfg.distill, cfg.export)
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
    _need(cfg.distributed_timeout_s >= 1, "distributed_timeout_s", "must be >= 1 (seconds)")
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
    _need(pl.prefetch_batches >= 0, "pseudo_label.prefetch_batches", "must be >= 0 (0 = no prefetch thread)")
    _need(0.0 <= pl.ood_drop_fraction < 1.0, "pseudo_label.ood_drop_fraction", "must be in [0, 1)")
    _need(
        pl.ood_drop_fraction == 0.0 or bool(pl.ood_score),
        "pseudo_label.ood_score",
        "must name a score when pseudo_label.ood_drop_fraction > 0",
    )


def _check_distill(d: DistillConfig, e: ExportConfig) -> None:
    _need(d.temperature > 0, "distill.temperature", "must be > 0")
    _need(0.0 <= d.threshold < 1.0, "distill.threshold", "must be in [0, 1)")
    _need(d.unlabeled_ratio > 0, "distill.unlabeled_ratio", "must be > 0 (distillation learns from the corpus)")
    _need(e.opset >= 18, "export.opset", "must be >= 18 (torch.onnx's dynamo exporter)")
    _need(e.tolerance > 0, "export.tolerance", "must be > 0")
    _need(e.check_images >= 1, "export.check_images", "must be >= 1")
    _need(e.calibration_images >= 1, "export.calibration_images", "must be >= 1")


def _check_analysis(a: AnalysisConfig) -> None:
    _need(a.knn_k >= 1, "analysis.knn_k", "must be >= 1")
    _need(a.knn_bank_size >= a.knn_k, "analysis.knn_bank_size", "must be >= analysis.knn_k")
    _need(0.0 < a.high_threshold < 1.0, "analysis.high_threshold", "must be in (0, 1)")
    _need(0.0 < a.react_percentile < 100.0, "analysis.react_percentile", "must be in (0, 100)")
    _need(0.0 < a.scale_percentile < 100.0, "analysis.scale_percentile", "must be in (0, 100)")
    _need(a.vim_dim >= 0, "analysis.vim_dim", "must be >= 0 (0 = half the feature width)")
    _need(0.0 < a.best_validation_fraction < 1.0, "analysis.best_validation_fraction", "must be in (0, 1)")


def _check_cluster_workers(c: ClusterConfig) -> None:
    """Worker counts; ``cluster.address`` is checked last, after the generation overrides."""
    _need(c.n_workers >= 1, "cluster.n_workers", "must be >= 1")
    _need(c.threads_per_worker >= 1, "cluster.threads_per_worker", "must be >= 1")
    _need(c.gpus_per_worker >= 0, "cluster.gpus_per_worker", "must be >= 0")
    _need(min(c.gpu_ids, default=0) >= 0, "cluster.gpu_ids", f"must be GPU indices >= 0, got {c.gpu_ids}")
    _need(len(set(c.gpu_ids)) == len(c.gpu_ids), "cluster.gpu_ids", f"lists a GPU twice: {c.gpu_ids}")


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
