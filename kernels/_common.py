"""Helpers shared by the Triton kernels: kernel launch and op definition that work on a GPU and under the
CPU interpreter (TRITON_INTERPRET=1, read once at import like `@triton.jit` does)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version(text: str) -> tuple[int, int]:
    return tuple(int(part) for part in text.split(".")[:2])


@functools.cache
def _check_interpreter() -> None:
    """Triton < 3.7's interpreter turns a scalar kernel argument used as a loop bound into an int with
    `int(<1-element array>)`, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"):
    every kernel here loops over such bounds, so say what to install instead of failing inside one."""
    if _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
        raise RuntimeError(
            f"TRITON_INTERPRET=1 with Triton {triton.__version__} needs numpy < 2.4 (numpy {np.__version__} is "
            "installed; Triton >= 3.7 has no such limit): pip install 'numpy<2.4'"
        )


def launch(kernel):
    """`wrap_triton(kernel)` so torch.compile can trace the launch; the raw kernel under the interpreter,
    because most torch versions reject interpreted kernels in wrap_triton (pytorch/pytorch#152868)."""
    if INTERPRET:
        _check_interpreter()
        return kernel
    return torch.library.wrap_triton(kernel)


def triton_op(name: str, fake: Callable) -> Callable:
    """Decorator: `torch.library.triton_op(name)` on a launcher-backed function.

    triton_op registers the function itself as its fake, tracing it with FakeTensors through `wrap_triton`.
    Under the interpreter the kernel is launched raw and would run on FakeTensors, so there the op is a
    `custom_op` with the explicit `fake` instead (same outputs, shapes and strides).
    """

    def define(fn: Callable):
        if INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=())

    return define
