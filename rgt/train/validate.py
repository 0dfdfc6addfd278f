"""Validation as in the paper: PSNR/SSIM on rounded 8-bit outputs, Y channel, `crop_border` = scale, each
against plain bicubic upsampling of the same LR image (MATLAB-exact `imresize`) as a baseline."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from rgt.data import imresize
from rgt.metrics import psnr_torch, ssim_torch
from rgt.train.dataset import SRDataset, degrade

_FUNCS = {"calculate_psnr": psnr_torch, "calculate_ssim": ssim_torch}


@torch.no_grad()
def validate(net: nn.Module, sets: dict[str, SRDataset], metrics: dict[str, dict], scale: int,
             device: torch.device) -> dict[str, dict[str, float]]:
    """{set name: {metric: mean, metric + '_bicubic': mean}}, one whole image at a time, in eval mode."""
    was_training = net.training
    net.eval()
    results = {}
    for set_name, ds in sets.items():
        sums: dict[str, float] = defaultdict(float)
        for i in range(len(ds)):
            item = ds[i]
            gt = item["gt"][None].to(device)
            lq = item["lq"][None].to(device) if "lq" in item else degrade(gt, scale)  # HR only, on the device
            sr = net(lq).float().clamp(0, 1)
            bicubic = imresize(lq.double(), scale).float().clamp(0, 1)
            for name, m in metrics.items():
                fn, crop = _FUNCS[m["type"]], scale if m["crop_border"] is None else int(m["crop_border"])
                y = bool(m["test_y_channel"])
                sums[name] += fn(sr, gt, crop, y).item()
                sums[f"{name}_bicubic"] += fn(bicubic, gt, crop, y).item()
        results[set_name] = {k: v / len(ds) for k, v in sums.items()}
    net.train(was_training)
    return results


def format_metrics(values: dict[str, float]) -> str:
    """'psnr 30.12 (bicubic 29.01, +1.11)  ssim 0.8812 (bicubic 0.8601, +0.0211)'."""
    parts = []
    for name, v in values.items():
        if name.endswith("_bicubic"):
            continue
        base = values.get(f"{name}_bicubic")
        digits = 2 if "psnr" in name else 4
        extra = f" (bicubic {base:.{digits}f}, {v - base:+.{digits}f})" if base is not None else ""
        parts.append(f"{name} {v:.{digits}f}{extra}")
    return "  ".join(parts)
