"""timm model creation, the equal-or-larger check, and checkpoints.

Checkpoints are plain dicts of tensors and primitives, saved atomically, loaded with
``torch.load(weights_only=True)`` (no pickle code execution) and verified against the sha256
recorded next to them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch

from .errors import CheckpointError, LadderError
from .io import atomic_path


@timm.models.register_model
def resnet10t_half(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """ResNet-10-T at half width (channels 32-256, a 16-wide stem): a quarter of resnet10t's
    parameters, the ResNet-style student to distil a resnet10t ladder into. Its shortcuts downsample
    with a strided 1x1 convolution (torchvision's), not resnet10t's average pool: onnxruntime's int8
    average pool cost 12% of the int8 model's time, and without it int8 runs 1.29x instead of 1.05x
    the fp32 speed at batch 64 on 2 cores (docs/deploy.md). Registered in timm's registry when
    noisystudent.models is imported, so it is addressable by name like any timm model; it has no
    pretrained weights."""
    from timm.models.resnet import BasicBlock, _create_resnet

    if pretrained:
        raise CheckpointError("resnet10t_half has no pretrained weights: train it (distill) or set pretrained_file")
    args = {
        "block": BasicBlock,
        "layers": (1, 1, 1, 1),
        "stem_width": 16,
        "stem_type": "deep_tiered",
        "avg_down": False,
        "channels": (32, 64, 128, 256),
    }
    # timm's resnet10t entry supplies the pretrained_cfg (stem and classifier names) only
    return _create_resnet("resnet10t", False, **{**args, **kwargs})


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model for inference, stored inside every checkpoint."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    class_names: list
    mean: list
    std: list

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def data_config(self, data):
        """``data`` (a DataConfig) at this model's own resolution and normalisation: a model is
        evaluated, and labels, the way it was trained, whatever another generation uses."""
        return replace(data, image_size=self.image_size, mean=list(self.mean), std=list(self.std))


def create_model(
    spec: ModelSpec,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    *,
    pretrained: bool = False,
    pretrained_file: str = "",
) -> torch.nn.Module:
    """A timm model by name, with model noise. Randomly initialised unless ``pretrained`` (timm's
    hub weights) or ``pretrained_file`` (local weights, which win); either way the classifier is
    new when the class count differs and the stem is adapted to ``spec.in_chans``, as timm does."""
    kwargs: dict[str, Any] = {"num_classes": spec.num_classes, "in_chans": spec.in_chans, "drop_rate": drop_rate}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    hub = pretrained and not pretrained_file
    try:
        model = timm.create_model(spec.name, pretrained=hub, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"unknown timm model {spec.name!r} in config 'ladder' (see timm.list_models())") from exc
        if hub:
            raise _hub_error(spec.name, exc) from exc
        raise
    except TypeError as exc:
        raise ValueError(f"timm model {spec.name!r} does not accept {sorted(kwargs)}: {exc}") from exc
    except OSError as exc:  # the hub is out of reach (no network, proxy, rate limit)
        raise _hub_error(spec.name, exc) from exc
    if pretrained_file:
        load_pretrained_file(model, pretrained_file, spec)
    return model


def _hub_error(name: str, exc: Exception) -> CheckpointError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return CheckpointError(
        f"pretrained=true: timm could not fetch the weights of {name} ({first_line}); on a machine "
        f"without access to the Hugging Face hub set pretrained_file=PATH to local weights"
    )


def load_pretrained_file(model: torch.nn.Module, path: str | Path, spec: ModelSpec) -> None:
    """Load ``.safetensors``, ``.pth`` or ``.bin`` weights into ``model`` through timm's own loader
    (``load_pretrained`` with the file's tensors as its source): a different class count gets a new head,
    a different channel count an adapted stem. A file of another architecture is refused, naming
    a few of the keys that do not fit, before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained_file not found: {path}")
    weights = _read_weights(path)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    heads = _names(cfg.get("classifier"))
    stems = _names(cfg.get("first_conv"))
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    stem_keys = {f"{s}.weight" for s in stems}
    own = model.state_dict()
    missing = [k for k in own if k not in weights and k not in head_keys]
    unexpected = [k for k in weights if k not in own]
    wrong = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in weights and k not in head_keys | stem_keys and weights[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label} {', '.join(keys[:3])}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape file vs model:", wrong))
            if keys
        ]
        raise CheckpointError(
            f"pretrained_file {path} does not fit timm model {spec.name} ({'; '.join(parts)}); "
            f"use weights of the same architecture"
        )
    head = next((weights[f"{h}.weight"] for h in heads if f"{h}.weight" in weights), None)
    stem = next((weights[k] for k in stem_keys if k in weights), None)
    size = tuple(cfg.get("input_size") or (3, spec.image_size, spec.image_size))
    # the tensors already read and checked go to timm as its state_dict source: the file is read
    # once, and a .pth is never unpickled beyond weights_only
    overlay = {
        **cfg,
        "state_dict": weights,
        "num_classes": head.shape[0] if head is not None else spec.num_classes,
        "input_size": (stem.shape[1] if stem is not None else spec.in_chans, *size[1:]),
    }
    timm.models.load_pretrained(model, pretrained_cfg=overlay, num_classes=spec.num_classes, in_chans=spec.in_chans)


def _names(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors; ``.pth`` / ``.bin`` are read with ``weights_only`` (no pickled code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"pretrained_file {path} cannot be read as weights ({type(exc).__name__}: "
            f"{str(exc)[:200]}); give a .safetensors, .pth or .bin state dict"
        ) from exc
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # nested checkpoints, in timm's order
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"pretrained_file {path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def count_params(model_or_name: torch.nn.Module | str, num_classes: int, in_chans: int = 3) -> int:
    if isinstance(model_or_name, str):
        model_or_name = timm.create_model(model_or_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    return sum(p.numel() for p in model_or_name.parameters())


def check_ladder(ladder: list[str], generations: int, num_classes: int, in_chans: int) -> list[int]:
    """Param counts per generation; raise LadderError if a student is smaller than its teacher."""
    names = [ladder[min(g, len(ladder) - 1)] for g in range(generations + 1)]
    params = [count_params(n, num_classes, in_chans) for n in names]
    for g in range(1, len(names)):
        if params[g] < params[g - 1]:
            raise LadderError(
                f"config key 'ladder': generation {g} student {names[g]} ({params[g]:,} params) is smaller than "
                f"its teacher {names[g - 1]} ({params[g - 1]:,} params); Noisy Student needs equal-or-larger "
                "students (or set require_equal_or_larger=false)"
            )
    return params


def save_checkpoint(path: str | Path, obj: dict) -> str:
    """Atomically save ``obj`` with torch.save, write ``<path>.sha256``; return the digest."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise in memory: a full disk then fails as OSError(ENOSPC/EFBIG)
    data = buffer.getbuffer()  # naming the file, not as torch's opaque "iostream error"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    digest = hashlib.sha256(data).hexdigest()
    with atomic_path(path.with_name(path.name + ".sha256")) as tmp:
        tmp.write_text(digest + "\n")
    return digest


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Load a checkpoint safely (weights_only) after checking its recorded sha256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    side = path.with_name(path.name + ".sha256")
    if verify and side.is_file():
        want = side.read_text().strip()
        got = hashlib.sha256(data).hexdigest()
        if want != got:
            raise CheckpointError(
                f"checkpoint {path} does not match its recorded sha256 ({got[:12]} != {want[:12]}): "
                "file is corrupt or was modified; delete it to retrain"
            )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {exc}") from exc


def save_model(path: str | Path, model: torch.nn.Module, spec: ModelSpec, extra: dict | None = None) -> str:
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return save_checkpoint(path, {"model": state, "spec": spec.as_dict(), "extra": extra or {}})


def load_model(
    path: str | Path, device: str | torch.device = "cpu", channels_last: bool = False
) -> tuple[torch.nn.Module, ModelSpec]:
    """A ready-to-use eval-mode model (no dropout / stochastic depth) and its spec.

    ``channels_last`` converts the weights to NHWC; NCHW inputs then run NHWC too (the first
    convolution switches format), which is faster for convolutions on GPUs and recent CPUs.
    """
    ckpt = load_checkpoint(path)
    spec = ModelSpec(**ckpt["spec"])
    model = create_model(spec)
    model.load_state_dict(ckpt["model"])
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), spec


def pooled_and_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled penultimate features (the classifier's input) and logits, from one forward pass.

    Works for any timm model: ``forward_head(pre_logits=True)`` pools (CNN) or picks tokens (ViT).
    """
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    return pooled, model.forward_head(feats)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying module of a DDP / torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
