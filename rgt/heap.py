"""`reuse_freed_memory()`: keep freed tensors' memory in the C heap for the next tensor, which RGT's forward
uses around its transformer body on a CPU (`for_inference`).

glibc gives every allocation above its mmap threshold (32 MB at most) a fresh mapping and unmaps it on free, so
each large tensor of a forward pass is new memory that the kernel faults in and zeroes page by page. RGT's body
makes hundreds of them: a token tensor (H*W, C) is 47 MB at 256x256 for C = 180. Measured on RGT-S x4 at 256x256
(2-core Xeon, torch 2.13, fp32, kernels="portable", one process per run): 9.2-9.4 M page faults and 23-24 s of
system time in a 30-31 s forward; with freed memory reused, 15-19 s and under 1 s of system time. The official
code gains too (62-65 s -> 28 s), so bench/model.py also times it inside this policy.

Inside, mallopt(M_MMAP_MAX, 0) serves every allocation from the heap and a 1 GB M_TRIM_THRESHOLD keeps freed
memory there. Held blocks fragment the heap, so the policy covers the body only (same-sized tensors, reused
block after block) and not the upsampling tail, whose few tensors are the largest: around the whole forward it
took a whole 1000x750 RGT-S x4 image from 8.5 GB to 15.1 GB peak RSS, around the body to 11.5 GB, which is why
`for_inference` also asks for room (HELD_FACTOR). On exit the free memory goes back to the
system (malloc_trim) and the thresholds are left where glibc's own dynamic adjustment takes a program with large
allocations: mmap above 32 MB, trim above 64 MB.

A no-op where the C library is not glibc (macOS, Windows, musl) and inside an enclosing use. The settings are
process-wide: other threads allocating meanwhile use the heap too.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from rgt.ops._dispatch import tracing

# glibc's mallopt parameters (malloc.h) and the values restored on exit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_MAX_DEFAULT = 65536  # glibc's DEFAULT_MMAP_MAX
MMAP_THRESHOLD_AFTER = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_AFTER = 2 * MMAP_THRESHOLD_AFTER  # glibc's dynamic rule: trim threshold = 2 x mmap threshold
TRIM_THRESHOLD_INSIDE = 2**30  # free memory at the heap top beyond 1 GB still goes back

# Held blocks raise the peak RSS: RGT-S x4 at 256x256 by 0.9 GB (19x its 47 MB token tensor), a 1000x750 image by
# 3.0 GB (5.6x its 540 MB one). The policy runs only where 64x the token tensor fits in the available memory, so
# that the worst measured extra takes under a third of it.
HELD_FACTOR = 64

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


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (memory the kernel can give without swapping), or None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def for_inference(x: Tensor) -> contextlib.AbstractContextManager:
    """`reuse_freed_memory()` around RGT's body for its token tensor x (B, H*W, C), or a null context: off a CPU
    (GPUs have their own caching allocator), with autograd (it keeps activations alive), when tracing or
    compiling, and when HELD_FACTOR x the token tensor does not fit in the memory available now."""
    use = x.device.type == "cpu" and not torch.is_grad_enabled() and not tracing()
    if use:
        free = available_bytes()
        use = free is not None and HELD_FACTOR * x.numel() * x.element_size() <= free
    return reuse_freed_memory() if use else contextlib.nullcontext()
