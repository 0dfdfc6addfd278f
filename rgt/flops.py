"""`python -m rgt.flops`: parameters and FLOPs of an RGT model, counted the paper's way.

fvcore counts one multiply-add as one flop, includes the attention matmuls, and charges 5 flops per element
for an affine LayerNorm; element-wise ops (GELU, softmax, adds) are free. The paper's Table 1 / 3 figures
(RGT-S x4 193.08 G, RGT x4 251.07 G at a 3 x 128 x 128 LR input) are reproduced exactly this way.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections import defaultdict

import torch

from rgt import models
from rgt.arch import RGT
from rgt.arch.lsa import L_SA
from rgt.arch.rgsa import RG_SA


def count(model: torch.nn.Module, height: int, width: int) -> dict:
    """{'params', 'gflops', 'groups': {name: gflops}} for one (1, in_chans, height, width) input."""
    model.eval()
    x = torch.rand(1, model.in_chans, height, width)
    # fvcore scripts helpers with torch.jit, deprecated in recent torch: that warning is fvcore's, not the
    # user's, to act on. The trace runs the model once: without no_grad it keeps ~13 GB of activations.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")  # torch 2.14: a FutureWarning
        try:
            from fvcore.nn import FlopCountAnalysis
        except ImportError as exc:
            raise SystemExit("FLOP counting needs fvcore: pip install 'rgt[flops]'") from exc
        analysis = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        per_module = analysis.by_module()
        total = analysis.total()
    groups: dict[str, float] = defaultdict(float)
    for name, module in model.named_modules():
        if isinstance(module, L_SA):
            groups["L-SA attention"] += per_module[name]
        elif isinstance(module, RG_SA):
            groups["RG-SA attention"] += per_module[name]
        elif name.endswith(".mlp"):
            groups["MLP"] += per_module[name]
        elif "." not in name and name:  # top-level children
            groups[name] += per_module[name]
    attn_mlp = groups["L-SA attention"] + groups["RG-SA attention"] + groups["MLP"]
    groups["layers (norms, group convs)"] = groups.pop("layers") - attn_mlp
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": total / 1e9,
        "groups": {k: v / 1e9 for k, v in groups.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rgt.flops", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(models.CONFIGS), default="rgt_s")
    parser.add_argument("--scale", type=int, choices=models.SCALES, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
                        help="LR input size (default: the paper's 128 x 128, i.e. 512 x 512 output at x4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    model = models.config(args.model, args.scale)
    net = RGT(**model, kernels="reference", check_finite=False)
    result = {"model": args.model, "scale": args.scale, "input": [3, *args.size], **count(net, *args.size)}
    if args.json:
        print(json.dumps(result))
        return
    h, w = args.size
    print(f"{args.model} x{args.scale}: {result['params']:,} parameters, {result['gflops']:.2f} GFLOPs "
          f"(fvcore, 1 multiply-add = 1 flop) at 3x{h}x{w} input / 3x{h * args.scale}x{w * args.scale} output")
    for name, g in sorted(result["groups"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<28} {g:9.2f} G  {100 * g / result['gflops']:5.1f}%")


if __name__ == "__main__":
    main()
