"""Which numeric precision to train in: bf16 autocast only where the hardware makes it fast.

bf16 autocast is a large speed-up on GPUs with bf16 tensor cores and on CPUs with AMX or
AVX512-BF16 (Intel Sapphire Rapids and later: ~5x faster matmuls), but on a CPU without them
PyTorch emulates bf16 and the same step is several times *slower* than fp32 (measured on an
AVX2-only AMD EPYC: a 4096x192 @ 192x768 linear takes 0.38 s in bf16 autocast, 0.045 s in fp32).
``trainer.precision: auto`` (the default) therefore resolves per machine; any explicit Lightning
precision (``32``, ``bf16-mixed``, ``16-mixed`` ...) is used as given.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("ssl_vit")

AUTO = "auto"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU executes bf16 matmuls natively (AMX tiles or AVX512-BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu, PyTorch >= 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def accelerator_type(accelerator: str) -> str:
    """``cuda`` or ``cpu``: the device Lightning's ``accelerator`` setting will use."""
    accelerator = str(accelerator).lower()
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator in ("gpu", "cuda") else accelerator


def fast_bf16(device_type: str) -> bool:
    """Whether bf16 autocast speeds up (rather than slows down) work on ``device_type``."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str:
    """Lightning's ``precision`` argument for the setting ``precision``: ``auto`` becomes
    ``bf16-mixed`` where bf16 is fast on the chosen accelerator, else ``32``; anything else is
    returned unchanged (as a string) for Lightning to check."""
    if str(precision) != AUTO:
        return str(precision)
    device_type = accelerator_type(accelerator)
    chosen = "bf16-mixed" if fast_bf16(device_type) else "32"
    log.info("trainer.precision=auto -> %s (%s%s)", chosen, device_type,
             "" if chosen == "32" else " with native bf16")
    return chosen
