"""Which mixed precision a run actually uses (``amp: auto`` resolved per device)."""

from __future__ import annotations

import functools
import types

import torch

from ..config import ConfigError


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast trains
    faster than fp32; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:  # not Linux: do not guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> str:
    """``off``, ``bf16`` or ``fp16`` for this device. ``auto``: bf16 on CUDA when supported (else
    fp16), bf16 on CPUs with native bf16, otherwise off. fp16 on CPU is refused: it would run without
    a GradScaler (CUDA only), so small gradients would underflow to zero."""
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"config key 'amp' is fp16 but the run computes on {device.type}: fp16 needs a GPU; use amp=bf16 or amp=off"
        )
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"


def autocast(device: torch.device, amp: str, inference: bool = False):
    """``torch.autocast`` for ``amp`` resolved on ``device``. ``inference=True`` keeps CPU inference
    in fp32: labels and metrics stay exact where low precision would buy little."""
    if inference and device.type != "cuda":
        return torch.autocast(device.type, enabled=False)
    mode = resolve_amp(amp, device)
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16, enabled=mode != "off")


def _stride_exceeds_the_input(conv: torch.nn.modules.conv._ConvNd, x: torch.Tensor) -> bool:
    """True when, along some dimension, ``conv``'s stride is larger than ``x`` and its kernel wider
    than one pixel: the shapes whose bf16 weight gradient oneDNN gets wrong (see below)."""
    return any(s > 1 and k > 1 and size < s for size, k, s in zip(x.shape[2:], conv.kernel_size, conv.stride))


def _conv_forward_fp32_where_bf16_fails(self: torch.nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    if (
        torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and x.device.type == "cpu"
        and _stride_exceeds_the_input(self, x)
    ):
        with torch.autocast("cpu", enabled=False):
            return type(self).forward(self, x.float())
    return type(self).forward(self, x)


def keep_fp32_where_cpu_bf16_fails(model: torch.nn.Module) -> int:
    """Makes each strided convolution of ``model`` run in fp32 instead of bf16 autocast on CPU
    whenever its stride is larger than its input (a 1x1 map under stride 2, say); returns how many
    convolutions it guards.

    Why: oneDNN's bf16 CPU kernel computes the weight gradient of exactly those convolutions wrong.
    Measured here (torch 2.14.1, AVX512-BF16; inputs 1-6 px, strides 2-4, kernels 1/3/5/7, both
    memory formats, 4 calls each): the gradient came out 1e13..1e37 or NaN on most calls for every
    shape with input < stride and kernel > 1, and right for every other shape (forward outputs and
    input gradients always right). pytorch/pytorch#169688 is a related class for conv3d's forward.
    Training at a small image size meets it in the last stage (resnet10t at 16 px: layer4.0.conv1),
    where the huge gradient either skips the step or, clipped, wipes out every other layer's update.
    Such a layer computes on a pixel or two, so fp32 costs nothing; every other layer keeps bf16
    (the default recipe's 2x2 map under stride 2 is not affected and keeps bf16)."""
    guarded = 0
    for module in model.modules():
        if (
            isinstance(module, torch.nn.modules.conv._ConvNd)
            and not module.transposed
            and any(s > 1 for s in module.stride)
        ):
            # bound to the module, so deepcopy (EMA) rebinds it to the copy
            module.forward = types.MethodType(_conv_forward_fp32_where_bf16_fails, module)
            guarded += 1
    return guarded
