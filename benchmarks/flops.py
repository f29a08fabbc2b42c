"""FLOP counting for the benchmarks: ``torch.utils.flop_counter`` registers formulas for the GPU
attention kernels only, so the CPU flash-attention forward and backward are added here."""
from __future__ import annotations

from typing import Any, Callable

import torch

def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def cpu_attention_flop_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    for op, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_forward),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward)):
        if hasattr(aten, op):
            mapping[getattr(aten, op)] = formula
    return mapping


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping())


def flops_by_op(counter) -> dict[str, int]:
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(fn: Callable[[], Any]) -> dict[str, int]:
    with flop_counter() as counter:
        fn()
    return flops_by_op(counter)
