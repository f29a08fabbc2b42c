"""Large CPU tensors without a page fault per page on every step (``cpu_allocator=reuse``).

A training step allocates the same large tensors again and again (a ViT-S/16 DINOv2 step: MLP
activations of 39 MB, head logits of 240 MB). By default the C library serves every block above
32 MB with a fresh ``mmap`` and returns it on free, so the kernel faults in and zeroes each of its
4 KB pages anew on every step: a (6304 x 384) @ (384 x 1536) product took 23.8 ms with 9,457 page
faults against 15.6 ms with none (2-core Xeon). ``reuse`` keeps freed memory in the process
(glibc ``mallopt``: no ``mmap`` blocks, no trimming of the heap). Blocks of 2 MB and more go on
transparent huge pages (torch's ``THP_MEM_ALLOC_ENABLE=1``): torch reads that setting once, at its
first CPU allocation, which importing Lightning already makes, so ``import ssl_vit`` sets it (unless
the environment does) for every run, whatever ``cpu_allocator`` says. Both together made the
ViT-S/16 DINOv2 step 15% faster (docs/benchmarks.md). The price: the process keeps the memory of
its largest step instead of handing it back between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

CPU_ALLOCATORS = ("reuse", "system")
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_UP_TO = 2**31 - 1  # trim threshold (a C int): keep up to 2 GB at the top of the heap


def use_cpu_allocator(choice: str) -> dict[str, bool]:
    """Apply ``choice`` (see the module docstring) to this process. Returns what is in effect:
    ``heap_reuse`` (glibc present and accepted the settings) and ``huge_pages`` (torch places
    large blocks on huge pages: ``THP_MEM_ALLOC_ENABLE`` was set before torch's first allocation)."""
    if choice not in CPU_ALLOCATORS:
        raise ValueError(f"cpu_allocator={choice!r}; allowed: {', '.join(CPU_ALLOCATORS)}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return {"heap_reuse": False, "huge_pages": large_blocks_on_huge_pages()}
    heap_reuse = False
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        mallopt = getattr(libc, "mallopt", None)  # glibc; musl has none
        if mallopt is not None:
            heap_reuse = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))
    return {"heap_reuse": heap_reuse, "huge_pages": large_blocks_on_huge_pages()}


def use_cpu_allocator_of_run(cfg) -> dict[str, bool] | None:
    """What ``ssl_vit.train`` applies before building anything: the run's ``cpu_allocator`` when it
    trains on the CPU (``None``, nothing changed, on a GPU)."""
    from ssl_vit.precision import accelerator_type

    if accelerator_type(cfg.trainer.accelerator) != "cpu":
        return None
    return use_cpu_allocator(cfg.get("cpu_allocator", "reuse"))


def large_blocks_on_huge_pages() -> bool:
    """Whether torch aligns its large CPU blocks to pages for transparent huge pages (what
    ``THP_MEM_ALLOC_ENABLE`` does), probed with three odd-sized 3 MB blocks."""
    page = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096
    blocks = [torch.empty(3 * 2**20 + 8 * i + 8, dtype=torch.uint8) for i in range(3)]
    return all(block.data_ptr() % page == 0 for block in blocks)
