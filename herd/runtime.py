"""Process-level settings for training on the CPU.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB, lower at first)
with a fresh `mmap` and gives it back with `munmap` on free. A training step allocates and frees
the same large tensors every step (logits, their log-softmax, their gradients: 64 MiB each at
2,048 tokens × an 8K vocabulary), so every step the kernel zero-fills those pages again, one page
fault per 4 KiB: on a 2-core VM that was a third of a tiny model's training step, time spent in
the kernel rather than in matmuls (bench/train_step.py shows the step with and without).
Intel's PyTorch CPU launcher preloads jemalloc/tcmalloc for the same reason; glibc's own knobs do
it without a new dependency: serve large blocks from the heap and keep freed memory for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt tunables)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Keep freed memory in this process for reuse instead of returning it to the kernel (no mmap
    for large blocks, no trimming of the heap). The process's resident size stays at its peak, which
    a training loop reaches every step anyway. Returns whether the setting took (glibc only)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    # trim only past 2 GiB of free heap top (mallopt takes an int: 2^31 - 1 is its largest value)
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok)
