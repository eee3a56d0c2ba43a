"""Which mixed precision a run actually uses (``amp: auto`` resolved per device)."""
from __future__ import annotations

import functools

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
        raise ConfigError(f"config key 'amp' is fp16 but the run computes on {device.type}: fp16 needs a GPU; "
                          f"use amp=bf16 or amp=off")
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
