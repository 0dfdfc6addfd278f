"""rgt.heap: freed CPU tensors' memory is reused inside `reuse_freed_memory()`, and RGT's CPU inference runs its
residual groups inside it (not the upsampling tail, not training)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rgt import heap

needs_glibc = pytest.mark.skipif(heap._LIBC is None, reason="the heap policy acts on glibc only")

BIG = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): mmapped afresh on every allocation by default


# Run in a fresh interpreter: in a process where the policy already ran, the heap holds large free chunks (their
# pages returned by malloc_trim), and glibc serves a big tensor from those before it maps new memory.
MECHANISM = f"""
import ctypes, torch
from rgt import heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

heap._LIBC.mallinfo2.restype = MallInfo2

def mapped_and_held():
    t = torch.ones({BIG} // 4)
    mapped = heap._LIBC.mallinfo2().hblkhd  # bytes in mmapped blocks while t is alive
    del t
    return mapped, heap._LIBC.mallinfo2().fordblks  # free bytes the heap holds once t is freed

outside = mapped_and_held()
with heap.reuse_freed_memory():
    inside = mapped_and_held()
print(outside[0], inside[0], inside[1], heap.active())
"""


@pytest.mark.skipif(heap._LIBC is None or not hasattr(heap._LIBC, "mallinfo2"), reason="needs glibc >= 2.33")
def test_big_tensors_come_from_the_heap_inside_and_are_held_once_freed():
    out = subprocess.run([sys.executable, "-c", MECHANISM], capture_output=True, text=True, check=True).stdout
    mapped_outside, mapped_inside, held_inside, active_after = out.split()
    assert int(mapped_outside) >= BIG  # outside: its own mapping (glibc maps everything above 32 MB)
    assert int(mapped_inside) < BIG and int(held_inside) >= BIG  # inside: from the heap, kept for the next one
    assert active_after == "False"


@needs_glibc
def test_nested_uses_restore_at_the_outermost_exit_and_after_errors():
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            pass
        assert heap.active() and heap._depth == 1
    assert not heap.active() and heap._depth == 0
    with pytest.raises(KeyError), heap.reuse_freed_memory():
        raise KeyError("boom")
    assert not heap.active() and heap._depth == 0


def test_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_LIBC", None)
    with heap.reuse_freed_memory():
        assert not heap.active()
    assert heap._depth == 0


def test_cpu_inference_runs_the_residual_groups_inside_it():
    from rgt.arch import RGT

    net = RGT(upscale=2, embed_dim=36, depth=[2, 2], num_heads=[6, 6], mlp_ratio=2, split_size=[4, 8],
              kernels="portable")
    seen = {}
    for name in ("layers.0", "layers.1", "conv_last"):
        net.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(
            heap._depth))
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        net.eval()(x)
    assert seen == {"layers.0": [1], "layers.1": [1], "conv_last": [0]}  # the tail's huge tensors: outside
    seen.clear()
    net.train()(x).mean().backward()  # autograd holds the activations: nothing to reuse
    assert seen == {"layers.0": [0], "layers.1": [0], "conv_last": [0]} and heap._depth == 0


def test_not_used_where_the_held_blocks_would_not_fit(monkeypatch):
    tokens = torch.empty(1, 1000, 180)  # 0.72 MB
    monkeypatch.setattr(heap, "available_bytes", lambda: heap.HELD_FACTOR * 720_000)
    with torch.no_grad(), heap.for_inference(tokens):
        assert heap._depth == 1
    monkeypatch.setattr(heap, "available_bytes", lambda: heap.HELD_FACTOR * 720_000 - 1)
    with torch.no_grad(), heap.for_inference(tokens):
        assert heap._depth == 0
    monkeypatch.setattr(heap, "available_bytes", lambda: None)  # no /proc/meminfo: not used
    with torch.no_grad(), heap.for_inference(tokens):
        assert heap._depth == 0


def test_available_bytes_reads_meminfo():
    free = heap.available_bytes()
    assert free is None or 0 < free < 2**50
