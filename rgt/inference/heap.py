"""`reuse_freed_memory()`: while RGT runs on a CPU, keep freed tensors' memory in the C heap for the next tensor.

glibc gives every allocation above its mmap threshold (32 MB at most) a fresh mapping and unmaps it on free, so
each large tensor of a forward pass is new memory that the kernel faults in and zeroes page by page. RGT makes
hundreds of them: a token tensor (H*W, C) is 47 MB at 256x256 for C = 180. Measured on RGT-S x4 at 256x256
(2-core Xeon, torch 2.13, fp32, kernels="portable"): 9.4 M page faults and 24 s of system time in a 31 s forward;
inside this context, 15 s. The official code gains too (65 s -> 28 s), and the benchmarks show both.

Inside, mallopt(M_MMAP_MAX, 0) serves every allocation from the heap and a huge M_TRIM_THRESHOLD keeps freed
memory there; peak RSS grows a little (1.2 -> 2.1 GB in that run) because freed blocks are held, not returned.
On exit the free memory goes back to the system (malloc_trim) and the thresholds are left where glibc's own
dynamic adjustment takes a program with large allocations: mmap above 32 MB, trim above 64 MB.

A no-op where the C library is not glibc (macOS, Windows, musl) and inside an enclosing use. The settings are
process-wide: other threads allocating meanwhile use the heap too.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
from collections.abc import Iterator

# glibc's mallopt parameters (malloc.h) and the values restored on exit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_MAX_DEFAULT = 65536  # glibc's DEFAULT_MMAP_MAX
MMAP_THRESHOLD_AFTER = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_AFTER = 2 * MMAP_THRESHOLD_AFTER  # glibc's dynamic rule: trim threshold = 2 x mmap threshold
TRIM_THRESHOLD_INSIDE = 2**31 - 1  # mallopt takes an int: 2 GB, the largest

_lock = threading.Lock()
_depth = 0


def _glibc():
    """The process's glibc (ctypes), or None when the C library is another one."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


_LIBC = _glibc()


def active() -> bool:
    """Whether a `reuse_freed_memory()` block is running and took effect (glibc)."""
    return _LIBC is not None and _depth > 0


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Serve the block's CPU allocations from the heap and reuse freed ones (see the module docstring)."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1 and _LIBC is not None:
            _LIBC.mallopt(M_MMAP_MAX, 0)
            _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_INSIDE)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _LIBC is not None:
                _LIBC.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
                _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_AFTER)
                _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_AFTER)
                _LIBC.malloc_trim(0)
