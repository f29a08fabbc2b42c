"""cpu_allocator=reuse: a training loop's repeated large CPU tensors stop costing page faults
(ssl_vit/cpu_memory.py). Each case runs in a fresh process: the settings are process-wide and
torch reads its huge-page setting once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vit.cpu_memory import use_cpu_allocator

ROOT = Path(__file__).resolve().parents[1]
# Allocate, fill and free a 40 MB tensor (above glibc's largest mmap threshold) ten times after
# two warm-up rounds; report the minor page faults per round and what use_cpu_allocator says.
PROBE = """
import json, resource, sys
import ssl_vit, torch
from ssl_vit.cpu_memory import use_cpu_allocator
state = use_cpu_allocator(sys.argv[1])
def step():
    torch.empty(10 * 2**20, dtype=torch.float32).fill_(1.0)
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({**state, "faults_per_step": faults}))
"""


def probe(choice: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, choice], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and transparent huge pages")
def test_reuse_removes_the_page_faults_of_repeated_large_tensors():
    system = probe("system", THP_MEM_ALLOC_ENABLE="0")
    reuse = probe("reuse")
    assert system == {"heap_reuse": False, "huge_pages": False, "faults_per_step": system["faults_per_step"]}
    assert system["faults_per_step"] > 5000  # 40 MB of fresh 4 KB pages each time (10,240 pages)
    assert reuse["heap_reuse"] and reuse["huge_pages"]
    # Zero on an idle machine; one CI run saw 106 per step (about 1% of the system allocator's count,
    # whatever the kernel took back of the retained heap meanwhile), so the bound is relative: reuse
    # must remove at least 95% of the faults, which it cannot do without keeping the freed pages.
    assert reuse["faults_per_step"] < system["faults_per_step"] / 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages")
def test_an_explicit_environment_setting_is_kept():
    kept = probe("reuse", THP_MEM_ALLOC_ENABLE="0")
    assert kept["heap_reuse"] and not kept["huge_pages"]


def test_a_bad_choice_names_the_allowed_ones():
    with pytest.raises(ValueError, match="cpu_allocator='jemalloc'; allowed: reuse, system"):
        use_cpu_allocator("jemalloc")
