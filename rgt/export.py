"""Export an RGT checkpoint to ONNX for ONNX Runtime, TensorRT, vs-mlrt or chaiNNer, and check it.

    python -m rgt.export -m RGT_S_x4.pth -o rgt_s_x4_256.onnx --size 256 256 --verify
    python -m rgt.export -m RGT_S_x4.pth -o rgt_s_x4_256_fp16.onnx --size 256 256 --fp16 --batch 0

The graph takes `input` (N, 3, H, W) RGB float in [0, 1] and returns `output` (N, 3, sH, sW), clamped to
[0, 1] unless --no-clamp (the names chaiNNer and vs-mlrt expect; float16 I/O with --fp16).

Which dimensions may vary: the batch N, with --batch 0 (any N >= 1); the spatial size never. RGT's RG-SA
recursion depth T, L-SA's padding to a multiple of 32 and the shifted-window masks are all computed from H and
W in Python, so the traced graph holds them for the exported H x W only: one file per tile size. ONNX Runtime
rejects any other input size (it checks the declared shape); `rgt.upscale --onnx` cuts images into tiles of
that size. Sizes RGT cannot take (a side < 16 px, or a strip too thin for the recursion) are refused.

The graph is traced on the plain-PyTorch reference ops (`kernels="reference"`), so it holds standard ONNX
operators only (checked after export); the C++ and Triton ops are never traced. The file's metadata_props
hold the architecture, scale, constructor config, tile size, batch, dtype, clamping and versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from rgt.arch import RGT
from rgt.arch.rgsa import MIN_EVAL_SIDE, recursion_depth
from rgt.checkpoint import atomic_write, read_state_dict
from rgt.detect import detect_config, resolve_config
from rgt.inference.onnx_tiles import ort_session
from rgt.inference.tiling import valid_size

__all__ = ["EXPORTERS", "INPUT_NAME", "OUTPUT_NAME", "export_onnx", "verify_onnx"]

INPUT_NAME, OUTPUT_NAME = "input", "output"
# Opsets written as asked and checked against PyTorch (torch 2.13): TorchScript 13, 14, 17, 20; dynamo 18, 20,
# 23. The dynamo exporter (torch.export + onnxscript) silently writes opset 18 when asked for less.
EXPORTERS = {"torchscript": (13, 20), "dynamo": (18, 23)}
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # 17: the first with LayerNormalization (TensorRT >= 8.6)
STANDARD_DOMAINS = ("", "ai.onnx")


class Deployed(nn.Module):
    """The exported function: RGT on a fixed-size batch, then (optionally) a clamp to the image range."""

    def __init__(self, net: RGT, clamp: bool):
        super().__init__()
        self.net, self.clamp = net, clamp

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) in [0, 1] -> (N, C, sH, sW)."""
        y = self.net(x)
        return y.clamp(0, 1) if self.clamp else y


def check_size(H: int, W: int) -> None:
    """Raise ValueError (naming --size) unless RGT takes an H x W input as it is, without padding."""
    if min(H, W) < MIN_EVAL_SIDE:
        raise ValueError(f"--size {H} {W}: both sides must be >= {MIN_EVAL_SIDE} px (spatial size is fixed: "
                         "the recursion depth, padding and masks are traced for one H x W)")
    if valid_size(H, W) != (H, W):
        try:
            recursion_depth(H, W, training=False)
            reason = "RGT cannot take it"
        except ValueError as e:
            reason = str(e)
        raise ValueError(f"--size {H} {W}: {reason}; the smallest valid size containing it is "
                         f"{' '.join(map(str, valid_size(H, W)))}")


def deployable(source: RGT | str | os.PathLike | Mapping, *, fp16: bool = False, clamp: bool = True,
               kernels: str = "reference", **load_args) -> tuple[Deployed, dict]:
    """A copy of the model ready to trace, and its constructor config (for the metadata).

    Args:
        source: an RGT (copied, not changed) or anything `rgt.load_model` reads.
        fp16: cast the weights to float16. kernels: the op path to trace; "reference" traces to plain ONNX.
        **load_args: `model` / `scale` / overrides for `rgt.detect.resolve_config`.
    """
    if isinstance(source, RGT):
        net = copy.deepcopy(source).cpu().float()
        config = detect_config(net.state_dict())
    else:
        sd = read_state_dict(source)
        config = resolve_config(sd, **load_args)
        net = RGT(**config)
        net.load_state_dict(sd, strict=True)
    net.eval().set_kernels(kernels)
    net.check_finite = False  # a data-dependent branch: not traceable, and ONNX users check their own inputs
    return Deployed(net.half() if fp16 else net, clamp), config


def _trace(module: Deployed, x: Tensor, path: str, exporter: str, opset: int, dynamic_batch: bool) -> None:
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with warnings.catch_warnings():
        # Expected: the Python branches on H and W (TracerWarning) are what fixes the size; the TorchScript
        # exporter's deprecation notice is known (it still exists in torch 2.11-2.14 and honours the opset).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX|feature will be removed)",
                                category=DeprecationWarning)
        if exporter == "torchscript":
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(module, (x,), path, dynamo=False, dynamic_axes=axes, **names)
        else:
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=shapes, verbose=False, **names)
            program.save(path, external_data=False)


def _metadata(config: dict, size: tuple[int, int], batch: int, fp16: bool, clamp: bool, exporter: str,
              opset: int) -> dict[str, str]:
    import rgt

    return {
        "architecture": "RGT",
        "scale": str(config["upscale"]),
        "config": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}),
        "tile_size": json.dumps(list(size)),
        "batch": "dynamic" if batch == 0 else str(batch),
        "dtype": "float16" if fp16 else "float32",
        "value_range": "[0, 1]",
        "output_clamped": json.dumps(clamp),
        "exporter": f"torch.onnx ({exporter}), opset {opset}",
        "rgt_version": rgt.__version__,
        "torch_version": torch.__version__,
    }


def export_onnx(
    source: RGT | str | os.PathLike | Mapping,
    path: str | os.PathLike,
    size: tuple[int, int],
    *,
    batch: int = 1,
    fp16: bool = False,
    opset: int | None = None,
    clamp: bool = True,
    exporter: str = "torchscript",
    kernels: str = "reference",
    **load_args,
):
    """Trace an RGT at one input size to an ONNX file, check it, and return the `onnx.ModelProto`.

    Args:
        source: an RGT module or a checkpoint (path or state dict) that `rgt.load_model` reads.
        path: where to write the .onnx file (atomically).
        size: (H, W) of the input: fixed in the graph (see the module docstring), refused if RGT cannot take it.
        batch: fixed batch N >= 1, or 0 for a dynamic batch dimension.
        fp16: float16 weights, input and output. opset: ONNX opset (default 17 torchscript, 18 dynamo).
        clamp: end the graph with a clamp to [0, 1]. exporter: "torchscript" (default) or "dynamo" (needs
            onnxscript). kernels: the op path traced; only paths that trace to standard ONNX ops are accepted.
        **load_args: `model="rgt_s"`, `scale=4` or constructor overrides, as for `rgt.load_model`.

    Raises:
        ValueError: a size, batch, opset or exporter that cannot be exported as asked, or custom ops in the graph.
    """
    import onnx

    H, W = (int(s) for s in size)
    check_size(H, W)
    if batch < 0:
        raise ValueError(f"--batch must be >= 1 (fixed) or 0 (dynamic), got {batch}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {sorted(EXPORTERS)}, got {exporter!r}")
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    lo, hi = EXPORTERS[exporter]
    if not lo <= opset <= hi:
        raise ValueError(f"--opset {opset}: the {exporter} exporter writes opsets {lo} to {hi}")
    module, config = deployable(source, fp16=fp16, clamp=clamp, kernels=kernels, **load_args)
    # A dynamic batch is traced at N = 2: torch.export specialises a size-1 dimension to the constant 1.
    example = torch.rand(batch or 2, config["in_chans"], H, W, dtype=torch.float16 if fp16 else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        traced = os.path.join(tmp, "model.onnx")
        try:
            with torch.no_grad():
                _trace(module, example, traced, exporter, opset, dynamic_batch=batch == 0)
        except torch.onnx.errors.UnsupportedOperatorError as e:  # e.g. rgt::recursive_dwconv_fwd of rgt._C
            first_line = str(e).splitlines()[0]
            raise ValueError(f"kernels={kernels!r}: {first_line} Export with kernels='reference'.") from None
        proto = onnx.load(traced)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ValueError(f"kernels={kernels!r} put non-standard ops in the graph ({', '.join(custom)}); "
                         "export with kernels='reference'")
    onnx.helper.set_model_props(proto, _metadata(config, (H, W), batch, fp16, clamp, exporter, opset))
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return proto


def verify_onnx(path: str | os.PathLike, source: RGT | str | os.PathLike | Mapping, *, seed: int = 0,
                **load_args) -> dict:
    """Run the exported file in ONNX Runtime (CPU) and the PyTorch model on one random input and compare.

    fp32 files: max |ORT - PyTorch fp32| must be <= 1e-4. fp16 files: both ORT and PyTorch run in fp16 are
    measured against PyTorch in float64, and ORT's error must be <= 2x PyTorch fp16's own error (STYLE.md).

    Returns:
        {"max_err", "bound", "ok", "input_shape"}, plus "torch_fp16_err" for fp16 files.
    """
    session = ort_session(path)
    meta = session.get_modelmeta().custom_metadata_map
    inp = session.get_inputs()[0]
    N, C, H, W = (d if isinstance(d, int) else 2 for d in inp.shape)  # a dynamic batch is checked at N = 2
    fp16 = inp.type == "tensor(float16)"
    clamp = json.loads(meta.get("output_clamped", "true"))
    module, _ = deployable(source, clamp=clamp, **load_args)
    x = torch.rand(N, C, H, W, generator=torch.Generator().manual_seed(seed))
    y = torch.from_numpy(session.run(None, {inp.name: x.to(torch.float16 if fp16 else torch.float32).numpy()})[0])
    report = {"input_shape": (N, C, H, W)}
    with torch.no_grad():
        if not fp16:
            report.update(max_err=(y - module(x)).abs().max().item(), bound=1e-4)
        else:
            ref = copy.deepcopy(module).double()(x.double())
            torch_err = (module.half()(x.half()).double() - ref).abs().max().item()
            report.update(max_err=(y.double() - ref).abs().max().item(), bound=2 * torch_err,
                          torch_fp16_err=torch_err)
    report["ok"] = report["max_err"] <= report["bound"]
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rgt.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("-m", "--checkpoint", required=True, help=".pth / .safetensors (official, BasicSR, ours)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .onnx file to write")
    p.add_argument("--size", required=True, type=int, nargs=2, metavar=("H", "W"),
                   help="input (tile) size in px, fixed in the graph: ONNX Runtime rejects any other size")
    p.add_argument("--batch", type=int, default=1, help="fixed batch N, or 0 for a dynamic batch (default 1)")
    p.add_argument("--fp16", action="store_true", help="float16 weights, input and output")
    p.add_argument("--opset", type=int, help="ONNX opset (default 17 torchscript, 18 dynamo)")
    p.add_argument("--exporter", choices=sorted(EXPORTERS), default="torchscript",
                   help="torch.onnx path: torchscript (default) or dynamo (torch.export; needs onnxscript)")
    p.add_argument("--no-clamp", dest="clamp", action="store_false", help="leave the output unclamped")
    p.add_argument("--model", choices=("rgt_s", "rgt"), help="use this preset instead of the detected config")
    p.add_argument("-s", "--scale", type=int, help="check the checkpoint's scale")
    p.add_argument("--verify", action="store_true", help="compare ONNX Runtime (CPU) with PyTorch afterwards")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 0, 1 when --verify finds a difference above its bound, 2 for bad arguments or files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401

        if args.verify or args.exporter == "dynamo":
            import onnxruntime  # noqa: F401
        if args.exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as e:
        parser.error(f"{e.name} is not installed: pip install 'rgt[onnx]' (onnx, onnxruntime, onnxscript)")
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint} not found")
    load_args = dict(model=args.model, scale=args.scale)
    try:
        proto = export_onnx(args.checkpoint, args.output, tuple(args.size), batch=args.batch, fp16=args.fp16,
                            opset=args.opset, clamp=args.clamp, exporter=args.exporter, **load_args)
    except ValueError as e:
        parser.error(str(e))
    meta = {p.key: p.value for p in proto.metadata_props}
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB): x{meta['scale']} RGT, input "
          f"{INPUT_NAME} ({'N' if args.batch == 0 else args.batch}, 3, {args.size[0]}, {args.size[1]}) "
          f"{meta['dtype']}, {meta['exporter']}")
    if not args.verify:
        return 0
    report = verify_onnx(args.output, args.checkpoint, **load_args)
    print(f"verify ({'ok' if report['ok'] else 'FAILED'}): ONNX Runtime CPU vs PyTorch on a random "
          f"{report['input_shape']} input: max abs error {report['max_err']:.2e} (bound {report['bound']:.2e}"
          + (" = 2x PyTorch fp16's error vs float64" if "torch_fp16_err" in report else "") + ")")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
