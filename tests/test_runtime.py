"""herd/runtime.py: with freed memory retained, a training step's large temporaries stop costing
page faults (glibc serves them from the heap it kept instead of fresh zero-filled mmap pages)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from herd.runtime import _glibc

PROBE = """
import resource, sys, torch
from herd.runtime import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
# Warm up: the first allocations fault in either way, and for the first few steps the small
# allocations made beside each block (tensor and storage objects) may split a freed 64 MiB block, so
# the next one extends the heap instead (3 warm-up steps left 65,536-81,920 faults in most runs on
# one machine; 10 left none in every run). A training loop runs in the steady state after them.
for _ in range(10):
    torch.empty(2048, 8192).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # a 64 MiB temporary, allocated and freed like a step's logits
    torch.empty(2048, 8192).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt only")
def test_retained_memory_stops_page_faults_on_repeated_large_tensors():
    system, retained = _faults("system"), _faults("retain")
    # 10 × 64 MiB: 163,840 faults in 4 KiB pages when each block is a fresh mmap (fewer with huge
    # pages); kept memory is reused without faulting in again
    assert system >= 1_000 and retained * 20 < system, (system, retained)
