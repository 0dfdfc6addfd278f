"""Exponential moving average of the weights (BasicSR's `net_g_ema`, saved as `params_ema`)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of the model whose parameters follow `ema = decay * ema + (1 - decay) * w` after each
    optimizer step; buffers are copied as they are (BasicSR's rule). Keep it unwrapped (no DDP/compile)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(params[name].detach(), 1.0 - self.decay)  # p + (1 - d) (w - p) = d p + (1 - d) w
        buffers = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(buffers[name])
