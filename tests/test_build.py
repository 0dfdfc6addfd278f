"""The compiled extension is part of every install: it loads, registers its library and reports its backends."""

import subprocess
import sys

import torch

from rgt.ops import _ext


def test_extension_loads_and_reports_backends():
    assert _ext.load_error() is None
    expected = "cpu+cuda" if torch.version.cuda else "cpu"
    assert _ext.built_kernels() == expected


def test_info_command_names_the_kernels():
    out = subprocess.run([sys.executable, "-m", "rgt"], capture_output=True, text=True, check=True).stdout
    assert "rgt._C: built with" in out and "torch " + torch.__version__ in out


def test_triton_code_is_namespaced_under_rgt():
    import rgt.kernels

    assert rgt.kernels.__name__ == "rgt.kernels"
    assert "kernels" not in sys.modules
