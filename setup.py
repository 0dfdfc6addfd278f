"""Build of the `rgt._C` extension (recursive depthwise stride convolution and friends).

Always builds the CPU kernels (`csrc/*.cpp`, `csrc/cpu/*.cpp`); adds the CUDA kernels (`csrc/cuda/*.cu`) when the
installed torch was built with CUDA and a CUDA toolkit is found. It never probes for a GPU, so a GPU-less build host
still produces CUDA kernels for the architectures in TORCH_CUDA_ARCH_LIST (default "9.0" there).

The C++ standard and the ABI flags are the ones the installed torch asks for (torch 2.13+ compiles extensions as
C++20, its headers need it): nothing here pins a language standard.

Environment: RGT_NO_CUDA=1 forces a CPU-only build; DEBUG=1 builds with -O0 -g.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

SUPPORTED = ((2, 11), (2, 14))  # torch releases, also in pyproject.toml and README.md
INSTALL_HINT = 'pip install "torch>=2.11,<2.15", then pip install --no-build-isolation -e .'
try:
    import torch
except ModuleNotFoundError:
    sys.exit(f"rgt: PyTorch is needed to build rgt (its C++ extension compiles against your torch): {INSTALL_HINT}")
if not SUPPORTED[0] <= tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) <= SUPPORTED[1]:
    sys.exit(f"rgt: torch {torch.__version__} is outside the supported 2.11 to 2.14: {INSTALL_HINT}")


def _cuda_toolkit() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, or above the nvcc on PATH, the first that
    has include/cuda_runtime.h. torch guesses from the nvcc on PATH alone, which is wrong when that nvcc is a
    wrapper script (/usr/local/bin/nvcc gives /usr/local, where the link then finds no libcudart)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    return next((c for c in candidates if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h"))), None)


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if (_toolkit := _cuda_toolkit()) is not None:
    os.environ["CUDA_HOME"] = _toolkit
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    want_cuda = os.environ.get("RGT_NO_CUDA", "0") != "1"
    with_cuda = want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # ATen's parallel_for is an inline OpenMP region in the torch headers: without -fopenmp it runs serially.
    cxx = [*opt, "-fopenmp"]
    sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    kwargs = {"include_dirs": [os.path.join(ROOT, "csrc")], "extra_link_args": ["-fopenmp"]}
    if with_cuda and _sources("cuda/*.cu"):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += _sources("cuda/*.cu")
        nvcc = [*opt, "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(
            "rgt._C", sources, define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs,
        )
        built = "cpu+cuda"
    else:
        ext = CppExtension("rgt._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
        built = "cpu"
    print(f"rgt: building rgt._C with {built} kernels (torch {torch.__version__}, CUDA "
          f"{torch.version.cuda or 'none'}, CUDA_HOME {CUDA_HOME or 'none'}, debug={debug})")
    print("rgt: sources: " + " ".join(sources))
    with open(os.path.join(ROOT, "rgt", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py: what rgt._C was built against."""\n\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\nCUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"KERNELS = {built!r}\n")
    return ext


# Data folders are listed as (namespace) packages: setuptools warns about data it finds in unlisted folders.
ASSET_DIRS = ["rgt.assets", "rgt.assets.images", "rgt.assets.images.train", "rgt.assets.images.val"]

setup(
    packages=["rgt", "rgt.arch", "rgt.data", "rgt.inference", "rgt.ops", "rgt.train", "rgt.kernels", *ASSET_DIRS],
    package_dir={"rgt.kernels": "kernels"},
    # The quickstart's options and bundled photographs (python -m rgt.train).
    package_data={"rgt.assets": ["*.yml"], "rgt.assets.images": ["README.md"],
                  "rgt.assets.images.train": ["*.png"], "rgt.assets.images.val": ["*.png"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
