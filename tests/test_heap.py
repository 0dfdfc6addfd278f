"""rgt.heap: freed CPU tensors' memory is reused inside `reuse_freed_memory()`, and RGT's CPU inference runs its
residual groups inside it (not the upsampling tail, not training)."""

from __future__ import annotations

import resource

import pytest
import torch

from rgt import heap

needs_glibc = pytest.mark.skipif(heap._LIBC is None, reason="the heap policy acts on glibc only")

BIG = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): mmapped afresh on every allocation by default


def faults_of_allocations(n: int = 8) -> int:
    """Minor page faults of filling n BIG tensors one after another (each freed before the next)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(BIG // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@needs_glibc
def test_freed_memory_is_reused_inside_and_returned_after():
    pages = BIG // resource.getpagesize()
    # Outside, every tensor is new memory: one fault per 4 KB page, 8 x pages (fewer with huge pages, hence 4x).
    assert faults_of_allocations() > 4 * pages
    with heap.reuse_freed_memory():
        assert heap.active()
        faults_of_allocations()  # the heap first grows to the working size (measured: 6-8 x pages)
        assert faults_of_allocations() <= pages  # then reuses it (measured: 0 or 1 x pages over 8 tensors)
    assert not heap.active()
    assert faults_of_allocations() > pages  # returned (measured 2-8 x pages)


@needs_glibc
def test_nested_uses_restore_at_the_outermost_exit_and_after_errors():
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            faults_of_allocations()
        assert heap.active()
        assert faults_of_allocations() <= BIG // resource.getpagesize()
    assert not heap.active()
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
