"""What a training run builds before its first step: the process (torchrun's group, the device,
the initial seed) and the model with its noise, on its device, wrapped for DDP and compile."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, TrainConfig
from ..io import remove_stale_temporaries, sha256_file
from ..models import ModelSpec, create_model, load_checkpoint
from ..seeds import Seeds, Stream
from . import distributed as ddp
from .device import resolve_device, seed_everything
from .precision import keep_fp32_where_cpu_bf16_fails, resolve_amp


def start_process(cfg: Config, out_dir: Path, seeds: Seeds) -> tuple[ddp.DistEnv, torch.device]:
    """Join torchrun's process group (if any), pick the device, clear stale temporaries, seed the
    model's initial weights."""
    env = ddp.init_distributed(cfg.distributed_timeout_s)
    device = resolve_device(cfg.device)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if env.is_main:  # rank 0 alone writes here: a temp file left now is from a writer killed mid-write
        remove_stale_temporaries(out_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(seeds(Stream.MODEL_INIT))
    return env, device


def build_model(
    spec: ModelSpec, recipe: TrainConfig, cfg: Config, device: torch.device, env: ddp.DistEnv, init_from: str | None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The timm model with this stage's model noise, and the module that runs forward/backward
    (DDP averages gradients across ranks; ``compile`` wraps it)."""
    starts_from_weights = not init_from  # init_from replaces every weight: fetching pretrained ones would be wasted
    model = create_model(
        spec,
        drop_rate=recipe.drop_rate,
        drop_path_rate=recipe.drop_path_rate,
        pretrained=recipe.pretrained and starts_from_weights,
        pretrained_file=recipe.pretrained_file if starts_from_weights else "",
    )
    if init_from:
        missing = model.load_state_dict(load_checkpoint(init_from)["model"], strict=False)
        if missing.missing_keys:
            raise ValueError(
                f"student.init=teacher needs the same architecture; missing keys e.g. {missing.missing_keys[:3]}"
            )
    model.to(device)
    if device.type == "cpu" and resolve_amp(cfg.amp, device) == "bf16":
        keep_fp32_where_cpu_bf16_fails(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None)
        if env.enabled
        else model
    )
    if cfg.compile:
        net = torch.compile(net)
    return model, net


def weights_source(recipe: TrainConfig, init_from: str | None) -> str:
    """Where a stage's initial weights come from, for result.json and the MLflow tag ``weights_source``."""
    if init_from:
        return f"checkpoint {init_from}"
    if recipe.pretrained_file:
        return f"file {recipe.pretrained_file} (sha256 {sha256_file(recipe.pretrained_file)[:16]})"
    return "timm pretrained (hub)" if recipe.pretrained else "random init"
