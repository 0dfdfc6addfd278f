"""rgt.inference.heap: freed CPU tensors' memory is reused inside `reuse_freed_memory()`, and the CPU inference
paths run inside it."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

from rgt.inference import heap

needs_glibc = pytest.mark.skipif(heap._LIBC is None, reason="the heap policy acts on glibc only")

BIG = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): mmapped afresh on every allocation by default


def faults_of_second_allocation() -> int:
    """Minor page faults of filling a BIG tensor right after an identical one was freed."""
    torch.ones(BIG // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(BIG // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@needs_glibc
def test_freed_memory_is_reused_inside_and_returned_after():
    pages = BIG // resource.getpagesize()
    # Outside, the second tensor is new memory: at least one fault per 4 KB page (fewer with huge pages, so
    # the bound is a tenth). Inside, the first one's freed pages serve it (measured: 0-2 faults).
    assert faults_of_second_allocation() > pages // 10
    with heap.reuse_freed_memory():
        assert heap.active()
        assert faults_of_second_allocation() < pages // 100
    assert not heap.active()
    assert faults_of_second_allocation() > pages // 10


@needs_glibc
def test_nested_uses_restore_at_the_outermost_exit_and_after_errors():
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            pass
        assert heap.active()
        assert faults_of_second_allocation() < BIG // resource.getpagesize() // 100
    assert not heap.active()
    with pytest.raises(KeyError), heap.reuse_freed_memory():
        raise KeyError("boom")
    assert not heap.active() and heap._depth == 0


def test_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_LIBC", None)
    with heap.reuse_freed_memory():
        assert not heap.active()
    assert heap._depth == 0


def test_cpu_upscaler_runs_the_model_inside_it():
    from rgt.arch import RGT
    from rgt.inference import Upscaler

    net = RGT(upscale=2, embed_dim=36, depth=[2], num_heads=[6], mlp_ratio=2, split_size=[4, 8])
    seen = []
    net.register_forward_hook(lambda *_: seen.append(heap._depth))
    up = Upscaler(net, device="cpu")
    up(np.zeros((20, 24, 3), np.uint8))
    assert seen == [1] and heap._depth == 0
