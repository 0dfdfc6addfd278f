"""Kernel launches exactly as the model makes them, captured without a GPU (for bench/sm90.py).

The official model runs forward (and backward) on meta tensors with the reference ops, so every shape, stride
and dtype is the model's own at full size, for free. Each call of a Triton-backed op (`rgt.ops._dispatch.Op`)
is recorded with the arguments its fused path would get and then replayed through the op's real launchers on
those meta tensors; the launch of every `triton.jit` function is intercepted (`JITFunction.run`; every config
of an `Autotuner`), so the kernels' arguments, constexprs, warps and stages come from the launchers as they
stand, whatever kernels they launch. The same records give each op call's analytic floor, and
`torch.utils.flop_counter` the whole model's FLOPs (forward, and forward + backward for a training step).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import triton
from rgt.kernels import rg_attn, rwin_attn
from torch.utils.flop_counter import FlopCounterMode
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from rgt import models
from rgt.ops._dispatch import Op

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Workload:
    """One way the model is run: LR input (B, 3, H, W), training (forward + backward) or inference."""

    name: str
    model: str  # "rgt_s" or "rgt"
    B: int
    H: int
    W: int
    train: bool


WORKLOADS = (
    Workload("train-64x64-b8", "rgt_s", 8, 64, 64, True),
    Workload("train-64x64-b32", "rgt_s", 32, 64, 64, True),
    Workload("infer-256x256", "rgt_s", 1, 256, 256, False),
    Workload("infer-250x250", "rgt_s", 1, 250, 250, False),  # windows pad 250 -> 256
    Workload("infer-750x1000", "rgt_s", 1, 750, 1000, False),
    Workload("rgt-train-64x64-b8", "rgt", 8, 64, 64, True),
    Workload("rgt-infer-256x256", "rgt", 1, 256, 256, False),
)


@dataclass
class Launch:
    """One intercepted kernel launch. `args` hold meta tensors (only dtype and alignment matter to the
    compiler); `key` identifies the compiled binary: kernel source, constexprs and options (keyword arguments,
    by value) and the JIT's specialisation inputs (dtypes, 16-byte alignment, ints equal to 1 / divisible by
    16 / past int32)."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    key: str = field(init=False)

    def __post_init__(self):
        const = [p.is_constexpr for p in self.kernel.params]
        spec = [a if c else _spec(a) for a, c in zip(self.args, const, strict=False)], sorted(self.kwargs.items())
        text = f"{triton.__version__}|{self.kernel.cache_key}|{self.name}|{spec}"
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def constexprs(self) -> dict:
        positional = {p.name: a for p, a in zip(self.kernel.params, self.args, strict=False) if p.is_constexpr}
        return positional | {k: v for k, v in self.kwargs.items() if k not in ("num_warps", "num_stages")}


def _spec(a) -> tuple:
    if isinstance(a, torch.Tensor):
        return ("ptr", str(a.dtype).removeprefix("torch."), a.storage_offset() * a.element_size() % 16 == 0)
    if isinstance(a, bool) or a is None or isinstance(a, str):
        return ("const", a)
    if isinstance(a, int):
        return ("int", a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
    if isinstance(a, float):
        return ("fp32",)
    raise TypeError(f"sm90 capture: unsupported kernel argument {type(a).__name__}")


@contextlib.contextmanager
def intercept_launches(sink: list[Launch]) -> Iterator[None]:
    """Record, instead of running, every launch of a `triton.jit` function (each config of an autotuned one).

    `torch.library.wrap_triton` is made the identity meanwhile: the launchers' wrapped kernels would otherwise
    go through a higher-order op, whose meta-tensor path traces but never launches.
    """
    run, tuned, wrap = JITFunction.run, Autotuner.run, torch.library.wrap_triton

    def record(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(self, args, kwargs, tuple(grid) if not callable(grid) else ("callable",)))

    def record_configs(self, *args, grid=None, **kwargs):
        for cfg in self.prune_configs(kwargs):
            self.fn.run(*args, grid=grid, warmup=False, **kwargs, **cfg.all_kwargs())

    JITFunction.run, Autotuner.run, torch.library.wrap_triton = record, record_configs, lambda kernel: kernel
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run, torch.library.wrap_triton = run, tuned, wrap


@dataclass(frozen=True)
class Fused:
    """The fused path of a Triton-backed op through its own launchers, from the arguments `Op.select(...)`
    callers pass: `fwd(*args) -> (out, ...)`, and `bwd(dout, fwd_result, *args)`."""

    fwd: Callable
    bwd: Callable


FUSED = {
    "rgsa_attention": Fused(
        lambda q, k, v, scale: rg_attn.rgsa_attn_fwd(q, k, v, scale),
        lambda do, res, q, k, v, scale: rg_attn.rgsa_attn_bwd(do, q, k, v, *res, scale)),
    "rwin_attention": Fused(
        lambda qkv, table, H, W, split, shift, heads, scale: rwin_attn.rwin_attn_fwd(
            qkv, table, H, W, split, shift, heads, scale),
        lambda do, res, qkv, table, H, W, split, shift, heads, scale: rwin_attn.rwin_attn_bwd(
            do, qkv, table, *res, H, W, split, shift, heads, scale)),
}


@contextlib.contextmanager
def record_ops(calls: list[tuple[str, tuple]]) -> Iterator[None]:
    """Run the reference ops (meta tensors cannot take the fused path) and record each Triton op's arguments."""
    select = Op.select

    def recording(self, mode, x):
        ref = select(self, "reference", x)
        if self.name not in FUSED:
            return ref

        def call(*args):
            calls.append((self.name, args))
            return ref(*args)

        return call

    Op.select = recording
    try:
        yield
    finally:
        Op.select = select


def model_calls(w: Workload, count_flops: bool = False) -> tuple[list[tuple[str, tuple]], dict]:
    """The Triton ops' calls (op name, arguments) of one forward of the model in fp32, on meta tensors, and,
    with `count_flops`, the model's GFLOP: {"forward"} and, for a training workload, {"train_step"} (forward +
    backward). The fp16/bf16 calls are these with the floating tensors retyped (`launches`), as
    `model.to(dtype)` would make them."""
    with torch.device("meta"):
        net = getattr(models, w.model)(4, kernels="reference", check_finite=False)
    net = net.to(device="meta").train(w.train)  # the mask buffers are built on the CPU
    x = torch.empty(w.B, 3, w.H, w.W, device="meta")
    calls: list[tuple[str, tuple]] = []
    flops = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    with record_ops(calls), flops, torch.set_grad_enabled(w.train and count_flops):
        y = net(x)
        if not count_flops:
            return calls, {}
        gflop = {"forward": flops.get_total_flops() / 1e9}
        if w.train:
            y.backward(torch.empty_like(y))
            gflop["train_step"] = flops.get_total_flops() / 1e9
    return calls, gflop


def retype(a, dtype: torch.dtype, device: str | torch.device = "meta"):
    """A tensor like `a` (sizes, strides, storage offset) in `dtype` on `device` (random values off meta) if
    `a` is floating; else `a` itself."""
    if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
        return a
    storage = torch.empty(a.untyped_storage().nbytes() // a.element_size(), dtype=dtype, device=device)
    if storage.device.type != "meta":
        storage.normal_()
    return storage.as_strided(a.size(), a.stride(), a.storage_offset())


def launches(calls: list[tuple[str, tuple]], dtype: str) -> list[tuple[str, str, Launch]]:
    """(op, "fwd" | "bwd", launch) of every kernel the fused ops launch for these calls, in `dtype`."""
    out: list[tuple[str, str, Launch]] = []
    for op, args in calls:
        args = tuple(retype(a.detach() if isinstance(a, torch.Tensor) else a, DTYPES[dtype]) for a in args)
        fwd: list[Launch] = []
        bwd: list[Launch] = []
        with torch.no_grad():
            with intercept_launches(fwd):
                res = FUSED[op].fwd(*args)
            with intercept_launches(bwd):  # autograd hands dout over in the output's layout
                FUSED[op].bwd(torch.empty_like(res[0]), res, *args)
        out += [(op, "fwd", launch) for launch in fwd] + [(op, "bwd", launch) for launch in bwd]
    return out
