"""Compile captured launches for sm_90 on a machine without a GPU, and read what the compiler decided.

Each launch is compiled through Triton's own JIT path (`kernel.warmup(...)`, so the specialisation, options
and passes are exactly a GPU run's) with the active driver replaced by one that reports
`GPUTarget("cuda", 90, 32)`. Triton runs its bundled ptxas with `-v`; its log gives registers, stack and
spills per thread. `cuobjdump -sass` of the cubin counts the tensor-core instructions (HMMA: mma.sync, HGMMA:
wgmma), the TTGIR tells how each `tt.dot` was lowered, and the metadata the shared memory per block.

Compiles run in worker processes (forked, each with a fresh Triton cache, so compile times are real) and
are cached as JSON keyed by `Launch.key` (Triton version, kernel source with its dependencies, constexprs,
options and the argument specialisation), so an unchanged kernel is not compiled again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

SM90_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (cudaFuncSetAttribute max)


def job(launch) -> dict:
    """A picklable description of a `_sm90_capture.Launch`: kernel by module and name, tensors as dtypes."""
    def arg(a):
        if hasattr(a, "data_ptr"):
            return {"dtype": str(a.dtype).removeprefix("torch."), "offset": a.storage_offset() * a.element_size()}
        return a

    return {"key": launch.key, "module": launch.kernel.fn.__module__, "name": launch.name,
            "args": [arg(a) for a in launch.args], "kwargs": launch.kwargs}


class _Sm90Driver:
    """The part of a Triton driver that `JITFunction.run(warmup=True)` asks for, answering sm_90."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


def _init_worker() -> None:
    import triton
    from triton.runtime import driver

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rgt-sm90-triton-")
    triton.knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
    driver.set_active(_Sm90Driver())
    # Triton 3.9 warns that its FP-fusion default will change; the report keeps the default a user gets.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _pointer(spec: dict):
    import torch
    from triton.runtime.jit import MockTensor

    class Pointer(MockTensor):  # what the JIT specialises a tensor on: dtype and 16-byte alignment
        def data_ptr(self) -> int:
            return spec["offset"]

    return Pointer(getattr(torch, spec["dtype"]))


def _ptxas_report(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not frame:
        raise RuntimeError(f"no ptxas -v report in the compile log: {log[-500:]!r}")
    stack, st, ld = (int(g) for g in frame.groups())
    return {"registers": int(regs.group(1)), "stack_bytes": stack, "spill_store_bytes": st, "spill_load_bytes": ld}


def _dot_lowering(ttgir: str) -> dict:
    """How each dot of the kernel was lowered: wgmma (warp_group_dot), mma.sync (tt.dot to an #mma layout) or
    FMA (tt.dot to a blocked layout: CUDA cores, as IEEE fp32 asks)."""
    wgmma = len(re.findall(r"= ttng\.warp_group_dot ", ttgir))
    dots = [line.split("->")[-1] for line in ttgir.splitlines() if re.search(r"= tt\.dot ", line)]
    mma = sum("#mma" in d for d in dots)
    return {"dots_wgmma": wgmma, "dots_mma": mma, "dots_fma": len(dots) - mma}


def _sass_counts(cubin: bytes) -> dict:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, flags=re.M)
    return {"sass_instructions": len(ops), "hmma": ops.count("HMMA"), "hgmma": ops.count("HGMMA")}


def compile_job(j: dict) -> dict:
    """Compile one job for sm_90 and report on it (in a worker set up by `_init_worker`)."""
    kernel = getattr(importlib.import_module(j["module"]), j["name"])
    args = [_pointer(a) if isinstance(a, dict) else a for a in j["args"]]
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.warmup(*args, grid=(1,), **j["kwargs"])
    except Exception as exc:  # a variant that does not compile is a result, not the end of the report
        return {"key": j["key"], "compiled": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    seconds = time.perf_counter() - t0
    return {"key": j["key"], "compiled": True, "compile_s": round(seconds, 2),
            "shared_bytes": compiled.metadata.shared, **_ptxas_report(log.getvalue()),
            **_dot_lowering(compiled.asm["ttgir"]), **_sass_counts(compiled.asm["cubin"])}


def default_cache_dir() -> Path:
    return Path(os.environ.get("RGT_SM90_CACHE", Path.home() / ".cache" / "rgt" / "sm90"))


def compile_all(jobs: list[dict], workers: int, cache: Path | None) -> dict[str, dict]:
    """{key: report} for every job, from the cache where present, else compiled by `workers` processes."""
    reports: dict[str, dict] = {}
    todo = []
    for j in jobs:
        hit = cache / f"{j['key']}.json" if cache else None
        if hit and hit.exists():
            reports[j["key"]] = {**json.loads(hit.read_text()), "cached": True}
        else:
            todo.append(j)
    if todo:
        ctx = multiprocessing.get_context("fork")  # as DataLoader workers: spawn would re-import the script
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            for r in pool.map(compile_job, todo):
                reports[r["key"]] = {**r, "cached": False}
                if cache and r["compiled"]:
                    cache.mkdir(parents=True, exist_ok=True)
                    (cache / f"{r['key']}.json").write_text(json.dumps(r) + "\n")
    return reports
