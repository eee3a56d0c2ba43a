"""The config sections of what a run computes: data, augmentation, training (teacher and student),
pseudo-labeling and analysis. Each field is declared with :func:`.setting.setting`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .setting import setting

#: OOD scores computed by the analysis stage, all oriented "higher = more out-of-distribution".
OODScore = Literal["msp", "entropy", "energy", "mahalanobis", "knn", "react", "scale", "vim"]
OOD_SCORES: tuple[str, ...] = get_args(OODScore)


@dataclass
class DataConfig:
    """Where the labeled and unlabeled data live, and how images are decoded."""

    labeled_dir: str = setting(
        "data/default/labeled/train", "Labeled training images, ImageFolder layout `root/<class>/<image>`."
    )
    extra_labeled_dirs: list[str] = setting(
        [],
        "More labeled training images, each an ImageFolder tree whose folders are classes of "
        "labeled_dir (not every class needed): what `noisystudent import-labels` writes. The "
        "original set is left as it is.",
    )
    label_overrides: str = setting(
        "",
        'A CSV of re-labels of the labeled training images, header "path,label": path relative '
        "to labeled_dir (or absolute), label a class name, or empty to drop the image. Written by "
        '`noisystudent import-labels` for re-label candidates. "" = none.',
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
class PseudoTrainConfig(TrainConfig):
    """A stage that learns from a teacher's soft labels over the corpus as well as the labels."""

    unlabeled_ratio: float = setting(3.0, "Pseudo-labeled images per step = ratio x batch_size (paper: 1 to 3).")
    unlabeled_weight: float = setting(1.0, "Weight of the pseudo-label loss.")

    @property
    def unlabeled_batch_size(self) -> int:
        """Pseudo-labeled images per step."""
        return max(1, int(round(self.batch_size * self.unlabeled_ratio)))

    @property
    def logit_temperature(self) -> float:
        """The temperature the model's logits are divided by in the pseudo-label loss (1: none)."""
        return 1.0


@dataclass
class StudentConfig(PseudoTrainConfig):
    """A student: labeled plus pseudo-labeled data, noised."""

    init: Literal["scratch", "teacher"] = setting(
        "scratch", '"scratch" (paper default) or "teacher" (copy the teacher\'s weights; same model only).'
    )
    finetune_epochs: int = setting(
        0,
        "Epochs of a final fine-tune on the labeled data alone (0 = none), at finetune_lr, "
        "without model noise. The paper found it helps a little on ImageNet.",
    )
    finetune_lr: float = setting(1e-4, "Peak learning rate of the labeled-only fine-tune.")


@dataclass
class DistillConfig(PseudoTrainConfig):
    """Distillation: a smaller model trained on a finished generation's soft labels over the whole
    corpus plus the labeled set (Hinton et al. 2015), with light noise unless asked for more."""

    model: str = setting(
        "",
        'timm model of the distilled student, e.g. resnet10t_half ("" = off: `iterate` ends with the '
        "last generation). `iterate` distils its last generation; `noisystudent distill` any checkpoint "
        "or registered model.",
    )
    temperature: float = setting(
        2.0,
        "Distillation temperature T: targets are the teacher's probabilities softened to "
        "softmax(logits / T) (p ** (1/T) renormalised), the student's logits are divided by T too, "
        "and the loss is scaled by T^2 so its gradients keep their size (Hinton et al.). 1 = plain soft labels.",
    )
    threshold: float = setting(
        0.0,
        "Keep corpus images whose teacher confidence >= threshold (0 = every image: a student "
        "imitating its teacher learns from its doubts too).",
    )
    balance: bool = setting(False, "Per-class balancing of the corpus images, as pseudo_label.balance.")
    registered_model: str = setting(
        "noisystudent-distilled",
        "Register the distilled model under this name (alias from-gen-<g>; models:/<name>/latest is "
        'the newest); "" = log without registering.',
        results=False,
    )

    @property
    def logit_temperature(self) -> float:
        return self.temperature


@dataclass
class ExportConfig:
    """ONNX export of a trained model, its int8 quantization and their checks."""

    onnx: bool = setting(True, "Export the distilled model (and `noisystudent export`'s) to ONNX after training.")
    opset: int = setting(18, "ONNX opset of the export (torch.onnx's dynamo exporter: 18 or newer).")
    tolerance: float = setting(
        1e-4,
        "Largest absolute difference allowed between onnxruntime's and torch's class probabilities "
        "on real validation images; the export fails above it.",
    )
    check_images: int = setting(256, "Validation images the ONNX model is checked against torch on.")
    int8: bool = setting(True, "Also write a statically quantized int8 model (onnxruntime, QDQ format).")
    calibration_images: int = setting(
        512, "Labeled training images (a seeded sample, evaluation preprocessing) that calibrate int8 activations."
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = setting(
        "minmax", "How onnxruntime sets each activation's int8 range from the calibration images."
    )
    per_channel: bool = setting(True, "Per-output-channel weight scales (per-tensor loses more on depthwise convs).")
    keep_float: list[str] = setting(
        ["stem"],
        "Layers left in float in the int8 model: `stem` (the first convolution: 1 or 3 input channels "
        "give int8 kernels too little to work on, so it runs faster in float, and it is the layer most "
        "sensitive to rounding), `depthwise` (every depthwise convolution, where int8 loses most on "
        "EfficientNet/MobileNet-style models), `head` (the classifier), or ONNX node names. [] = "
        "quantize everything. docs/deploy.md measures them.",
    )


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
        'one of msp, entropy, energy, mahalanobis, knn, react, scale, vim ("" = keep all, the '
        "paper's choice; the analysis report names the one that separated tagged OOD images "
        "best on a validation split). Needs the teacher's analysis (`<shard>.ood.npz`, "
        "written by analysis of the previous generation).",
    )
    ood_drop_fraction: float = setting(
        0.0, "Share of the corpus with the highest `ood_score` to drop (0.05 = the most OOD-looking 5%)."
    )
    decode: Literal["cpu", "gpu", "auto"] = setting(
        "cpu",
        "Where the teacher's inputs are decoded and resized. cpu = PIL/OpenCV on the worker's cores, "
        "one image after another (the labels of every earlier version). gpu = each batch's JPEGs in "
        "one torchvision decode_jpeg call on the labeling device (nvJPEG on CUDA) and the same "
        "geometry there, from uint8; PNG, WebP, CMYK and whatever that decoder refuses go "
        "through the CPU decoder, counted by reason in each shard's summary and the manifest. "
        "Labels agree with cpu's up to decoder rounding; a changed value gets its own label "
        "cache entry. auto = gpu when the device is CUDA and torchvision was built with it, else cpu.",
    )
    prefetch_batches: int = setting(
        2,
        "Batches a background thread of each labeling task reads, decodes and prepares ahead "
        "while the current one is inferred and written. Memory: up to this many prepared "
        "batches wait, plus the one being made (decode=cpu: uint8 views, 77 MB per batch of 512 "
        "at 224 px RGB; decode=gpu: float32 on the device, 308 MB). 0 = no thread, one step after another.",
        results=False,
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
    react_percentile: float = setting(
        90.0,
        "ReAct: features are clipped at this percentile of the labeled train split's activations "
        "before the energy score (Sun et al. 2021 use 90).",
    )
    scale_percentile: float = setting(
        85.0,
        "SCALE: each image's features are scaled by exp(sum / sum above this percentile of its own "
        "activations) before the energy score (Xu et al. 2024 use 85 on ImageNet).",
    )
    vim_dim: int = setting(
        0,
        "ViM: dimension of the principal subspace of the labeled features; the score is the norm "
        "of the residual outside it, scaled to the logits, minus the energy (Wang et al. 2022). "
        "0 = half the feature width, at most 1000 (the paper's 1000 for 2048-d ResNet-50 features).",
    )
    best_validation_fraction: float = setting(
        0.5,
        "Where the corpus has hidden OOD tags, the best score is picked by AUROC on this share of "
        "the tagged images (a seeded split) and its AUROC reported on the rest, so the choice is "
        "not made on the numbers it is judged by.",
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
