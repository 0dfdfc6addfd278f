"""`python -m rgt`: what this installation can run (versions, compiled kernels, Triton)."""

import os

import torch

import rgt
from rgt.ops import _ext


def main() -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"rgt {rgt.__version__}  torch {torch.__version__}  triton {triton_version}  GPU {cuda}")
    err = _ext.load_error()
    print(f"C++ extension rgt._C: {'built with ' + _ext.built_kernels() + ' kernels' if err is None else err}")
    triton_where = "CUDA tensors" if cuda != "none" else "nowhere (no GPU)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        triton_where = "CPU tensors via TRITON_INTERPRET=1 (slow; for tests)"
    print(f"Triton kernels run on: {triton_where}")
    print(f"default kernels mode (RGT_KERNELS): {os.environ.get('RGT_KERNELS', 'auto')}")


if __name__ == "__main__":
    main()
