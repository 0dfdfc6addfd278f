"""The compiled extension is part of every install: it loads, registers its library and reports its backends."""

import subprocess
import sys

import torch

from rgt import _build_info
from rgt.ops import _ext


def test_extension_loads_and_reports_backends():
    """The binary has the kernels setup.py built (CUDA ones only with a CUDA torch and toolkit, and without
    RGT_NO_CUDA=1); CI's CUDA stage checks that they are there with `.ci/smoke.py --kernels cpu+cuda`."""
    assert _ext.load_error() is None
    assert _ext.built_kernels() == _build_info.KERNELS
    if not torch.version.cuda:
        assert _build_info.KERNELS == "cpu"


def test_info_command_names_the_kernels():
    out = subprocess.run([sys.executable, "-m", "rgt"], capture_output=True, text=True, check=True).stdout
    assert "rgt._C: built with" in out and "torch " + torch.__version__ in out


def test_triton_code_is_namespaced_under_rgt():
    import rgt.kernels

    assert rgt.kernels.__name__ == "rgt.kernels"
    assert "kernels" not in sys.modules
