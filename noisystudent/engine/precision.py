"""Which mixed precision a run actually uses (``amp: auto`` resolved per device)."""
from __future__ import annotations

import functools

import torch


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
    fp16), bf16 on CPUs with native bf16, otherwise off. fp16 on CPU is not offered (no speed-up)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"


def autocast(device: torch.device, amp: str, inference: bool = False):
    """``torch.autocast`` for ``amp`` resolved on ``device``. ``inference=True`` keeps CPU inference
    in fp32: labels and metrics stay exact where low precision would buy little."""
    mode = resolve_amp(amp, device)
    enabled = mode != "off" and (device.type == "cuda" or not inference)
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16, enabled=enabled)
